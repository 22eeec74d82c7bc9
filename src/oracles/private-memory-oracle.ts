import { PAGE_SIZE } from '../host/constants.ts';
import type { Memslot } from '../host/memslot.ts';
import { slotRanges } from '../host/memory-attributes.ts';
import type { Vm } from '../host/vm.ts';
import type { ConversionObserver, GuestMemfdRam } from '../host/vmm/kvm-convert-memory.ts';
import type { ConversionWatch } from '../host/vmm/kvm-cpu-exec.ts';
import { RDM_OK, type RamBlockAttributes, type RamDiscardListener, type RamDiscardResult, type RamSection, wholeSection } from '../host/vmm/ram-block-attributes.ts';
import type { Steps } from '../roles/role.ts';
import { hex } from '../util/hex.ts';

/**
 * What must hold for a confidential guest's memory whenever no conversion is under way
 * (docs/reference.md §7, the orderings that leak or lose data): QEMU's RamDiscardManager says shared
 * exactly where KVM's attributes do (a drift makes a late listener, a hot-plugged device,
 * map the wrong pages); no IOMMU mapping reaches a page that is private (a mapping left
 * behind lets the device write memory that is discarded, or reused); and a private page's
 * shared memory was discarded (what is left there is data the host still sees).
 */
export const PRIVATE_MEMORY_FINDING_KINDS = [
  'rdm-drift', 'mapping-left', 'shared-not-discarded',
  // ConversionOracle: the orderings of a conversion, and what a device or a vCPU reached meanwhile.
  'discarded-while-mapped', 'populated-while-private', 'discarded-while-shared', 'dma-after-discard', 'stale-store', 'hole-not-zero',
] as const;
export type PrivateMemoryFindingKind = (typeof PRIVATE_MEMORY_FINDING_KINDS)[number];

export interface PrivateMemoryFinding { kind: PrivateMemoryFindingKind; slot: number; gfn: number; detail: string }

/** The RamDiscardManager disagrees with KVM's attribute (`priv`) on a page: the finding, worded after `when`, or null. */
function rdmDrift(slot: Memslot, rdm: RamBlockAttributes, page: number, priv: boolean, when: string): PrivateMemoryFinding | null {
  if (rdm.isPopulated(page * PAGE_SIZE, PAGE_SIZE) !== priv) return null;
  return { kind: 'rdm-drift', slot: slot.id, gfn: slot.baseGfn + page, detail: `${when} ${priv ? 'private' : 'shared'}, the RamDiscardManager ${priv ? 'populated (shared)' : 'discarded (private)'}` };
}

/** `discards`: the design discards a private page's shared memory (in place, nothing is). */
export function checkPrivateMemory(vm: Vm, ram: GuestMemfdRam, o: { max?: number; discards?: boolean } = {}): { findings: PrivateMemoryFinding[]; count: number } {
  const max = o.max ?? 16;
  const discards = o.discards ?? true;
  const attributes = vm.attributes;
  const findings: PrivateMemoryFinding[] = [];
  let count = 0;
  if (attributes === null) return { findings, count };
  const found = (f: PrivateMemoryFinding): void => { count++; if (findings.length < max) findings.push(f); };
  // Which gfns the IOMMU maps, and at which IOVA (one pass over the IO page table).
  const mappedAt = new Map<number, number>();
  const table = vm.iommu?.table;
  if (table !== undefined) for (let iova = 0; iova < table.pages; iova++) if (table.present(iova)) mappedAt.set(table.gfn(iova), iova);
  for (const [slot, rdm] of ram.blocks) {
    for (let page = 0; page < slot.pages; page++) {
      const gfn = slot.baseGfn + page;
      const priv = attributes.isPrivate(slot, page);
      const drift = rdmDrift(slot, rdm, page, priv, 'KVM says');
      if (drift !== null) found(drift);
      if (!priv) continue;
      const iova = mappedAt.get(gfn);
      if (iova !== undefined) found({ kind: 'mapping-left', slot: slot.id, gfn, detail: `private, still mapped in the IOMMU at IOVA ${hex(iova * PAGE_SIZE)}` });
      if (discards && !slot.isZeroPage(page)) found({ kind: 'shared-not-discarded', slot: slot.id, gfn, detail: 'private, its shared memory still holds data' });
    }
  }
  return { findings, count };
}

export function describePrivateMemoryFinding(f: PrivateMemoryFinding): string {
  return `${f.kind}: slot ${f.slot} gfn ${hex(f.gfn)}: ${f.detail}`;
}

/**
 * The private memory rules that hold at every moment, not only between conversions
 * (docs/reference.md §7, the orderings that lose data or leak access), checked where they
 * can break:
 * - as a RamDiscardListener registered like VFIO's (a witness): a populate (a map) only of
 *   pages KVM already says are shared, a discard (an unmap) only of pages it already says
 *   are private: KVM_SET_MEMORY_ATTRIBUTES comes first (kvm_convert_memory). A late
 *   registration replays the manager's populated ranges: they must be shared too.
 * - as the conversion's observer: shared memory is discarded only once no IOMMU mapping
 *   reaches it (the listeners unmapped first); a punched guest_memfd range reads zeros.
 * - per device DMA: never into a private page whose shared memory was discarded (a
 *   mapping left behind: the write is lost, or lands in reused memory).
 * - per retired vCPU store: of the kind the page's attribute says (a store of the other
 *   kind went through a translation KVM should have zapped before the attribute changed).
 * The IOMMU is looked up at IOVA = GPA, as VFIO's RAM discard listener maps.
 */
export class ConversionOracle implements ConversionObserver, RamDiscardListener, ConversionWatch {
  readonly doubleDiscardSupported = true;
  /** The first `max` findings; every finding is counted, and its kind kept. */
  readonly findings: PrivateMemoryFinding[] = [];
  count = 0;
  readonly kinds = new Set<PrivateMemoryFindingKind>();
  /** Per VM-wide page: its shared memory was discarded and it has not been converted to shared since. */
  private readonly discarded: Uint8Array;

  constructor(readonly vm: Vm, readonly max = 16) {
    this.discarded = new Uint8Array(vm.memory.totalPages);
  }

  /** Observes `ram`'s conversions and witnesses every RAM block's listeners (the registration replays what is populated). */
  *attach(ram: GuestMemfdRam): Steps {
    ram.observe(this);
    for (const [slot, rdm] of ram.blocks) yield* rdm.registerListener(this, wholeSection(slot));
  }

  /** Findings handed out by take(). */
  private taken = 0;

  /** ConversionWatch: the findings not taken yet (of the first `max`), described. */
  take(): string[] {
    const out = this.findings.slice(this.taken).map(describePrivateMemoryFinding);
    this.taken = this.findings.length;
    return out;
  }

  /**
   * ConversionWatch: after a conversion, over its range the RamDiscardManager (or the
   * design's record the VMM keeps in its bitmap) says shared exactly where KVM does, and
   * the IOMMU maps none of the pages that are private now.
   */
  converted(ram: GuestMemfdRam, gpa: number, size: number): void {
    const first = gpa / PAGE_SIZE;
    for (const { slot, page: from, count } of slotRanges(this.vm.memory, first, first + size / PAGE_SIZE)) {
      const rdm = ram.rdmOf(slot);
      if (rdm === undefined) continue;
      for (let page = from; page < from + count; page++) {
        const priv = this.vm.attributes!.isPrivate(slot, page);
        const drift = rdmDrift(slot, rdm, page, priv, 'after its conversion KVM says');
        if (drift !== null) this.record(drift);
        const gfn = slot.baseGfn + page;
        if (priv && this.mapped(gfn)) this.record({ kind: 'mapping-left', slot: slot.id, gfn, detail: `converted to private, still mapped in the IOMMU at IOVA ${hex(gfn * PAGE_SIZE)}` });
      }
    }
  }

  /** Adds a finding (this oracle's, or checkPrivateMemory's between conversions). */
  record(f: PrivateMemoryFinding): void {
    this.count++;
    this.kinds.add(f.kind);
    if (this.findings.length < this.max) this.findings.push(f);
  }

  private mapped(gfn: number): boolean {
    const t = this.vm.iommu?.table;
    return t !== undefined && t.inRange(gfn) && t.present(gfn) && t.gfn(gfn) === gfn;
  }

  private *sectionPages(s: RamSection): Generator<{ slot: Memslot; page: number; gfn: number }> {
    const first = s.offsetWithinAddressSpace / PAGE_SIZE;
    for (let gfn = first; gfn < first + s.size / PAGE_SIZE; gfn++) {
      const slot = this.vm.memory.findSlot(gfn);
      if (slot !== undefined) yield { slot, page: gfn - slot.baseGfn, gfn };
    }
  }

  *notifyPopulate(s: RamSection): Steps<RamDiscardResult> {
    for (const { slot, page, gfn } of this.sectionPages(s)) {
      if (this.vm.attributes!.isPrivate(slot, page)) this.record({ kind: 'populated-while-private', slot: slot.id, gfn, detail: 'the RamDiscardManager populates it (VFIO maps it) while KVM says private' });
    }
    return RDM_OK;
  }

  *notifyDiscard(s: RamSection): Steps {
    for (const { slot, page, gfn } of this.sectionPages(s)) {
      if (!this.vm.attributes!.isPrivate(slot, page)) this.record({ kind: 'discarded-while-shared', slot: slot.id, gfn, detail: 'the RamDiscardManager discards it (VFIO unmaps it) while KVM still says shared' });
    }
  }

  converting(slot: Memslot, page: number, count: number, toPrivate: boolean): void {
    if (!toPrivate) this.discarded.fill(0, slot.firstPage + page, slot.firstPage + page + count);
  }

  sharedDiscarded(slot: Memslot, page: number, count: number): void {
    for (let p = page; p < page + count; p++) {
      const gfn = slot.baseGfn + p;
      if (this.mapped(gfn)) this.record({ kind: 'discarded-while-mapped', slot: slot.id, gfn, detail: `its shared memory was discarded while the IOMMU still maps it at IOVA ${hex(gfn * PAGE_SIZE)}` });
      this.discarded[slot.firstPage + p] = 1;
    }
  }

  gmemPunched(slot: Memslot, page: number, count: number): void {
    for (let p = page; p < page + count; p++) {
      if (!slot.gmem!.isZeroPage(p)) this.record({ kind: 'hole-not-zero', slot: slot.id, gfn: slot.baseGfn + p, detail: 'punched out of guest_memfd, it does not read back zeros' });
    }
  }

  /** A device's DMA write reached guest frame `gfn`. */
  dmaWrite(gfn: number): void {
    const slot = this.vm.memory.findSlot(gfn);
    if (slot === undefined || slot.gmem === null) return;
    const page = gfn - slot.baseGfn;
    if (this.discarded[slot.firstPage + page] === 1 && this.vm.attributes!.isPrivate(slot, page)) {
      this.record({ kind: 'dma-after-discard', slot: slot.id, gfn, detail: 'a device DMA wrote it after it became private and its shared memory was discarded (a mapping left behind)' });
    }
  }

  /** A vCPU's store retired into guest frame `gfn`, private or shared. */
  storeRetired(vcpu: number, gfn: number, priv: boolean): void {
    const slot = this.vm.memory.findSlot(gfn);
    if (slot === undefined) return;
    const page = gfn - slot.baseGfn;
    if (this.vm.attributes!.isPrivate(slot, page) !== priv) {
      this.record({ kind: 'stale-store', slot: slot.id, gfn, detail: `vcpu${vcpu}'s ${priv ? 'private' : 'shared'} store retired while the page's attribute says ${priv ? 'shared' : 'private'} (a translation of the old kind survived the attribute change)` });
    }
  }
}
