import type { Memslot } from './memslot.ts';

/**
 * The VM's tracepoints: where KVM and the VMM say what they did to a guest page, as
 * KVM's tracepoints do (include/trace/events/kvm.h: kvm_dirty_ring_push,
 * kvm_dirty_ring_reset; arch/x86/kvm/mmu/mmutrace.h: fast_page_fault) and QEMU's trace
 * events (accel/kvm/trace-events: kvm_dirty_ring_page; migration/trace-events:
 * ram_save_page). Page history records through them; litmus and explain observe
 * through them, instead of subclassing the VM or reading the history's text.
 *
 * They report what the code did, in its own terms: an injected bug that skips a step
 * skips its tracepoint too (clear-without-protect reports no write-protect), so an
 * observer that must see effects whatever did them (a stale TLB entry's store) still
 * reads the page. The guest's own stores have no tracepoint: a store through a writable
 * TLB entry is the steady-state write path.
 *
 * Pages are memslot-relative; a tracepoint fires on the thread that acted (each thread
 * has its own Vm view and its own tracers).
 */
export interface VmTracepoints {
  /** A write-protect fault on vCPU `vcpu` (kvm_page_fault with PFERR_WRITE), before KVM handles it. */
  writeFault(vcpu: number, slot: Memslot, page: number): void;
  /** mark_page_dirty_in_slot on a slot that logs dirty pages, after it ran: where the page went. */
  pageDirtied(e: PageDirtied): void;
  /** kvm_write_guest stored into the page, and how it was logged. */
  hostWrite(slot: Memslot, page: number, how: HostWriteLog): void;
  /** An ioctl write-protected the pages of a 64-bit mask (two 32-bit halves) from `page`. */
  writeProtected(slot: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void;
  /** Enabling dirty logging write-protected `count` pages from `page`. */
  writeProtectedRange(slot: Memslot, page: number, count: number, by: ProtectBy): void;
  /**
   * Userspace collected the pages of a mask from `page`: ring entries of vCPU `from`
   * (QEMU's kvm_dirty_ring_page), or bits KVM_GET_DIRTY_LOG returned (HARVEST_BITMAP).
   */
  harvested(slot: Memslot, page: number, lo: number, hi: number, from: number): void;
  /** The migration thread put `pages` into the stream (ram_save_page), in pass `stage` or at completion. */
  copied(slot: Memslot, pages: ArrayLike<number>, stage: number): void;
}

/** Where mark_page_dirty_in_slot put a page: a vCPU's ring, the slot's bitmap, or nowhere (lost). */
export type PageDirtied =
  | { where: 'ring'; slot: Memslot; page: number; gfn: number; vcpu: number; entry: number; softFull: boolean }
  | { where: 'bitmap'; slot: Memslot; page: number; gfn: number; vcpu: number }
  | { where: 'lost'; slot: Memslot; page: number; gfn: number };

/** How a host write was logged (hostWrite). */
export const enum HostWriteLog { UNTRACKED = 0, RING = 1, BITMAP = 2, DROPPED = 3 }
/** Which ioctl write-protected pages (writeProtected). */
export const enum ProtectBy { RESET_DIRTY_RINGS = 1, CLEAR_DIRTY_LOG = 2, GET_DIRTY_LOG = 3, ENABLE_LOGGING = 4 }
/** harvested's `from` for bits returned by KVM_GET_DIRTY_LOG (otherwise: the ring's vCPU). */
export const HARVEST_BITMAP = -1;
/** copied's `stage` at completion (otherwise: the pass number). */
export const COPY_COMPLETION = 0;

/** Every tracepoint a no-op: extend it to implement the ones an observer needs. */
export class NoTracepoints implements VmTracepoints {
  writeFault(_vcpu: number, _slot: Memslot, _page: number): void {}
  pageDirtied(_e: PageDirtied): void {}
  hostWrite(_slot: Memslot, _page: number, _how: HostWriteLog): void {}
  writeProtected(_slot: Memslot, _page: number, _lo: number, _hi: number, _by: ProtectBy): void {}
  writeProtectedRange(_slot: Memslot, _page: number, _count: number, _by: ProtectBy): void {}
  harvested(_slot: Memslot, _page: number, _lo: number, _hi: number, _from: number): void {}
  copied(_slot: Memslot, _pages: ArrayLike<number>, _stage: number): void {}
}

/** Several tracers on one VM: each tracepoint reaches each, in the order attached. */
class Fanout implements VmTracepoints {
  constructor(readonly all: readonly VmTracepoints[]) {}
  writeFault(vcpu: number, slot: Memslot, page: number): void { for (const t of this.all) t.writeFault(vcpu, slot, page); }
  pageDirtied(e: PageDirtied): void { for (const t of this.all) t.pageDirtied(e); }
  hostWrite(slot: Memslot, page: number, how: HostWriteLog): void { for (const t of this.all) t.hostWrite(slot, page, how); }
  writeProtected(slot: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void { for (const t of this.all) t.writeProtected(slot, page, lo, hi, by); }
  writeProtectedRange(slot: Memslot, page: number, count: number, by: ProtectBy): void { for (const t of this.all) t.writeProtectedRange(slot, page, count, by); }
  harvested(slot: Memslot, page: number, lo: number, hi: number, from: number): void { for (const t of this.all) t.harvested(slot, page, lo, hi, from); }
  copied(slot: Memslot, pages: ArrayLike<number>, stage: number): void { for (const t of this.all) t.copied(slot, pages, stage); }
}

/**
 * The tracers attached to one Vm view: `active` is null when there are none, so that an
 * untraced VM pays one null check per event and builds no event object.
 */
export class TracepointSet {
  private tracers: VmTracepoints[] = [];
  active: VmTracepoints | null = null;

  /** Attaches `t`; returns the function that detaches it. */
  attach(t: VmTracepoints): () => void {
    this.tracers = [...this.tracers, t];
    this.update();
    return () => { this.tracers = this.tracers.filter((x) => x !== t); this.update(); };
  }

  private update(): void {
    const n = this.tracers.length;
    this.active = n === 0 ? null : n === 1 ? this.tracers[0]! : new Fanout(this.tracers);
  }
}

/** Calls `f` with the page of every set bit of a 64-bit mask (two 32-bit halves) from `page`. */
export function forEachMaskPage(page: number, lo: number, hi: number, f: (page: number) => void): void {
  for (let m = lo >>> 0; m !== 0; m &= m - 1) f(page + 31 - Math.clz32(m & -m));
  for (let m = hi >>> 0; m !== 0; m &= m - 1) f(page + 32 + 31 - Math.clz32(m & -m));
}
