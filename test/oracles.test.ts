import { describe, expect, it } from 'vitest';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { PageHistory } from '../src/host/page-history.ts';
import { PageEvent } from '../src/host/page-history-buffer.ts';
import { describeDmaRecord } from '../src/oracles/dma-oracle.ts';
import { type VerifyExceptions, describeViolation, verifyDirtyLog, verifyDirtyLogSteps } from '../src/oracles/dirty-log-verify.ts';
import { compareMemory, describeMismatch, withHistory } from '../src/oracles/stamp-oracle.ts';
import { LEGACY } from './helpers.ts';

/**
 * The oracles on their own, against memory written by hand: what each calls a finding,
 * what it forgives (and only that), and the words it reports it in.
 */
const SLOTS = [{ id: 1, asId: 0, baseGfn: 0x100, pages: 8, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x800, pages: 4, flags: 0 }];
const memory = (pageHistory = false): { mem: GuestMemory; layout: ReturnType<typeof createVmLayout> } => {
  const layout = createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, pageHistory });
  return { mem: new GuestMemory(layout), layout };
};

describe('the stamp oracle', () => {
  it('finds a page that differs anywhere, even in its last byte, and counts past the pages it keeps', () => {
    const { mem: src } = memory();
    const { mem: dst } = memory();
    const [a, b] = src.slots as [GuestMemory['slots'][number], GuestMemory['slots'][number]];
    a.writeU64Stamped(2, 5, 1, 9, 3);
    a.bytes(6)[a.byteOffset(6) + 4095] = 1;
    b.bytes(3)[b.byteOffset(3) + 2000] = 1;
    expect(compareMemory(src, dst)).toEqual({
      pages: 12, count: 3, mismatches: [
        { slot: 1, gfn: 0x102, source: { writer: 1, seq: 9, iteration: 3 }, destination: { writer: 0, seq: 0, iteration: 0 } },
        { slot: 1, gfn: 0x106, source: { writer: 0, seq: 0, iteration: 0 }, destination: { writer: 0, seq: 0, iteration: 0 } },
        { slot: 2, gfn: 0x803, source: { writer: 0, seq: 0, iteration: 0 }, destination: { writer: 0, seq: 0, iteration: 0 } },
      ],
    });
    const kept = compareMemory(src, dst, 1);
    expect([kept.count, kept.mismatches.length]).toEqual([3, 1]);
    for (const p of [2, 6]) dst.slots[0]!.bytes(p).set(a.bytes(p).subarray(a.byteOffset(p), a.byteOffset(p) + 4096), a.byteOffset(p));
    dst.slots[1]!.bytes(3)[b.byteOffset(3) + 2000] = 1;
    expect(compareMemory(src, dst)).toEqual({ pages: 12, count: 0, mismatches: [] });
  });

  it('a destination without one of the source\'s slots is an error, not a pass', () => {
    const { mem: src } = memory();
    const dst = new GuestMemory(createVmLayout({ slots: [SLOTS[0]!], vcpus: 1, tracking: LEGACY }));
    expect(() => compareMemory(src, dst)).toThrow('destination has no slot 0:2');
  });

  it('says who wrote each side, with the page\'s history when it was kept', () => {
    const { mem, layout } = memory(true);
    const history = new PageHistory(layout.pageHistory!);
    history.record(mem.slots[0]!.firstPage + 2, PageEvent.LOGGED, 0);
    const m = { slot: 1, gfn: 0x102, source: { writer: 1, seq: 9, iteration: 3 }, destination: { writer: 0, seq: 0, iteration: 0 } };
    expect(withHistory([m], mem, null)).toEqual([m]);
    const [h] = withHistory([m], mem, history);
    expect(h!.history!.map((e) => e.event)).toEqual(['logged']);
    expect(describeMismatch(m)).toBe('LOST write: slot 1 gfn 0x102: source last written by vcpu0 seq 9 (iteration 3), destination holds never written');
    expect(describeMismatch(h!)).toMatch(/^LOST write: slot 1 gfn 0x102: .*\n {2}page history: .*logged/);
  });
});

describe('the dirty_log_test oracle (vm_dirty_log_verify)', () => {
  /** Page g of the twelve (slot 1's 8, then slot 2's 4) in the VM-wide numbering (slots start 64-aligned there). */
  const vmPage = (mem: GuestMemory, g: number): number => (g < 8 ? mem.slots[0]!.firstPage + g : mem.slots[1]!.firstPage + g - 8);
  const none: VerifyExceptions = { unretired: new Set(), previousUnretired: new Set(), initiallySet: false, firstCollection: null };
  /** Memory whose pages hold the given stamp iterations (slot 1 pages 0..7, then slot 2 pages 0..3), and a report of `dirty`. */
  const setup = (iterations: number[], dirty: number[]): { mem: GuestMemory; reported: PageBitmap } => {
    const { mem } = memory();
    iterations.forEach((it, g) => {
      const slot = g < 8 ? mem.slots[0]! : mem.slots[1]!;
      slot.writeU64Stamped(g < 8 ? g : g - 8, it * 10, 1, g, it);
    });
    const reported = new PageBitmap(mem.totalPages);
    for (const g of dirty) reported.mark(vmPage(mem, g));
    return { mem, reported };
  };

  it('dirty pages hold the iteration, clean pages less: no violation; counts each', () => {
    const { mem, reported } = setup([5, 4, 5, 0, 3, 5, 1, 2, 5, 4, 0, 5], [0, 2, 5, 8, 11]);
    expect(verifyDirtyLog(mem, reported, 5, none)).toEqual({ dirty: 5, clean: 7, violations: [] });
  });

  it('a clean page holding the iteration is LOST; a dirty page holding less is stale; each with where, what and who', () => {
    const { mem, reported } = setup([5, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], [1]);
    const r = verifyDirtyLog(mem, reported, 5, none);
    expect(r.violations).toEqual([
      { kind: 'lost', iteration: 5, slot: 1, gfn: 0x100, value: 50, stampIteration: 5, writer: 'vcpu0', seq: 0 },
      { kind: 'stale', iteration: 5, slot: 1, gfn: 0x101, value: 40, stampIteration: 4, writer: 'vcpu0', seq: 1 },
      { kind: 'lost', iteration: 5, slot: 2, gfn: 0x803, value: 50, stampIteration: 5, writer: 'vcpu0', seq: 11 },
    ]);
    expect(describeViolation(r.violations[0]!)).toBe('LOST dirty page: slot 1 gfn 0x100 holds iteration 5 but was not reported dirty in iteration 5; last written by vcpu0 (seq 0), value 50');
    expect(describeViolation(r.violations[1]!)).toBe('stale dirty page: slot 1 gfn 0x101 was reported dirty in iteration 5 but holds iteration 4; last written by vcpu0 (seq 1), value 40');
    expect(verifyDirtyLog(mem, reported, 5, none, 2).violations).toHaveLength(2);
    expect(verifyDirtyLog(mem, reported, 6, none).violations.map((v) => v.kind), 'a page ahead of a clean report is lost too (>=)').toEqual(['stale']);
  });

  it('forgives exactly the ring\'s exceptions: an unretired write (older), the previous iteration\'s unretired write (one older), INITIALLY_SET\'s zero on iteration 1', () => {
    const { mem, reported } = setup([3, 4, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3]);
    const at = (...g: number[]): Set<number> => new Set(g.map((x) => vmPage(mem, x)));
    const kinds = (it: number, ex: Partial<VerifyExceptions>): string[] => verifyDirtyLog(mem, reported, it, { ...none, ...ex }).violations.map((v) => `${v.kind} 0x${v.gfn.toString(16)}`);
    expect(kinds(5, {})).toEqual(['stale 0x100', 'stale 0x101', 'stale 0x102', 'stale 0x103']);
    expect(kinds(5, { unretired: at(0, 1, 2) }), 'unretired: any older value').toEqual(['stale 0x103']);
    expect(kinds(5, { previousUnretired: at(0, 1, 2) }), 'previous: only iteration - 1').toEqual(['stale 0x100', 'stale 0x102', 'stale 0x103']);
    const first = new PageBitmap(mem.totalPages);
    first.mark(vmPage(mem, 3));
    expect(kinds(1, { initiallySet: true, firstCollection: first }), 'iteration 1: a zero page the first collection reported').not.toContain('stale 0x103');
    expect(kinds(1, { initiallySet: false, firstCollection: first })).toContain('stale 0x103');
    expect(kinds(1, { initiallySet: true, firstCollection: null })).toContain('stale 0x103');
    expect(kinds(2, { initiallySet: true, firstCollection: first }), 'only on iteration 1').toContain('stale 0x103');
  });

  it('yields every 65536 pages, never after the last: a big guest\'s check shows signs of life', () => {
    const pages = 65536 * 2 + 5;
    const mem = new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages, flags: 0 }], vcpus: 1, tracking: LEGACY }));
    const steps = verifyDirtyLogSteps(mem, new PageBitmap(pages), 1, none);
    let yields = 0;
    let r = steps.next();
    while (!r.done) { yields++; r = steps.next(); }
    expect(yields).toBe(2);
    expect(r.value).toEqual({ dirty: 0, clean: pages, violations: [] });
    const exact = new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 65536, flags: 0 }], vcpus: 1, tracking: LEGACY }));
    const once = verifyDirtyLogSteps(exact, new PageBitmap(65536), 1, none);
    expect(once.next().done, 'exactly one chunk: no yield').toBe(true);
  });
});

describe('the DMA oracle\'s words', () => {
  it('names each kind of finding with its device, direction, IOVA and gfns', () => {
    const base = { device: 2, iova: 0x5000, write: true, cachedGfn: -1, currentGfn: -1 };
    expect(describeDmaRecord({ ...base, kind: 'unmapped-iova', write: false })).toBe('DEVICE FAULT: device 2 read to IOVA 0x5000, which nothing maps');
    expect(describeDmaRecord({ ...base, kind: 'unmapped-iova' })).toBe('DEVICE FAULT: device 2 write to IOVA 0x5000, which nothing maps');
    expect(describeDmaRecord({ ...base, kind: 'write-to-read-only', currentGfn: 0x123 })).toBe('DEVICE FAULT: device 2 write to IOVA 0x5000, mapped read-only (gfn 0x123)');
    expect(describeDmaRecord({ ...base, kind: 'stale-iotlb', cachedGfn: 0x10 })).toBe('STALE IOTLB: device 2 write to IOVA 0x5000 through a cached translation to gfn 0x10 after its unmap returned (the IOVA now maps nothing)');
    expect(describeDmaRecord({ ...base, kind: 'stale-iotlb', write: false, cachedGfn: 0x10, currentGfn: 0 })).toBe('STALE IOTLB: device 2 read to IOVA 0x5000 through a cached translation to gfn 0x10 after its unmap returned (the IOVA now maps gfn 0x0)');
  });
});
