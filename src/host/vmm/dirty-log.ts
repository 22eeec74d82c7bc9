import type { PageBitmap } from '../dirty-bitmap.ts';
import type { DirtyTracking } from '../layout.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import type { DirtySource, DirtySourceStats, SourceTally } from './dirty-source.ts';
import { dmaDirtySourcesFor } from './dma-dirty-sources.ts';
import { KvmBitmapSource, KvmClearLogSource } from './kvm-bitmap-source.ts';
import { KvmRingSource } from './kvm-ring-source.ts';
import { VmmDirtySource } from './vmm-dirty-source.ts';

/** How userspace tracks dirty pages with KVM: legacy GET, GET + CLEAR (manual protect), or the dirty ring. */
export type TrackingMode = 'dirty-log' | 'clear-log' | 'dirty-ring';
export const MODES: readonly TrackingMode[] = ['dirty-log', 'clear-log', 'dirty-ring'];

/**
 * The KVM capabilities a mode asks for (the one place a mode becomes a VM's tracking):
 * the ring with its backup bitmap when KVM will write guest memory with no running vCPU
 * (unless no-backup-bitmap leaves it out), or the bitmap, with manual protect (and,
 * for the selftests, KVM_DIRTY_LOG_INITIALLY_SET) for clear-log.
 */
export function trackingFor(mode: TrackingMode, o: { ringEntries: number; hostWrites: boolean; noBackupBitmap?: boolean; initiallySet?: boolean }): DirtyTracking {
  return mode === 'dirty-ring'
    ? { kind: 'ring', entries: o.ringEntries, withBitmap: o.hostWrites && o.noBackupBitmap !== true }
    : { kind: 'bitmap', manualProtect: mode === 'clear-log', initiallySet: mode === 'clear-log' && o.initiallySet === true };
}

export interface DirtyLogOptions {
  /** Manual protect: CLEAR each chunk just before it is copied (a migration), else each slot after its GET. */
  clearPerChunk: boolean;
  /** harvest-skips-entry: the ring harvest drops every Nth entry (0: never). */
  harvestSkipEvery?: number;
  /** copy-before-reset: the ring source defers KVM_RESET_DIRTY_RINGS until after the copy. */
  deferRingReset?: boolean;
  /** copy-before-clear: the clear-log source CLEARs a chunk only after it was copied. */
  clearAfterCopy?: boolean;
}

/**
 * Every dirty log of a VM as one: KVM's (by its tracking) then the DMA sources its
 * devices need (QEMU's memory listeners' log_sync; Firecracker's dump_dirty ORs KVM's
 * log with its own). A sync ORs them all into one bitmap and counts per source.
 */
export class DirtyLog {
  readonly sources: readonly DirtySource[];
  private readonly counts: DirtySourceStats[];
  /** KVM's ring source, when the VM has rings. */
  readonly ring: KvmRingSource | null;
  syncs = 0;

  constructor(readonly vm: Vm, o: DirtyLogOptions) {
    const t = vm.tracking;
    const kvm: DirtySource = t.kind === 'ring'
      ? new KvmRingSource(vm, { harvestSkipEvery: o.harvestSkipEvery, deferReset: o.deferRingReset })
      : t.manualProtect ? new KvmClearLogSource(vm, { perChunk: o.clearPerChunk, clearAfterCopy: o.clearAfterCopy }) : new KvmBitmapSource(vm);
    this.ring = kvm instanceof KvmRingSource ? kvm : null;
    this.sources = [kvm, ...(VmmDirtySource.needed(vm) ? [new VmmDirtySource(vm)] : []), ...(vm.iommu ? dmaDirtySourcesFor(vm.iommu) : [])];
    this.counts = this.sources.map((s) => ({ source: s.name, syncs: 0, pagesReported: 0 }));
  }

  /** Logging on, KVM's first (log_global_start). */
  *start(): Steps { for (const s of this.sources) yield* s.start(); }

  /** Logging off (log_global_stop). */
  stop(): void { for (const s of this.sources) s.stop(); }

  /** One sync: every source into `into`; `final`: the VM is stopped. Returns the pages reported in all. */
  *sync(into: PageBitmap, final: boolean, tally?: SourceTally): Steps<number> {
    this.syncs++;
    let total = 0;
    for (let i = 0; i < this.sources.length; i++) {
      const n: number = yield* this.sources[i]!.sync(into, final, tally);
      this.counts[i]!.syncs++;
      this.counts[i]!.pagesReported += n;
      total += n;
    }
    return total;
  }

  *beforeCopy(slot: Memslot, page: number, dirty: PageBitmap): Steps { for (const s of this.sources) if (s.beforeCopy) yield* s.beforeCopy(slot, page, dirty); }
  *afterCopy(pages: number): Steps { for (const s of this.sources) if (s.afterCopy) yield* s.afterCopy(pages); }
  *afterSlot(slot: Memslot): Steps { for (const s of this.sources) if (s.afterSlot) yield* s.afterSlot(slot); }
  *settle(): Steps { for (const s of this.sources) if (s.settle) yield* s.settle(); }

  stats(): DirtySourceStats[] { return this.counts.map((c) => ({ ...c })); }
  /** The DMA sources' counts (what a migration reports per device source). */
  dmaStats(): DirtySourceStats[] { return this.counts.filter((_, i) => this.sources[i]!.dma).map((c) => ({ ...c })); }
}
