import {
  KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_GFN_SIZE, KVM_DIRTY_RING_MAX_ENTRIES,
  KVM_DIRTY_RING_MIN_ENTRIES, KVM_DIRTY_RING_RSVD_ENTRIES,
} from './constants.ts';
import { RING_INDEX_WORDS, RingIndex, type VmLayout } from './layout.ts';

/** Words of one struct kvm_dirty_gfn in the Int32 view: flags, slot, offset (lo, hi). */
export const GfnWord = { FLAGS: 0, SLOT: 1, OFF_LO: 2, OFF_HI: 3, WORDS: KVM_DIRTY_GFN_SIZE / 4 } as const;
const F = GfnWord.FLAGS, SLOT = GfnWord.SLOT, OFF_LO = GfnWord.OFF_LO, OFF_HI = GfnWord.OFF_HI;
const ENTRY_WORDS = GfnWord.WORDS;
/** Counter of pushes into a hard-full ring (KVM's WARN_ON_ONCE), on the dirty-index line. */
const HARD_FULL = RingIndex.DIRTY + 1;
/** The most entries the ring ever held at once (published by the vCPU as it grows). */
const MAX_USED = RingIndex.DIRTY + 2;

/** The ring size rules of KVM_CAP_DIRTY_LOG_RING; returns an error text or null. */
export function checkRingSize(entries: number): string | null {
  if (!Number.isInteger(entries) || entries <= 0 || (entries & (entries - 1)) !== 0) {
    return `${entries} entries is not a power of two`;
  }
  if (entries < KVM_DIRTY_RING_MIN_ENTRIES) return `${entries} entries is less than one page (${KVM_DIRTY_RING_MIN_ENTRIES} entries)`;
  if (entries > KVM_DIRTY_RING_MAX_ENTRIES) return `${entries} entries is more than ${KVM_DIRTY_RING_MAX_ENTRIES}`;
  if (entries < KVM_DIRTY_RING_RSVD_ENTRIES) return `${entries} entries is less than the ${KVM_DIRTY_RING_RSVD_ENTRIES} reserved entries`;
  return null;
}

/**
 * One vCPU's dirty ring (virt/kvm/dirty_ring.c): an array of struct kvm_dirty_gfn in
 * shared memory, plus the kernel's dirty_index (written only by the vCPU) and
 * reset_index (written only by KVM_RESET_DIRTY_RINGS).
 */
export class DirtyRing {
  readonly entries: number;
  readonly mask: number;
  readonly softLimit: number;
  readonly gfns: Int32Array;
  private readonly idx: Int32Array;
  private readonly base: number;

  constructor(layout: VmLayout, readonly vcpu: number) {
    const rings = layout.rings;
    if (!rings) throw new Error('the VM has no dirty rings');
    this.entries = rings.entries;
    this.mask = rings.entries - 1;
    this.softLimit = rings.entries - KVM_DIRTY_RING_RSVD_ENTRIES;
    this.gfns = new Int32Array(rings.gfns[vcpu]!);
    this.idx = new Int32Array(rings.indexes);
    this.base = vcpu * RING_INDEX_WORDS;
  }

  get dirtyIndex(): number { return Atomics.load(this.idx, this.base + RingIndex.DIRTY); }
  get resetIndex(): number { return Atomics.load(this.idx, this.base + RingIndex.RESET); }
  get hardFullWarnings(): number { return Atomics.load(this.idx, this.base + HARD_FULL); }
  /** The most entries in use at once so far (dirty_index - reset_index after a push). */
  get maxUsed(): number { return Atomics.load(this.idx, this.base + MAX_USED); }
  /** The pushing vCPU's copy of maxUsed: it alone pushes, so only a new maximum is published. */
  private maxSeen = 0;

  used(): number {
    return (this.dirtyIndex - this.resetIndex) | 0;
  }

  /** kvm_dirty_ring_soft_full */
  softFull(): boolean {
    return this.used() >= this.softLimit;
  }

  /**
   * kvm_dirty_ring_push, on the vCPU's thread: fill slot and offset, then publish the
   * entry by storing flags = DIRTY (the write barrier), then bump dirty_index.
   * Returns kvm_dirty_ring_soft_full() after the push.
   */
  push(slotField: number, offset: number): boolean {
    const idx = this.idx;
    const gfns = this.gfns;
    const base = this.base;
    const softLimit = this.softLimit;
    const di = Atomics.load(idx, base + RingIndex.DIRTY);
    const e = (di & this.mask) * ENTRY_WORDS;
    if (Atomics.load(gfns, e + F) !== 0) Atomics.add(idx, base + HARD_FULL, 1); // "It should never get full"
    gfns[e + SLOT] = slotField;
    gfns[e + OFF_LO] = offset;
    gfns[e + OFF_HI] = 0;
    Atomics.store(gfns, e + F, KVM_DIRTY_GFN_F_DIRTY);
    Atomics.store(idx, base + RingIndex.DIRTY, (di + 1) | 0);
    const used = (di + 1 - Atomics.load(idx, base + RingIndex.RESET)) | 0;
    if (used > this.maxSeen) { this.maxSeen = used; Atomics.store(idx, base + MAX_USED, used); }
    return used >= softLimit;
  }

  /** Entry accessors for userspace (harvest) and for tests. */
  flagsAt(index: number): number { return Atomics.load(this.gfns, (index & this.mask) * ENTRY_WORDS + F); }
  slotAt(index: number): number { return this.gfns[(index & this.mask) * ENTRY_WORDS + SLOT]! >>> 0; }
  offsetAt(index: number): number {
    const e = (index & this.mask) * ENTRY_WORDS;
    return (this.gfns[e + OFF_LO]! >>> 0) + (this.gfns[e + OFF_HI]! >>> 0) * 4294967296;
  }
  /** Userspace marks an entry collected: flags = RESET (store-release). */
  markHarvested(index: number): void { Atomics.store(this.gfns, (index & this.mask) * ENTRY_WORDS + F, KVM_DIRTY_GFN_F_RESET); }
  /** Userspace can write anything into the shared entries; tests use this to forge entries. */
  forge(index: number, flags: number, slotField: number, offset: number): void {
    const e = (index & this.mask) * ENTRY_WORDS;
    this.gfns[e + SLOT] = slotField;
    this.gfns[e + OFF_LO] = offset;
    this.gfns[e + OFF_HI] = 0;
    Atomics.store(this.gfns, e + F, flags);
  }

  /**
   * kvm_dirty_ring_reset: from reset_index, while the entry is harvested, invalidate it
   * and re-protect its page; runs of entries in one slot within a 64-page window are
   * coalesced into one mask per re-protect. Like KVM it does not look at dirty_index (a
   * vCPU publishes flags before it bumps the index, so userspace may already have
   * harvested an entry the index does not cover yet); it stops at the first entry not
   * harvested, and after `entries` entries, so userspace re-setting RESET flags cannot
   * keep it spinning. `protect(slotField, offset, lo, hi)` re-protects a 64-bit mask.
   * Returns the number of entries reset; `protectCalls` counts the coalesced re-protects.
   */
  reset(protect: (slotField: number, offset: number, lo: number, hi: number) => void): number {
    // Fields in locals: each Atomics call is an opaque call to the compiler, after which
    // it would load them again.
    const gfns = this.gfns;
    const idx = this.idx;
    const resetAt = this.base + RingIndex.RESET;
    const mask = this.mask;
    const entries = this.entries;
    let ri = Atomics.load(idx, resetAt);
    let count = 0;
    let curSlot = 0, curOffset = 0, lo = 0, hi = 0;
    let calls = 0;
    while (count < entries) {
      const e = (ri & mask) * ENTRY_WORDS;
      if ((Atomics.load(gfns, e + F) & KVM_DIRTY_GFN_F_RESET) === 0) break;
      const nextSlot = gfns[e + SLOT]! >>> 0;
      const nextOffset = (gfns[e + OFF_LO]! >>> 0) + (gfns[e + OFF_HI]! >>> 0) * 4294967296;
      Atomics.store(gfns, e + F, 0);
      ri = (ri + 1) | 0;
      count++;
      if ((lo | hi) !== 0 && nextSlot === curSlot) {
        const delta = nextOffset - curOffset;
        if (delta >= 0 && delta < 64) {
          if (delta < 32) lo |= 1 << delta; else hi |= 1 << (delta - 32);
          continue;
        }
        // Backwards visit: shift the mask up if no set bit falls off the top.
        if (delta > -64 && delta < 0 && fls64(lo, hi) - delta <= 63) {
          const k = -delta;
          if (k >= 32) { hi = lo << (k - 32); lo = 0; } else { hi = (hi << k) | (lo >>> (32 - k)); lo = lo << k; }
          lo |= 1;
          curOffset = nextOffset;
          continue;
        }
      }
      if ((lo | hi) !== 0) { protect(curSlot, curOffset, lo >>> 0, hi >>> 0); calls++; }
      curSlot = nextSlot; curOffset = nextOffset; lo = 1; hi = 0;
    }
    if ((lo | hi) !== 0) { protect(curSlot, curOffset, lo >>> 0, hi >>> 0); calls++; }
    // The entries go back to the vCPU at once, after every one of them was invalidated
    // (KVM bumps reset_index per entry under the same rule: invalid before reusable).
    Atomics.store(idx, resetAt, ri);
    this.protectCalls = calls;
    return count;
  }

  /** Re-protect calls made by the last reset (after coalescing). */
  protectCalls = 0;
}

/** Index of the highest set bit of a 64-bit mask given as two halves. */
function fls64(lo: number, hi: number): number {
  return hi !== 0 ? 63 - Math.clz32(hi) : 31 - Math.clz32(lo);
}
