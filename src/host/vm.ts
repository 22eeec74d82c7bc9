import {
  EINVAL, ENOENT, ENXIO, KVM_CLEAR_LOG_ALIGN, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_DMA, KVM_MEM_GUEST_MEMFD, KVM_MEM_KVM_ONLY,
  KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
  KVM_X86_QUIRK_IGNORE_GUEST_PAT,
} from './constants.ts';
import { SharedDirtyBitmap, popcount32 } from './dirty-bitmap.ts';
import { DirtyRing } from './dirty-ring.ts';
import { GuestMemory } from './guest-memory.ts';
import {
  type DirtyTracking, GlobalWord, VCPU_BLOCK_WORDS, VcpuWord, type VmLayout, slotIsReadonly, slotLogsDirtyPages,
} from './layout.ts';
import { Memslot, type PageStamp } from './memslot.ts';
import {
  SPTE_PRIVATE, SPTE_WRITABLE, makeSpteWritable, setSpteMemoryType, spteAccessType, mapSlotWritable, writeProtectMask32, writeProtectSlot, zapSptes,
} from './spte.ts';
import { type KvmMemoryAttributes, MemoryAttributes, gfnRange, invalidMemoryAttributes, slotRanges } from './memory-attributes.ts';
import { MMU_LOCK_HOLDER_KVM, MmuInvalidate } from './mmu-invalidate.ts';
import { CacheAccess, CpuCache, lineKey } from './cpu-cache.ts';
import { guestDram } from './guest-dram.ts';
import { type EptMemoryType, type MemoryType, type NoncoherentDmaUnregister, effectiveMemoryType, kvmCheckHasQuirk, vmxGetMtMask } from './memory-type.ts';
import { TlbShootdown } from './tlb-shootdown.ts';
import { Iommu } from './iommu/iommu.ts';
import { KvmBarMmu } from './mmio/kvm-bar-mmu.ts';
import { VfioBarMapping } from './mmio/vfio-bar-mapping.ts';
import type { BarBugs } from './mmio/bar-bugs.ts';
import { VendorDriver } from './mmio/vendor-driver.ts';
import { Acted, InjectionCounters } from './injections.ts';
import { KvmError } from '../util/errors.ts';
import { PageHistory } from './page-history.ts';
import { HARVEST_BITMAP, HostWriteLog, ProtectBy, TracepointSet } from './tracepoints.ts';
import { type Steps, WaitCode, waitFor } from '../roles/role.ts';

const MEMSLOT_FLAG_NAMES: [number, string][] = [
  [KVM_MEM_LOG_DIRTY_PAGES, 'KVM_MEM_LOG_DIRTY_PAGES'], [KVM_MEM_READONLY, 'KVM_MEM_READONLY'], [KVM_MEM_GUEST_MEMFD, 'KVM_MEM_GUEST_MEMFD'],
  [KVM_MEM_DMA, 'KVM_MEM_DMA'], [KVM_MEM_KVM_ONLY, 'KVM_MEM_KVM_ONLY'],
];

/** KVM_MEM_* flag names, `|`-joined (unknown bits in hex). */
export function memslotFlagNames(flags: number): string {
  const names = MEMSLOT_FLAG_NAMES.filter(([f]) => (flags & f) !== 0).map(([, n]) => n);
  const rest = flags & ~MEMSLOT_FLAG_NAMES.reduce((m, [f]) => m | f, 0);
  return [...names, ...(rest !== 0 ? [`0x${rest.toString(16)}`] : [])].join('|') || '0';
}

export { MMU_LOCK_HOLDER_KVM } from './mmu-invalidate.ts';

/** An oracle's count and the first gfn it saw (or null). */
export interface OracleCount { count: number; firstGfn: number | null }

/** A mediated device's virtual BAR in this VM (Vm.bars). */
export interface VmBar { mmu: KvmBarMmu; mapping: VfioBarMapping; driver: VendorDriver }

/** Kernel bugs a Vm can be built with (see src/bugs/catalog.ts). */
export interface KernelBugs extends BarBugs {
  skipTlbShootdown?: boolean;
  ringFullIgnored?: boolean;
  clearWithoutProtect?: boolean;
  untrackedHostWrite?: boolean;
  /** IOMMU: unmap returns without invalidating device IOTLBs. */
  staleIotlbAfterUnmap?: boolean;
  /** IOMMU: read-only pins mark pages dirty (today's vfio_pin_pages). */
  readPinDirties?: boolean;
  /** Devices: a DMA write no dirty source records (vfio_dma_rw without marking, a device log that misses it). */
  untrackedDma?: boolean;
  /** Devices: the mdev's vendor driver passes GPAs to vfio_dma_rw, which takes IOVAs. */
  gpaAsIova?: boolean;
  /** KVM_SET_MEMORY_ATTRIBUTES stores the new attributes before it zaps the old kind's SPTEs and flushes. */
  attributesBeforeZap?: boolean;
  /** kvm_noncoherent_dma_assignment_start_or_stop leaves the SPTEs as they are: built before, they keep WB + IPAT. */
  noZapOnNoncoherentTransition?: boolean;
  /** A guest's WBINVD is skipped even while non-coherent DMA is registered (need_emulate_wbinvd always false). */
  wbinvdNoop?: boolean;
  /** kvm_vfio_update_coherency decides from the file just added, not from all of them (kvm-vfio.ts). */
  noncoherentUnbalanced?: boolean;
  /** Dirty logging starts on a KVM_MEM_DMA slot as on any other: KVM keeps honouring the guest's PAT there. */
  dmaSlotWithDirtyLogging?: boolean;
  /** vmx_get_mt_mask has no clause for host MMIO: device memory gets RAM's memory type. */
  mmioMappedWb?: boolean;
}

/**
 * The VM as KVM holds it, usable from any thread that has the layout: memslots, SPTEs,
 * dirty bitmaps and rings, and the ioctls that act on them. Methods named after KVM's
 * ioctls are the ioctls; the ones that end in a remote TLB flush are step generators,
 * because completing a flush needs the vCPUs to step.
 */
export class Vm {
  readonly memory: GuestMemory;
  readonly shootdown: TlbShootdown;
  readonly global: Int32Array;
  readonly vcpuWords: Int32Array;
  readonly slotFlags: Int32Array;
  readonly bitmaps: SharedDirtyBitmap[];
  readonly rings: DirtyRing[] | null;
  readonly tracking: DirtyTracking;
  /** Per-page event records for the stamp oracle, or null (off: nothing is recorded). */
  readonly history: PageHistory | null;
  /** This view's tracers (page history, litmus, explain attach here). */
  readonly tracepoints = new TracepointSet();
  /** The IOMMU with its devices' shared state, when the VM has one. */
  readonly iommu: Iommu | null;
  /** How often each injected bug acted, counted where it acts. */
  readonly acts: InjectionCounters;
  /** KVM's memory attributes, when the VM type has private memory (VmConfig.privateMem). */
  readonly attributes: MemoryAttributes | null;
  readonly mmuInvalidate: MmuInvalidate;
  /** VmConfig.cpuCache: the CPU cache in front of guest memory (cpu-cache.ts), else null. */
  readonly cache: CpuCache | null;
  /** With the cache: the memory type the guest's PAT gives each page (VM-wide numbering), else null. */
  readonly guestPat: Uint8Array | null;
  /** Mediated devices' virtual BARs (VmConfig.bars): KVM's side, the VMM's mapping (whose zaps reach KVM here, in whatever thread zaps), the vendor driver. */
  readonly bars: readonly VmBar[];

  constructor(readonly layout: VmLayout, readonly bugs: KernelBugs = {}) {
    this.memory = new GuestMemory(layout);
    this.shootdown = new TlbShootdown(layout);
    this.global = new Int32Array(layout.global);
    this.vcpuWords = new Int32Array(layout.vcpus);
    this.slotFlags = new Int32Array(layout.slotFlags);
    this.bitmaps = this.memory.slots.map((s) => new SharedDirtyBitmap(s.dirtyBitmap, s.pages));
    this.tracking = layout.config.tracking;
    this.rings = layout.rings
      ? Array.from({ length: layout.config.vcpus }, (_, i) => new DirtyRing(layout, i))
      : null;
    this.history = layout.pageHistory ? new PageHistory(layout.pageHistory) : null;
    if (this.history !== null) this.tracepoints.attach(this.history.tracer());
    this.acts = new InjectionCounters(layout.injections);
    this.iommu = layout.iommu ? new Iommu(layout.iommu, this.memory, bugs, this.acts) : null;
    this.attributes = layout.attributes ? new MemoryAttributes(layout.attributes, this.memory) : null;
    this.cache = layout.cpuCache ? new CpuCache(layout.cpuCache.cache, guestDram(this.memory)) : null;
    this.guestPat = layout.cpuCache ? new Uint8Array(layout.cpuCache.guestPat) : null;
    this.bars = (layout.config.bars ?? []).map((b) => {
      const driver = new VendorDriver(b.driver);
      const injection = { bugs, acts: this.acts };
      const mapping = new VfioBarMapping(b.mapping, driver, injection);
      const mmu = new KvmBarMmu(b.mmu, this, mapping, driver.mmio, injection);
      mapping.register(mmu);
      return { mmu, mapping, driver };
    });
    this.mmuInvalidate = new MmuInvalidate(this.global);
  }

  /** kvm_supported_mem_attributes: PRIVATE on a VM type with private memory, else none. */
  get supportedMemoryAttributes(): number {
    return this.attributes !== null ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0;
  }

  /**
   * kvm_unmap_gfn_range over gfns [start, end) of every slot: zaps the SPTEs that map
   * `kinds` (SPTE_PRIVATE, SPTE_WRITABLE: kvm_gfn_range's attr_filter), then flushes
   * remote TLBs if any was present. Returns the SPTEs zapped.
   */
  *unmapGfnRange(start: number, end: number, kinds: number): Steps<number> {
    let zapped = 0;
    for (const r of slotRanges(this.memory, start, end)) zapped += zapSptes(r.slot, r.page, r.count, kinds);
    yield undefined;
    if (zapped > 0) yield* this.flushRemoteTlbs();
    return zapped;
  }

  /**
   * The first half of an MMU invalidation of gfns [start, end) (kvm_handle_gfn_range with
   * on_lock = kvm_mmu_invalidate_begin): under mmu_lock, begin, zap the SPTEs that map
   * `kinds`, flush. The caller changes what the range maps to, then calls
   * mmuInvalidate.end(); faults in the range retry until then.
   */
  *invalidateGfnRange(start: number, end: number, kinds: number): Steps<number> {
    while (!this.mmuInvalidate.tryLock(MMU_LOCK_HOLDER_KVM)) yield undefined; // a vCPU's fault holds it for one step
    this.mmuInvalidate.begin(start, end);
    const zapped = yield* this.unmapGfnRange(start, end, kinds);
    this.mmuInvalidate.unlock();
    return zapped;
  }

  /**
   * KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_set_mem_attributes), in its order and with a step
   * between each part, so that faults and other actors can come in between: nothing to
   * do if the whole range has the attributes already; reserve every entry (so nothing
   * fails half-way); begin an MMU invalidation and zap the SPTEs of the kind the range
   * leaves (to private: the shared mappings; to shared: the private ones, as TDX zaps),
   * flush; store the attributes; end the invalidation. Faults that raced it retry.
   */
  *setMemoryAttributes(a: KvmMemoryAttributes): Steps {
    const why = invalidMemoryAttributes(a, this.supportedMemoryAttributes);
    if (why !== null) throw new KvmError(EINVAL, 'KVM_SET_MEMORY_ATTRIBUTES', why);
    const attributes = this.attributes;
    if (attributes === null) return; // only attributes 0 pass the check, and they are what every gfn has
    const { start, end } = gfnRange(a.address, a.size);
    if (attributes.rangeHas(start, end, a.attributes)) return;
    yield undefined; // xa_reserve for every gfn: memory allocation, which cannot fail here
    const leaving = (a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE) !== 0 ? SPTE_WRITABLE : SPTE_PRIVATE;
    if (this.bugs.attributesBeforeZap) {
      // The store first: until the zap and flush below, a vCPU's TLB still maps the old kind
      // and its accesses go on through it into a page whose attribute says otherwise.
      for (const r of slotRanges(this.memory, start, end)) {
        attributes.store(r, a.attributes);
        yield undefined;
      }
      if ((yield* this.invalidateGfnRange(start, end, leaving)) > 0) this.acts.acted(Acted.ATTRIBUTES_BEFORE_ZAP);
      this.mmuInvalidate.end();
      return;
    }
    yield* this.invalidateGfnRange(start, end, leaving);
    for (const r of slotRanges(this.memory, start, end)) {
      attributes.store(r, a.attributes);
      yield undefined;
    }
    this.mmuInvalidate.end();
  }

  /** kvm->arch.disabled_quirks (VmConfig.disabledQuirks, KVM_CAP_DISABLE_QUIRKS2). */
  get disabledQuirks(): number {
    return this.layout.config.disabledQuirks ?? 0;
  }

  /** kvm_arch_has_noncoherent_dma. */
  noncoherentDma(): boolean {
    return Atomics.load(this.global, GlobalWord.NONCOHERENT_DMA_COUNT) !== 0;
  }

  /** KVM honours the guest's PAT somewhere: non-coherent DMA is registered, or a slot has KVM_MEM_DMA. */
  honoursGuestPat(): boolean {
    return this.noncoherentDma() || this.dmaSlots().length > 0;
  }

  /** The slot has KVM_MEM_DMA: a device's non-coherent DMA goes there (constants.ts). */
  isDmaSlot(slot: Memslot): boolean {
    return (this.flags(slot) & KVM_MEM_DMA) !== 0;
  }

  /** The slots with KVM_MEM_DMA. */
  dmaSlots(): Memslot[] {
    return this.memory.slots.filter((s) => this.isDmaSlot(s));
  }

  /**
   * vmx_get_mt_mask for a page of `slot` as the VM is now: the EPT memory type and IPAT
   * bits a new SPTE gets (host/memory-type.ts). Device memory (MemslotConfig.hostMmio) is
   * host MMIO; a KVM_MEM_DMA slot has the guest's PAT honoured as if non-coherent DMA
   * were registered (slotHonoursPat).
   */
  getMtMask(slot: Memslot): number {
    let isMmio = slot.hostMmio;
    // mmio-mapped-wb: the host MMIO clause is missing, and device memory is typed as RAM.
    if (isMmio && this.bugs.mmioMappedWb) { this.acts.acted(Acted.MMIO_MAPPED_WB); isMmio = false; }
    return vmxGetMtMask({ isMmio, noncoherentDma: this.noncoherentDma() || this.slotHonoursPat(slot), disabledQuirks: this.disabledQuirks });
  }

  /**
   * KVM_MEM_DMA (constants.ts): the guest's PAT is honoured in this slot, except while it
   * logs dirty pages under 'force-wb' (VmConfig.dmaSlotLogging; 'refuse' never gets there).
   */
  slotHonoursPat(slot: Memslot): boolean {
    if (!this.isDmaSlot(slot)) return false;
    return (this.flags(slot) & KVM_MEM_LOG_DIRTY_PAGES) === 0 || this.bugs.dmaSlotWithDirtyLogging === true;
  }

  /** The machine check oracle: a cacheable access to host MMIO (a vCPU's, through an SPTE that was not UC). */
  machineCheck(slot: Memslot, page: number): void {
    Atomics.add(this.global, GlobalWord.MACHINE_CHECKS, 1);
    Atomics.compareExchange(this.global, GlobalWord.MACHINE_CHECK_FIRST_GFN, 0, slot.baseGfn + page + 1);
  }

  /** The KVM-only slot oracle: the VMM's generic path (migration, a dump) read or wrote a KVM_MEM_KVM_ONLY slot's page. */
  kvmOnlyTouched(slot: Memslot, page: number, pages = 1): void {
    Atomics.add(this.global, GlobalWord.KVM_ONLY_TOUCHES, pages);
    Atomics.compareExchange(this.global, GlobalWord.KVM_ONLY_TOUCH_FIRST_GFN, 0, slot.baseGfn + page + 1);
  }

  /** What the machine check oracle counted, and the first gfn. */
  machineChecks(): OracleCount {
    return this.oracleCount(GlobalWord.MACHINE_CHECKS, GlobalWord.MACHINE_CHECK_FIRST_GFN);
  }

  /** What the KVM-only slot oracle counted, and the first gfn. */
  kvmOnlyTouches(): OracleCount {
    return this.oracleCount(GlobalWord.KVM_ONLY_TOUCHES, GlobalWord.KVM_ONLY_TOUCH_FIRST_GFN);
  }

  private oracleCount(count: number, first: number): OracleCount {
    const f = Atomics.load(this.global, first);
    return { count: Atomics.load(this.global, count), firstGfn: f > 0 ? f - 1 : null };
  }

  /**
   * The memory type a vCPU access to a page of `slot` takes now, with the CPU cache model:
   * its SPTE's EPT type combined with the guest's PAT (effectiveMemoryType). A zapped SPTE:
   * the access faults and KVM builds it anew (reads take no walk here: the type is what
   * that fault gives).
   */
  accessMemoryType(slot: Memslot, page: number): EptMemoryType {
    const spte = slot.spte[page]!;
    const pat = this.guestPat![slot.firstPage + page]! as MemoryType;
    return spte === 0 ? effectiveMemoryType(this.getMtMask(slot), pat) : spteAccessType(spte, pat);
  }

  /**
   * kvm_arch_register_noncoherent_dma (VFIO, for a device that cannot be forced to snoop):
   * count it; the first one starts honouring the guest's PAT. Returns the SPTEs zapped.
   */
  *registerNoncoherentDma(): Steps<number> {
    if (Atomics.add(this.global, GlobalWord.NONCOHERENT_DMA_COUNT, 1) !== 0) return 0;
    return yield* this.noncoherentDmaAssignmentStartOrStop();
  }

  /**
   * A VM capability with which the VMM asks KVM to honour the guest's PAT (Kevin Tian's
   * suggestion in the seed discussion; not merged, no name settled: vmemlab calls it
   * KVM_CAP_NONCOHERENT_DMA): enabled once, for the VM's life, it registers non-coherent
   * DMA as VFIO would. A second enable is EINVAL, as KVM_ENABLE_CAP answers a one-shot
   * capability. Returns the SPTEs zapped.
   */
  *enableCapNoncoherentDma(): Steps<number> {
    if (Atomics.compareExchange(this.global, GlobalWord.NONCOHERENT_CAP, 0, 1) !== 0) {
      throw new KvmError(EINVAL, 'KVM_ENABLE_CAP', 'KVM_CAP_NONCOHERENT_DMA is already enabled');
    }
    return yield* this.registerNoncoherentDma();
  }

  /**
   * kvm_arch_unregister_noncoherent_dma: the last one stops honouring the guest's PAT.
   * Refused, the count unchanged, when nothing is registered: KVM does not check, and a
   * count of -1 reads as registered (kvm_vfio_update_coherency only unregisters what it
   * registered, so only a caller's bug gets there).
   */
  *unregisterNoncoherentDma(): Steps<NoncoherentDmaUnregister> {
    const g = this.global;
    for (;;) {
      const count = Atomics.load(g, GlobalWord.NONCOHERENT_DMA_COUNT);
      if (count === 0) return { ok: false, error: 'kvm_arch_unregister_noncoherent_dma: no non-coherent DMA is registered' };
      if (Atomics.compareExchange(g, GlobalWord.NONCOHERENT_DMA_COUNT, count, count - 1) !== count) continue;
      return { ok: true, zapped: count === 1 ? yield* this.noncoherentDmaAssignmentStartOrStop() : 0 };
    }
  }

  /**
   * kvm_noncoherent_dma_assignment_start_or_stop: IPAT changes for every gfn, so zap every
   * SPTE (kvm_zap_gfn_range over all gfns: begin, zap, flush, end) for faults to rebuild
   * them; with the quirk off the guest's PAT is honoured either way and nothing changes.
   */
  private *noncoherentDmaAssignmentStartOrStop(): Steps<number> {
    if (!kvmCheckHasQuirk(this.disabledQuirks, KVM_X86_QUIRK_IGNORE_GUEST_PAT)) return 0;
    if (this.bugs.noZapOnNoncoherentTransition) {
      // The SPTEs built with the old IPAT stay: each present one is a page the guest's PAT still cannot reach.
      let present = 0;
      for (const s of this.memory.slots) for (let p = 0; p < s.pages; p++) if ((s.spte[p]! & (SPTE_WRITABLE | SPTE_PRIVATE)) !== 0) present++;
      if (present > 0) this.acts.acted(Acted.NO_ZAP_ON_NONCOHERENT_TRANSITION, present);
      return 0;
    }
    const end = Math.max(0, ...this.memory.slots.map((s) => s.endGfn)); // only memslot gfns have SPTEs
    const zapped = yield* this.invalidateGfnRange(0, end, SPTE_WRITABLE | SPTE_PRIVATE);
    this.mmuInvalidate.end();
    return zapped;
  }

  /** Maps every slot: pages start present and writable unless the slot is read-only; with the cache model, typed as vmx_get_mt_mask says. */
  populate(): void {
    for (const s of this.memory.slots) {
      if (slotIsReadonly(this.flags(s))) continue;
      mapSlotWritable(s);
      if (this.cache === null) continue;
      const mt = this.getMtMask(s);
      for (let p = 0; p < s.pages; p++) setSpteMemoryType(s, p, mt);
    }
  }

  flags(slot: Memslot): number {
    return Atomics.load(this.slotFlags, slot.index);
  }

  vcpuBase(vcpu: number): number {
    return vcpu * VCPU_BLOCK_WORDS;
  }

  get manualProtect(): boolean {
    return this.tracking.kind === 'bitmap' && this.tracking.manualProtect;
  }

  get hasBackupBitmap(): boolean {
    return this.tracking.kind === 'ring' && this.tracking.withBitmap;
  }

  /**
   * KVM_SET_USER_MEMORY_REGION adding KVM_MEM_LOG_DIRTY_PAGES. Write-protects the slot
   * unless manual protect with INITIALLY_SET is on, in which case the bitmap starts
   * all-ones and protection comes with the first CLEAR. Then flushes remote TLBs. A
   * KVM_MEM_DMA slot is zapped first (force-wb) or refused (VmConfig.dmaSlotLogging).
   * Returns the SPTEs the zap cleared.
   */
  *enableDirtyLogging(slot: Memslot): Steps<number> {
    // check_memory_region_flags: "Dirty logging private memory is not currently supported".
    if (slot.gmem !== null && this.layout.config.logSharedGuestMemfd !== true) throw new KvmError(EINVAL, 'KVM_SET_USER_MEMORY_REGION2', `slot ${slot.id}: KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_GUEST_MEMFD slot`);
    const dma = this.isDmaSlot(slot);
    if (dma && this.bugs.dmaSlotWithDirtyLogging) this.acts.acted(Acted.DMA_SLOT_WITH_DIRTY_LOGGING);
    else if (dma && this.layout.config.dmaSlotLogging === 'refuse') {
      throw new KvmError(EINVAL, 'KVM_SET_USER_MEMORY_REGION', `slot ${slot.id}: KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_DMA slot (the two exclude each other)`);
    }
    Atomics.or(this.slotFlags, slot.index, KVM_MEM_LOG_DIRTY_PAGES);
    let zapped = 0;
    if (dma && !this.bugs.dmaSlotWithDirtyLogging) {
      // force-wb: the guest's PAT no longer counts here; zap so that faults rebuild every SPTE WB + IPAT.
      zapped = yield* this.invalidateGfnRange(slot.baseGfn, slot.endGfn, SPTE_WRITABLE);
      this.mmuInvalidate.end();
    }
    const t = this.tracking;
    if (t.kind === 'bitmap' && t.manualProtect && t.initiallySet) {
      this.bitmaps[slot.index]!.setAll();
      return zapped;
    }
    writeProtectSlot(slot);
    this.tracepoints.active?.writeProtectedRange(slot, 0, slot.pages, ProtectBy.ENABLE_LOGGING);
    yield undefined;
    yield* this.flushRemoteTlbs();
    return zapped;
  }

  /**
   * KVM_SET_USER_MEMORY_REGION on an existing slot, the same range, new flags
   * (KVM_MR_FLAGS_ONLY): only KVM_MEM_LOG_DIRTY_PAGES may change. KVM refuses a change of
   * KVM_MEM_READONLY or KVM_MEM_GUEST_MEMFD with EINVAL (__kvm_set_memory_region), and
   * vmemlab the proposals' KVM_MEM_DMA and KVM_MEM_KVM_ONLY likewise (fixed for the slot's
   * life: a change would need every SPTE's memory type and every mapping rebuilt). Nothing
   * changes on a refusal.
   */
  *setMemslotFlags(slot: Memslot, flags: number): Steps {
    const old = this.flags(slot);
    const fixed = (flags ^ old) & ~KVM_MEM_LOG_DIRTY_PAGES;
    if (fixed !== 0) throw new KvmError(EINVAL, 'KVM_SET_USER_MEMORY_REGION', `slot ${slot.id}: ${memslotFlagNames(fixed)} cannot change on an existing slot (only KVM_MEM_LOG_DIRTY_PAGES can)`);
    if ((flags & ~old & KVM_MEM_LOG_DIRTY_PAGES) !== 0) yield* this.enableDirtyLogging(slot);
    else if ((old & ~flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0) this.disableDirtyLogging(slot);
  }

  /**
   * Logging off. A KVM_MEM_DMA slot forced to WB keeps its WB + IPAT SPTEs until they are
   * zapped (left: a completed migration's source does not run again).
   */
  disableDirtyLogging(slot: Memslot): void {
    Atomics.and(this.slotFlags, slot.index, ~KVM_MEM_LOG_DIRTY_PAGES);
    // A read-only slot stays unmapped for writes (populate leaves it so): its writes exit to MMIO.
    // A guest_memfd slot keeps its SPTEs: a shared mapping must come from a fault that checks the attribute.
    if (!slotIsReadonly(this.flags(slot)) && slot.gmem === null) mapSlotWritable(slot);
  }

  /**
   * mark_page_dirty_in_slot. With the ring: the running vCPU's ring in vCPU context,
   * else the backup bitmap if DIRTY_LOG_RING_WITH_BITMAP is on, else lost (KVM WARNs).
   * Returns true when the push left the vCPU's ring soft-full.
   */
  markPageDirtyInSlot(slot: Memslot, page: number, vcpu: number): boolean {
    if (!slotLogsDirtyPages(this.flags(slot))) return false;
    const t = this.tracepoints.active;
    if (this.rings !== null) {
      if (vcpu >= 0) {
        const ring = this.rings[vcpu]!;
        const entry = t !== null ? ring.dirtyIndex : 0;
        const softFull = ring.push(slot.slotField, page);
        t?.pageDirtied({ where: 'ring', slot, page, gfn: slot.baseGfn + page, vcpu, entry, softFull });
        if (softFull && this.bugs.ringFullIgnored) { this.acts.acted(Acted.RING_FULL_IGNORED); return false; }
        return softFull;
      }
      if (this.hasBackupBitmap) {
        this.bitmaps[slot.index]!.mark(page);
        t?.pageDirtied({ where: 'bitmap', slot, page, gfn: slot.baseGfn + page, vcpu });
      } else {
        Atomics.add(this.global, GlobalWord.LOST_HOST_WRITES, 1);
        this.acts.acted(Acted.NO_BACKUP_BITMAP);
        t?.pageDirtied({ where: 'lost', slot, page, gfn: slot.baseGfn + page });
      }
      return false;
    }
    this.bitmaps[slot.index]!.mark(page);
    t?.pageDirtied({ where: 'bitmap', slot, page, gfn: slot.baseGfn + page, vcpu });
    return false;
  }

  /**
   * The write-protect fault on vCPU `vcpu`: make the SPTE writable, then log the page if
   * the slot logs dirty pages. Returns true when the vCPU must exit with
   * KVM_EXIT_DIRTY_RING_FULL before the faulting write retires.
   */
  handleWriteFault(vcpu: number, slot: Memslot, page: number): boolean {
    // SPTE first, then the log, as KVM's fast_page_fault does (cmpxchg the SPTE writable,
    // then mark_page_dirty_in_slot). The other order loses writes: a harvest and reset
    // between the push and the SPTE update would re-protect the page, and the late
    // update would leave it writable with nothing left in the log.
    this.tracepoints.active?.writeFault(vcpu, slot, page);
    // The memory type first (before the SPTE is usable), and only where the cache model is: elsewhere every SPTE stays WB + IPAT.
    if (this.cache !== null) setSpteMemoryType(slot, page, this.getMtMask(slot));
    makeSpteWritable(slot, page);
    return this.markPageDirtyInSlot(slot, page, vcpu);
  }

  /**
   * kvm_write_guest: KVM (or the VMM through KVM) writes a guest page and marks it dirty.
   * `vcpu` is the running vCPU whose context the write happens in, or -1 for none.
   */
  writeGuest(slot: Memslot, page: number, value: number, stamp: PageStamp, vcpu: number): void {
    if (this.cache === null) {
      slot.writeU64(page, value);
      slot.stamp(page, stamp.writer, stamp.seq, stamp.iteration);
    } else {
      // KVM writes through the kernel's mapping of the page: write-back.
      const bytes = new Uint32Array(4);
      Memslot.stampedBytes(bytes, value, stamp.writer, stamp.seq, stamp.iteration);
      this.cache.write(CacheAccess.WB, lineKey(slot.firstPage + page, 0), 0, new Uint8Array(bytes.buffer));
    }
    Atomics.add(this.global, GlobalWord.HOST_WRITES, 1);
    if (!this.bugs.untrackedHostWrite) this.markPageDirtyInSlot(slot, page, vcpu);
    else if (slotLogsDirtyPages(this.flags(slot))) this.acts.acted(Acted.UNTRACKED_HOST_WRITE);
    const t = this.tracepoints.active;
    if (t !== null) {
      const how = this.bugs.untrackedHostWrite || !slotLogsDirtyPages(this.flags(slot)) ? HostWriteLog.UNTRACKED
        : this.rings !== null && vcpu >= 0 ? HostWriteLog.RING
        : this.rings === null || this.hasBackupBitmap ? HostWriteLog.BITMAP : HostWriteLog.DROPPED;
      t.hostWrite(slot, page, how);
    }
  }

  /** kvm_flush_remote_tlbs: complete only when every vCPU in guest mode has acknowledged. */
  *flushRemoteTlbs(): Steps {
    if (this.bugs.skipTlbShootdown) {
      if (this.shootdown.anyInGuestMode()) this.acts.acted(Acted.SKIP_TLB_SHOOTDOWN);
      return;
    }
    const gen = this.shootdown.begin();
    yield undefined;
    for (;;) {
      const v = this.shootdown.pendingVcpu(gen);
      if (v < 0) return;
      const at = this.shootdown.ackWord(v);
      yield waitFor(WaitCode.FLUSH_ACK, v, gen, { ...at, value: Atomics.load(at.array, at.index) });
    }
  }

  private checkBitmapIoctl(ioctl: string, slot: Memslot): void {
    if (this.rings !== null && !this.hasBackupBitmap) {
      throw new KvmError(ENXIO, ioctl, 'the dirty ring is enabled without a backup bitmap');
    }
    if (!slotLogsDirtyPages(this.flags(slot))) {
      throw new KvmError(ENOENT, ioctl, `slot ${slot.id} does not log dirty pages`);
    }
  }

  /**
   * KVM_GET_DIRTY_LOG. Legacy (no manual protect): snapshot the bitmap and clear it word
   * by word, write-protect the pages in the snapshot, then flush; the snapshot is what
   * userspace gets. With manual protect: a plain copy, nothing protected.
   */
  *getDirtyLog(slot: Memslot, out: Uint32Array = new Uint32Array(slot.dirtyBitmap.length)): Steps<Uint32Array> {
    this.checkBitmapIoctl('KVM_GET_DIRTY_LOG', slot);
    const words = slot.dirtyBitmap;
    const t = this.tracepoints.active;
    if (this.manualProtect) {
      for (let w = 0; w < words.length; w++) {
        out[w] = Atomics.load(words, w);
        if (t !== null && out[w] !== 0) t.harvested(slot, w * 32, out[w]!, 0, HARVEST_BITMAP);
      }
      yield undefined; // the copy takes time: vCPUs run on while userspace reads it
      return out;
    }
    let flush = false;
    for (let w = 0; w < words.length; w++) {
      const mask = Atomics.load(words, w) === 0 ? 0 : Atomics.exchange(words, w, 0) >>> 0;
      out[w] = mask;
      if (mask !== 0) {
        writeProtectMask32(slot, w * 32, mask);
        flush = true;
        if (t !== null) {
          t.harvested(slot, w * 32, mask, 0, HARVEST_BITMAP);
          t.writeProtected(slot, w * 32, mask, 0, ProtectBy.GET_DIRTY_LOG);
        }
      }
    }
    yield undefined;
    if (flush) yield* this.flushRemoteTlbs();
    return out;
  }

  /**
   * KVM_CLEAR_DIRTY_LOG(first_page, num_pages, bitmap): clear the given bits that are
   * set, write-protect exactly those pages, flush if any were cleared. first_page must
   * be a multiple of 64, and num_pages too unless the range ends at the end of the slot.
   * Returns the number of pages cleared.
   */
  *clearDirtyLog(slot: Memslot, firstPage: number, numPages: number, bitmap: ArrayLike<number>): Steps<number> {
    const ioctl = 'KVM_CLEAR_DIRTY_LOG';
    if (!this.manualProtect && !this.hasBackupBitmap) {
      throw new KvmError(EINVAL, ioctl, 'manual dirty log protect is not enabled');
    }
    this.checkBitmapIoctl(ioctl, slot);
    if (firstPage % KVM_CLEAR_LOG_ALIGN !== 0) {
      throw new KvmError(EINVAL, ioctl, `first_page ${firstPage} is not a multiple of ${KVM_CLEAR_LOG_ALIGN}`);
    }
    if (firstPage + numPages > slot.pages || numPages < 0) {
      throw new KvmError(EINVAL, ioctl, `pages ${firstPage}..${firstPage + numPages} pass the end of slot ${slot.id} (${slot.pages} pages)`);
    }
    if (numPages % KVM_CLEAR_LOG_ALIGN !== 0 && firstPage + numPages !== slot.pages) {
      throw new KvmError(EINVAL, ioctl, `num_pages ${numPages} is not a multiple of ${KVM_CLEAR_LOG_ALIGN} and the range does not end at the end of the slot`);
    }
    const words = slot.dirtyBitmap;
    let cleared = 0;
    for (let i = 0; i < numPages; i += 32) {
      const w = (firstPage + i) >>> 5;
      let mask = (bitmap[i >>> 5]! >>> 0);
      const valid = numPages - i;
      if (valid < 32) mask &= (1 << valid) - 1;
      if (mask === 0) continue;
      // atomic_long_fetch_andnot: only bits that were set count as cleared.
      mask &= Atomics.and(words, w, ~mask) >>> 0;
      mask >>>= 0;
      if (mask === 0) continue;
      cleared += popcount32(mask);
      if (!this.bugs.clearWithoutProtect) {
        writeProtectMask32(slot, w * 32, mask);
        this.tracepoints.active?.writeProtected(slot, w * 32, mask, 0, ProtectBy.CLEAR_DIRTY_LOG);
      } else {
        this.acts.acted(Acted.CLEAR_WITHOUT_PROTECT, popcount32(mask));
      }
    }
    yield undefined;
    if (cleared > 0) yield* this.flushRemoteTlbs();
    return cleared;
  }

  /**
   * KVM_RESET_DIRTY_RINGS: reset every vCPU's harvested entries (re-protecting their
   * pages, coalesced per 64-page window), then one remote TLB flush if anything was
   * reset. Entries naming a missing slot or an offset past its end are skipped.
   * Returns the number of entries reset.
   */
  *resetDirtyRings(): Steps<number> {
    if (this.rings === null) throw new KvmError(EINVAL, 'KVM_RESET_DIRTY_RINGS', 'the dirty ring is not enabled');
    let total = 0;
    for (const ring of this.rings) {
      total += ring.reset(this.resetDirtyGfn);
      yield undefined;
    }
    if (total > 0) yield* this.flushRemoteTlbs();
    return total;
  }

  /** kvm_reset_dirty_gfn: validates the slot and range, then write-protects the mask. */
  readonly resetDirtyGfn = (slotField: number, offset: number, lo: number, hi: number): void => {
    const slot = this.memory.slotByField(slotField);
    if (slot === undefined) return;
    const fls = hi !== 0 ? 63 - Math.clz32(hi) : 31 - Math.clz32(lo);
    if (offset + fls >= slot.pages) return;
    if (!slotLogsDirtyPages(this.flags(slot))) return;
    writeProtectMask32(slot, offset, lo);
    if (hi !== 0) writeProtectMask32(slot, offset + 32, hi);
    this.tracepoints.active?.writeProtected(slot, offset, lo, hi, ProtectBy.RESET_DIRTY_RINGS);
  };

  /** Guest operations retired by all vCPUs (each publishes its count at its step boundary): the guest's clock for devices that pace by it. */
  /** The virtual BAR holding guest frame `gfn`, or undefined. */
  barAt(gfn: number): VmBar | undefined {
    for (const b of this.bars) if (gfn >= b.mmu.baseGfn && gfn < b.mmu.baseGfn + b.mmu.barPages) return b;
    return undefined;
  }

  /** The operations vCPU `v` has retired (published in bursts). */
  vcpuOps(v: number): number {
    return Atomics.load(this.vcpuWords, this.vcpuBase(v) + VcpuWord.OPS);
  }

  guestOps(): number {
    let n = 0;
    for (let v = 0; v < this.layout.config.vcpus; v++) n += this.vcpuOps(v);
    return n;
  }

  lostHostWrites(): number {
    return Atomics.load(this.global, GlobalWord.LOST_HOST_WRITES);
  }
}
