import { PAGE_SHIFT } from './constants.ts';
import type { VmLayout } from './layout.ts';
import { Memslot } from './memslot.ts';

/** Guest physical address and frame helpers. GPAs are numbers (exact up to 2^53). */
export function gfnOf(gpa: number): number {
  return Math.floor(gpa / 4096);
}
export function gpaOf(gfn: number): number {
  return gfn * (1 << PAGE_SHIFT);
}

/**
 * All memslots of one address space view, with KVM's lookup by guest frame number.
 * Like KVM's `search_memslots` with its last-used-slot cache: most accesses hit the
 * same slot as the previous one.
 */
export class GuestMemory {
  readonly slots: Memslot[];
  readonly totalPages: number;
  private readonly byGfn: Memslot[];
  private last: Memslot | undefined;
  /** slotByField's last answer (ring entries come in runs of one slot). */
  private lastByField: Memslot | undefined;

  constructor(layout: VmLayout) {
    this.slots = layout.slots.map((s, i) => new Memslot(s, i));
    this.byGfn = [...this.slots].sort((a, b) => a.baseGfn - b.baseGfn);
    this.totalPages = layout.totalPages;
    this.last = this.byGfn[0];
  }

  /** The slot holding `gfn`, or undefined when no slot does (an MMIO or error exit). */
  findSlot(gfn: number): Memslot | undefined {
    const last = this.last;
    if (last !== undefined && gfn >= last.baseGfn && gfn < last.endGfn) return last;
    let lo = 0;
    let hi = this.byGfn.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const s = this.byGfn[mid]!;
      if (gfn < s.baseGfn) hi = mid - 1;
      else if (gfn >= s.endGfn) lo = mid + 1;
      else return (this.last = s);
    }
    return undefined;
  }

  /** The slot holding VM-wide page `frame` (Memslot.firstPage numbering), or undefined. */
  slotOfFrame(frame: number): Memslot | undefined {
    return this.slots.find((s) => frame >= s.firstPage && frame < s.firstPage + s.pages);
  }

  /** The slot whose kvm_dirty_gfn.slot field is `slotField` (as_id << 16 | id). */
  slotByField(slotField: number): Memslot | undefined {
    const last = this.lastByField;
    if (last !== undefined && last.slotField === slotField) return last;
    const slots = this.slots;
    for (let i = 0; i < slots.length; i++) {
      const s = slots[i]!;
      if (s.slotField === slotField) return (this.lastByField = s);
    }
    return undefined;
  }

}
