import type { PageBitmap } from '../host/dirty-bitmap.ts';
import type { GuestMemory } from '../host/guest-memory.ts';
import { describeWriter } from '../host/memslot.ts';

/** A page whose state contradicts what dirty logging reported. */
export interface DirtyLogViolation {
  kind: 'lost' | 'stale';
  iteration: number;
  slot: number;
  gfn: number;
  /** The first 8 bytes of the page (dirty_log_test's value). */
  value: number;
  /** The iteration in the page's stamp (the workload-independent value). */
  stampIteration: number;
  writer: string;
  seq: number;
}

export interface VerifyExceptions {
  /** Pages whose last write had not retired when the vCPU exited (may hold older values). */
  unretired: ReadonlySet<number>;
  /** Pages interrupted in the previous iteration: may hold iteration - 1 when reported. */
  previousUnretired: ReadonlySet<number>;
  /** KVM_DIRTY_LOG_INITIALLY_SET: on iteration 1 a page collected while running may hold 0. */
  initiallySet: boolean;
  /** Pages the first (while running) collection reported. */
  firstCollection: PageBitmap | null;
}

export interface VerifyResult {
  dirty: number;
  clean: number;
  violations: DirtyLogViolation[];
}

/**
 * vm_dirty_log_verify of tools/testing/selftests/kvm/dirty_log_test.c, for every page of
 * every slot, with the vCPUs stopped. Reported dirty => the page holds the current
 * iteration (with the ring's unretired-write exceptions); not reported => it holds
 * less. A clean page holding the current iteration is a LOST dirty page.
 * The value checked is the iteration in the page's stamp, which every workload writes.
 */
export function verifyDirtyLog(
  memory: GuestMemory, reported: PageBitmap, iteration: number, ex: VerifyExceptions, maxViolations = 16,
): VerifyResult {
  const steps = verifyDirtyLogSteps(memory, reported, iteration, ex, maxViolations);
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
  }
}

/** Pages verified per step: a big guest's check is many steps, each a sign of life for the watchdog. */
const VERIFY_CHUNK = 1 << 16;

/** verifyDirtyLog as steps: it yields after every VERIFY_CHUNK pages (never after the last). */
export function* verifyDirtyLogSteps(
  memory: GuestMemory, reported: PageBitmap, iteration: number, ex: VerifyExceptions, maxViolations = 16,
): Generator<undefined, VerifyResult, unknown> {
  let dirty = 0;
  let clean = 0;
  let n = 0;
  const violations: DirtyLogViolation[] = [];
  for (const slot of memory.slots) {
    for (let page = 0; page < slot.pages; page++) {
      if (++n > VERIFY_CHUNK) { n = 1; yield undefined; }
      const g = slot.firstPage + page;
      const val = slot.stampIteration(page);
      if (reported.isDirty(g)) {
        dirty++;
        if (val === iteration) continue;
        if (ex.previousUnretired.has(g) && val === iteration - 1) continue;
        if (ex.unretired.has(g) && val < iteration) continue;
        if (ex.initiallySet && iteration === 1 && val === 0 && ex.firstCollection?.isDirty(g)) continue;
        if (violations.length < maxViolations) violations.push(violation('stale', iteration, slot, page, val));
      } else {
        clean++;
        if (val < iteration) continue;
        if (violations.length < maxViolations) violations.push(violation('lost', iteration, slot, page, val));
      }
    }
  }
  return { dirty, clean, violations };
}

function violation(kind: DirtyLogViolation['kind'], iteration: number, slot: GuestMemory['slots'][number], page: number, val: number): DirtyLogViolation {
  const stamp = slot.stampOf(page);
  return {
    kind, iteration, slot: slot.id, gfn: slot.baseGfn + page, value: slot.readU64(page), stampIteration: val,
    writer: describeWriter(stamp.writer), seq: stamp.seq,
  };
}

export function describeViolation(v: DirtyLogViolation): string {
  const where = `slot ${v.slot} gfn 0x${v.gfn.toString(16)}`;
  const by = `last written by ${v.writer} (seq ${v.seq}), value ${v.value}`;
  return v.kind === 'lost'
    ? `LOST dirty page: ${where} holds iteration ${v.stampIteration} but was not reported dirty in iteration ${v.iteration}; ${by}`
    : `stale dirty page: ${where} was reported dirty in iteration ${v.iteration} but holds iteration ${v.stampIteration}; ${by}`;
}
