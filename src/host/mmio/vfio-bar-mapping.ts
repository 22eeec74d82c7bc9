import { lockWord, unlockWord } from '../../util/word-lock.ts';
import { EFAULT, EINVAL } from '../constants.ts';
import type { Steps } from '../../roles/role.ts';
import type { MapRequest, VendorDriver } from './vendor-driver.ts';
import { MAPPING_PTE_BASE, MAPPING_PTE_WORDS, type VfioBarMappingLayout } from '../bar-layouts.ts';
export type { VfioBarMappingLayout } from '../bar-layouts.ts';
export { createVfioBarMappingLayout } from '../bar-layouts.ts';

/**
 * A VM's virtual BAR as the VMM mmap()s it from VFIO: a VM_PFNMAP VMA over `barPages`
 * pages, with nothing mapped at mmap time. Its page table (one entry per BAR page: the
 * physical MMIO pfn + 1, whether writable, and the page's generation when it was mapped)
 * lives in shared memory, because KVM's fault path reads it from the vCPU threads
 * (hva_to_pfn_remapped: follow_pfn, and on a miss fixup_user_fault) while the vendor
 * driver's thread zaps it.
 *
 * fault(pos): the vfio-mdev fault handler of the 2016 design. It asks the vendor's
 * validate_map_request which slice backs BAR page `pos` for this VM, checks the answer as
 * the kernel would (a range outside the VMA is EINVAL; so is a pfn range the vendor does
 * not hold for this VM: vfio-mdev's own check), and maps it (remap_pfn_range), or returns
 * the refusal (the caller's SIGBUS).
 *
 * unmapMappingRange(pos, count): unmap_mapping_range over BAR pages: the entries go, then
 * the MMU notifier (KVM's, for the gfns the BAR occupies in the guest) invalidates its
 * SPTEs and flushes TLBs. "Whoever called remap_pfn_range is also going to call
 * unmap_mapping_range before the underlying pages are freed" is all KVM relies on.
 */
const LOCK = 0;
const PTE_BASE = MAPPING_PTE_BASE;
const PTE_WORDS = MAPPING_PTE_WORDS;
const PTE_WRITABLE = 1;

/** What a BAR page's entry maps, or null. */
export interface BarPte { pfn: number; writable: boolean; generation: number }

/** The MMU notifier a mapping calls when its entries go (KVM's: kvm_mmu_notifier_invalidate_range_start/end), over BAR pages. */
export interface MmuNotifier {
  invalidateRangeStart(pos: number, count: number): Steps<number>;
  invalidateRangeEnd(pos: number, count: number): void;
}

/** The fault handler's outcome: the entry mapped (now or before), or the refusal. */
export type BarFault = { ok: true; pte: BarPte; mapped: number } | { ok: false; errno: number; why: string };

export class VfioBarMapping {
  readonly vm: number;
  readonly barPages: number;
  private readonly w: Int32Array;
  private readonly notifiers: MmuNotifier[] = [];

  constructor(readonly layout: VfioBarMappingLayout, private readonly driver: VendorDriver) {
    this.vm = layout.vm;
    this.barPages = layout.barPages;
    this.w = new Int32Array(layout.ptes);
  }

  /** mmu_notifier_register: KVM watches this VMA (one per VM). */
  register(n: MmuNotifier): void {
    this.notifiers.push(n);
  }

  /** follow_pfn: the entry of BAR page `pos`, or null when nothing maps it. */
  pte(pos: number): BarPte | null {
    const at = this.at(pos);
    const pfn = Atomics.load(this.w, at) - 1;
    if (pfn < 0) return null;
    return { pfn, writable: (Atomics.load(this.w, at + 1) & PTE_WRITABLE) !== 0, generation: Atomics.load(this.w, at + 2) };
  }

  /**
   * The fault handler for BAR page `pos` (fixup_user_fault lands here when follow_pfn finds
   * nothing): validate, check, remap_pfn_range. A write to a read-only entry is refused
   * (EFAULT) as a write fault on a read-only PFNMAP is.
   */
  fault(pos: number, write: boolean): BarFault {
    this.lock();
    try {
      const present = this.pte(pos);
      if (present !== null) {
        if (write && !present.writable) return { ok: false, errno: EFAULT, why: `BAR page ${pos} of vm${this.vm} is mapped read-only` };
        return { ok: true, pte: present, mapped: 0 };
      }
      const r = this.driver.validateMapRequest(this.vm, pos);
      if (!r.ok) return r;
      const bad = this.check(r, pos);
      if (bad !== null) return { ok: false, errno: EINVAL, why: bad };
      if (write && !r.writable) return { ok: false, errno: EFAULT, why: `BAR page ${pos} of vm${this.vm} is mapped read-only` };
      // remap_pfn_range over the whole answer.
      for (let i = 0; i < r.pages; i++) {
        const at = this.at(r.barPage + i);
        Atomics.store(this.w, at + 1, r.writable ? PTE_WRITABLE : 0);
        Atomics.store(this.w, at + 2, this.driver.mmio.generation(r.pfn + i));
        Atomics.store(this.w, at, r.pfn + i + 1);
      }
      return { ok: true, pte: this.pte(pos)!, mapped: r.pages };
    } finally {
      this.unlock();
    }
  }

  /**
   * unmap_mapping_range over BAR pages [pos, pos + count): the entries go, and every MMU
   * notifier invalidates what it built from them before this returns. Returns the
   * entries that were present.
   */
  *unmapMappingRange(pos: number, count: number): Steps<number> {
    this.lock();
    let present = 0;
    try {
      for (let p = pos; p < pos + count; p++) {
        const at = this.at(p);
        if (Atomics.exchange(this.w, at, 0) !== 0) present++;
      }
    } finally {
      this.unlock();
    }
    for (const n of this.notifiers) yield* n.invalidateRangeStart(pos, count);
    for (const n of this.notifiers) n.invalidateRangeEnd(pos, count);
    return present;
  }

  /** The kernel's checks of a validate answer: inside the VMA, and inside what the vendor gave this VM. */
  private check(r: Extract<MapRequest, { ok: true }>, pos: number): string | null {
    if (r.pages < 1 || r.barPage < 0 || r.barPage + r.pages > this.barPages) return `validate_map_request mapped BAR pages ${r.barPage}..${r.barPage + r.pages - 1}, outside the ${this.barPages}-page VMA`;
    if (pos < r.barPage || pos >= r.barPage + r.pages) return `validate_map_request mapped BAR pages ${r.barPage}..${r.barPage + r.pages - 1}, not the faulting page ${pos}`;
    for (let i = 0; i < r.pages; i++) {
      const pfn = r.pfn + i;
      if (pfn < 0 || pfn >= this.driver.mmio.pages || this.driver.mmio.owner(pfn) !== this.vm) return `validate_map_request gave pfn ${pfn}, which vm${this.vm} does not hold`;
    }
    return null;
  }

  private at(pos: number): number {
    if (!Number.isInteger(pos) || pos < 0 || pos >= this.barPages) throw new Error(`BAR page ${pos} outside the ${this.barPages}-page mapping`);
    return PTE_BASE + pos * PTE_WORDS;
  }

  private lock(): void {
    lockWord(this.w, LOCK);
  }

  private unlock(): void {
    unlockWord(this.w, LOCK);
  }
}
