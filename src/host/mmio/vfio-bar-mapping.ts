import { lockWord, unlockWord } from '../../util/word-lock.ts';
import { EFAULT, EINVAL } from '../constants.ts';
import type { Steps } from '../../roles/role.ts';
import { Acted } from '../injections.ts';
import type { MapRequest, Refusal, VendorDriver } from './vendor-driver.ts';
import { BarRefusal, MAPPING_DECODE_OFF, MAPPING_PTE_BASE, MAPPING_PTE_WORDS, type VfioBarMappingLayout } from '../bar-layouts.ts';
import { type BarInjection, NO_BAR_BUGS } from './bar-bugs.ts';
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
 * unmapMappingRange(pos, count): unmap_mapping_range over BAR pages, in the kernel's order
 * (zap_page_range_single): the MMU notifiers' invalidate_range_start (KVM's, for the gfns
 * the BAR occupies in the guest: SPTEs zapped, TLBs flushed), then the entries go, then
 * invalidate_range_end. Between start and end the entries still exist: a fault or a
 * prefetch that looks them up then must not install from them (mmu_invalidate_retry_gfn).
 * "Whoever called remap_pfn_range is also going to call unmap_mapping_range before the
 * underlying pages are freed" is all KVM relies on.
 *
 * Memory decode off (a reset, D3) zaps the whole BAR, and a fault meanwhile is refused
 * (vfio_pci_zap_bars; vfio_pci_mmap_huge_fault's SIGBUS while memory is disabled).
 */
const LOCK = 0;
const PTE_BASE = MAPPING_PTE_BASE;
const PTE_WORDS = MAPPING_PTE_WORDS;
const PTE_WRITABLE = 1;
/** Mapped by the fault handler after validate_map_request agreed. */
const PTE_VALIDATED = 2;
/** Mapped at mmap time by a device without a validate callback, over a slice it holds for good (the static 1:1 mapping). */
const PTE_STATIC = 4;

/** What a BAR page's entry maps, or null. `checked`: validated, or a static slice of the VM's; false: mapped without either. */
export interface BarPte { pfn: number; writable: boolean; generation: number; checked: boolean }

/** The MMU notifier a mapping calls when its entries go (KVM's: kvm_mmu_notifier_invalidate_range_start/end), over BAR pages. */
export interface MmuNotifier {
  invalidateRangeStart(pos: number, count: number): Steps<number>;
  invalidateRangeEnd(pos: number, count: number): void;
}

/** The fault handler's outcome: the entry mapped (now or before), or the refusal. */
export type BarFault = { ok: true; pte: BarPte; mapped: number } | Refusal;

/** A slice a device without a validate callback maps at mmap time: `pages` BAR pages from `barPage` to pfns from `pfn`. */
export interface StaticSlice { barPage: number; pfn: number; pages: number; writable: boolean }

export class VfioBarMapping {
  readonly vm: number;
  readonly barPages: number;
  private readonly w: Int32Array;
  private readonly notifiers: MmuNotifier[] = [];

  constructor(readonly layout: VfioBarMappingLayout, private readonly driver: VendorDriver, readonly injection: BarInjection = NO_BAR_BUGS) {
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
    const flags = Atomics.load(this.w, at + 1);
    return { pfn, writable: (flags & PTE_WRITABLE) !== 0, generation: Atomics.load(this.w, at + 2), checked: (flags & (PTE_VALIDATED | PTE_STATIC)) !== 0 };
  }

  /** How many of BAR pages [pos, pos + count) have an entry. */
  presentIn(pos: number, count: number): number {
    let n = 0;
    for (let p = pos; p < pos + count; p++) if (Atomics.load(this.w, this.at(p)) !== 0) n++;
    return n;
  }

  /** Memory decode is off: every fault is refused. */
  get decodeOff(): boolean {
    return Atomics.load(this.w, MAPPING_DECODE_OFF) !== 0;
  }

  /**
   * The fault handler for BAR page `pos` (fixup_user_fault lands here when follow_pfn finds
   * nothing): validate, check, remap_pfn_range. A write to a read-only entry is refused
   * (EFAULT) as a write fault on a read-only PFNMAP is.
   */
  fault(pos: number, write: boolean): BarFault {
    this.lock();
    try {
      if (this.decodeOff) return { ok: false, errno: EFAULT, reason: BarRefusal.DECODE_OFF, why: `vm${this.vm}'s BAR has memory decode off` };
      const present = this.pte(pos);
      if (present !== null) {
        if (write && !present.writable) return this.readOnly(pos);
        return { ok: true, pte: present, mapped: 0 };
      }
      const r = this.driver.validateMapRequest(this.vm, pos);
      if (!r.ok) return r;
      const bad = this.check(r, pos);
      if (bad !== null) return { ok: false, errno: EINVAL, reason: BarRefusal.BAD_ANSWER, why: bad };
      if (write && !r.writable) return this.readOnly(pos);
      // remap_pfn_range over the whole answer.
      this.map(r.barPage, r.pfn, r.pages, (r.writable ? PTE_WRITABLE : 0) | PTE_VALIDATED);
      return { ok: true, pte: this.pte(pos)!, mapped: r.pages };
    } finally {
      this.unlock();
    }
  }

  /**
   * unmap_mapping_range over BAR pages [pos, pos + count): every MMU notifier's
   * invalidate_range_start, then the entries go, one per step (other actors run in
   * between, as on other CPUs), then invalidate_range_end. Returns the entries that
   * were present.
   */
  *unmapMappingRange(pos: number, count: number): Steps<number> {
    for (const n of this.notifiers) yield* n.invalidateRangeStart(pos, count);
    let present = 0;
    for (let p = pos; p < pos + count; p++) {
      // zap_pte_range, an entry at a time under the page table lock: other CPUs run meanwhile.
      yield undefined;
      this.lock();
      try {
        if (Atomics.exchange(this.w, this.at(p), 0) !== 0) present++;
      } finally {
        this.unlock();
      }
    }
    for (const n of this.notifiers) n.invalidateRangeEnd(pos, count);
    return present;
  }

  /** Memory decode off (a reset, D3): faults are refused from now on, and the whole BAR is zapped (vfio_pci_zap_bars). */
  *disableMemoryDecode(): Steps<number> {
    Atomics.store(this.w, MAPPING_DECODE_OFF, 1);
    return yield* this.unmapMappingRange(0, this.barPages);
  }

  enableMemoryDecode(): void {
    Atomics.store(this.w, MAPPING_DECODE_OFF, 0);
  }

  /**
   * mmap of a device without a validate callback: each slice mapped 1:1 now, for good
   * (the static alternative to mapping on fault; the slices are the VM's for the VM's life).
   */
  mmapStatic(slices: readonly StaticSlice[]): void {
    this.lock();
    try {
      for (const s of slices) this.map(s.barPage, s.pfn, s.pages, (s.writable ? PTE_WRITABLE : 0) | PTE_STATIC);
    } finally {
      this.unlock();
    }
  }

  /**
   * mmap with map-whole-bar-without-validate: the device has no validate callback, so
   * the whole BAR is mapped 1:1 onto the device's MMIO from pfn 0, although its slices
   * are allocated at run time. Nothing checks that the pages are this VM's.
   */
  mmapWholeBar(): void {
    const { bugs, acts } = this.injection;
    if (bugs.mapWholeBarWithoutValidate !== true) return;
    const pages = Math.min(this.barPages, this.driver.mmio.pages);
    this.lock();
    try {
      for (let p = 0; p < pages; p++) {
        const r = this.driver.resources[this.driver.resourceAt(p)];
        this.map(p, p, 1, r?.writable === true ? PTE_WRITABLE : 0);
      }
    } finally {
      this.unlock();
    }
    acts?.acted(Acted.MAP_WHOLE_BAR_WITHOUT_VALIDATE);
  }

  private map(barPage: number, pfn: number, pages: number, flags: number): void {
    for (let i = 0; i < pages; i++) {
      const at = this.at(barPage + i);
      Atomics.store(this.w, at + 1, flags);
      Atomics.store(this.w, at + 2, this.driver.mmio.generation(pfn + i));
      Atomics.store(this.w, at, pfn + i + 1);
    }
  }

  private readOnly(pos: number): Refusal {
    return { ok: false, errno: EFAULT, reason: BarRefusal.READ_ONLY, why: `BAR page ${pos} of vm${this.vm} is mapped read-only` };
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
