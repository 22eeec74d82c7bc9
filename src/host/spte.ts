import type { Memslot } from './memslot.ts';

/**
 * Second-level page-table entry state, one byte per page in shared memory. vmemlab keeps
 * only what dirty tracking needs: whether the page is mapped writable. (Memory type and
 * the private attribute will take further bits.)
 */
export const SPTE_WRITABLE = 1 << 0;

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
