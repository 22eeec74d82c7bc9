import type { PageBitmap } from '../dirty-bitmap.ts';
import { Acted } from '../injections.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import type { DirtySource, SourceTally } from './dirty-source.ts';
import { DirtyRingHarvester } from './ring-harvester.ts';

export const KVM_RINGS = 'the vCPUs\' dirty rings';
export const KVM_BACKUP_BITMAP = 'the ring\'s backup bitmap';

export interface KvmRingSourceOptions {
  /** harvest-skips-entry: every Nth entry is marked collected without being recorded (0: never). */
  harvestSkipEvery?: number;
  /** copy-before-reset: KVM_RESET_DIRTY_RINGS only at settle(), after the harvested pages were copied. */
  deferReset?: boolean;
}

/**
 * KVM's dirty ring as userspace reads it (QEMU's kvm_dirty_ring_reap, the selftest's
 * dirty_ring_collect_dirty_pages): harvest every vCPU's ring in order, then
 * KVM_RESET_DIRTY_RINGS re-protects what was harvested; on the final sync, with the VM
 * stopped, also the backup bitmap (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: KVM_GET_DIRTY_LOG,
 * last, as api.rst requires).
 */
export class KvmRingSource implements DirtySource {
  readonly name = KVM_RINGS;
  readonly dma = false;
  readonly harvester: DirtyRingHarvester;
  /** Entries the last sync harvested, and KVM_RESET_DIRTY_RINGS reset (they must be equal). */
  lastHarvested = 0;
  lastReset = 0;
  private pendingReset = false;
  private copiedBeforeReset = 0;
  private readonly scratch: Uint32Array[];

  constructor(readonly vm: Vm, private readonly o: KvmRingSourceOptions = {}) {
    this.harvester = new DirtyRingHarvester(vm.rings!.length, vm.acts);
    this.scratch = vm.memory.slots.map((s) => new Uint32Array(s.dirtyBitmap.length));
  }

  *start(): Steps {
    for (const slot of this.vm.memory.slots) yield* this.vm.enableDirtyLogging(slot);
  }

  *sync(into: PageBitmap, final: boolean, tally?: SourceTally): Steps<number> {
    const vm = this.vm;
    const rings = vm.rings!;
    const skip = this.o.harvestSkipEvery ?? 0;
    let harvested = 0;
    let before = tally ? into.count() : 0;
    if (this.o.deferReset && !final) {
      // The bug: harvest now, reset (re-protect) only after the pages were copied.
      yield* this.settle();
      for (const ring of rings) harvested += this.harvester.harvest(ring, ring.entries, this.recorder(into, ring.vcpu), skip);
      this.pendingReset = true;
      yield undefined;
      this.lastHarvested = harvested;
      this.lastReset = harvested;
      tally?.(KVM_RINGS, into.count() - before);
      return harvested;
    }
    for (const ring of rings) {
      harvested += this.harvester.harvest(ring, ring.entries, this.recorder(into, ring.vcpu), skip);
      yield undefined;
    }
    this.lastReset = yield* vm.resetDirtyRings();
    this.lastHarvested = harvested;
    if (tally) { const now = into.count(); tally(KVM_RINGS, now - before); before = now; }
    if (final && vm.hasBackupBitmap) {
      for (const slot of vm.memory.slots) into.orWords(yield* vm.getDirtyLog(slot, this.scratch[slot.index]), slot.firstPage);
      tally?.(KVM_BACKUP_BITMAP, into.count() - before);
    }
    return harvested;
  }

  /** copy-before-reset: the pages copied while a reset is pending are what the bug exposes. */
  *afterCopy(pages: number): Steps {
    if (this.pendingReset) this.copiedBeforeReset += pages;
  }

  *settle(): Steps {
    if (!this.pendingReset) return;
    if (this.copiedBeforeReset > 0) this.vm.acts.acted(Acted.COPY_BEFORE_RESET);
    this.copiedBeforeReset = 0;
    yield* this.vm.resetDirtyRings();
    this.pendingReset = false;
  }

  /** Logging off (QEMU's log_global_stop: KVM_MEM_LOG_DIRTY_PAGES cleared on every slot). */
  stop(): void {
    for (const slot of this.vm.memory.slots) this.vm.disableDirtyLogging(slot);
  }

  /** The harvest callback for vCPU `vcpu`'s ring: records each entry's page in `into` (and its history). */
  private recorder(into: PageBitmap, vcpu: number): (slotField: number, offset: number) => void {
    const mem = this.vm.memory;
    const trace = this.vm.tracepoints;
    return (slotField, offset) => {
      const slot = mem.slotByField(slotField);
      if (slot === undefined || offset >= slot.pages) return;
      into.mark(slot.firstPage + offset);
      trace.active?.harvested(slot, offset, 1, 0, vcpu);
    };
  }
}
