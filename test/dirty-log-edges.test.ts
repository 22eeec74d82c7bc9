import { describe, expect, it } from 'vitest';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { KVM_DIRTY_GFN_F_RESET } from '../src/host/constants.ts';
import { type DirtyTracking, VcpuRunState, createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { DirtyLog } from '../src/host/vmm/dirty-log.ts';
import { KvmRingSource } from '../src/host/vmm/kvm-ring-source.ts';
import { LEGACY, MANUAL, RING, VmmControl, complete, retire, vcpuWith } from './helpers.ts';

/** The edges of the VMM's dirty log: the copy hooks, the clear-log and ring sources' deferred work, their tallies. */
const BASE = 0x100;
const PAGES = 128;

function vmWith(tracking: DirtyTracking): Vm {
  const vm = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: BASE, pages: PAGES, flags: 0 }], vcpus: 1, tracking }));
  vm.populate();
  return vm;
}

/** A real guest write of slot page `page` by vCPU 0 (write path, fault, log), after which the vCPU stops so no flush waits on it. */
function guestWrite(vm: Vm, vmm: VmmControl, page: number): void {
  vmm.release(0);
  const v = vcpuWith(vm, 0, [{ gfn: BASE + page, value: 7 }]);
  retire(v, 1);
  vmm.requestStop(0);
  for (let i = 0; i < 100 && vmm.runState(0) !== VcpuRunState.STOPPED; i++) v.step();
  expect(vmm.runState(0)).toBe(VcpuRunState.STOPPED);
}

/** The slot-relative pages set in `b`. */
function pagesOf(vm: Vm, b: PageBitmap): number[] {
  const first = vm.memory.slots[0]!.firstPage;
  return [...b.pagesSet()].map((p) => p - first);
}

describe('DirtyLog\'s copy hooks', () => {
  it('pass over a source that has no such hook: the legacy bitmap keeps its bits through beforeCopy, afterCopy, afterSlot and settle', () => {
    const vm = vmWith(LEGACY);
    const vmm = new VmmControl(vm);
    const log = new DirtyLog(vm, { clearPerChunk: true });
    const slot = vm.memory.slots[0]!;
    complete(log.start());
    guestWrite(vm, vmm, 5);
    const dirty = new PageBitmap(vm.memory.totalPages);
    dirty.mark(slot.firstPage + 5);
    // KvmBitmapSource implements none of the four (QEMU's kvm listener has no log_clear without manual protect).
    complete(log.beforeCopy(slot, 5, dirty));
    complete(log.afterCopy(1));
    complete(log.afterSlot(slot));
    complete(log.settle());
    expect(vm.bitmaps[0]!.isDirty(5), 'nothing cleared the bit').toBe(true);
    const into = new PageBitmap(vm.memory.totalPages);
    expect(complete(log.sync(into, false))).toBe(1);
    expect(pagesOf(vm, into)).toEqual([5]);
  });

  it('a ring VM reports no DMA source: dmaStats lists only device sources', () => {
    const vm = vmWith(RING(256));
    const log = new DirtyLog(vm, { clearPerChunk: false });
    expect(log.sources.map((s) => [s.name, s.dma])).toEqual([["the vCPUs' dirty rings", false]]);
    complete(log.start());
    complete(log.sync(new PageBitmap(vm.memory.totalPages), false));
    expect(log.dmaStats()).toEqual([]);
    expect(log.stats()).toEqual([{ source: "the vCPUs' dirty rings", syncs: 1, pagesReported: 0 }]);
  });
});

describe('the clear-log source', () => {
  it('CLEARing per slot after each GET (the selftests\' collector), beforeCopy clears nothing: a page dirtied again after the CLEAR is reported by the next sync', () => {
    const vm = vmWith(MANUAL);
    const vmm = new VmmControl(vm);
    const log = new DirtyLog(vm, { clearPerChunk: false });
    const slot = vm.memory.slots[0]!;
    complete(log.start());
    guestWrite(vm, vmm, 3);
    const into = new PageBitmap(vm.memory.totalPages);
    complete(log.sync(into, false));
    expect(pagesOf(vm, into)).toEqual([3]);
    expect(vm.bitmaps[0]!.isDirty(3), 'GET then CLEAR of the whole slot').toBe(false);
    guestWrite(vm, vmm, 3); // re-protected by the CLEAR: faults and is logged again
    expect(vm.bitmaps[0]!.isDirty(3)).toBe(true);
    complete(log.beforeCopy(slot, 3, into));
    expect(vm.bitmaps[0]!.isDirty(3), 'no CLEAR per chunk in this mode').toBe(true);
    const next = new PageBitmap(vm.memory.totalPages);
    complete(log.sync(next, false));
    expect(pagesOf(vm, next)).toEqual([3]);
  });

  it('copy-before-clear acts only when its late CLEAR took a bit KVM had: a chunk whose only dirty page came from another source clears nothing and does not count', () => {
    const vm = vmWith(MANUAL);
    const log = new DirtyLog(vm, { clearPerChunk: true, clearAfterCopy: true });
    const slot = vm.memory.slots[0]!;
    complete(log.start());
    const into = new PageBitmap(vm.memory.totalPages);
    complete(log.sync(into, false));
    into.mark(slot.firstPage + 70); // reported by a DMA source, not in KVM's log
    complete(log.beforeCopy(slot, 70, into));
    complete(log.afterSlot(slot));
    expect(vm.bitmaps[0]!.isDirty(70)).toBe(false);
    expect(vm.acts.count('copy-before-clear')).toBe(0);
    // The same with a page KVM logged: the late CLEAR takes it, and that is the bug acting.
    slot.dirtyBitmap[71 >>> 5]! |= 1 << (71 & 31);
    const again = new PageBitmap(vm.memory.totalPages);
    complete(log.sync(again, false));
    complete(log.beforeCopy(slot, 71, again));
    expect(vm.bitmaps[0]!.isDirty(71), 'not cleared before the copy').toBe(true);
    complete(log.afterSlot(slot));
    expect(vm.bitmaps[0]!.isDirty(71)).toBe(false);
    expect(vm.acts.count('copy-before-clear')).toBe(1);
  });
});

describe('the ring source', () => {
  it('harvest-skips-entry through DirtyLog: every third fetch index is collected unrecorded and counted, yet harvested and reset', () => {
    const vm = vmWith(RING(256));
    const log = new DirtyLog(vm, { clearPerChunk: false, harvestSkipEvery: 3 });
    complete(log.start());
    const ring = vm.rings![0]!;
    for (let p = 10; p < 16; p++) ring.push(1, p);
    const into = new PageBitmap(vm.memory.totalPages);
    expect(complete(log.sync(into, false)), 'entries harvested').toBe(6);
    // Fetch indexes 2 and 5 ((fi + 1) % 3 === 0): pages 12 and 15.
    expect(pagesOf(vm, into)).toEqual([10, 11, 13, 14]);
    expect(vm.acts.count('harvest-skips-entry')).toBe(2);
    expect(log.ring!.lastReset).toBe(6);
    expect(ring.used()).toBe(0);
  });

  it('settle without a deferred reset does nothing: entries harvested since are not reset, and pages copied are not counted', () => {
    const vm = vmWith(RING(256));
    const source = new KvmRingSource(vm);
    complete(source.start());
    const ring = vm.rings![0]!;
    ring.push(1, 1);
    ring.push(1, 2);
    // Harvested (flags RESET) but no KVM_RESET_DIRTY_RINGS yet.
    expect(source.harvester.harvest(ring, ring.entries, () => {})).toBe(2);
    expect(ring.flagsAt(0)).toBe(KVM_DIRTY_GFN_F_RESET);
    complete(source.afterCopy(4));
    complete(source.settle());
    expect(ring.used(), 'no reset: only KVM_RESET_DIRTY_RINGS in sync or a deferred one resets').toBe(2);
    expect(ring.resetIndex).toBe(0);
    expect(vm.acts.count('copy-before-reset')).toBe(0);
  });

  it('copy-before-reset counts only pages copied while a reset is pending: copies before the first sync and after the settle do not act', () => {
    const vm = vmWith(RING(256));
    const log = new DirtyLog(vm, { clearPerChunk: false, deferRingReset: true });
    complete(log.start());
    const ring = vm.rings![0]!;
    complete(log.afterCopy(4)); // no reset pending yet
    ring.push(1, 3);
    const into = new PageBitmap(vm.memory.totalPages);
    expect(complete(log.sync(into, false))).toBe(1);
    expect(ring.used(), 'harvested, reset deferred').toBe(1);
    complete(log.settle());
    expect(ring.used()).toBe(0);
    expect(vm.acts.count('copy-before-reset'), 'nothing copied between the harvest and the reset').toBe(0);
    // A pending reset with a copy before it acts once; copies after its settle do not.
    ring.push(1, 4);
    complete(log.sync(into, false));
    complete(log.afterCopy(2));
    complete(log.settle());
    expect(vm.acts.count('copy-before-reset')).toBe(1);
    complete(log.afterCopy(3));
    complete(log.settle());
    expect(vm.acts.count('copy-before-reset'), 'the reset is no longer pending').toBe(1);
  });

  it('tallies only the pages new to the bitmap it ORs into, deferred reset or not', () => {
    for (const deferRingReset of [false, true]) {
      const vm = vmWith(RING(256));
      const log = new DirtyLog(vm, { clearPerChunk: false, deferRingReset });
      complete(log.start());
      const first = vm.memory.slots[0]!.firstPage;
      const into = new PageBitmap(vm.memory.totalPages);
      for (const p of [1, 2, 3]) into.mark(first + p); // already dirty from an earlier sync
      const ring = vm.rings![0]!;
      for (const p of [3, 4, 5]) ring.push(1, p);
      const tally: [string, number][] = [];
      expect(complete(log.sync(into, false, (s, n) => tally.push([s, n]))), `deferred ${deferRingReset}: entries harvested`).toBe(3);
      expect(tally, `deferred ${deferRingReset}`).toEqual([["the vCPUs' dirty rings", 2]]);
      expect(pagesOf(vm, into)).toEqual([1, 2, 3, 4, 5]);
    }
  });

  it('on a final sync with the backup bitmap, tallies the rings and the bitmap each by the pages it added', () => {
    const vm = vmWith(RING(256, true));
    const source = new KvmRingSource(vm);
    complete(source.start());
    const slot = vm.memory.slots[0]!;
    const into = new PageBitmap(vm.memory.totalPages);
    for (const p of [1, 2]) into.mark(slot.firstPage + p);
    vm.rings![0]!.push(1, 2);
    vm.rings![0]!.push(1, 6);
    vm.writeGuest(slot, 9, 1, { writer: 0x1000, seq: 1, iteration: 1 }, -1); // no running vCPU: the backup bitmap
    const tally: [string, number][] = [];
    complete(source.sync(into, true, (s, n) => tally.push([s, n])));
    expect(tally).toEqual([["the vCPUs' dirty rings", 1], ["the ring's backup bitmap", 1]]);
    expect(pagesOf(vm, into)).toEqual([1, 2, 6, 9]);
  });
});
