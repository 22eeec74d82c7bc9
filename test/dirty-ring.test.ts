import { describe, expect, it } from 'vitest';
import {
  KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_EXIT_DIRTY_RING_FULL,
} from '../src/host/constants.ts';
import { checkRingSize } from '../src/host/dirty-ring.ts';
import { DirtyRingHarvester } from '../src/host/vmm/ring-harvester.ts';
import { spteWritable } from '../src/host/spte.ts';
import { VcpuRunState } from '../src/host/layout.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { RING, complete, makeVm, retire, vcpuWith } from './helpers.ts';

describe('ring size rules (KVM_CAP_DIRTY_LOG_RING)', () => {
  it('accepts powers of two from 256 to 65536 entries', () => {
    for (const n of [256, 4096, 65536]) expect(checkRingSize(n)).toBeNull();
  });
  it.each([[1000, /power of two/], [128, /less than one page/], [131072, /more than 65536/], [0, /power of two/]])('rejects %d', (n, msg) => {
    expect(checkRingSize(n)).toMatch(msg);
  });
});

describe('dirty ring push, harvest, reset', () => {
  it('pushes the real kvm_dirty_gfn layout: flags, slot (as_id<<16|id), offset', () => {
    const vm = makeVm({ slots: [{ id: 3, asId: 1, baseGfn: 0x1000, pages: 128, flags: 0 }], tracking: RING() });
    const ring = vm.rings![0]!;
    ring.push((1 << 16) | 3, 77);
    expect(Array.from(ring.gfns.subarray(0, 4))).toEqual([KVM_DIRTY_GFN_F_DIRTY, (1 << 16) | 3, 77, 0]);
    expect(ring.dirtyIndex).toBe(1);
  });

  it('harvests in order, marks entries RESET, and reset returns exactly the harvested count', () => {
    const vm = makeVm({ tracking: RING() });
    const ring = vm.rings![0]!;
    for (let p = 0; p < 10; p++) ring.push(vm.memory.slots[0]!.slotField, p);
    const h = new DirtyRingHarvester(1);
    const seen: number[] = [];
    expect(h.harvest(ring, 4, (_s, off) => seen.push(off))).toBe(4);
    expect(seen).toEqual([0, 1, 2, 3]);
    expect(ring.flagsAt(0)).toBe(KVM_DIRTY_GFN_F_RESET);
    expect(ring.flagsAt(4)).toBe(KVM_DIRTY_GFN_F_DIRTY);
    expect(complete(vm.resetDirtyRings())).toBe(4);
    expect(ring.resetIndex).toBe(4);
    expect(ring.flagsAt(0)).toBe(0);
  });

  it('reset without harvest resets nothing', () => {
    const vm = makeVm({ tracking: RING() });
    vm.rings![0]!.push(vm.memory.slots[0]!.slotField, 5);
    expect(complete(vm.resetDirtyRings())).toBe(0);
  });

  it('coalesces runs within a 64-page window, forwards and backwards, into one re-protect', () => {
    const vm = makeVm({ tracking: RING(), pages: 512 });
    const ring = vm.rings![0]!;
    const f = vm.memory.slots[0]!.slotField;
    for (const p of [100, 101, 140, 90, 200]) ring.push(f, p); // 90 is a backwards visit that fits
    new DirtyRingHarvester(1).harvest(ring, 100, () => {});
    const calls: [number, number, number][] = [];
    ring.reset((_s, off, lo, hi) => calls.push([off, lo, hi]));
    expect(calls).toHaveLength(2);
    expect(calls[0]![0]).toBe(90);
    expect(calls[1]).toEqual([200, 1, 0]);
  });

  it('skips entries naming a missing slot or an offset past the slot, and still counts them', () => {
    const vm = makeVm({ tracking: RING(), pages: 64 });
    const ring = vm.rings![0]!;
    ring.forge(0, KVM_DIRTY_GFN_F_RESET, 0x7777, 3);
    ring.forge(1, KVM_DIRTY_GFN_F_RESET, vm.memory.slots[0]!.slotField, 64);
    expect(complete(vm.resetDirtyRings())).toBe(2);
    expect(vm.memory.slots[0]!.spte.every((b) => b === 1)).toBe(true);
  });

  it('cannot be kept spinning by userspace re-setting RESET flags: one reset handles at most the ring size', () => {
    const vm = makeVm({ tracking: RING(256) });
    const ring = vm.rings![0]!;
    for (let i = 0; i < 256; i++) ring.forge(i, KVM_DIRTY_GFN_F_RESET, 0x7777, 0);
    expect(ring.reset(() => {})).toBe(256);
  });

  it('exits with KVM_EXIT_DIRTY_RING_FULL at exactly size - 64 entries, before the write retires, and redoes it after a reset', () => {
    const vm = makeVm({ tracking: RING(256), pages: 256 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const ops = Array.from({ length: 193 }, (_, i) => ({ gfn: slot.baseGfn + i, value: 7 }));
    const v = vcpuWith(vm, 0, ops);
    retire(v, 191);
    expect(v.runState).toBe(VcpuRunState.RUNNING);
    expect(vm.rings![0]!.used()).toBe(191);
    retire(v, 1); // the 192nd push reaches the soft limit: exit before the store
    expect(v.runState).toBe(VcpuRunState.EXITED);
    expect(vm.rings![0]!.used()).toBe(192);
    expect(slot.readU64(191)).toBe(0);
    expect(v.retired).toBe(191);
    // Still soft-full: re-entering exits again without running.
    const vmm = new VmmControl(vm);
    vmm.reenter(0);
    v.step();
    expect(v.runState).toBe(VcpuRunState.EXITED);
    expect(vm.rings![0]!.used()).toBe(192);
    // Harvest and reset, then the redone write faults again and is logged again.
    const seen: number[] = [];
    new DirtyRingHarvester(1).harvest(vm.rings![0]!, 1000, (_s, off) => seen.push(off));
    expect(seen).toHaveLength(192);
    expect(complete(vm.resetDirtyRings(), [v])).toBe(192);
    expect(spteWritable(slot, 191)).toBe(false);
    vmm.reenter(0);
    retire(v, 1);
    expect(slot.readU64(191)).toBe(7);
    expect(vm.rings![0]!.used()).toBe(1);
    expect(vm.rings![0]!.offsetAt(192)).toBe(191);
    expect(vm.rings![0]!.slotAt(192)).toBe(slot.slotField);
    expect(v.runState).toBe(VcpuRunState.RUNNING);
    expect(KVM_EXIT_DIRTY_RING_FULL).toBe(31);
  });
});

/**
 * kvm_dirty_ring_reset (virt/kvm/dirty_ring.c) as the kernel writes it, with a u64 mask:
 * what the ring's reset must re-protect, call for call.
 */
function kernelReset(entries: { slot: number; offset: number }[]): { slot: number; offset: number; mask: bigint }[] {
  const out: { slot: number; offset: number; mask: bigint }[] = [];
  let curSlot = 0, curOffset = 0, mask = 0n;
  const u64 = (x: bigint): bigint => x & 0xffff_ffff_ffff_ffffn;
  for (const { slot, offset } of entries) {
    if (mask !== 0n && slot === curSlot) {
      const delta = offset - curOffset;
      if (delta >= 0 && delta < 64) { mask |= 1n << BigInt(delta); continue; }
      if (delta > -64 && delta < 0 && (u64(mask << BigInt(-delta)) >> BigInt(-delta)) === mask) {
        curOffset = offset;
        mask = u64(mask << BigInt(-delta)) | 1n;
        continue;
      }
    }
    if (mask !== 0n) out.push({ slot: curSlot, offset: curOffset, mask });
    curSlot = slot; curOffset = offset; mask = 1n;
  }
  if (mask !== 0n) out.push({ slot: curSlot, offset: curOffset, mask });
  return out;
}

describe('kvm_dirty_ring_reset, call for call against the kernel\'s algorithm', () => {
  const vm = (): ReturnType<typeof makeVm> => makeVm({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 4096, flags: 0 }, { id: 2, asId: 0, baseGfn: 8192, pages: 4096, flags: 0 }], tracking: RING(256) });

  it('coalesces forward and backward runs, across both mask halves, and splits at slots, gaps and bits that would fall off the top', async () => {
    const fc = await import('fast-check');
    const ring = vm().rings![0]!; // one ring for every case: each case's reset leaves it empty
    fc.assert(fc.property(
      fc.array(fc.record({ slot: fc.constantFrom(0, 1, 2), offset: fc.oneof(fc.integer({ min: 0, max: 200 }), fc.integer({ min: 0, max: 4095 })) }), { minLength: 1, maxLength: 200 }),
      (entries) => {
        const from = ring.resetIndex;
        for (const e of entries) ring.push(e.slot, e.offset);
        for (let i = 0; i < entries.length; i++) ring.markHarvested(from + i);
        const calls: { slot: number; offset: number; mask: bigint }[] = [];
        const n = ring.reset((slot, offset, lo, hi) => calls.push({ slot, offset, mask: (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0) }));
        expect(n).toBe(entries.length);
        expect(calls).toEqual(kernelReset(entries));
        expect(ring.protectCalls).toBe(calls.length);
        expect(ring.resetIndex).toBe(from + entries.length);
        for (let i = 0; i < entries.length; i++) expect(ring.flagsAt(from + i), `entry ${i} invalidated`).toBe(0);
      },
    ), {
      seed: 20261207, numRuns: 300,
      // The edges, always: a repeated page, 63 and 64 pages ahead, backwards by 40 (the upper
      // half), 63 and 64, backwards with a bit that would fall off the top, a backward shift
      // below 32 with bits in both halves, slot 0 first.
      examples: ([
        [[1, 10], [1, 10]], [[1, 0], [1, 63]], [[1, 0], [1, 64]], [[1, 100], [1, 60]], [[1, 100], [1, 37]], [[1, 100], [1, 36]],
        [[1, 0], [1, 60], [1, -5 + 64], [1, 59]], [[1, 64], [1, 124], [1, 60]], [[1, 10], [1, 40], [1, 5]], [[1, 10], [1, 50], [1, 45], [1, 3]], [[0, 5], [0, 6]], [[2, 5], [1, 5], [2, 6]], [[1, 100], [1, 101], [1, 68]],
      ] as [number, number][][]).map((seq) => [seq.map(([slot, offset]) => ({ slot, offset }))]),
    });
  });

  it('stops at the first entry not harvested, and after one lap even if every flag says RESET', () => {
    const ring = vm().rings![0]!;
    for (let p = 0; p < 10; p++) ring.push(1, p * 100);
    const none: number[] = [];
    expect(ring.reset((_s, offset) => none.push(offset)), 'nothing harvested yet').toBe(0);
    expect(none, 'and nothing re-protected').toEqual([]);
    expect(ring.protectCalls).toBe(0);
    for (const i of [0, 1, 2, 4]) ring.markHarvested(i);
    expect(ring.reset(() => {})).toBe(3);
    const full = vm().rings![0]!;
    for (let i = 0; i < full.entries; i++) full.forge(i, KVM_DIRTY_GFN_F_RESET, 1, i);
    expect(full.reset(() => {})).toBe(full.entries);
  });
});

describe('the ring\'s own accounting', () => {
  it('counts the most entries ever in use (for "never acted" reports) and a push into an entry not yet reset (KVM: "It should never get full")', () => {
    const v = makeVm({ tracking: RING(256) });
    const ring = v.rings![0]!;
    for (let p = 0; p < 10; p++) ring.push(1, p);
    expect(ring.maxUsed).toBe(10);
    for (let i = 0; i < 10; i++) ring.markHarvested(i);
    ring.reset(() => {});
    ring.push(1, 99);
    expect(ring.maxUsed, 'one in use now; the most stays 10').toBe(10);
    expect(ring.hardFullWarnings).toBe(0);
    for (let p = 0; p < 255; p++) ring.push(1, p); // 256 in use: every entry holds a dirty gfn
    expect(ring.hardFullWarnings).toBe(0);
    ring.push(1, 7); // the 257th lands on an entry still DIRTY
    expect(ring.hardFullWarnings).toBe(1);
  });

  it('reads each entry where it is: flags, slot and offset of the i-th push', () => {
    const ring = makeVm({ tracking: RING(256) }).rings![0]!;
    for (let i = 0; i < 6; i++) ring.push(0x10000 + i, 1000 + i);
    ring.markHarvested(3);
    expect([0, 1, 2, 3, 4, 5].map((i) => ring.flagsAt(i))).toEqual([1, 1, 1, 2, 1, 1].map((f) => (f === 1 ? KVM_DIRTY_GFN_F_DIRTY : KVM_DIRTY_GFN_F_RESET)));
    expect([0, 1, 2, 3, 4, 5].map((i) => ring.slotAt(i))).toEqual([0, 1, 2, 3, 4, 5].map((i) => 0x10000 + i));
    expect([0, 1, 2, 3, 4, 5].map((i) => ring.offsetAt(i))).toEqual([0, 1, 2, 3, 4, 5].map((i) => 1000 + i));
  });

  it('a VM without dirty rings has none to open', async () => {
    const { DirtyRing } = await import('../src/host/dirty-ring.ts');
    const v = makeVm({ tracking: { kind: 'bitmap', manualProtect: true, initiallySet: false } });
    expect(() => new DirtyRing(v.layout, 0)).toThrow('the VM has no dirty rings');
  });
});

describe('harvest-skips-entry, at the harvester', () => {
  it('every skipEvery-th entry (by fetch index) is marked collected without being recorded, and each skip counts as the bug acting', async () => {
    const { InjectionCounters, INJECTION_WORDS } = await import('../src/host/injections.ts');
    const ring = makeVm({ tracking: RING(256) }).rings![0]!;
    for (let p = 0; p < 9; p++) ring.push(1, 100 + p);
    const counters = new InjectionCounters(new SharedArrayBuffer(INJECTION_WORDS * 4));
    const h = new DirtyRingHarvester(1, counters);
    const seen: number[] = [];
    expect(h.harvest(ring, 64, (_s, off) => seen.push(off), 3)).toBe(9);
    expect(seen, 'fetch indices 2, 5 and 8 are skipped').toEqual([100, 101, 103, 104, 106, 107]);
    expect(counters.count('harvest-skips-entry')).toBe(3);
    for (let i = 0; i < 9; i++) expect(ring.flagsAt(i), `entry ${i}`).toBe(KVM_DIRTY_GFN_F_RESET);
    expect(h.fetch[0]).toBe(9);
    // Without counters (a harvester built outside a run) the injection still works, uncounted.
    const bare = makeVm({ tracking: RING(256) }).rings![0]!;
    for (let p = 0; p < 3; p++) bare.push(1, p);
    expect(new DirtyRingHarvester(1).harvest(bare, 64, () => {}, 3)).toBe(3);
  });
});
