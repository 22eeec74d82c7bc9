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
