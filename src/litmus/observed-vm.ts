import { GlobalWord, slotLogsDirtyPages, type VmLayout } from '../host/layout.ts';
import type { Memslot } from '../host/memslot.ts';
import { type KernelBugs, Vm } from '../host/vm.ts';

/** Where mark_page_dirty_in_slot put a page: a vCPU's ring, the slot's bitmap, or nowhere (lost). */
export type LogEvent =
  | { where: 'ring'; gfn: number; slot: Memslot; vcpu: number; entry: number; softFull: boolean }
  | { where: 'bitmap'; gfn: number; slot: Memslot }
  | { where: 'lost'; gfn: number; slot: Memslot };

export interface VmObserver {
  /** A write-protect fault on vCPU `vcpu`, before KVM handles it. */
  fault(vcpu: number, slot: Memslot, page: number): void;
  /** mark_page_dirty_in_slot on a slot that logs dirty pages, after it ran. */
  logged(e: LogEvent): void;
}

/**
 * The VM with two observation points for the litmus runner: write-protect faults and
 * mark_page_dirty_in_slot. It changes no behaviour: each override calls the real method
 * and reports what it did, judged from its effects on the ring, the bitmap and KVM's
 * lost-write counter.
 */
export class ObservedVm extends Vm {
  observer: VmObserver | null = null;

  constructor(layout: VmLayout, bugs: KernelBugs = {}) {
    super(layout, bugs);
  }

  override handleWriteFault(vcpu: number, slot: Memslot, page: number): boolean {
    this.observer?.fault(vcpu, slot, page);
    return super.handleWriteFault(vcpu, slot, page);
  }

  override markPageDirtyInSlot(slot: Memslot, page: number, vcpu: number): boolean {
    const logging = slotLogsDirtyPages(this.flags(slot));
    const ring = vcpu >= 0 ? this.rings?.[vcpu] : undefined;
    const dirtyBefore = ring?.dirtyIndex ?? 0;
    const lostBefore = Atomics.load(this.global, GlobalWord.LOST_HOST_WRITES);
    const softFull = super.markPageDirtyInSlot(slot, page, vcpu);
    if (logging && this.observer) {
      const gfn = slot.baseGfn + page;
      if (ring !== undefined && ring.dirtyIndex !== dirtyBefore) {
        this.observer.logged({ where: 'ring', gfn, slot, vcpu, entry: dirtyBefore, softFull: ring.softFull() });
      } else if (Atomics.load(this.global, GlobalWord.LOST_HOST_WRITES) !== lostBefore) {
        this.observer.logged({ where: 'lost', gfn, slot });
      } else if (this.bitmaps[slot.index]!.isDirty(page)) {
        this.observer.logged({ where: 'bitmap', gfn, slot });
      }
    }
    return softFull;
  }
}
