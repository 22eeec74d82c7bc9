import type { Memslot } from './memslot.ts';
import { EVENTS, HEADER_WORDS, PageEvent, Unit, WORDS_PER_PAGE } from './page-history-buffer.ts';
import {
  COPY_COMPLETION, HARVEST_BITMAP, HostWriteLog, NoTracepoints, type PageDirtied, ProtectBy, forEachMaskPage,
} from './tracepoints.ts';

/** The slots of a VM as readGfn needs them (a GuestMemory is one). */
interface SlotTable {
  readonly slots: readonly { readonly id: number; readonly baseGfn: number; readonly endGfn: number; readonly firstPage: number }[];
}

/**
 * Page history: for every guest page, the last time each dirty-tracking event touched
 * it, so the stamp oracle can tell how a lost write got lost (docs/architecture.md, Oracles).
 * The records live in a SharedArrayBuffer of the VM layout, so every worker (vCPU fault
 * path, host writer, migration thread) writes them directly. Only the last event of each
 * kind is kept: a page's story is the order of those last events. The vCPU's store itself
 * is not recorded (that is the steady-state write path); the stamp says who wrote last.
 * It records through the VM's tracepoints (PageHistory.tracer, attached by the Vm).
 */
export const PAGE_EVENT_NAMES = ['logged', 'host-write', 'harvested', 're-protected', 'copied'] as const;
export type PageEventName = (typeof PAGE_EVENT_NAMES)[number];

/** Who logged a page (LOGGED detail): which log, and which vCPU's context (-1: none). */
const enum LogSink { RING = 1, BITMAP = 2 }
// The other details are the tracepoints' own values: HostWriteLog, ProtectBy, the
// harvest's vCPU (HARVEST_BITMAP), the copy's pass (COPY_COMPLETION).


export interface PageHistoryEvent {
  event: PageEventName;
  /** Free-run: microseconds since the run started; deterministic: the global step number. */
  at: number;
  unit: 'us' | 'step';
  /** What did it, in KVM's words. */
  detail: string;
}

export class PageHistory {
  private readonly words: Uint32Array;
  private readonly details: Int32Array;
  private readonly epoch: number;
  private clock: () => number;

  constructor(readonly buffer: SharedArrayBuffer) {
    this.words = new Uint32Array(buffer);
    this.details = new Int32Array(buffer);
    this.epoch = new Float64Array(buffer, 0, 1)[0]!;
    const origin = performance.timeOrigin - this.epoch; // worker threads have their own time origin
    this.clock = () => Math.round((origin + performance.now()) * 1000);
  }

  /** Deterministic driver: time is the global step number. */
  useStepClock(steps: () => number): void {
    Atomics.store(this.words, 2, Unit.STEPS);
    this.clock = steps;
  }

  get unit(): 'us' | 'step' { return Atomics.load(this.words, 2) === Unit.STEPS ? 'step' : 'us'; }

  /** `page` is VM-wide (Memslot.firstPage + page). Last writer wins: it is a record of the latest event. */
  record(page: number, event: PageEvent, detail: number): void {
    this.put(page, event, detail, this.now());
  }

  /** The same event for each of `pages`, VM-wide `first + pages[i]`, at one time (one ioctl, one batch). */
  recordEach(first: number, pages: ArrayLike<number>, event: PageEvent, detail: number): void {
    const t = this.now();
    for (let i = 0; i < pages.length; i++) this.put(first + pages[i]!, event, detail, t);
  }

  /** The same event for `count` consecutive pages from VM-wide `page`, at one time. */
  recordRange(page: number, count: number, event: PageEvent, detail: number): void {
    const t = this.now();
    for (let p = page; p < page + count; p++) this.put(p, event, detail, t);
  }

  private now(): number {
    return Math.min(this.clock(), 0xfffffffd) + 1;
  }

  private put(page: number, event: PageEvent, detail: number, t: number): void {
    const i = HEADER_WORDS + page * WORDS_PER_PAGE + event * 2;
    this.words[i] = t;
    this.details[i + 1] = detail;
  }

  /** Records `event` for every page of a 64-bit mask (two 32-bit halves) starting at VM-wide `page`. */
  recordMask(page: number, lo: number, hi: number, event: PageEvent, detail: number): void {
    forEachMaskPage(page, lo, hi, (p) => this.record(p, event, detail));
  }

  /** The tracer that keeps these records, for the Vm to attach to its tracepoints. */
  tracer(): PageHistoryTracer {
    return new PageHistoryTracer(this);
  }

  /** A page's last events, oldest first. */
  read(page: number): PageHistoryEvent[] {
    const out: PageHistoryEvent[] = [];
    const unit = this.unit;
    for (let e = 0; e < EVENTS; e++) {
      const i = HEADER_WORDS + page * WORDS_PER_PAGE + e * 2;
      const t = Atomics.load(this.words, i);
      if (t === 0) continue;
      out.push({ event: PAGE_EVENT_NAMES[e]!, at: t - 1, unit, detail: describeDetail(e, this.details[i + 1]!) });
    }
    // Same time: the protocol's own order (a legacy GET harvests and protects in one step).
    return out.sort((a, b) => a.at - b.at || PAGE_EVENT_NAMES.indexOf(a.event) - PAGE_EVENT_NAMES.indexOf(b.event));
  }

  /** The history of guest frame `gfn` of slot id `slot` (as the oracles report pages). */
  readGfn(memory: SlotTable, slot: number, gfn: number): PageHistoryEvent[] {
    const s = memory.slots.find((x) => x.id === slot && gfn >= x.baseGfn && gfn < x.endGfn);
    return s ? this.read(s.firstPage + gfn - s.baseGfn) : [];
  }
}

/** The page history's side of the tracepoints: every event is one record per page. */
class PageHistoryTracer extends NoTracepoints {
  constructor(private readonly h: PageHistory) { super(); }

  override pageDirtied(e: PageDirtied): void {
    if (e.where !== 'lost') this.h.record(e.slot.firstPage + e.page, PageEvent.LOGGED, loggedDetail(e));
  }

  override hostWrite(slot: Memslot, page: number, how: HostWriteLog): void {
    this.h.record(slot.firstPage + page, PageEvent.HOST_WRITE, how);
  }

  override writeProtected(slot: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void {
    this.h.recordMask(slot.firstPage + page, lo, hi, PageEvent.PROTECTED, by);
  }

  override writeProtectedRange(slot: Memslot, page: number, count: number, by: ProtectBy): void {
    this.h.recordRange(slot.firstPage + page, count, PageEvent.PROTECTED, by);
  }

  override harvested(slot: Memslot, page: number, lo: number, hi: number, from: number): void {
    this.h.recordMask(slot.firstPage + page, lo, hi, PageEvent.HARVESTED, from);
  }

  override copied(slot: Memslot, pages: ArrayLike<number>, stage: number): void {
    this.h.recordEach(slot.firstPage, pages, PageEvent.COPIED, stage);
  }
}

/** The LOGGED detail of a page mark_page_dirty_in_slot logged: its sink and vCPU. */
export function loggedDetail(e: Exclude<PageDirtied, { where: 'lost' }>): number {
  return ((e.where === 'ring' ? LogSink.RING : LogSink.BITMAP) << 16) | (e.vcpu + 1);
}

/** A record's detail in KVM's words. */
export function describeDetail(event: PageEvent, d: number): string {
  switch (event) {
    case PageEvent.LOGGED: {
      const vcpu = (d & 0xffff) - 1;
      const sink = d >>> 16 === LogSink.RING ? 'dirty ring' : 'dirty bitmap';
      return vcpu >= 0 ? `vcpu${vcpu} write fault, ${sink}` : `no running vCPU, ${sink}`;
    }
    case PageEvent.HOST_WRITE:
      return HOST_WRITE_TEXT[d as HostWriteLog] ?? `host write ${d}`;
    case PageEvent.HARVESTED:
      return d === HARVEST_BITMAP ? 'KVM_GET_DIRTY_LOG' : `ring of vcpu${d}`;
    case PageEvent.PROTECTED:
      return PROTECT_TEXT[d as ProtectBy] ?? `protect ${d}`;
    case PageEvent.COPIED:
      return d === COPY_COMPLETION ? 'completion' : `pass ${d}`;
  }
}

const HOST_WRITE_TEXT: Record<HostWriteLog, string> = {
  [HostWriteLog.UNTRACKED]: 'kvm_write_guest without mark_page_dirty_in_slot',
  [HostWriteLog.RING]: 'kvm_write_guest, dirty ring',
  [HostWriteLog.BITMAP]: 'kvm_write_guest, dirty bitmap',
  [HostWriteLog.DROPPED]: 'kvm_write_guest with no vCPU and no backup bitmap: not logged',
};
const PROTECT_TEXT: Record<ProtectBy, string> = {
  [ProtectBy.RESET_DIRTY_RINGS]: 'KVM_RESET_DIRTY_RINGS',
  [ProtectBy.CLEAR_DIRTY_LOG]: 'KVM_CLEAR_DIRTY_LOG',
  [ProtectBy.GET_DIRTY_LOG]: 'KVM_GET_DIRTY_LOG',
  [ProtectBy.ENABLE_LOGGING]: 'dirty logging enabled',
};

/** One line: the page's events in order, with their times. */
export function describeHistory(events: readonly PageHistoryEvent[]): string {
  if (events.length === 0) return 'no dirty-tracking event recorded';
  const unit = events[0]!.unit === 'step' ? 'step' : 'µs';
  const missing = PAGE_EVENT_NAMES.filter((n) => n !== 'host-write' && !events.some((e) => e.event === n));
  return events.map((e) => `${e.event} ${unit} ${e.at} (${e.detail})`).join(', ') + (missing.length ? `; never ${missing.join(', ')}` : '');
}
