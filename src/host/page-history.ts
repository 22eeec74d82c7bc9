/** The slots of a VM as readGfn needs them (a GuestMemory is one). */
interface SlotTable {
  readonly slots: readonly { readonly id: number; readonly baseGfn: number; readonly endGfn: number; readonly firstPage: number }[];
}

/**
 * Page history: for every guest page, the last time each dirty-tracking event touched
 * it, so the stamp oracle can tell how a lost write got lost (ARCHITECTURE.md, Oracles).
 * The records live in a SharedArrayBuffer of the VM layout, so every worker (vCPU fault
 * path, host writer, migration thread) writes them directly. Only the last event of each
 * kind is kept: a page's story is the order of those last events. The vCPU's store itself
 * is not recorded (that is the steady-state write path); the stamp says who wrote last.
 */
export const enum PageEvent {
  /** mark_page_dirty_in_slot logged the page: a write-protect fault, or a host write. */
  LOGGED = 0,
  /** kvm_write_guest stored into the page (logged or not). */
  HOST_WRITE = 1,
  /** Userspace collected the page: a ring entry harvested, or a bit returned by KVM_GET_DIRTY_LOG. */
  HARVESTED = 2,
  /** KVM write-protected the page: ring reset, CLEAR, legacy GET, or logging enabled. */
  PROTECTED = 3,
  /** The migration thread copied the page into the stream. */
  COPIED = 4,
}
const EVENTS = 5;
export const PAGE_EVENT_NAMES = ['logged', 'host-write', 'harvested', 're-protected', 'copied'] as const;
export type PageEventName = (typeof PAGE_EVENT_NAMES)[number];

/** Who logged a page (LOGGED detail): which log, and which vCPU's context (-1: none). */
export const enum LogSink { RING = 1, BITMAP = 2 }
/** How a host write was logged (HOST_WRITE detail). */
export const enum HostWriteLog { UNTRACKED = 0, RING = 1, BITMAP = 2, DROPPED = 3 }
/** Which ioctl re-protected a page (PROTECTED detail). */
export const enum ProtectBy { RESET_DIRTY_RINGS = 1, CLEAR_DIRTY_LOG = 2, GET_DIRTY_LOG = 3, ENABLE_LOGGING = 4 }
/** HARVESTED detail for a bit returned by KVM_GET_DIRTY_LOG (otherwise: the ring's vCPU). */
export const HARVEST_BITMAP = -1;
/** COPIED detail for the completion stage (otherwise: the pass number). */
export const COPY_COMPLETION = 0;

/** Header words: [0..1] the run's epoch (ms, float64), [2] the clock unit. */
const HEADER_WORDS = 4;
const WORDS_PER_PAGE = EVENTS * 2; // per event: time + 1 (0: never), detail
const enum Unit { MICROSECONDS = 0, STEPS = 1 }

export function createPageHistoryBuffer(totalPages: number): SharedArrayBuffer {
  const buf = new SharedArrayBuffer((HEADER_WORDS + totalPages * WORDS_PER_PAGE) * 4);
  new Float64Array(buf, 0, 1)[0] = performance.timeOrigin + performance.now();
  return buf;
}

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
    for (let m = lo >>> 0; m !== 0; m &= m - 1) this.record(page + 31 - Math.clz32(m & -m), event, detail);
    for (let m = hi >>> 0; m !== 0; m &= m - 1) this.record(page + 32 + 31 - Math.clz32(m & -m), event, detail);
  }

  /**
   * A page's raw event times into `out` (one per PageEvent, 0: never), with no allocation:
   * for observers that compare them after every step (src/hunt/explain.ts) and call read()
   * only when one changed.
   */
  times(page: number, out: Uint32Array): Uint32Array {
    const at = HEADER_WORDS + page * WORDS_PER_PAGE;
    for (let e = 0; e < EVENTS; e++) out[e] = Atomics.load(this.words, at + e * 2);
    return out;
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

function describeDetail(event: PageEvent, d: number): string {
  switch (event) {
    case PageEvent.LOGGED: {
      const vcpu = (d & 0xffff) - 1;
      const sink = d >>> 16 === LogSink.RING ? 'dirty ring' : 'dirty bitmap';
      return vcpu >= 0 ? `vcpu${vcpu} write fault, ${sink}` : `no running vCPU, ${sink}`;
    }
    case PageEvent.HOST_WRITE:
      return ['kvm_write_guest without mark_page_dirty_in_slot', 'kvm_write_guest, dirty ring', 'kvm_write_guest, dirty bitmap',
        'kvm_write_guest with no vCPU and no backup bitmap: not logged'][d] ?? `host write ${d}`;
    case PageEvent.HARVESTED:
      return d === HARVEST_BITMAP ? 'KVM_GET_DIRTY_LOG' : `ring of vcpu${d}`;
    case PageEvent.PROTECTED:
      return ['', 'KVM_RESET_DIRTY_RINGS', 'KVM_CLEAR_DIRTY_LOG', 'KVM_GET_DIRTY_LOG', 'dirty logging enabled'][d] ?? `protect ${d}`;
    case PageEvent.COPIED:
      return d === COPY_COMPLETION ? 'completion' : `pass ${d}`;
  }
}

/** One line: the page's events in order, with their times. */
export function describeHistory(events: readonly PageHistoryEvent[]): string {
  if (events.length === 0) return 'no dirty-tracking event recorded';
  const unit = events[0]!.unit === 'step' ? 'step' : 'µs';
  const missing = PAGE_EVENT_NAMES.filter((n) => n !== 'host-write' && !events.some((e) => e.event === n));
  return events.map((e) => `${e.event} ${unit} ${e.at} (${e.detail})`).join(', ') + (missing.length ? `; never ${missing.join(', ')}` : '');
}
