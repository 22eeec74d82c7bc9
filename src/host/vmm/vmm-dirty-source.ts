import { type PageBitmap, popcount32 } from '../dirty-bitmap.ts';
import { PAGE_SIZE } from '../constants.ts';
import { slotRanges } from '../memory-attributes.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import type { DirtySource, SourceTally } from './dirty-source.ts';

/**
 * Marks pages of a guest_memfd slot that the VMM changed itself: a conversion changes
 * what the page's shared memory holds (a discard leaves zeros) or whether the page is
 * sent at all, so migration must look at it again. QEMU marks RAM that userspace
 * changed with cpu_physical_memory_set_dirty_range; here the marks live in the slot's
 * shared vmmDirtyBitmap, because the conversions run on another thread than migration.
 */
export function markVmmDirty(vm: Vm, gpa: number, size: number): void {
  const first = Math.floor(gpa / PAGE_SIZE);
  for (const { slot, page, count } of slotRanges(vm.memory, first, first + Math.ceil(size / PAGE_SIZE))) {
    const words = slot.vmmDirtyBitmap;
    if (words !== null) for (let p = page; p < page + count; p++) Atomics.or(words, p >>> 5, 1 << (p & 31));
  }
}

/** The VMM's own marks as a dirty source of migration (dirty-log.ts ORs it with KVM's log). */
export class VmmDirtySource implements DirtySource {
  readonly name = "the VMM's conversions (RAM it discarded or converted)";
  readonly dma = false;
  private readonly slots: Memslot[];

  constructor(vm: Vm) {
    this.slots = vm.memory.slots.filter((s) => s.vmmDirtyBitmap !== null);
  }

  /** Whether `vm` has anything for this source to report. */
  static needed(vm: Vm): boolean { return vm.memory.slots.some((s) => s.vmmDirtyBitmap !== null); }

  *start(): Steps { /* the marks are always kept */ }

  *sync(into: PageBitmap, _final: boolean, tally?: SourceTally): Steps<number> {
    let reported = 0;
    let added = 0;
    for (const slot of this.slots) {
      const words = slot.vmmDirtyBitmap!;
      // firstPage is a multiple of 64: the slot's words line up with the VM-wide bitmap's.
      const at = slot.firstPage >>> 5;
      for (let i = 0; i < words.length; i++) {
        if (words[i] === 0) continue;
        const v = Atomics.exchange(words, i, 0);
        const old = into.words[at + i]!;
        into.words[at + i] = old | v;
        reported += popcount32(v);
        added += popcount32(v & ~old);
      }
    }
    tally?.(this.name, added);
    return reported;
  }

  stop(): void { /* nothing to stop */ }
}
