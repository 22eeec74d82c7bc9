import {
  type EptMemoryType, type MemoryType, VMX_EPT_IPAT_BIT, VMX_EPT_MT_EPTE_SHIFT, VMX_EPT_MT_MASK, X86_MEMTYPE_WB, effectiveMemoryType,
} from './memory-type.ts';
import type { Memslot } from './memslot.ts';

/**
 * Second-level page-table entry state, one byte per page in shared memory. vmemlab keeps
 * what dirty tracking and private memory need: whether the page is mapped writable to
 * its shared memory, or mapped to its private (guest_memfd) memory, and, on a VM with the
 * CPU cache model, the EPT memory type KVM gave it. A zapped SPTE is 0: the next access
 * faults.
 */
export const SPTE_WRITABLE = 1 << 0;
/** Mapped to the slot's guest_memfd page (private; never write-protected: KVM does not log private memory). */
export const SPTE_PRIVATE = 1 << 1;

/**
 * The EPT memory type field (vmx_get_mt_mask's value, memory-type.ts) as an SPTE keeps it:
 * bits 2-4 the type XOR WB (so that 0 is WB), bit 5 set when IPAT is clear (the guest's PAT
 * takes part), bit 6 once a fault computed them. 0 in all three is WB + IPAT, what KVM
 * gives every page while no non-coherent DMA is registered.
 */
const SPTE_MT_SHIFT = 2;
const SPTE_MT_MASK = 7 << SPTE_MT_SHIFT;
const SPTE_HONOUR_PAT = 1 << 5;
export const SPTE_MT_SET = 1 << 6;

/** The EPT memory type bits (VMX_EPT_MT_MASK | VMX_EPT_IPAT_BIT) of an SPTE value. */
export function spteMtMask(spte: number): number {
  const type = ((spte & SPTE_MT_MASK) >>> SPTE_MT_SHIFT) ^ X86_MEMTYPE_WB;
  return (type << VMX_EPT_MT_EPTE_SHIFT) | ((spte & SPTE_HONOUR_PAT) !== 0 ? 0 : VMX_EPT_IPAT_BIT);
}

/** The memory type an access through the SPTE takes: its EPT type, with the guest's PAT type `pat` unless IPAT is set. */
export function spteAccessType(spte: number, pat: MemoryType): EptMemoryType {
  return effectiveMemoryType(spteMtMask(spte), pat);
}

/** Gives the page's SPTE the memory type `mtMask` (vmx_get_mt_mask's value) unless a fault already did since it was installed. */
export function setSpteMemoryType(slot: Memslot, page: number, mtMask: number): void {
  if ((slot.spte[page]! & SPTE_MT_SET) !== 0) return;
  const type = ((mtMask & VMX_EPT_MT_MASK) >>> VMX_EPT_MT_EPTE_SHIFT) ^ X86_MEMTYPE_WB;
  Atomics.or(slot.spte, page, SPTE_MT_SET | (type << SPTE_MT_SHIFT) | ((mtMask & VMX_EPT_IPAT_BIT) !== 0 ? 0 : SPTE_HONOUR_PAT));
}

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
    // An SPTE maps one kind at a time: zapped, nothing of it is left (its memory type included).
    Atomics.store(spte, p, 0);
    zapped++;
  }
  return zapped;
}
