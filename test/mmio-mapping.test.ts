import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { EFAULT, EINVAL } from '../src/host/constants.ts';
import { NO_OWNER } from '../src/host/mmio/device-mmio.ts';
import { reclaimResource } from '../src/host/mmio/reclaim.ts';
import { type MapRequest, type MmioResource, VendorDriver, createVendorDriverLayout } from '../src/host/mmio/vendor-driver.ts';
import { type MmuNotifier, VfioBarMapping, createVfioBarMappingLayout } from '../src/host/mmio/vfio-bar-mapping.ts';
import { complete } from './helpers.ts';

/**
 * A mediated device's MMIO mapped on fault (the 2016 design): the vendor driver carves the
 * physical MMIO into slices per VM at run time, each VM's virtual BAR starts unmapped, a
 * fault asks validate_map_request and maps what it answers, and taking a slice back zaps
 * every user mapping of it, notifying KVM, before another VM can own it.
 */
const RESOURCES: MmioResource[] = [
  { name: 'status', barOffset: 0, maxPages: 1, writable: false },
  { name: 'A', barOffset: 1, maxPages: 4, writable: true },
  { name: 'B', barOffset: 5, maxPages: 3, writable: true },
];

function device(vms = 2, mmioPages = 8) {
  const driver = new VendorDriver(createVendorDriverLayout({ vms, mmioPages, resources: RESOURCES }));
  const maps = Array.from({ length: vms }, (_, vm) => new VfioBarMapping(createVfioBarMappingLayout(vm, driver.barPages), driver));
  return { driver, maps };
}

/** A notifier that records what it was told, as KVM's would zap and flush. */
function recorder(): MmuNotifier & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    *invalidateRangeStart(pos, count) { calls.push(`start ${pos}+${count}`); yield undefined; return 0; },
    invalidateRangeEnd(pos, count) { calls.push(`end ${pos}+${count}`); },
  };
}

describe('the vendor driver: slices of the physical MMIO per VM, at run time', () => {
  it('allocates first fit, contiguous, one slice per VM and resource; the pages change owner and generation', () => {
    const { driver } = device();
    expect(driver.barPages).toBe(8);
    expect(driver.allocate(0, 1, 3)).toEqual({ vm: 0, resource: 1, pfn: 0, pages: 3 });
    expect(driver.allocate(1, 1, 4)).toEqual({ vm: 1, resource: 1, pfn: 3, pages: 4 });
    expect(driver.allocate(0, 1, 1), 'vm0 holds A already').toBeNull();
    expect(driver.allocate(0, 2, 2), 'one page free: no room for two').toBeNull();
    expect([0, 1, 2, 3, 6, 7].map((p) => driver.mmio.owner(p))).toEqual([0, 0, 0, 1, 1, NO_OWNER]);
    expect(driver.mmio.generation(0)).toBe(1);
    expect(driver.free(0, 1)).toEqual({ vm: 0, resource: 1, pfn: 0, pages: 3 });
    expect(driver.mmio.owner(0)).toBe(NO_OWNER);
    expect(driver.mmio.generation(0), 'freed: a new generation').toBe(2);
    expect(driver.free(0, 1), 'nothing left to free').toBeNull();
  });

  it('validate_map_request: the allocated part of the resource holding the page, or EFAULT (not allocated yet, past the allocation, no resource)', () => {
    const { driver } = device();
    const no = (r: MapRequest) => (r.ok ? '' : `${r.errno} ${r.why}`);
    expect(no(driver.validateMapRequest(0, 2))).toBe(`${EFAULT} resource A is not allocated to vm0`);
    driver.allocate(0, 1, 2);
    driver.allocate(0, 0, 1);
    expect(driver.validateMapRequest(0, 2)).toEqual({ ok: true, barPage: 1, pfn: 0, pages: 2, writable: true });
    expect(no(driver.validateMapRequest(0, 3))).toBe(`${EFAULT} BAR page 3 is past vm0's 2 page(s) of A`);
    expect(driver.validateMapRequest(0, 0)).toEqual({ ok: true, barPage: 0, pfn: 2, pages: 1, writable: false });
    expect(no(driver.validateMapRequest(1, 1)), 'vm1 holds nothing').toBe(`${EFAULT} resource A is not allocated to vm1`);
  });
});

describe('a VM\'s virtual BAR mapped on fault (VM_PFNMAP)', () => {
  it('starts unmapped; the first fault maps the whole answer; the next finds it present', () => {
    const { driver, maps: [m0] } = device();
    driver.allocate(0, 1, 3);
    expect(m0!.pte(2)).toBeNull();
    const f = m0!.fault(2, true);
    expect(f).toMatchObject({ ok: true, pte: { pfn: 1, writable: true, generation: 1 }, mapped: 3 });
    expect([1, 2, 3].map((p) => m0!.pte(p)?.pfn)).toEqual([0, 1, 2]);
    expect(m0!.pte(4), 'past the allocation: nothing').toBeNull();
    expect(m0!.fault(3, false)).toMatchObject({ ok: true, mapped: 0 });
  });

  it('a refused fault maps nothing; a write to a read-only page is refused, a read maps it read-only', () => {
    const { driver, maps: [m0] } = device();
    expect(m0!.fault(1, false)).toMatchObject({ ok: false, errno: EFAULT, why: 'resource A is not allocated to vm0' });
    expect(m0!.pte(1)).toBeNull();
    driver.allocate(0, 0, 1);
    expect(m0!.fault(0, true)).toMatchObject({ ok: false, errno: EFAULT });
    expect(m0!.pte(0)).toBeNull();
    expect(m0!.fault(0, false)).toMatchObject({ ok: true, pte: { writable: false } });
    expect(m0!.fault(0, true)).toMatchObject({ ok: false, errno: EFAULT, why: 'BAR page 0 of vm0 is mapped read-only' });
  });

  it('refuses, as the kernel does, an answer outside the VMA or pfns the vendor does not give this VM: EINVAL, nothing mapped', () => {
    const { driver } = device();
    driver.allocate(0, 1, 2);
    driver.allocate(1, 1, 2);
    const lying = (answer: MapRequest): VfioBarMapping => {
      const fake = Object.create(driver) as VendorDriver;
      fake.validateMapRequest = () => answer;
      return new VfioBarMapping(createVfioBarMappingLayout(0, driver.barPages), fake);
    };
    const outside = lying({ ok: true, barPage: 6, pfn: 0, pages: 4, writable: true });
    expect(outside.fault(6, false)).toMatchObject({ ok: false, errno: EINVAL, why: 'validate_map_request mapped BAR pages 6..9, outside the 8-page VMA' });
    const others = lying({ ok: true, barPage: 1, pfn: 2, pages: 2, writable: true });
    expect(others.fault(1, false)).toMatchObject({ ok: false, errno: EINVAL, why: 'validate_map_request gave pfn 2, which vm0 does not hold' });
    const elsewhere = lying({ ok: true, barPage: 5, pfn: 0, pages: 1, writable: true });
    expect(elsewhere.fault(1, false)).toMatchObject({ ok: false, errno: EINVAL });
    for (const m of [outside, others, elsewhere]) expect(Array.from({ length: 8 }, (_, p) => m.pte(p)).every((x) => x === null)).toBe(true);
  });
});

describe('taking a slice back: zap every user mapping, notify KVM, then free', () => {
  it('the entries go and the notifier hears of the resource\'s BAR pages before the pages are free; another VM then faults them in', () => {
    const { driver, maps: [m0, m1] } = device(2, 4);
    const kvm0 = recorder();
    m0!.register(kvm0);
    driver.allocate(0, 1, 4);
    m0!.fault(1, true);
    const g = complete(reclaimResource(driver, m0!, 1));
    expect(g).toEqual({ vm: 0, resource: 1, pfn: 0, pages: 4 });
    expect(kvm0.calls).toEqual(['start 1+4', 'end 1+4']);
    expect(m0!.pte(1)).toBeNull();
    expect(m0!.fault(1, true), 'vm0\'s next access is refused').toMatchObject({ ok: false, errno: EFAULT });
    expect(driver.allocate(1, 1, 4)).toMatchObject({ pfn: 0 });
    const f = m1!.fault(2, true);
    expect(f).toMatchObject({ ok: true, pte: { pfn: 1, generation: 3 } });
    expect(complete(reclaimResource(driver, m0!, 1)), 'vm0 holds nothing').toBeNull();
  });

  it('the driver\'s table is shared memory: a worker thread allocates, this thread validates and maps what it gave', async () => {
    const { driver, maps: [m0] } = device();
    const code = `
      const { workerData, parentPort } = require('node:worker_threads');
      const t = new Int32Array(workerData.table);
      // allocate(0, resource 1, 2 pages at pfn 5) as the driver would: owner + generation, then the slot.
      const w = new Int32Array(workerData.pageWords);
      for (const p of [5, 6]) { Atomics.store(w, p * 2, 1); Atomics.add(w, p * 2 + 1, 1); }
      const at = 1 + (0 * 3 + 1) * 3; // VENDOR_TABLE_BASE + slot * VENDOR_SLOT_WORDS
      Atomics.store(t, at + 1, 2);
      Atomics.store(t, at, 6);
      parentPort.postMessage('done');`;
    const worker = new Worker(code, { eval: true, workerData: { table: driver.layout.table, pageWords: driver.layout.mmio.pageWords } });
    await new Promise((resolve) => worker.once('message', resolve));
    await worker.terminate();
    expect(m0!.fault(2, true)).toMatchObject({ ok: true, pte: { pfn: 6, writable: true, generation: 1 }, mapped: 2 });
  });
});
