import type { PageBitmap } from '../dirty-bitmap.ts';
import { DirtyRingHarvester } from './ring-harvester.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import { PageEvent } from '../page-history.ts';
import { DmaDirtySync } from './dma-dirty-sources.ts';

/** Called with each source's name and the pages it newly added to the bitmap (a sync's breakdown). */
export type SourceTally = (source: string, newPages: number) => void;

/** Names of KVM's sources in a tally. */
export const KVM_RINGS = 'the vCPUs\' dirty rings';
export const KVM_BACKUP_BITMAP = 'the ring\'s backup bitmap';
export const KVM_DIRTY_BITMAP = 'KVM_GET_DIRTY_LOG';

export interface SyncResult {
  /** Ring entries harvested, and reset by KVM_RESET_DIRTY_RINGS (they must be equal). */
  harvested: number;
  reset: number;
}

/**
 * Userspace's side of dirty logging: pull KVM's log into a bitmap of VM-wide page
 * numbers, the way QEMU's kvm_dirty_ring_reap / kvm_physical_sync_dirty_bitmap and the
 * selftests' collectors do. Ring: harvest every vCPU's ring in order, then
 * KVM_RESET_DIRTY_RINGS; the backup bitmap last, with the VM stopped. Bitmap: GET, and
 * with manual protect either CLEAR the whole slot now or leave clearing to the caller
 * (QEMU clears each 64-page chunk just before sending it).
 */
export class DirtyLogSync {
  readonly harvester: DirtyRingHarvester | null;
  /** DMA dirty sources read with KVM's log at every sync, when the VM has an IOMMU. */
  readonly dma: DmaDirtySync | null;
  private readonly scratch: Uint32Array[];
  syncs = 0;

  constructor(readonly vm: Vm, private readonly harvestSkipEvery = 0) {
    this.harvester = vm.rings ? new DirtyRingHarvester(vm.rings.length, vm.acts) : null;
    this.dma = vm.iommu ? new DmaDirtySync(vm.iommu) : null;
    this.scratch = vm.memory.slots.map((s) => new Uint32Array(s.dirtyBitmap.length));
  }

  /**
   * One sync into `into`: KVM's log, then the DMA sources. `final`: the VM is stopped,
   * also collect the ring's backup bitmap (last). `clearNow`: with manual protect, CLEAR what GET returned (whole slot).
   */
  *sync(into: PageBitmap, final: boolean, clearNow = true, tally?: SourceTally): Steps<SyncResult> {
    this.syncs++;
    const vm = this.vm;
    const mem = vm.memory;
    let before = tally ? into.count() : 0;
    const counted = (source: string): void => {
      if (!tally) return;
      const now = into.count();
      tally(source, now - before);
      before = now;
    };
    if (vm.rings && this.harvester) {
      let harvested = 0;
      for (const ring of vm.rings) {
        harvested += this.harvester.harvest(ring, ring.entries, this.recorder(into, ring.vcpu), this.harvestSkipEvery);
        yield undefined;
      }
      const reset: number = yield* vm.resetDirtyRings();
      counted(KVM_RINGS);
      if (this.dma) yield* this.dma.sync(into, tally);
      if (tally) before = into.count();
      if (final && vm.hasBackupBitmap) {
        for (const slot of mem.slots) into.orWords(yield* vm.getDirtyLog(slot, this.scratch[slot.index]), slot.firstPage);
        counted(KVM_BACKUP_BITMAP);
      }
      return { harvested, reset };
    }
    for (const slot of mem.slots) {
      const bitmap: Uint32Array = yield* vm.getDirtyLog(slot, this.scratch[slot.index]);
      if (vm.manualProtect && clearNow) yield* vm.clearDirtyLog(slot, 0, slot.pages, bitmap);
      into.orWords(bitmap, slot.firstPage);
    }
    counted(KVM_DIRTY_BITMAP);
    if (this.dma) yield* this.dma.sync(into, tally);
    return { harvested: 0, reset: 0 };
  }

  /** The harvest callback for vCPU `vcpu`'s ring: records each entry's page in `into` (and its history). */
  recorder(into: PageBitmap, vcpu: number): (slotField: number, offset: number) => void {
    const mem = this.vm.memory;
    const h = this.vm.history;
    return (slotField, offset) => {
      const slot = mem.slotByField(slotField);
      if (slot === undefined || offset >= slot.pages) return;
      into.mark(slot.firstPage + offset);
      if (h !== null) h.record(slot.firstPage + offset, PageEvent.HARVESTED, vcpu);
    };
  }

  /**
   * KVM_CLEAR_DIRTY_LOG for the 64-page chunk holding `page` (slot-relative), with the
   * bits `dirty` (VM-wide) has there: QEMU's per-chunk clear just before sending.
   */
  *clearChunk(slot: Memslot, page: number, dirty: PageBitmap): Steps<number> {
    const c = chunkOf(slot, page, dirty);
    return yield* this.vm.clearDirtyLog(slot, c.first, c.num, c.bits);
  }
}

/** A 64-page CLEAR range: its slot-relative first page, length, and the bits to clear. */
export interface ClearChunk { slot: Memslot; first: number; num: number; bits: Uint32Array }

/** The 64-page chunk holding `page` (slot-relative), with the bits `dirty` (VM-wide) has set there now. */
export function chunkOf(slot: Memslot, page: number, dirty: PageBitmap): ClearChunk {
  const first = page - (page % 64);
  const g = slot.firstPage + first; // 64-aligned in the VM-wide numbering
  return { slot, first, num: Math.min(64, slot.pages - first), bits: new Uint32Array([dirty.words[g >>> 5]!, dirty.words[(g >>> 5) + 1] ?? 0]) };
}
