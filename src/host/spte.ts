import type { Memslot } from './memslot.ts';

/**
 * Second-level page-table entry state, one byte per page in shared memory. vmemlab keeps
 * what dirty tracking and private memory need: whether the page is mapped writable to
 * its shared memory, or mapped to its private (guest_memfd) memory. A zapped SPTE is 0:
 * the next access faults. (Memory type will take further bits.)
 */
export const SPTE_WRITABLE = 1 << 0;
/** Mapped to the slot's guest_memfd page (private; never write-protected: KVM does not log private memory). */
export const SPTE_PRIVATE = 1 << 1;

export function spteWritable(slot: Memslot, page: number): boolean {
  return (slot.spte[page]! & SPTE_WRITABLE) !== 0;
}

export function makeSpteWritable(slot: Memslot, page: number): void {
  Atomics.or(slot.spte, page, SPTE_WRITABLE);
}

/** Write-protects one page (kvm_arch_mmu_enable_log_dirty_pt_masked for one bit). */
export function writeProtectPage(slot: Memslot, page: number): void {
  Atomics.and(slot.spte, page, ~SPTE_WRITABLE & 0xff);
}

/** Write-protects the pages of `mask` (bit i = page base + i), 32 pages at a time. */
export function writeProtectMask32(slot: Memslot, base: number, mask: number): void {
  // The same bits, lowest first, in int32 arithmetic (bit 31 is the sign bit).
  const spte = slot.spte;
  let m = mask | 0;
  while (m !== 0) {
    const bit = 31 - Math.clz32(m & -m);
    Atomics.and(spte, base + bit, ~SPTE_WRITABLE & 0xff);
    m = (m & (m - 1)) | 0;
  }
}

export function writeProtectSlot(slot: Memslot): void {
  for (let p = 0; p < slot.pages; p++) Atomics.and(slot.spte, p, ~SPTE_WRITABLE & 0xff);
}

export function mapSlotWritable(slot: Memslot): void {
  slot.spte.fill(SPTE_WRITABLE);
}

/** Maps one page to its private (guest_memfd) memory: a private fault's SPTE. */
export function mapPagePrivate(slot: Memslot, page: number): void {
  Atomics.store(slot.spte, page, SPTE_PRIVATE);
}

/**
 * kvm_unmap_gfn_range over `count` pages from `page`: zaps the SPTEs that map the given
 * kind of memory (private, shared, or both, as kvm_gfn_range's attr_filter) and returns
 * how many were present; the caller flushes remote TLBs when that is not 0.
 */
export function zapSptes(slot: Memslot, page: number, count: number, kinds: number): number {
  let zapped = 0;
  const spte = slot.spte;
  for (let p = page; p < page + count; p++) {
    if ((spte[p]! & kinds) === 0) continue;
    Atomics.and(spte, p, ~kinds & 0xff);
    zapped++;
  }
  return zapped;
}
