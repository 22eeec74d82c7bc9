import { describe, expect, it } from 'vitest';
import { StreamError, checkHeaderSlots } from '../src/migration/stream.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { type VerifyExceptions, verifyDirtyLog } from '../src/oracles/dirty-log-verify.ts';
import { type SweepCheck, checkSweepPattern, describeSweepCheck } from '../src/oracles/sweep-pattern.ts';
import { LEGACY } from './helpers.ts';

/** One slot at gfn 0x100 whose page i holds `values[i]` in byte 0 (the sweep's byte). */
function sweptMemory(values: number[], vcpus: number): GuestMemory {
  const mem = new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: values.length, flags: 0 }], vcpus, tracking: LEGACY }));
  const [s] = mem.slots;
  values.forEach((v, p) => { s!.bytes(p)[s!.byteOffset(p)] = v; });
  return mem;
}

/** The two figures the nearest pattern minimises, in this order: pages out of line, and of those, pages ahead of it. */
function fit(c: SweepCheck): { outOfLine: number; ahead: number } {
  return { outOfLine: c.outOfLine, ahead: c.offending.filter((p) => p.value === ((p.expected + 1) & 0xff)).length };
}

describe('the sweep oracle fits a broken slice to the nearest valid pattern', () => {
  // Each case is a broken slice whose nearest pattern (fewest pages out of line, then
  // fewest ahead) is reached only when every candidate value and split is weighed.
  const cases: { values: number[]; vcpus: number; outOfLine: number; ahead: number; why: string }[] = [
    { values: [99, 102, 101], vcpus: 1, outOfLine: 1, ahead: 0, why: 'the pattern 102/101 comes from the second commonest value' },
    { values: [12, 6, 9, 8], vcpus: 1, outOfLine: 2, ahead: 0, why: 'the second candidate is the commonest after the first, not a later tie' },
    { values: [255, 255, 2, 4], vcpus: 1, outOfLine: 2, ahead: 0, why: 'the commonest value (255) is a candidate, not the rarest' },
    { values: [3, 5, 255, 2, 1], vcpus: 1, outOfLine: 3, ahead: 0, why: 'value 0 and 1 are weighed like any other' },
    { values: [102, 101, 101, 100], vcpus: 1, outOfLine: 1, ahead: 0, why: 'a page ahead of the pattern costs more than one behind it' },
    { values: [10, 12, 6, 9, 8, 8, 7, 7], vcpus: 2, outOfLine: 2, ahead: 0, why: 'vcpu0\'s slice is counted without vcpu1\'s first page' },
    { values: [3, 2, 2, 1, 1, 4, 6, 0], vcpus: 2, outOfLine: 3, ahead: 0, why: 'the split at the slice start costs only the slice\'s own pages' },
    { values: [6, 9, 8, 8, 7, 7], vcpus: 2, outOfLine: 1, ahead: 0, why: 'a split inside the slice costs only the slice\'s own pages' },
  ];
  for (const c of cases) {
    it(`fits [${c.values.join(', ')}] over ${c.vcpus} vCPU(s) with ${c.outOfLine} page(s) out of line: ${c.why}`, () => {
      const check = checkSweepPattern(sweptMemory(c.values, c.vcpus), c.vcpus, 100);
      expect(check.ok).toBe(false);
      expect(fit(check)).toEqual({ outOfLine: c.outOfLine, ahead: c.ahead });
    });
  }

  it('names a slice whose sweep stopped at its start in the OK line', () => {
    const c = checkSweepPattern(sweptMemory([4, 4, 7, 6], 2), 2);
    expect(describeSweepCheck(c, 'after migration')).toEqual([
      'sweep pattern after migration: OK (4 pages in 2 slice(s); the sweep stopped: vcpu0 at its slice start, vcpu1 at gfn 0x103)',
    ]);
  });
});

describe('the dirty_log_test oracle (vm_dirty_log_verify)', () => {
  const none: VerifyExceptions = { unretired: new Set(), previousUnretired: new Set(), initiallySet: false, firstCollection: null };
  /** Four pages at gfn 0x100 holding these stamp iterations, all reported dirty. */
  function reportedAll(iterations: number[]): { mem: GuestMemory; reported: PageBitmap } {
    const mem = new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: iterations.length, flags: 0 }], vcpus: 1, tracking: LEGACY }));
    const [s] = mem.slots;
    const reported = new PageBitmap(mem.totalPages);
    iterations.forEach((it, p) => { s!.writeU64Stamped(p, it, 1, p, it); reported.mark(s!.firstPage + p); });
    return { mem, reported };
  }

  it('stops listing stale pages at the limit: three of four with a limit of three', () => {
    const { mem, reported } = reportedAll([1, 2, 3, 4]);
    const r = verifyDirtyLog(mem, reported, 7, none, 3);
    expect(r.dirty).toBe(4);
    expect(r.violations.map((v) => `${v.kind} 0x${v.gfn.toString(16)} ${v.stampIteration}`)).toEqual(['stale 0x100 1', 'stale 0x101 2', 'stale 0x102 3']);
  });

  it('INITIALLY_SET forgives on iteration 1 only a page still zero, not one holding a later iteration', () => {
    // dirty_log_test.c: with KVM_DIRTY_LOG_INITIALLY_SET the first collection reports
    // every page, so a page reported then may still hold 0; any other value is checked.
    const { mem, reported } = reportedAll([0, 2]);
    const first = new PageBitmap(mem.totalPages);
    first.mark(mem.slots[0]!.firstPage);
    first.mark(mem.slots[0]!.firstPage + 1);
    const r = verifyDirtyLog(mem, reported, 1, { ...none, initiallySet: true, firstCollection: first });
    expect(r.violations.map((v) => `${v.kind} 0x${v.gfn.toString(16)} ${v.stampIteration}`)).toEqual(['stale 0x101 2']);
  });
});

describe('the header\'s memslots are checked before memory is committed for them', () => {
  it('refuses a slot id repeated in address space 1, even at another gfn', () => {
    const slots = [{ id: 5, asId: 1, baseGfn: 0x100, pages: 4 }, { id: 5, asId: 1, baseGfn: 0x200, pages: 4 }];
    expect(() => checkHeaderSlots(slots, 'header')).toThrow(new StreamError('header: slot 1 (1:5) duplicates or overlaps slot 1:5'));
  });

  it('accepts the same id in address spaces 0 and 1', () => {
    expect(() => checkHeaderSlots([{ id: 5, asId: 0, baseGfn: 0x100, pages: 4 }, { id: 5, asId: 1, baseGfn: 0x200, pages: 4 }], 'header')).not.toThrow();
  });

  it('names an undefined slot as undefined, with a StreamError', () => {
    expect(() => checkHeaderSlots([undefined], 'header')).toThrow(StreamError);
    expect(() => checkHeaderSlots([undefined], 'header')).toThrow(/^header: slot 0: undefined is not a memslot/);
  });
});
