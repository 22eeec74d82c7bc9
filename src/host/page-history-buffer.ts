/**
 * The page history's shared records (host/page-history.ts reads and writes them): a
 * header, then per guest page one (time + 1, detail) pair per PageEvent. Apart from the
 * reader so that the VM layout can allocate them without importing the tracepoints.
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
export const EVENTS = 5;

/** Header words: [0..1] the run's epoch (ms, float64), [2] the clock unit. */
export const HEADER_WORDS = 4;
export const WORDS_PER_PAGE = EVENTS * 2; // per event: time + 1 (0: never), detail
export const enum Unit { MICROSECONDS = 0, STEPS = 1 }

export function createPageHistoryBuffer(totalPages: number): SharedArrayBuffer {
  const buf = new SharedArrayBuffer((HEADER_WORDS + totalPages * WORDS_PER_PAGE) * 4);
  new Float64Array(buf, 0, 1)[0] = performance.timeOrigin + performance.now();
  return buf;
}
