import { MMU_LOCK_HOLDER_KVM, type MmuInvalidate } from '../mmu-invalidate.ts';
import type { Steps } from '../../roles/role.ts';
import type { DeviceMmio } from './device-mmio.ts';
import type { BarPte, MmuNotifier, VfioBarMapping } from './vfio-bar-mapping.ts';
import { BarMmuWord, BarRefusal, KVM_BAR_FINDINGS, KVM_BAR_SPTE_WORDS, type KvmBarMmuLayout } from '../bar-layouts.ts';
import { Acted } from '../injections.ts';
import { type BarInjection, NO_BAR_BUGS } from './bar-bugs.ts';
import type { Refusal } from './vendor-driver.ts';
export type { KvmBarMmuLayout } from '../bar-layouts.ts';
export { createKvmBarMmuLayout } from '../bar-layouts.ts';

/**
 * KVM's side of a VM's virtual BAR (a memslot over a VM_PFNMAP VMA): the SPTEs it builds
 * from the VMA's entries, the two halves of a fault, accesses through the SPTEs with the
 * isolation oracles, and the MMU notifier the VMA calls when its entries go.
 *
 * A fault (arch/x86/kvm/mmu/mmu.c, kvm_mmu_faultin_pfn -> hva_to_pfn_remapped) reads
 * mmu_invalidate_seq first, then looks the pfn up in the VMA (follow_pfn) and, when
 * nothing maps the page, faults it in (fixup_user_fault: the driver's fault handler, which
 * validates; vfio-bar-mapping.ts); a refusal is the vCPU's KVM_EXIT_MEMORY_FAULT / EFAULT.
 * Then, under mmu_lock, the install retries if an invalidation covered the gfn since that
 * read (mmu_invalidate_retry_gfn), else it builds the SPTE from what it looked up: the pfn,
 * writable only if the VMA entry is, and the page's generation (for the stale SPTE oracle).
 * The halves are separate calls, so a zap can come between them, as it can in KVM.
 *
 * The SPTEs live in shared memory (per BAR page: pfn + 1, writable, generation), one block
 * per VM; the oracles count in their own words.
 *
 * Prefetch (direct_pte_prefetch): after an install, up to PTE_PREFETCH_NUM neighbours in
 * the same aligned group, under the same mmu_lock. KVM's rule takes only refcounted pages,
 * so BAR pages (PFNMAP) are never prefetched; with the layout's 'mapped' policy, those the
 * VMA maps already, skipping any an invalidation covers.
 */
/** arch/x86/kvm/mmu/mmu.c */
export const PTE_PREFETCH_NUM = 8;
const SPTE_WORDS = KVM_BAR_SPTE_WORDS;
const SPTE_WRITABLE = 1;

/** What the isolation oracles find at an access through an SPTE. */
export const enum BarFinding {
  /** The pfn belongs to another VM's slice. */
  CROSS_VM = 0,
  /** The page changed hands since the SPTE was built from it: a zap was missed. */
  STALE_SPTE,
  /** The SPTE maps a page the VMA does not map (it was never validated, or was zapped there). */
  UNVALIDATED,
  /** A write through an SPTE whose VMA entry is read-only. */
  READ_ONLY_WRITE,
  /** An access the vendor refused completed anyway (a read returned zeros) instead of stopping the VM. */
  REFUSED_COMPLETED,
  COUNT,
}
if ((BarFinding.COUNT as number) !== KVM_BAR_FINDINGS) throw new Error('kvm-bar-mmu.ts: BarFinding out of step with KVM_BAR_FINDINGS');
export const BAR_FINDING_NAMES = ['cross-vm-access', 'stale-spte', 'unvalidated-mapping', 'read-only-write', 'refused-access-completed'] as const;
export type BarFindingName = (typeof BAR_FINDING_NAMES)[number];

/** kvm_mmu_faultin_pfn's half: the sequence read first, and what the VMA maps. */
export type BarFaultIn = { ok: true; seq: number; pte: BarPte } | Refusal;

/** The last refused fault, as KVM's side recorded it for the VMM's report. */
export interface BarRefusalRecord { vcpu: number; page: number; reason: BarRefusal; errno: number; write: boolean }

/** An access through the BAR's SPTE: done (a read's value), or none usable: the caller faults. */
export type BarAccess = { done: true; value: number } | { done: false };

/** What of KVM the BAR's MMU needs: the invalidation sequence and mmu_lock, and remote TLB flushes. */
export interface KvmMmu {
  readonly mmuInvalidate: MmuInvalidate;
  flushRemoteTlbs(): Steps;
}

export class KvmBarMmu implements MmuNotifier {
  readonly vm: number;
  readonly baseGfn: number;
  readonly barPages: number;
  private readonly s: Int32Array;
  private readonly f: Int32Array;
  /** BarMmuWord. */
  readonly words: Int32Array;

  constructor(
    readonly layout: KvmBarMmuLayout, private readonly kvm: KvmMmu, private readonly mapping: VfioBarMapping, private readonly mmio: DeviceMmio,
    private readonly injection: BarInjection = NO_BAR_BUGS,
  ) {
    this.vm = layout.vm;
    this.baseGfn = layout.baseGfn;
    this.barPages = layout.barPages;
    this.s = new Int32Array(layout.sptes);
    this.f = new Int32Array(layout.findings);
    this.words = new Int32Array(layout.words);
    if (mapping.barPages !== layout.barPages || mapping.vm !== layout.vm) throw new Error(`KVM BAR MMU: vm${layout.vm}'s ${layout.barPages} pages against a mapping of vm${mapping.vm}'s ${mapping.barPages}`);
  }

  /** The SPTE of BAR page `page`, or null when none is present. */
  spte(page: number): BarPte | null {
    const at = this.at(page);
    const pfn = Atomics.load(this.s, at) - 1;
    if (pfn < 0) return null;
    return { pfn, writable: (Atomics.load(this.s, at + 1) & SPTE_WRITABLE) !== 0, generation: Atomics.load(this.s, at + 2), checked: true };
  }

  /**
   * The first half of a fault on BAR page `page` by vCPU `vcpu`: the sequence, then
   * follow_pfn, and the driver's fault handler on a miss. A refusal is recorded.
   */
  faultin(page: number, write: boolean, vcpu = 0): BarFaultIn {
    Atomics.add(this.words, BarMmuWord.FAULTS, 1);
    const seq = this.kvm.mmuInvalidate.seq();
    const present = this.mapping.pte(page);
    if (present !== null && (!write || present.writable)) return { ok: true, seq, pte: present };
    if (present !== null && write && this.injection.bugs.ignoreReadonlyPfnmap === true) {
      // hva_to_pfn_remapped without the write check: a writable SPTE over a read-only entry.
      this.injection.acts?.acted(Acted.IGNORE_READONLY_PFNMAP);
      return { ok: true, seq, pte: { ...present, writable: true } };
    }
    const f = this.mapping.fault(page, write);
    if (!f.ok) {
      this.recordRefusal(vcpu, page, write, f);
      return f;
    }
    return { ok: true, seq, pte: f.pte };
  }

  /** The last refused fault, or null. */
  lastRefusal(): BarRefusalRecord | null {
    const w = this.words;
    const vcpu = Atomics.load(w, BarMmuWord.REFUSAL_VCPU) - 1;
    if (vcpu < 0) return null;
    return {
      vcpu, page: Atomics.load(w, BarMmuWord.REFUSAL_PAGE), reason: Atomics.load(w, BarMmuWord.REFUSAL_REASON),
      errno: Atomics.load(w, BarMmuWord.REFUSAL_ERRNO), write: Atomics.load(w, BarMmuWord.REFUSAL_WRITE) !== 0,
    };
  }

  /** kvm_vm_dead: the VM's every KVM_RUN fails with EIO from now on (onRefusal 'kill-vm'). */
  killVm(): void {
    Atomics.store(this.words, BarMmuWord.VM_DEAD, 1);
  }

  get dead(): boolean {
    return Atomics.load(this.words, BarMmuWord.VM_DEAD) !== 0;
  }

  /** The oracle for refused-access-reads-zeros: an access the vendor refused completed anyway. */
  refusedCompleted(page: number): void {
    this.find(BarFinding.REFUSED_COMPLETED, page);
  }

  stat(w: BarMmuWord): number {
    return Atomics.load(this.words, w);
  }

  private recordRefusal(vcpu: number, page: number, write: boolean, r: Refusal): void {
    const w = this.words;
    Atomics.add(w, BarMmuWord.REFUSED, 1);
    Atomics.store(w, BarMmuWord.REFUSAL_PAGE, page);
    Atomics.store(w, BarMmuWord.REFUSAL_REASON, r.reason);
    Atomics.store(w, BarMmuWord.REFUSAL_ERRNO, r.errno);
    Atomics.store(w, BarMmuWord.REFUSAL_WRITE, write ? 1 : 0);
    Atomics.store(w, BarMmuWord.REFUSAL_VCPU, vcpu + 1);
  }

  /**
   * The second half, under mmu_lock: 'retry' when an invalidation covered the page since
   * the sequence was read (RET_PF_RETRY: the vCPU faults again), 'busy' when mmu_lock is
   * held (the vCPU re-enters and faults again), else the SPTE is built.
   */
  install(page: number, f: Extract<BarFaultIn, { ok: true }>, holder: number): 'installed' | 'retry' | 'busy' {
    const inv = this.kvm.mmuInvalidate;
    if (!inv.tryLock(holder)) return 'busy';
    try {
      if (inv.retry(f.seq, this.baseGfn + page)) {
        if (this.injection.bugs.noInvalidateRetry !== true) {
          Atomics.add(this.words, BarMmuWord.RETRIES, 1);
          return 'retry';
        }
        this.injection.acts?.acted(Acted.NO_INVALIDATE_RETRY);
      }
      this.set(page, f.pte.pfn, f.pte.writable, f.pte.generation);
      Atomics.add(this.words, BarMmuWord.INSTALLS, 1);
      this.prefetch(page, f);
      return 'installed';
    } finally {
      inv.unlock();
    }
  }

  /** direct_pte_prefetch around BAR page `page` (under mmu_lock, after its install). */
  private prefetch(page: number, f: Extract<BarFaultIn, { ok: true }>): void {
    const { bugs, acts } = this.injection;
    const mapped = this.layout.prefetch === 'mapped';
    if (!mapped && bugs.prefetchUnvalidatedMmio !== true) return;
    const inv = this.kvm.mmuInvalidate;
    const start = page & ~(PTE_PREFETCH_NUM - 1);
    const end = Math.min(start + PTE_PREFETCH_NUM, this.barPages);
    let prefetched = 0;
    let skipped = 0;
    for (let p = start; p < end; p++) {
      if (p === page || Atomics.load(this.s, this.at(p)) !== 0) continue;
      const pte = this.mapping.pte(p);
      if (pte === null) {
        // Nothing validated it: KVM has no pfn for it, unless it guesses one.
        const pfn = f.pte.pfn + (p - page);
        if (bugs.prefetchUnvalidatedMmio === true && pfn >= 0 && pfn < this.mmio.pages) {
          this.set(p, pfn, f.pte.writable, this.mmio.generation(pfn));
          acts?.acted(Acted.PREFETCH_UNVALIDATED_MMIO);
          prefetched++;
        } else skipped++;
        continue;
      }
      if (!mapped) { skipped++; continue; } // PFNMAP: KVM never prefetches it
      if (inv.retry(f.seq, this.baseGfn + p)) {
        if (bugs.prefetchDuringInvalidation !== true) { skipped++; continue; }
        acts?.acted(Acted.PREFETCH_DURING_INVALIDATION);
      }
      this.set(p, pte.pfn, pte.writable, pte.generation);
      prefetched++;
    }
    if (prefetched > 0) Atomics.add(this.words, BarMmuWord.PREFETCHED, prefetched);
    if (skipped > 0) Atomics.add(this.words, BarMmuWord.PREFETCH_SKIPPED, skipped);
  }

  private set(page: number, pfn: number, writable: boolean, generation: number): void {
    const at = this.at(page);
    Atomics.store(this.s, at + 1, writable ? SPTE_WRITABLE : 0);
    Atomics.store(this.s, at + 2, generation);
    Atomics.store(this.s, at, pfn + 1);
  }

  /**
   * A guest access to BAR page `page` through its SPTE: a read returns the MMIO word, a
   * write stores `value`. No SPTE, or a write through a read-only one: not done (the
   * vCPU faults). The oracles check the pfn's owner and generation, and that the VMA
   * still maps what the SPTE does.
   */
  access(page: number, write: boolean, value = 0): BarAccess {
    const spte = this.spte(page);
    if (spte === null || (write && !spte.writable)) return { done: false };
    this.check(page, spte, write);
    if (write) { this.mmio.write32(spte.pfn, value); return { done: true, value }; }
    return { done: true, value: this.mmio.read32(spte.pfn) };
  }

  /** kvm_mmu_notifier_invalidate_range_start over BAR pages: begin, zap the SPTEs, flush remote TLBs. Returns the SPTEs zapped. */
  *invalidateRangeStart(pos: number, count: number): Steps<number> {
    const inv = this.kvm.mmuInvalidate;
    while (!inv.tryLock(MMU_LOCK_HOLDER_KVM)) yield undefined;
    inv.begin(this.baseGfn + pos, this.baseGfn + pos + count);
    let zapped = 0;
    for (let p = pos; p < pos + count; p++) if (Atomics.exchange(this.s, this.at(p), 0) !== 0) zapped++;
    inv.unlock();
    if (zapped > 0) Atomics.add(this.words, BarMmuWord.ZAPPED, zapped);
    if (zapped > 0) yield* this.kvm.flushRemoteTlbs();
    return zapped;
  }

  /**
   * kvm_mmu_notifier_invalidate_range_end: faults that waited on the range may install
   * again. The oracles check the notifier's promise first: no SPTE in the range may map
   * what the VMA no longer maps (one built during the invalidation outlived it).
   */
  invalidateRangeEnd(pos: number, count: number): void {
    for (let p = pos; p < pos + count; p++) {
      const spte = this.spte(p);
      if (spte === null) continue;
      const pte = this.mapping.pte(p);
      if (pte === null || pte.pfn !== spte.pfn) this.find(BarFinding.UNVALIDATED, p);
    }
    this.kvm.mmuInvalidate.end();
  }

  /**
   * The oracles' sweep over every present SPTE, once, when nothing runs (the end of a run;
   * a second sweep would count the same SPTEs again): one
   * that maps another VM's page, a page that changed hands since, or what the VMA does not
   * map, is a breach waiting for an access, counted as if an access had found it.
   * Returns the SPTEs found.
   */
  audit(): number {
    let found = 0;
    for (let page = 0; page < this.barPages; page++) {
      const spte = this.spte(page);
      if (spte === null) continue;
      const n = this.check(page, spte, false);
      if (n > 0) Atomics.add(this.words, BarMmuWord.AUDIT_FOUND, 1);
      found += n;
    }
    return found;
  }

  /**
   * The oracles' checks of an SPTE at BAR page `page` (a write also against the VMA
   * entry's permission): each finding counted. Returns how many there were.
   */
  private check(page: number, spte: BarPte, write: boolean): number {
    let found = 0;
    if (this.mmio.owner(spte.pfn) !== this.vm) { this.find(BarFinding.CROSS_VM, page); found++; }
    if (this.mmio.generation(spte.pfn) !== spte.generation) { this.find(BarFinding.STALE_SPTE, page); found++; }
    const pte = this.mapping.pte(page);
    if (pte === null || pte.pfn !== spte.pfn || !pte.checked) { this.find(BarFinding.UNVALIDATED, page); found++; }
    else if (write && !pte.writable) { this.find(BarFinding.READ_ONLY_WRITE, page); found++; }
    return found;
  }

  /** The oracles' counts by finding, and the first BAR page each was seen at (or null). */
  findings(): { kind: BarFindingName; count: number; firstPage: number | null }[] {
    return BAR_FINDING_NAMES.map((kind, i) => {
      const first = Atomics.load(this.f, BarFinding.COUNT + i);
      return { kind, count: Atomics.load(this.f, i), firstPage: first > 0 ? first - 1 : null };
    });
  }

  private find(kind: BarFinding, page: number): void {
    Atomics.add(this.f, kind, 1);
    Atomics.compareExchange(this.f, BarFinding.COUNT + kind, 0, page + 1);
  }

  private at(page: number): number {
    if (!Number.isInteger(page) || page < 0 || page >= this.barPages) throw new Error(`BAR page ${page} outside the ${this.barPages}-page BAR`);
    return page * SPTE_WORDS;
  }
}
