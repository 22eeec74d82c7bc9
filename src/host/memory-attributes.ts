import { KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT, PAGE_SIZE } from './constants.ts';
import type { GuestMemory } from './guest-memory.ts';
import type { Memslot } from './memslot.ts';
import { hex } from '../util/hex.ts';

/** struct kvm_memory_attributes, the argument of KVM_SET_MEMORY_ATTRIBUTES. */
export interface KvmMemoryAttributes {
  address: number;
  size: number;
  attributes: number;
  flags: number;
}

const U64_LIMIT = 2 ** 64;

/**
 * kvm_vm_ioctl_set_mem_attributes' argument checks (virt/kvm/kvm_main.c), in its order:
 * the reason for EINVAL, or null.
 */
export function invalidMemoryAttributes(a: KvmMemoryAttributes, supported: number): string | null {
  if (a.flags !== 0) return `flags ${a.flags} (must be 0)`;
  if ((a.attributes & ~supported) !== 0) { // a negative value has bits above the supported ones
    return `attributes ${hex(a.attributes)} (supported: ${hex(supported)})`;
  }
  if (!Number.isInteger(a.address) || !Number.isInteger(a.size) || a.address < 0 || a.size < 0) {
    return `address ${a.address} or size ${a.size} is not a u64`;
  }
  if (a.size === 0) return 'size 0';
  if (a.address + a.size > U64_LIMIT) return `the range at ${hex(a.address)} of ${hex(a.size)} bytes wraps`;
  if (a.address % PAGE_SIZE !== 0 || a.size % PAGE_SIZE !== 0) {
    return `address ${hex(a.address)} or size ${hex(a.size)} is not page aligned`;
  }
  return null;
}

/** A run of pages of one memslot inside a gfn range. */
export interface SlotRange { slot: Memslot; page: number; count: number }

/** The pages of every memslot that [start, end) covers, in slot order (kvm_handle_gfn_range's walk). */
export function slotRanges(memory: GuestMemory, start: number, end: number): SlotRange[] {
  const out: SlotRange[] = [];
  for (const slot of memory.slots) {
    const from = Math.max(start, slot.baseGfn);
    const to = Math.min(end, slot.endGfn);
    if (from < to) out.push({ slot, page: from - slot.baseGfn, count: to - from });
  }
  return out;
}

/**
 * KVM's memory attributes (kvm->mem_attr_array, one entry per gfn), in shared memory so
 * that vCPU threads read them in their fault path (kvm_mem_is_private). Stored for the
 * gfns of memslots: a gfn outside every slot has no memory whose kind it could decide.
 */
export class MemoryAttributes {
  private readonly bytes: Uint8Array;

  constructor(buffer: SharedArrayBuffer, private readonly memory: GuestMemory) {
    this.bytes = new Uint8Array(buffer);
  }

  /** kvm_mem_is_private: the attribute says private and the slot has private memory to map. */
  isPrivate(slot: Memslot, page: number): boolean {
    return (Atomics.load(this.bytes, slot.firstPage + page) & KVM_MEMORY_ATTRIBUTE_PRIVATE) !== 0;
  }

  /** kvm_range_has_memory_attributes(start, end, ~0, attrs): every gfn of the range has exactly `attrs`. */
  rangeHas(start: number, end: number, attrs: number): boolean {
    for (const r of slotRanges(this.memory, start, end)) {
      const base = r.slot.firstPage + r.page;
      for (let i = 0; i < r.count; i++) if (Atomics.load(this.bytes, base + i) !== attrs) return false;
    }
    return true;
  }

  /** xa_store over one slot's run of pages. */
  store(r: SlotRange, attrs: number): void {
    const base = r.slot.firstPage + r.page;
    for (let i = 0; i < r.count; i++) Atomics.store(this.bytes, base + i, attrs);
  }

  /** Pages whose attribute is private, VM-wide. */
  privatePages(): number {
    let n = 0;
    for (let i = 0; i < this.bytes.length; i++) if ((this.bytes[i]! & KVM_MEMORY_ATTRIBUTE_PRIVATE) !== 0) n++;
    return n;
  }
}

/** The gfn range [start, end) of a byte range already checked by invalidMemoryAttributes. */
export function gfnRange(address: number, size: number): { start: number; end: number } {
  return { start: Math.floor(address / 2 ** PAGE_SHIFT), end: Math.floor((address + size) / 2 ** PAGE_SHIFT) };
}
