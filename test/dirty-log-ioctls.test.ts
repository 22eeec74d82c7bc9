import { HOST_WRITER_BASE } from '../src/host/memslot.ts';
import { describe, expect, it } from 'vitest';
import { EINVAL, ENXIO, KVM_MEM_LOG_DIRTY_PAGES } from '../src/host/constants.ts';
import { spteWritable } from '../src/host/spte.ts';
import { KvmError } from '../src/util/errors.ts';
import { LEGACY, MANUAL, RING, complete, makeVm, retire, vcpuWith } from './helpers.ts';

function bits(words: Uint32Array, pages: number): number[] {
  const out: number[] = [];
  for (let p = 0; p < pages; p++) if (words[p >>> 5]! & (1 << (p & 31))) out.push(p);
  return out;
}

describe('KVM_GET_DIRTY_LOG (legacy)', () => {
  it('write-protects every page when logging starts, then logs the first write to each page once', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 128 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    expect(vm.flags(slot) & KVM_MEM_LOG_DIRTY_PAGES).toBe(KVM_MEM_LOG_DIRTY_PAGES);
    expect(spteWritable(slot, 5)).toBe(false);
    const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 5, value: 1 }, { gfn: slot.baseGfn + 5, value: 2 }, { gfn: slot.baseGfn + 9, value: 3 }]);
    retire(v, 3);
    expect(bits(complete(vm.getDirtyLog(slot), [v]), 128)).toEqual([5, 9]);
  });

  it('clears the bitmap before it re-protects, so a write after GET is logged by the next GET', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 64 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 1, value: 1 }, { gfn: slot.baseGfn + 1, value: 2 }]);
    retire(v, 1);
    expect(bits(complete(vm.getDirtyLog(slot), [v]), 64)).toEqual([1]);
    expect(slot.dirtyBitmap[0]).toBe(0);
    expect(spteWritable(slot, 1)).toBe(false);
    retire(v, 1);
    expect(bits(complete(vm.getDirtyLog(slot), [v]), 64)).toEqual([1]);
    expect(bits(complete(vm.getDirtyLog(slot), [v]), 64)).toEqual([]);
  });

  it('fails with ENXIO when the ring is on without a backup bitmap, and works with one', () => {
    const vm = makeVm({ tracking: RING() });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    expect(() => complete(vm.getDirtyLog(slot))).toThrow(KvmError);
    try { complete(vm.getDirtyLog(slot)); } catch (e) { expect((e as KvmError).errno).toBe(ENXIO); }
    const withBitmap = makeVm({ tracking: RING(256, true) });
    complete(withBitmap.enableDirtyLogging(withBitmap.memory.slots[0]!));
    expect(() => complete(withBitmap.getDirtyLog(withBitmap.memory.slots[0]!))).not.toThrow();
  });
});

describe('KVM_CLEAR_DIRTY_LOG (manual protect)', () => {
  function manualVm(pages: number, initiallySet = false) {
    const vm = makeVm({ tracking: { kind: 'bitmap', manualProtect: true, initiallySet }, pages });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    return { vm, slot };
  }

  it('GET only copies; CLEAR clears and re-protects exactly the given set bits', () => {
    const { vm, slot } = manualVm(128);
    const v = vcpuWith(vm, 0, [3, 4, 70].map((p) => ({ gfn: slot.baseGfn + p, value: 1 })));
    retire(v, 3);
    const got = complete(vm.getDirtyLog(slot), [v]);
    expect(bits(got, 128)).toEqual([3, 4, 70]);
    expect(spteWritable(slot, 3)).toBe(true); // GET did not protect
    const only3 = new Uint32Array(4);
    only3[0] = 1 << 3;
    expect(complete(vm.clearDirtyLog(slot, 0, 128, only3), [v])).toBe(1);
    expect(spteWritable(slot, 3)).toBe(false);
    expect(spteWritable(slot, 4)).toBe(true);
    expect(bits(complete(vm.getDirtyLog(slot), [v]), 128)).toEqual([4, 70]);
  });

  it.each([[1, 64], [64, 32], [0, 100]])('rejects first_page %d num_pages %d with EINVAL', (first, num) => {
    const { vm, slot } = manualVm(256);
    let err: unknown;
    try { complete(vm.clearDirtyLog(slot, first, num, new Uint32Array(8).fill(~0))); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(KvmError);
    expect((err as KvmError).errno).toBe(EINVAL);
    expect((err as KvmError).message).toMatch(/^KVM_CLEAR_DIRTY_LOG: EINVAL: /);
  });

  it('accepts a num_pages that is not a multiple of 64 when the range ends at the end of the slot', () => {
    const { vm, slot } = manualVm(100, true);
    expect(complete(vm.clearDirtyLog(slot, 64, 36, new Uint32Array(2).fill(~0)))).toBe(36);
    expect(spteWritable(slot, 99)).toBe(false);
    expect(spteWritable(slot, 63)).toBe(true);
  });

  it('INITIALLY_SET: the bitmap starts all-ones and nothing is write-protected until CLEAR', () => {
    const { vm, slot } = manualVm(70, true);
    expect(spteWritable(slot, 0)).toBe(true);
    expect(bits(complete(vm.getDirtyLog(slot)), 70)).toHaveLength(70);
  });

  it('is refused without manual protect', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 64 });
    complete(vm.enableDirtyLogging(vm.memory.slots[0]!));
    expect(() => complete(vm.clearDirtyLog(vm.memory.slots[0]!, 0, 64, new Uint32Array(2)))).toThrow(/EINVAL/);
  });

  it('MANUAL tracking constant is manual protect without initially-set', () => {
    expect(MANUAL).toEqual({ kind: 'bitmap', manualProtect: true, initiallySet: false });
  });
});

describe('kvm_write_guest and mark_page_dirty_in_slot', () => {
  const stamp = { writer: HOST_WRITER_BASE, seq: 1, iteration: 1 };

  it('goes to the running vCPU\'s ring in vCPU context', () => {
    const vm = makeVm({ tracking: RING(), vcpus: 2 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    vm.writeGuest(slot, 12, 5, stamp, 1);
    expect(vm.rings![1]!.used()).toBe(1);
    expect(vm.rings![1]!.offsetAt(0)).toBe(12);
    expect(vm.rings![0]!.used()).toBe(0);
  });

  it('goes to the backup bitmap with no vCPU when DIRTY_LOG_RING_WITH_BITMAP is on', () => {
    const vm = makeVm({ tracking: RING(256, true) });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    vm.writeGuest(slot, 12, 5, stamp, -1);
    expect(bits(complete(vm.getDirtyLog(slot)), slot.pages)).toEqual([12]);
    expect(vm.lostHostWrites()).toBe(0);
  });

  it('is lost, and counted as KVM\'s warning, with no vCPU and no backup bitmap', () => {
    const vm = makeVm({ tracking: RING() });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    vm.writeGuest(slot, 12, 5, stamp, -1);
    expect(vm.rings![0]!.used()).toBe(0);
    expect(vm.lostHostWrites()).toBe(1);
    expect(slot.readU64(12)).toBe(5);
  });

  it('with the untracked-host-write bug the page changes and nothing is logged', () => {
    const vm = makeVm({ tracking: LEGACY, bugs: { untrackedHostWrite: true } });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    vm.writeGuest(slot, 12, 5, stamp, -1);
    expect(slot.readU64(12)).toBe(5);
    expect(bits(complete(vm.getDirtyLog(slot)), slot.pages)).toEqual([]);
  });
});
