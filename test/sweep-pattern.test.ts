import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { type MemslotConfig, type VmLayout, createVmLayout } from '../src/host/layout.ts';
import { checkSweepPattern, describeSweepCheck, sweepSlices } from '../src/oracles/sweep-pattern.ts';
import { LEGACY } from './helpers.ts';

function layoutOf(pages: number[], vcpus = 1): VmLayout {
  let gfn = 0x100;
  const slots: MemslotConfig[] = pages.map((n, i) => { const s = { id: i + 1, asId: 0, baseGfn: gfn, pages: n, flags: 0 }; gfn += n + 0x100; return s; });
  return createVmLayout({ slots, vcpus, tracking: LEGACY });
}

/** Guest memory whose byte 0 of page i (slots flattened in order) is values[i]. */
function memoryWith(values: number[], slotPages = [values.length], vcpus = 1): { mem: GuestMemory; layout: VmLayout } {
  const layout = layoutOf(slotPages, vcpus);
  const mem = new GuestMemory(layout);
  let i = 0;
  for (const s of mem.slots) for (let p = 0; p < s.pages; p++) s.bytes(p)[s.byteOffset(p)] = values[i++]!;
  return { mem, layout };
}

describe('the sweep-pattern oracle (migration-test check_guests_ram)', () => {
  it('accepts all bytes equal: the sweep stopped at the start of its range', () => {
    const c = checkSweepPattern(memoryWith([7, 7, 7, 7, 7, 7]).mem, 1);
    expect(c.ok).toBe(true);
    expect(c.slices[0]).toMatchObject({ firstByte: 7, lastByte: 7, edgeGfn: null, bad: 0 });
  });

  it('accepts exactly one step down by one, and says where it is', () => {
    const c = checkSweepPattern(memoryWith([8, 8, 8, 7, 7, 7]).mem, 1);
    expect(c.ok).toBe(true);
    expect(c.slices[0]!.edgeGfn).toBe(0x103);
    expect(describeSweepCheck(c, 'at completion')[0]).toBe('sweep pattern at completion: OK (6 pages in 1 slice(s); the sweep stopped: vcpu0 at gfn 0x103)');
  });

  it('wraps at 256: 0x00 before the sweep steps down to 0xff after it; the other way round is a step up', () => {
    expect(checkSweepPattern(memoryWith([0, 0, 0xff, 0xff]).mem, 1).ok).toBe(true);
    const up = checkSweepPattern(memoryWith([0xff, 0xff, 0, 0]).mem, 1);
    expect(up.ok).toBe(false);
    expect(up.slices[0]!.bad).toBe(1);
  });

  it('rejects a step by more than one, a second step down, and a step up', () => {
    expect(checkSweepPattern(memoryWith([9, 9, 7, 7]).mem, 1).ok).toBe(false);
    expect(checkSweepPattern(memoryWith([9, 9, 8, 8, 7, 7]).mem, 1).ok).toBe(false);
    expect(checkSweepPattern(memoryWith([8, 8, 9, 9]).mem, 1).ok).toBe(false);
  });

  it('names the stale page itself, with its stamp, not the page after it', () => {
    // 5 5 [4] 5 5 4 4: gfn 0x102 is one pass behind. check_guests_ram takes it for the
    // edge and counts the page after it as bad; the nearest valid pattern names 0x102.
    const { mem } = memoryWith([5, 5, 4, 5, 5, 4, 4]);
    mem.slots[0]!.stamp(2, 2, 41, 1);
    const c = checkSweepPattern(mem, 1);
    expect(c.ok).toBe(false);
    expect(c.outOfLine).toBe(1);
    expect(c.offending).toEqual([{ vcpu: 0, slot: 1, gfn: 0x102, value: 4, expected: 5, stamp: { writer: 2, seq: 41, iteration: 1 } }]);
    const lines = describeSweepCheck(c, 'after resume');
    expect(lines[0]).toBe('sweep pattern after resume: BROKEN: 1 page(s) out of line');
    expect(lines).toContain('  SWEEP page out of line: slot 1 gfn 0x102 holds 0x4, the pattern expects 0x5; last written by vcpu1 (seq 41)');
  });

  it('names a page that never arrived (zero, never written) in the middle of the range', () => {
    const c = checkSweepPattern(memoryWith([3, 3, 3, 3, 0, 3, 2, 2]).mem, 1);
    expect(c.ok).toBe(false);
    expect(c.offending.map((p) => [p.gfn, p.value, p.expected])).toEqual([[0x104, 0, 3]]);
    expect(describeSweepCheck(c, 'x').at(-1)).toMatch(/gfn 0x104 holds 0x0, the pattern expects 0x3; never written$/);
  });

  it('checks each vCPU\'s slice on its own, across memslots', () => {
    // 2 vCPUs over 3 + 5 pages in two slots: slices [0, 4) and [4, 8), the first spanning both slots.
    expect(sweepSlices(8, 2)).toEqual([{ vcpu: 0, first: 0, count: 4 }, { vcpu: 1, first: 4, count: 4 }]);
    expect(sweepSlices(9, 2).map((s) => s.count)).toEqual([4, 5]);
    const values = [4, 4, 3, 3, /* vcpu1 */ 9, 9, 9, 8];
    expect(checkSweepPattern(memoryWith(values, [3, 5], 2).mem, 2).ok).toBe(true);
    const one = checkSweepPattern(memoryWith(values, [3, 5], 2).mem, 1); // as one sweep: broken
    expect(one.ok).toBe(false);
    const c = checkSweepPattern(memoryWith(values, [3, 5], 2).mem, 2);
    expect(c.slices.map((s) => s.edgeGfn)).toEqual([0x102, 0x207]); // slot 2 starts at gfn 0x203
    // 3 + 7 pages: slices of 5; vcpu1's third page (slot 2, gfn 0x207) is stale.
    const stale = [4, 4, 4, 3, 3, /* vcpu1 */ 9, 9, 8, 9, 9];
    const bad = checkSweepPattern(memoryWith(stale, [3, 7], 2).mem, 2);
    expect(bad.slices.map((s) => s.bad)).toEqual([0, 1]);
    expect(bad.outOfLine).toBe(1);
    expect(bad.offending[0]).toMatchObject({ vcpu: 1, slot: 2, gfn: 0x207, value: 8, expected: 9 });
  });
});
