import { GlobalWord, VCPU_BLOCK_WORDS, VcpuWord } from '../host/layout.ts';
import { DEVICE_WRITER_BASE, HOST_WRITER_BASE, type Memslot, type PageStamp, describeWriter } from '../host/memslot.ts';
import { SPTE_WRITABLE } from '../host/spte.ts';
import { KVM_DIRTY_GFN_F_RESET } from '../host/constants.ts';
import { IOPTE_PRESENT } from '../host/iommu/io-page-table.ts';
import { DeviceWord, IoPte, IommuWord, deviceBase } from '../host/iommu/iommu-layout.ts';
import type { Vm } from '../host/vm.ts';
import { type DmaRecord, describeDmaRecord } from '../oracles/dma-oracle.ts';
import { PAGE_EVENT_NAMES, type PageEventName } from '../host/page-history.ts';
import type { StampMismatch } from '../oracles/stamp-oracle.ts';
import { type MigrationRunResult, runMigration } from '../scenarios/migration.ts';
import { UserError } from '../util/errors.ts';
import { fingerprint } from './failure.ts';
import type { ReplayFile } from './replay-file.ts';

/**
 * Plain-language explanations of a failing deterministic run (issue 5, item 4): the
 * causal chain of its first lost page, or of its first DMA oracle record, in protocol
 * words, step by step. Nothing hooks the hot paths: the recorded schedule is replayed
 * once to learn the subject, then again with an observer that, after every step, reads
 * the state of that one page (stamp, SPTE, dirty bit, page-history records, its dirty
 * ring entry, the TLB flush generation and acknowledgements; for DMA: the IOPTE of the
 * IOVA, the IOTLB invalidation generation, the device's acknowledgements) and keeps the
 * transitions. A narrator then picks the ones that tell the story.
 *
 * Step numbers are 1-based (the n-th step of the run), as the page history's are.
 */
export interface ExplanationStep {
  /** The run's step (1-based, as the page history counts); 0: before the run started. */
  step: number;
  /** The role that took the step (vcpu0, migration, host-writer, device0, iommu-service). */
  actor: string;
  text: string;
}

export interface Explanation {
  /** What is explained: the lost page or the DMA record, in one line. */
  subject: string;
  /** The causal chain, oldest first, at most about 20 lines. */
  steps: ExplanationStep[];
  conclusion: string;
}

export interface ExplainOptions {
  /**
   * What to explain: the first lost page, or the first DMA oracle record. Default: the
   * DMA record when the run has one (a stale IOTLB entry also loses the page it writes),
   * else the lost page.
   */
  subject?: 'auto' | 'lost-write' | 'dma';
}

/** At most this many lines in a chain (the rest is summarized in one line). */
const MAX_LINES = 20;

const hex = (n: number): string => `0x${n.toString(16)}`;

/** Replays a deterministic replay file twice (learn the subject, then observe it) and explains its failure. */
export async function explainReplay(f: ReplayFile, o: ExplainOptions = {}): Promise<Explanation> {
  const schedule = f.schedule;
  if (schedule === null) {
    throw new UserError('this replay file records a free-run failure: it has no schedule to replay step by step, so it cannot be explained (hunt the scenario with a deterministic strategy and explain that replay)');
  }
  const scenario = { ...f.scenario, seed: f.seed, pageHistory: true };
  const run = (observe?: Observer): Promise<MigrationRunResult> => runMigration(scenario, {
    driver: 'deterministic', replay: schedule, resumeOps: 0, watchdogMs: 10_000, burst: 256,
    prepare: observe ? (vm) => observe.init(vm) : undefined,
    onStep: observe ? (n, role, vm) => observe.step(n + 1, role, vm) : undefined,
  });
  const first = await run();
  const print = fingerprint(first);
  const note = print === f.fingerprint ? '' : '(this replay did not reproduce the recorded run exactly; it explains the replayed run) ';
  const record = first.dma?.records[0];
  const lost = first.mismatches[0];
  const want = o.subject ?? 'auto';
  if (record !== undefined && want !== 'lost-write') {
    const tracer = new DmaTracer(record);
    const second = await run(tracer);
    checkSame(print, second);
    return narrateDma(tracer, record, first, note);
  }
  if (lost !== undefined && want !== 'dma') {
    const tracer = new PageTracer(lost.slot, lost.gfn);
    const second = await run(tracer);
    checkSame(print, second);
    return narrateLostWrite(tracer, lost, first, note);
  }
  if (first.status === 'stuck' && first.errors[0]) {
    // A deadlock: the driver's report says, role by role, what each waits for.
    const [head, ...waits] = first.errors[0].split('\n');
    const at = Number(/at step (\d+)/.exec(head ?? '')?.[1] ?? first.steps ?? 0);
    const steps = waits.map((l) => l.trim()).filter(Boolean).map((l) => {
      const [actor, ...rest] = l.split(' ');
      return { step: at, actor: actor!, text: `${actor} ${rest.join(' ')}` };
    });
    return { subject: f.failure.summary, steps, conclusion: `${note}no role can make progress at step ${at}: each waits for another (${head})` };
  }
  const ended = { passed: 'passed', failed: 'failed', stuck: 'got stuck', crashed: 'crashed' }[first.status];
  const what = first.status === 'passed' ? 'the replay passed: nothing to explain'
    : `no ${want === 'dma' ? 'DMA record' : want === 'lost-write' ? 'lost page' : 'lost page or DMA record'} to explain: the run ${ended}${first.reason ? ` (${first.reason})` : ''}${first.errors[0] ? `: ${first.errors[0].split('\n')[0]}` : ''}`;
  return { subject: f.failure.summary, steps: [], conclusion: note + what };
}

function checkSame(print: string, r: MigrationRunResult): void {
  if (fingerprint(r) !== print) throw new Error('explain: the observed replay diverged from the first replay (an observer changed the run?)');
}

/** The explanation as lines for a terminal. */
export function describeExplanation(e: Explanation): string[] {
  const width = Math.max(0, ...e.steps.map((s) => String(s.step).length));
  const actor = Math.max(0, ...e.steps.map((s) => s.actor.length));
  return [
    `explaining: ${e.subject}`,
    ...e.steps.map((s) => `  step ${String(s.step).padStart(width)}  ${s.actor.padEnd(actor)}  ${s.text}`),
    `conclusion: ${e.conclusion}`,
  ];
}

// ---------------------------------------------------------------------------------------
// Observation

interface Observer {
  init(vm: Vm): void;
  step(step: number, actor: string, vm: Vm): void;
}

interface At { step: number; actor: string }

type PageEv = At & (
  | { k: 'write'; stamp: PageStamp; spte: boolean }
  | { k: 'event'; event: PageEventName; detail: string; stamp: PageStamp }
  | { k: 'spte'; writable: boolean }
  | { k: 'bit'; set: boolean }
  | { k: 'ring'; vcpu: number; what: 'overwritten' | 'skipped' }
  | { k: 'flush-begin'; gen: number }
  | { k: 'flush-done'; gen: number }
  | { k: 'ack'; vcpu: number; gen: number }
);

const EVENTS = PAGE_EVENT_NAMES.length;

/** The state of one guest page, and the TLB flush words, compared after every step. */
class PageTracer implements Observer {
  readonly evs: PageEv[] = [];
  slot!: Memslot;
  page = 0;
  vmPage = 0;
  vcpus = 0;
  private words!: Uint32Array;
  private wi = 0;
  private stampWord = 0;
  private seq = 0;
  private spte = false;
  private bit = false;
  private times = new Uint32Array(EVENTS);
  private readonly now = new Uint32Array(EVENTS);
  private flushGen = 0;
  private acks: number[] = [];
  private pendingFlushes: number[] = [];
  /** Dirty ring entries pushed for the page and not yet reset: vCPU, index, collected. */
  private entries: { vcpu: number; index: number; collected: boolean }[] = [];

  constructor(readonly slotId: number, readonly gfn: number) {}

  init(vm: Vm): void {
    const s = vm.memory.slots.find((x) => x.id === this.slotId && this.gfn >= x.baseGfn && this.gfn < x.endGfn);
    if (s === undefined) throw new Error(`explain: no slot ${this.slotId} holds gfn ${hex(this.gfn)}`);
    this.slot = s;
    this.page = this.gfn - s.baseGfn;
    this.vmPage = s.firstPage + this.page;
    this.words = s.words(this.page);
    this.wi = s.wordIndex(this.page);
    this.stampWord = this.words[this.wi + 2]!;
    this.seq = this.words[this.wi + 3]!;
    this.spte = (s.spte[this.page]! & SPTE_WRITABLE) !== 0;
    this.bit = this.bitOf();
    vm.history?.times(this.vmPage, this.times);
    this.vcpus = vm.layout.config.vcpus;
    this.flushGen = Atomics.load(vm.global, GlobalWord.FLUSH_GEN);
    for (let v = 0; v < this.vcpus; v++) this.acks.push(Atomics.load(vm.vcpuWords, v * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK));
  }

  private bitOf(): boolean {
    return (Atomics.load(this.slot.dirtyBitmap, this.page >>> 5) & (1 << (this.page & 31))) !== 0;
  }

  private stamp(): PageStamp {
    const w = this.words[this.wi + 2]!;
    return { writer: w & 0xffff, seq: this.words[this.wi + 3]!, iteration: w >>> 16 };
  }

  step(step: number, actor: string, vm: Vm): void {
    const at = { step, actor };
    const sw = this.words[this.wi + 2]!;
    const seq = this.words[this.wi + 3]!;
    const spte = (this.slot.spte[this.page]! & SPTE_WRITABLE) !== 0;
    const bit = this.bitOf();
    let harvested = false;
    // Page history first: a fault logs in the same step as its SPTE change.
    const h = vm.history;
    if (h !== null) {
      h.times(this.vmPage, this.now);
      let changed = false;
      for (let e = 0; e < EVENTS; e++) if (this.now[e] !== this.times[e]) changed = true;
      if (changed) {
        const read = h.read(this.vmPage);
        for (let e = 0; e < EVENTS; e++) {
          if (this.now[e] === this.times[e]) continue;
          const name = PAGE_EVENT_NAMES[e]!;
          const r = read.find((x) => x.event === name);
          this.evs.push({ ...at, k: 'event', event: name, detail: r?.detail ?? '', stamp: this.stamp() });
          if (name === 'harvested') harvested = true;
          if (name === 'logged' && r && /dirty ring/.test(r.detail)) this.trackEntry(vm, r.detail);
        }
        this.times.set(this.now);
      }
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

  /** A LOGGED event into a vCPU's ring: remember the entry the push filled, to see what becomes of it. */
  private trackEntry(vm: Vm, detail: string): void {
    const v = /^vcpu(\d+) /.exec(detail);
    const ring = v ? vm.rings?.[Number(v[1])] : undefined;
    if (ring === undefined) return;
    const index = (ring.dirtyIndex - 1) | 0;
    if (ring.slotAt(index) !== this.slot.slotField || ring.offsetAt(index) !== this.page) return;
    this.entries.push({ vcpu: ring.vcpu, index, collected: false });
    if (this.entries.length > 8) this.entries.shift();
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

type DmaEv = At & (
  | { k: 'iopte'; gfn: number; present: boolean; writable: boolean; wasGfn: number; wasPresent: boolean }
  | { k: 'write'; stamp: PageStamp }
  | { k: 'inv-begin'; gen: number }
  | { k: 'inv-done'; gen: number }
  | { k: 'inv-ack'; gen: number }
  | { k: 'mode'; active: boolean }
  | { k: 'record'; count: number }
);

/** The IOPTE of one IOVA, the IOTLB invalidation words, one device, and the page its stale translation names. */
class DmaTracer implements Observer {
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
        this.evs.push({ ...at, k: 'write', stamp: { writer: w & 0xffff, seq, iteration: w >>> 16 } });
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

// ---------------------------------------------------------------------------------------
// Narration

interface Line extends ExplanationStep { order: number }

type WriteEv = Extract<PageEv, { k: 'write' }>;
type HistEv = Extract<PageEv, { k: 'event' }>;
type AckEv = Extract<PageEv, { k: 'ack' }>;

function stampText(s: PageStamp): string {
  return s.writer === 0 ? 'nothing (never written)' : `seq ${s.seq} from ${describeWriter(s.writer)}`;
}

const isVcpu = (writer: number): boolean => writer > 0 && writer < DEVICE_WRITER_BASE;
const isDevice = (writer: number): boolean => writer >= DEVICE_WRITER_BASE && writer < HOST_WRITER_BASE;

/**
 * How a write reached the page: a vCPU's store through a stale TLB entry (its SPTE is
 * write-protected), right after its own write-protect fault, or through a writable SPTE
 * with no fault (so nothing logged it); a host write; a device's DMA.
 */
type WriteMode = 'stale' | 'fault' | 'writable' | 'host' | 'dma' | 'other';

function writeModes(evs: readonly PageEv[]): Map<WriteEv, WriteMode> {
  const faulted = new Set<string>();
  const modes = new Map<WriteEv, WriteMode>();
  for (const e of evs) {
    if (e.k === 'spte' && e.writable) faulted.add(e.actor);
    if (e.k !== 'write') continue;
    const w = e.stamp.writer;
    const vcpu = `vcpu${w - 1}`;
    modes.set(e, w >= HOST_WRITER_BASE ? 'host' : isDevice(w) ? 'dma' : !isVcpu(w) ? 'other'
      : !e.spte ? 'stale' : faulted.has(vcpu) ? 'fault' : 'writable');
    if (isVcpu(w)) faulted.delete(vcpu);
  }
  return modes;
}

interface Narration {
  evs: readonly PageEv[];
  g: string;
  /** The last copy, the re-protect before the first lost write, the first lost write, the write the destination holds, the write that filled a stale TLB entry. */
  C: HistEv | undefined;
  P: HistEv | undefined;
  W1: WriteEv | undefined;
  Wd: WriteEv | undefined;
  fill: WriteEv | undefined;
  /** The stale writer's last flush acknowledgement before the first lost write. */
  staleAck: AckEv | undefined;
  modes: Map<WriteEv, WriteMode>;
  /** What followed each re-protect shown: the remote TLB flush, or none. */
  flush: Map<HistEv, string>;
}

function narrateLostWrite(tr: PageTracer, m: StampMismatch, r: MigrationRunResult, note: string): Explanation {
  const g = `gfn ${hex(m.gfn)}`;
  const evs = tr.evs;
  const writes = evs.filter((e): e is WriteEv => e.k === 'write');
  const hist = (name: PageEventName): HistEv[] => evs.filter((e): e is HistEv => e.k === 'event' && e.event === name);
  const modes = writeModes(evs);
  const C = hist('copied').at(-1);
  const copyStep = C?.step ?? 0;
  // The first lost write: the first write after the last copy.
  const W1 = writes.find((w) => w.step > copyStep);
  const upTo = W1?.step ?? Infinity;
  const protects = hist('re-protected');
  const P = protects.filter((p) => p.step < upTo).at(-1);
  const from = P?.step ?? 0;
  const dst = m.destination;

  const sel = new Set<PageEv>();
  if (P) sel.add(P);
  // Between that re-protect and the first lost write: the last event of each kind.
  const lastOf = new Map<string, PageEv>();
  for (const e of evs) {
    if (e.step <= from || e.step >= upTo) continue;
    if (e.k === 'event' && e.event !== 'host-write') lastOf.set(`event:${e.event}`, e);
    else if (e.k === 'spte' && e.writable) lastOf.set('spte', e);
    else if (e.k === 'bit' && !e.set) lastOf.set('bit', e);
    else if (e.k === 'ring') lastOf.set(`ring:${e.what}`, e);
  }
  for (const e of lastOf.values()) sel.add(e);
  // The write the destination holds; for a stale write, the write that filled its TLB entry.
  const Wd = writes.filter((w) => w.step <= copyStep && w.stamp.writer === dst.writer && w.stamp.seq === dst.seq).at(-1);
  if (Wd) sel.add(Wd);
  let fill: WriteEv | undefined;
  let staleAck: AckEv | undefined;
  if (W1 && modes.get(W1) === 'stale') {
    const vcpu = W1.stamp.writer - 1;
    staleAck = evs.filter((e): e is AckEv => e.k === 'ack' && e.vcpu === vcpu && e.step < W1.step).at(-1);
    // Its TLB was empty after that acknowledgement: its next write to the page walked the SPTE and filled the entry.
    fill = writes.find((w) => w.stamp.writer === W1.stamp.writer && w.step > (staleAck?.step ?? 0) && w.step < W1.step && w.spte);
    if (fill) sel.add(fill);
  }
  // From the first lost write on: everything that happened to the page.
  for (const e of evs) {
    if (e.step >= upTo && (e.k === 'write' || e.k === 'event' || e.k === 'spte' || e.k === 'bit' || e.k === 'ring')) sel.add(e);
  }
  const flush = new Map<HistEv, string>();
  for (const p of protects) if (sel.has(p)) flush.set(p, flushAfter(evs, p, protects.find((q) => q.step > p.step)?.step ?? Infinity));

  const n: Narration = { evs, g, C, P, W1, Wd, fill, staleAck, modes, flush };
  const lines = cap(compose(evs.filter((e) => sel.has(e)), n), g);
  const more = r.mismatchCount > 1 ? ` (the first of ${r.mismatchCount} lost pages)` : '';
  return {
    subject: `lost write: slot ${m.slot} ${g}: the source holds ${stampText(m.source)}, the destination ${stampText(dst)}${more}`,
    steps: lines.map(({ step, actor, text }) => ({ step, actor, text })),
    conclusion: `${note}${fateOf(n)}; the destination holds ${stampText(dst)}, the source ${stampText(m.source)}`,
  };
}

/** The remote TLB flush that followed a re-protect (before the next one), in words. */
function flushAfter(evs: readonly PageEv[], p: HistEv, next: number): string {
  const begin = evs.find((e): e is Extract<PageEv, { k: 'flush-begin' }> => e.k === 'flush-begin' && e.step >= p.step && e.step < next);
  if (!begin) return ', but no remote TLB flush followed';
  const done = evs.find((e) => e.k === 'flush-done' && e.gen === begin.gen);
  return `; a remote TLB flush followed (generation ${begin.gen}, step ${begin.step})${done ? ` and completed at step ${done.step}` : ', and had not completed when the run ended'}`;
}

/** What became of the lost write: nothing logged it, or its log was lost before a harvest, or it was never copied. */
function fateOf(n: Narration): string {
  const { g, C, W1 } = n;
  if (C === undefined) return `the migration never copied ${g}`;
  if (W1 === undefined) return `nothing wrote ${g} after its last copy at step ${C.step}, yet the destination differs`;
  const after = n.evs.filter((e) => e.step > C.step);
  const log = after.find((e) => (e.k === 'event' && e.event === 'logged') || (e.k === 'bit' && e.set));
  if (log === undefined) {
    return isDevice(W1.stamp.writer)
      ? `no dirty source reported ${g} after its copy (KVM's log does not see DMA, and no IOMMU or device log made the migration copy it again)`
      : `no later log reported ${g}`;
  }
  const harvest = after.find((e) => e.step >= log.step && e.k === 'event' && e.event === 'harvested');
  if (harvest !== undefined) return `${g} was logged at step ${log.step} and harvested at step ${harvest.step}, but never copied again`;
  const gone = after.find((e) => e.step > log.step && (e.k === 'ring' || (e.k === 'bit' && !e.set) || (e.k === 'event' && e.event === 're-protected')));
  const why = gone === undefined ? 'no later sync collected it before the migration completed'
    : gone.k === 'ring' ? gone.what === 'overwritten' ? `its dirty ring entry was overwritten at step ${gone.step}` : `its dirty ring entry was marked collected without being recorded at step ${gone.step}`
    : gone.k === 'event' ? `${gone.detail} ${gone.detail === 'KVM_CLEAR_DIRTY_LOG' ? 'cleared its dirty bit and ' : ''}re-protected it at step ${gone.step} first`
    : `its dirty bit was cleared at step ${gone.step} first`;
  return `${g} was logged at step ${log.step} but never harvested: ${why}`;
}

/**
 * One line per step, in the protocol's words; after the first lost write, runs of plain
 * writes of the same kind become one line.
 */
function compose(evs: PageEv[], n: Narration): Line[] {
  const groups: PageEv[][] = [];
  for (const e of evs) {
    const last = groups.at(-1);
    if (last && last[0]!.step === e.step) last.push(e);
    else groups.push([e]);
  }
  const lines: Line[] = [];
  const add = (at: At, text: string): void => { lines.push({ step: at.step, actor: at.actor, text, order: lines.length }); };
  let run: WriteEv[] = [];
  const endRun = (): void => {
    if (run.length === 1) for (const t of phrase(run, n)) add(run[0]!, t);
    else if (run.length > 1) {
      const last = run.at(-1)!;
      const who = [...new Set(run.map((w) => describeWriter(w.stamp.writer)))].join(' and ');
      const mode = n.modes.get(run[0]!);
      const how = mode === 'stale' ? ' through stale TLB entries' : mode === 'writable' ? ' through the writable SPTE' : mode === 'dma' ? ' by DMA' : '';
      add(last, `${who} wrote ${n.g}${how} ${run.length} more times from step ${run[0]!.step}, the last (${stampText(last.stamp)}) at this step`);
    }
    run = [];
  };
  for (const grp of groups) {
    const w = grp.length === 1 && grp[0]!.k === 'write' ? grp[0] as WriteEv : undefined;
    if (w !== undefined && n.W1 !== undefined && w.step > n.W1.step) {
      if (run.length > 0 && n.modes.get(run[0]!) !== n.modes.get(w)) endRun();
      run.push(w);
      continue;
    }
    endRun();
    for (const t of phrase(grp, n)) add(grp[0]!, t);
  }
  endRun();
  return lines;
}

/** The events of one step (one role's step), as sentences. */
function phrase(grp: PageEv[], n: Narration): string[] {
  const { g } = n;
  const ev = (name: PageEventName): HistEv | undefined => grp.find((e): e is HistEv => e.k === 'event' && e.event === name);
  const out: string[] = [];
  const actor = grp[0]!.actor;
  const logged = ev('logged');
  const hostWrite = ev('host-write');
  const harvested = ev('harvested');
  const prot = ev('re-protected');
  const copied = ev('copied');
  const spte = grp.find((e) => e.k === 'spte') as Extract<PageEv, { k: 'spte' }> | undefined;
  const bit = grp.find((e) => e.k === 'bit') as Extract<PageEv, { k: 'bit' }> | undefined;
  const write = grp.find((e) => e.k === 'write') as WriteEv | undefined;
  if (spte?.writable && !hostWrite && /^vcpu\d+$/.test(actor)) {
    out.push(`${actor} took a write-protect fault on ${g}: KVM made its SPTE writable${logged ? ` and logged it ${sinkText(logged.detail)}` : ' (the slot does not log dirty pages)'}`);
  } else if (logged && !hostWrite) {
    out.push(`KVM logged ${g} ${sinkText(logged.detail)} (${logged.detail})`);
  }
  if (write) out.push(writeText(write, n, hostWrite));
  else if (hostWrite) out.push(`a host write to ${g} (${hostWrite.detail})`);
  const getProtects = prot?.detail === 'KVM_GET_DIRTY_LOG';
  if (harvested) {
    const how = harvested.detail === 'KVM_GET_DIRTY_LOG' ? `KVM_GET_DIRTY_LOG reported ${g} dirty` : `the migration harvested ${g} from the ${harvested.detail}`;
    out.push(getProtects ? `${how} and re-protected it${n.flush.get(prot!) ?? ''}` : `${how}${prot ? '' : ' (not re-protected yet)'}`);
  }
  if (prot && !(harvested && getProtects)) {
    const late = n.C && n.W1 && prot.step > n.W1.step && n.W1.step > n.C.step ? `, after its copy at step ${n.C.step} and the write at step ${n.W1.step}: that write is forgotten` : '';
    out.push(`${protectText(prot.detail, g)}${late}${n.flush.get(prot) ?? ''}`);
  } else if (bit && !bit.set && !prot && !harvested) {
    out.push(`${g}'s dirty bit was cleared without write-protecting the page: its SPTE stays writable`);
  } else if (spte && !spte.writable && !prot) {
    out.push(`${g}'s SPTE was write-protected`);
  }
  if (copied) out.push(`the migration copied ${g} ${copied.detail === 'completion' ? 'at completion' : `(${copied.detail})`}: it sent ${stampText(copied.stamp)}`);
  for (const e of grp) {
    if (e.k !== 'ring') continue;
    out.push(e.what === 'overwritten'
      ? `vcpu${e.vcpu}'s dirty ring wrapped: the entry for ${g} was overwritten before userspace harvested it`
      : `the entry for ${g} in vcpu${e.vcpu}'s dirty ring was marked collected without being recorded`);
  }
  return out;
}

function protectText(detail: string, g: string): string {
  switch (detail) {
    case 'KVM_RESET_DIRTY_RINGS': return `KVM_RESET_DIRTY_RINGS re-protected ${g}`;
    case 'KVM_CLEAR_DIRTY_LOG': return `KVM_CLEAR_DIRTY_LOG cleared the dirty bit of ${g} and re-protected it`;
    case 'KVM_GET_DIRTY_LOG': return `KVM_GET_DIRTY_LOG re-protected ${g}`;
    case 'dirty logging enabled': return `enabling dirty logging write-protected ${g}`;
    default: return `${detail} write-protected ${g}`;
  }
}

function sinkText(loggedDetail: string): string {
  const ring = /^vcpu(\d+) .*dirty ring/.exec(loggedDetail);
  if (ring) return `in vcpu${ring[1]}'s dirty ring`;
  return /dirty ring/.test(loggedDetail) ? 'in a dirty ring' : 'in the dirty bitmap';
}

function writeText(w: WriteEv, n: Narration, hostWrite: HistEv | undefined): string {
  const { g } = n;
  const who = describeWriter(w.stamp.writer);
  const tags: string[] = [];
  if (w === n.Wd) tags.push('the destination holds this write');
  if (w === n.W1) tags.push('the first write after the last copy');
  let how = '';
  switch (n.modes.get(w)) {
    case 'stale': {
      const since = n.P && n.P.step < w.step ? ` has been write-protected since step ${n.P.step}` : ' is write-protected';
      const flushes = n.evs.filter((e) => e.k === 'flush-begin' && e.step >= (n.P?.step ?? 0) && e.step < w.step);
      const acked = flushes.length === 0
        ? `${who} has acknowledged no TLB flush since ${n.staleAck ? `step ${n.staleAck.step}` : 'the run began'} (none began after the re-protect)`
        : `${who} had not yet acknowledged the TLB flush begun at step ${flushes.at(-1)!.step}`;
      how = ` through its stale writable TLB entry: the SPTE${since}, but ${acked}, so the write took no fault and nothing logged it`;
      break;
    }
    case 'fault': how = ' after its fault (the access retried)'; break;
    case 'writable': {
      if (w === n.fill) { how = ' through its writable SPTE, caching a writable translation in its TLB'; break; }
      if (w !== n.W1) { how = ' through the writable SPTE'; break; }
      const since = n.evs.filter((e) => e.k === 'spte' && e.writable && e.step < w.step).at(-1);
      how = ` through the still-writable SPTE${since ? ` (writable since step ${since.step})` : ''}: no fault, so nothing logged this write`;
      break;
    }
    case 'host': how = hostWrite ? ` with kvm_write_guest: ${hostWriteText(hostWrite.detail)}` : ''; break;
    case 'dma': how = ' by DMA'; break;
    default: break;
  }
  return `${who} wrote ${g} (seq ${w.stamp.seq})${how}${tags.length ? ` (${tags.join('; ')})` : ''}`;
}

function hostWriteText(detail: string): string {
  switch (detail) {
    case 'kvm_write_guest without mark_page_dirty_in_slot': return 'without mark_page_dirty_in_slot, so not logged';
    case 'kvm_write_guest, dirty ring': return 'logged in the running vCPU\'s dirty ring';
    case 'kvm_write_guest, dirty bitmap': return 'logged in the dirty bitmap';
    case 'kvm_write_guest with no vCPU and no backup bitmap: not logged': return 'no running vCPU and no backup bitmap, so not logged';
    default: return detail;
  }
}

/** Keeps a chain at MAX_LINES: the first lines and the last, with one line for what is left out. */
function cap(lines: Line[], what: string): Line[] {
  if (lines.length <= MAX_LINES) return lines;
  const head = lines.slice(0, MAX_LINES - 4);
  const tail = lines.slice(lines.length - 3);
  const skipped = lines.slice(MAX_LINES - 4, lines.length - 3);
  const first = skipped[0]!;
  return [...head, { step: first.step, actor: first.actor, order: first.order, text: `… ${skipped.length} more events on ${what} until step ${skipped.at(-1)!.step}` }, ...tail];
}

// ---------------------------------------------------------------------------------------
// DMA records

function narrateDma(tr: DmaTracer, rec: DmaRecord, r: MigrationRunResult, note: string): Explanation {
  const io = `IOVA ${hex(rec.iova)}`;
  const dev = `device ${rec.device}`;
  const evs = tr.evs;
  const R = evs.find((e) => e.k === 'record');
  const end = R?.step ?? Infinity;
  const lines: Line[] = [];
  const push = (e: At, text: string): void => { lines.push({ step: e.step, actor: e.actor, text, order: lines.length }); };
  const iopte = evs.filter((e): e is Extract<DmaEv, { k: 'iopte' }> => e.k === 'iopte' && e.step <= end);
  const total = r.dma ? r.dma.staleIotlb + r.dma.faults : 0;
  const subject = `${describeDmaRecord(rec)}${total > 1 ? ` (the first of ${total} DMA records)` : ''}`;
  const alsoLost = r.mismatchCount > 0 ? `; the run also lost ${r.mismatchCount} page${r.mismatchCount > 1 ? 's' : ''}, the first gfn ${hex(r.mismatches[0]!.gfn)}` : '';
  if (rec.kind === 'stale-iotlb') {
    const cached = `gfn ${hex(rec.cachedGfn)}`;
    const revoke = iopte.filter((e) => e.wasPresent && !e.present && e.gfn === rec.cachedGfn).at(-1);
    const map = iopte.filter((e) => e.present && e.gfn === rec.cachedGfn && (!revoke || e.step < revoke.step)).at(-1);
    const rs = revoke?.step ?? 0;
    const devWriter = DEVICE_WRITER_BASE + rec.device;
    if (map) push(map, `the IOMMU service mapped ${io} to ${cached}`);
    else if (tr.initial.gfn === rec.cachedGfn) lines.push({ step: 0, actor: 'vmm', order: -1, text: `${io} was mapped to ${cached} before the run started` });
    const before = evs.filter((e): e is Extract<DmaEv, { k: 'write' }> => e.k === 'write' && e.step < rs && e.stamp.writer === devWriter).at(-1);
    if (before) push(before, `${dev} wrote ${cached} by DMA through ${io} (seq ${before.stamp.seq}), with the translation in its IOTLB`);
    if (revoke) push(revoke, `the IOMMU service began unmapping ${io}: it revoked the IOPTE (${cached} no longer mapped for new walks)`);
    const free = iopte.find((e) => e.step > rs && e.gfn < 0 && e.wasGfn === rec.cachedGfn);
    const freeStep = free?.step ?? end;
    const invs = evs.filter((e) => (e.k === 'inv-begin' || e.k === 'inv-done' || e.k === 'inv-ack') && e.step >= rs && e.step <= end);
    for (const e of invs) {
      if (e.k === 'inv-begin') {
        const done = evs.find((x) => x.k === 'inv-done' && x.gen === e.gen);
        push(e, `an IOTLB invalidation began (generation ${e.gen})${done ? ` and completed at step ${done.step}: every active device acknowledged it` : ''}`);
      } else if (e.k === 'inv-ack') push(e, `${dev} acknowledged IOTLB invalidation generation ${e.gen}: it dropped its IOTLB`);
    }
    for (const e of evs) if (e.k === 'mode' && e.step >= rs && e.step <= end) push(e, e.active ? `${dev} resumed DMA` : `${dev} quiesced: it dropped its IOTLB`);
    const invBeforeFree = invs.some((e) => e.k === 'inv-begin' && e.step <= freeStep);
    if (free) push(free, `the unmap freed the IOPTE of ${io} and returned${invBeforeFree ? '' : `, with no IOTLB invalidation since the revoke: ${dev}'s IOTLB still translates ${io} to ${cached}`}`);
    const remap = iopte.find((e) => e.step > freeStep && e.present);
    if (remap) push(remap, `the IOMMU service mapped ${io} to gfn ${hex(remap.gfn)}`);
    const stale = evs.filter((e): e is Extract<DmaEv, { k: 'write' }> => e.k === 'write' && e.step > freeStep && e.step <= end && e.stamp.writer === devWriter);
    for (const w of stale.slice(0, 3)) {
      if (w.step !== end) push(w, `${dev} wrote ${cached} (seq ${w.stamp.seq}) through its stale IOTLB entry for ${io}`);
    }
    if (R) {
      const w = stale.find((x) => x.step === R.step);
      push(R, `${dev} ${rec.write ? `wrote ${cached}${w ? ` (seq ${w.stamp.seq})` : ''}` : `read ${cached}`} through its stale IOTLB entry for ${io}: the DMA oracle recorded it (the IOVA ${rec.currentGfn < 0 ? 'maps nothing' : `maps gfn ${hex(rec.currentGfn)}`} now)`);
    }
    lines.sort((a, b) => a.step - b.step || a.order - b.order);
    const lost = r.mismatches.find((m) => m.gfn === rec.cachedGfn);
    const fate = lost ? `; ${cached} is also lost in migration: the destination holds ${stampText(lost.destination)}, the source ${stampText(lost.source)}` : '';
    const inv = invBeforeFree ? 'an IOTLB invalidation began before the unmap returned, yet the device kept the translation' : `no IOTLB invalidation followed the unmap of ${io}`;
    return {
      subject,
      steps: cap(lines, io).map(({ step, actor, text }) => ({ step, actor, text })),
      conclusion: `${note}${inv}; ${dev} ${rec.write ? 'wrote' : 'read'} ${cached} through the stale translation at step ${R?.step ?? '?'}, after the unmap returned${remap ? ` and ${io} was mapped to gfn ${hex(remap.gfn)}` : ''}${fate || alsoLost}`,
    };
  }
  // A device fault: what the IOVA's IOPTE went through, then the faulting DMA.
  if (iopte.length === 0) {
    lines.push({ step: 0, actor: 'vmm', order: -1, text: tr.initial.present ? `${io} was mapped to gfn ${hex(tr.initial.gfn)} before the run started` : `nothing mapped ${io} when the run started` });
  }
  for (const e of iopte.slice(-8)) {
    push(e, e.present ? `the IOMMU service mapped ${io} to gfn ${hex(e.gfn)}${e.writable ? '' : ' read-only'}`
      : e.gfn >= 0 ? `the IOMMU service began unmapping ${io}: it revoked the IOPTE` : `the unmap freed the IOPTE of ${io}`);
  }
  if (R) push(R, `${dev}'s ${rec.write ? 'write' : 'read'} to ${io} faulted (${rec.kind}): the DMA oracle recorded it`);
  lines.sort((a, b) => a.step - b.step || a.order - b.order);
  const ram = tr.iovaAsGfnIsRam ? ` (read as a guest physical address, ${io} is guest RAM: gfn ${hex(tr.iova)})` : '';
  const state = rec.kind === 'unmapped-iova' ? (iopte.some((e) => e.present) || tr.initial.present ? 'nothing mapped it at the time' : 'nothing had mapped it since the run began') : `it was mapped read-only to gfn ${hex(rec.currentGfn)}`;
  return {
    subject,
    steps: cap(lines, io).map(({ step, actor, text }) => ({ step, actor, text })),
    conclusion: `${note}${dev} ${rec.write ? 'wrote' : 'read'} ${io} at step ${R?.step ?? '?'}: ${state}${ram}${alsoLost}`,
  };
}
