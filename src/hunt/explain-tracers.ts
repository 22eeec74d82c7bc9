import { GlobalWord, VCPU_BLOCK_WORDS, VcpuWord } from '../host/layout.ts';
import { type Memslot, type PageStamp, decodeStamp } from '../host/memslot.ts';
import { SPTE_WRITABLE } from '../host/spte.ts';
import { KVM_DIRTY_GFN_F_RESET } from '../host/constants.ts';
import { IOPTE_PRESENT } from '../host/iommu/io-page-table.ts';
import { DeviceWord, IoPte, IommuWord, deviceBase } from '../host/iommu/iommu-layout.ts';
import type { Vm } from '../host/vm.ts';
import type { DmaRecord } from '../oracles/dma-oracle.ts';
import { PAGE_EVENT_NAMES, type PageEventName, describeDetail, loggedDetail } from '../host/page-history.ts';
import { PageEvent } from '../host/page-history-buffer.ts';
import { type HostWriteLog, NoTracepoints, type PageDirtied, type ProtectBy } from '../host/tracepoints.ts';
import { hex } from './narration.ts';

/*
 * The observers of explain's second replay: what happened to one guest page, or to one
 * IOVA, step by step, as events the narrators (narrate-*.ts) turn into sentences.
 */

/** Watches one replay: init before the first step, then after every step. */
export interface Observer {
  init(vm: Vm): void;
  step(step: number, actor: string, vm: Vm): void;
}

export interface At { step: number; actor: string }

export type PageEv = At & (
  | { k: 'write'; stamp: PageStamp; spte: boolean }
  /**
   * A tracepoint on the page. `code` is its value: logged, the ring's vCPU (-1: the
   * bitmap); host-write, a HostWriteLog; harvested, the ring's vCPU or HARVEST_BITMAP;
   * re-protected, a ProtectBy; copied, the pass or COPY_COMPLETION. `detail` says it in KVM's words.
   */
  | { k: 'event'; event: PageEventName; code: number; detail: string; stamp: PageStamp }
  | { k: 'spte'; writable: boolean }
  | { k: 'bit'; set: boolean }
  | { k: 'ring'; vcpu: number; what: 'overwritten' | 'skipped' }
  | { k: 'flush-begin'; gen: number }
  | { k: 'flush-done'; gen: number }
  | { k: 'ack'; vcpu: number; gen: number }
);

/**
 * One guest page: its tracepoints as they fire (kept per step, one per kind, in the
 * page history's order), and its state and the TLB flush words compared after every step.
 */
export class PageTracer extends NoTracepoints implements Observer {
  readonly evs: PageEv[] = [];
  slot!: Memslot;
  page = 0;
  vcpus = 0;
  private words!: Uint32Array;
  private wi = 0;
  private stampWord = 0;
  private seq = 0;
  private spte = false;
  private bit = false;
  /** This step's tracepoints, by PageEvent: code and detail (null: none). */
  private readonly fired: ({ code: number; detail: string } | null)[] = PAGE_EVENT_NAMES.map(() => null);
  /** This step's last push of the page into a dirty ring. */
  private pushed: { vcpu: number; index: number } | null = null;
  private flushGen = 0;
  private acks: number[] = [];
  private pendingFlushes: number[] = [];
  /** Dirty ring entries pushed for the page and not yet reset: vCPU, index, collected. */
  private entries: { vcpu: number; index: number; collected: boolean }[] = [];

  constructor(readonly slotId: number, readonly gfn: number) { super(); }

  init(vm: Vm): void {
    const s = vm.memory.slots.find((x) => x.id === this.slotId && this.gfn >= x.baseGfn && this.gfn < x.endGfn);
    if (s === undefined) throw new Error(`explain: no slot ${this.slotId} holds gfn ${hex(this.gfn)}`);
    this.slot = s;
    this.page = this.gfn - s.baseGfn;
    this.words = s.words(this.page);
    this.wi = s.wordIndex(this.page);
    this.stampWord = this.words[this.wi + 2]!;
    this.seq = this.words[this.wi + 3]!;
    this.spte = (s.spte[this.page]! & SPTE_WRITABLE) !== 0;
    this.bit = this.bitOf();
    this.vcpus = vm.layout.config.vcpus;
    this.flushGen = Atomics.load(vm.global, GlobalWord.FLUSH_GEN);
    for (let v = 0; v < this.vcpus; v++) this.acks.push(Atomics.load(vm.vcpuWords, v * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK));
    vm.tracepoints.attach(this);
  }

  // The tracepoints (the page history records the same events, with the same words).
  private mine(slot: Memslot, page: number): boolean { return slot === this.slot && page === this.page; }
  private inMask(slot: Memslot, page: number, lo: number, hi: number): boolean {
    const d = this.page - page;
    return slot === this.slot && d >= 0 && d < 64 && ((d < 32 ? lo >>> d : hi >>> (d - 32)) & 1) !== 0;
  }
  override pageDirtied(e: PageDirtied): void {
    if (e.where === 'lost' || !this.mine(e.slot, e.page)) return;
    this.fired[PageEvent.LOGGED] = { code: e.where === 'ring' ? e.vcpu : -1, detail: describeDetail(PageEvent.LOGGED, loggedDetail(e)) };
    if (e.where === 'ring') this.pushed = { vcpu: e.vcpu, index: e.entry };
  }
  override hostWrite(slot: Memslot, page: number, how: HostWriteLog): void {
    if (this.mine(slot, page)) this.fire(PageEvent.HOST_WRITE, how);
  }
  override writeProtected(slot: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void {
    if (this.inMask(slot, page, lo, hi)) this.fire(PageEvent.PROTECTED, by);
  }
  override writeProtectedRange(slot: Memslot, page: number, count: number, by: ProtectBy): void {
    if (slot === this.slot && this.page >= page && this.page < page + count) this.fire(PageEvent.PROTECTED, by);
  }
  override harvested(slot: Memslot, page: number, lo: number, hi: number, from: number): void {
    if (this.inMask(slot, page, lo, hi)) this.fire(PageEvent.HARVESTED, from);
  }
  override copied(slot: Memslot, pages: ArrayLike<number>, stage: number): void {
    if (slot !== this.slot) return;
    for (let i = 0; i < pages.length; i++) if (pages[i] === this.page) this.fire(PageEvent.COPIED, stage);
  }
  private fire(event: PageEvent, code: number): void {
    this.fired[event] = { code, detail: describeDetail(event, code) };
  }

  private bitOf(): boolean {
    return (Atomics.load(this.slot.dirtyBitmap, this.page >>> 5) & (1 << (this.page & 31))) !== 0;
  }

  private stamp(): PageStamp {
    return decodeStamp(this.words[this.wi + 2]!, this.words[this.wi + 3]!);
  }

  step(step: number, actor: string, vm: Vm): void {
    const at = { step, actor };
    const sw = this.words[this.wi + 2]!;
    const seq = this.words[this.wi + 3]!;
    const spte = (this.slot.spte[this.page]! & SPTE_WRITABLE) !== 0;
    const bit = this.bitOf();
    // Tracepoints first: a fault logs in the same step as its SPTE change.
    const harvested = this.fired[PageEvent.HARVESTED] !== null;
    for (let e = 0; e < this.fired.length; e++) {
      const f = this.fired[e];
      if (f === null) continue;
      this.evs.push({ ...at, k: 'event', event: PAGE_EVENT_NAMES[e]!, code: f.code, detail: f.detail, stamp: this.stamp() });
      this.fired[e] = null;
    }
    if (this.pushed !== null) {
      this.entries.push({ ...this.pushed, collected: false });
      if (this.entries.length > 8) this.entries.shift();
      this.pushed = null;
    }
    if (spte !== this.spte) { this.evs.push({ ...at, k: 'spte', writable: spte }); this.spte = spte; }
    if (bit !== this.bit) { this.evs.push({ ...at, k: 'bit', set: bit }); this.bit = bit; }
    if (sw !== this.stampWord || seq !== this.seq) {
      this.evs.push({ ...at, k: 'write', stamp: this.stamp(), spte });
      this.stampWord = sw;
      this.seq = seq;
    }
    if (this.entries.length > 0) this.watchEntries(vm, at, harvested);
    const gen = Atomics.load(vm.global, GlobalWord.FLUSH_GEN);
    if (gen !== this.flushGen) {
      this.evs.push({ ...at, k: 'flush-begin', gen });
      this.flushGen = gen;
      this.pendingFlushes.push(gen);
    }
    for (let v = 0; v < this.vcpus; v++) {
      const a = Atomics.load(vm.vcpuWords, v * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK);
      if (a !== this.acks[v]) { this.evs.push({ ...at, k: 'ack', vcpu: v, gen: a }); this.acks[v] = a; }
    }
    if (this.pendingFlushes.length > 0) {
      this.pendingFlushes = this.pendingFlushes.filter((g) => {
        if (vm.shootdown.pendingVcpu(g) >= 0) return true;
        this.evs.push({ ...at, k: 'flush-done', gen: g });
        return false;
      });
    }
  }

  private watchEntries(vm: Vm, at: At, harvested: boolean): void {
    this.entries = this.entries.filter((e) => {
      const ring = vm.rings![e.vcpu]!;
      const flags = ring.flagsAt(e.index);
      if (ring.slotAt(e.index) !== this.slot.slotField || ring.offsetAt(e.index) !== this.page) {
        if (!e.collected) this.evs.push({ ...at, k: 'ring', vcpu: e.vcpu, what: 'overwritten' });
        return false;
      }
      if ((flags & KVM_DIRTY_GFN_F_RESET) !== 0 && !e.collected) {
        e.collected = true;
        if (!harvested) this.evs.push({ ...at, k: 'ring', vcpu: e.vcpu, what: 'skipped' });
      }
      return !(flags === 0 && e.collected);
    });
  }
}

export type DmaEv = At & (
  | { k: 'iopte'; gfn: number; present: boolean; writable: boolean; wasGfn: number; wasPresent: boolean }
  | { k: 'write'; stamp: PageStamp }
  | { k: 'inv-begin'; gen: number }
  | { k: 'inv-done'; gen: number }
  | { k: 'inv-ack'; gen: number }
  | { k: 'mode'; active: boolean }
  | { k: 'record'; count: number }
);

/** The IOPTE of one IOVA, the IOTLB invalidation words, one device, and the page its stale translation names. */
export class DmaTracer implements Observer {
  readonly evs: DmaEv[] = [];
  readonly iova: number;
  /** Mapped when the run started (attachDevices maps the initial buffers). */
  initial = { gfn: -1, present: false };
  /** The IOVA's page number is a guest frame number of RAM too (a GPA used as an IOVA would look so). */
  iovaAsGfnIsRam = false;
  private gfn = -1;
  private flags = 0;
  private invGen = 0;
  private ack = 0;
  private mode = 0;
  private count = 0;
  private pending: number[] = [];
  private page: { words: Uint32Array; wi: number; w: number; seq: number } | null = null;

  constructor(readonly record: DmaRecord) {
    this.iova = Math.floor(record.iova / 4096);
  }

  init(vm: Vm): void {
    const iommu = vm.iommu!;
    this.gfn = iommu.table.gfn(this.iova);
    this.flags = iommu.table.flags(this.iova);
    this.initial = { gfn: this.gfn, present: (this.flags & IOPTE_PRESENT) !== 0 };
    this.invGen = Atomics.load(iommu.words, IommuWord.INV_GEN);
    const b = deviceBase(this.record.device);
    this.ack = Atomics.load(iommu.words, b + DeviceWord.INV_ACK);
    this.mode = Atomics.load(iommu.words, b + DeviceWord.MODE);
    this.count = iommu.dmaRecords.count();
    this.iovaAsGfnIsRam = vm.memory.slots.some((x) => this.iova >= x.baseGfn && this.iova < x.endGfn);
    const g = this.record.cachedGfn;
    const s = g >= 0 ? vm.memory.slots.find((x) => g >= x.baseGfn && g < x.endGfn) : undefined;
    if (s !== undefined) {
      const p = g - s.baseGfn;
      const words = s.words(p);
      const wi = s.wordIndex(p);
      this.page = { words, wi, w: words[wi + 2]!, seq: words[wi + 3]! };
    }
  }

  step(step: number, actor: string, vm: Vm): void {
    const at = { step, actor };
    const iommu = vm.iommu!;
    const t = iommu.table;
    const gfn = t.gfn(this.iova);
    const flags = t.flags(this.iova);
    const mask = IOPTE_PRESENT;
    if (gfn !== this.gfn || (flags & mask) !== (this.flags & mask)) {
      this.evs.push({ ...at, k: 'iopte', gfn, present: (flags & IOPTE_PRESENT) !== 0, writable: (flags & IoPte.WRITE) !== 0, wasGfn: this.gfn, wasPresent: (this.flags & IOPTE_PRESENT) !== 0 });
    }
    this.gfn = gfn;
    this.flags = flags;
    const pg = this.page;
    if (pg !== null) {
      const w = pg.words[pg.wi + 2]!;
      const seq = pg.words[pg.wi + 3]!;
      if (w !== pg.w || seq !== pg.seq) {
        this.evs.push({ ...at, k: 'write', stamp: decodeStamp(w, seq) });
        pg.w = w;
        pg.seq = seq;
      }
    }
    const inv = Atomics.load(iommu.words, IommuWord.INV_GEN);
    if (inv !== this.invGen) { this.evs.push({ ...at, k: 'inv-begin', gen: inv }); this.invGen = inv; this.pending.push(inv); }
    const b = deviceBase(this.record.device);
    const ack = Atomics.load(iommu.words, b + DeviceWord.INV_ACK);
    if (ack !== this.ack) { this.evs.push({ ...at, k: 'inv-ack', gen: ack }); this.ack = ack; }
    const mode = Atomics.load(iommu.words, b + DeviceWord.MODE);
    if (mode !== this.mode) { this.evs.push({ ...at, k: 'mode', active: mode !== 0 }); this.mode = mode; }
    if (this.pending.length > 0) {
      this.pending = this.pending.filter((g) => {
        if (iommu.invalidation.pendingDevice(g) >= 0) return true;
        this.evs.push({ ...at, k: 'inv-done', gen: g });
        return false;
      });
    }
    const count = iommu.dmaRecords.count();
    if (count !== this.count) { if (this.count === 0) this.evs.push({ ...at, k: 'record', count }); this.count = count; }
  }
}
