import { describe, expect, it } from 'vitest';
import { EFAULT } from '../src/host/constants.ts';
import { VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { KVM_EXIT_MEMORY_FAULT, KVM_RUN_EIO } from '../src/host/constants.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { OpKind } from '../src/host/guest-op.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { KvmBarMmu, createKvmBarMmuLayout } from '../src/host/mmio/kvm-bar-mmu.ts';
import { reclaimResource } from '../src/host/mmio/reclaim.ts';
import { type MmioResource, VendorDriver, createVendorDriverLayout } from '../src/host/mmio/vendor-driver.ts';
import { VfioBarMapping, createVfioBarMappingLayout } from '../src/host/mmio/vfio-bar-mapping.ts';
import { Vm } from '../src/host/vm.ts';
import { MANUAL, Ops, complete, retire } from './helpers.ts';

/**
 * KVM's side of a VM's virtual BAR: a fault in two halves (the invalidation sequence and
 * the VMA lookup, then the install under mmu_lock), accesses through the SPTEs with the
 * isolation oracles, and the MMU notifier the VFIO mapping calls as the vendor driver
 * takes a slice back.
 */
const RESOURCES: MmioResource[] = [
  { name: 'status', barOffset: 0, maxPages: 1, writable: false },
  { name: 'A', barOffset: 1, maxPages: 4, writable: true },
];
const BAR_GFN = 0x1000;

function twoVms(o: { notify?: boolean } = {}) {
  const driver = new VendorDriver(createVendorDriverLayout({ vms: 2, mmioPages: 4, resources: RESOURCES }));
  const vms = [0, 1].map((id) => {
    const kvm = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 8, flags: 0 }], vcpus: 1, tracking: MANUAL }));
    const mapping = new VfioBarMapping(createVfioBarMappingLayout(id, driver.barPages), driver);
    const mmu = new KvmBarMmu(createKvmBarMmuLayout(id, BAR_GFN, driver.barPages), kvm, mapping, driver.mmio);
    if (o.notify !== false) mapping.register(mmu);
    return { kvm, mapping, mmu };
  });
  return { driver, vms };
}

/** The whole fault: both halves, as a vCPU with nothing in between. */
function fault(mmu: KvmBarMmu, page: number, write: boolean) {
  const f = mmu.faultin(page, write);
  if (!f.ok) return f;
  return { ok: true as const, installed: mmu.install(page, f, 1) };
}

const clean = (mmu: KvmBarMmu) => mmu.findings().every((f) => f.count === 0);

describe('a fault on a BAR page, then accesses through its SPTE', () => {
  it('no SPTE at first; the fault validates through the VMA and builds the SPTE; reads and writes reach the VM\'s slice', () => {
    const { driver, vms: [a] } = twoVms();
    driver.allocate(0, 1, 2);
    expect(a!.mmu.access(1, true, 7)).toEqual({ done: false });
    expect(fault(a!.mmu, 1, true)).toEqual({ ok: true, installed: 'installed' });
    expect(a!.mmu.spte(1)).toMatchObject({ pfn: 0, writable: true, generation: 1 });
    expect(a!.mmu.access(1, true, 7)).toEqual({ done: true, value: 7 });
    expect(driver.mmio.read32(0)).toBe(7);
    expect(a!.mmu.access(2, false), 'the VMA maps page 2 too, but KVM builds one SPTE per fault').toEqual({ done: false });
    expect(clean(a!.mmu)).toBe(true);
  });

  it('a refused fault is the vCPU\'s EFAULT: nothing built (the guest touched the BAR before its allocation)', () => {
    const { vms: [a] } = twoVms();
    expect(fault(a!.mmu, 1, false)).toMatchObject({ ok: false, errno: EFAULT, why: 'resource A is not allocated to vm0' });
    expect(a!.mmu.spte(1)).toBeNull();
  });

  it('a read-only page: a read builds a read-only SPTE, a write through it is not done, and its fault is refused', () => {
    const { driver, vms: [a] } = twoVms();
    driver.allocate(0, 0, 1);
    expect(fault(a!.mmu, 0, false)).toMatchObject({ installed: 'installed' });
    expect(a!.mmu.spte(0)).toMatchObject({ writable: false });
    expect(a!.mmu.access(0, true, 1)).toEqual({ done: false });
    expect(fault(a!.mmu, 0, true)).toMatchObject({ ok: false, errno: EFAULT });
    expect(a!.mmu.access(0, false)).toEqual({ done: true, value: 0 });
  });
});

describe('the slice taken back between the halves of a fault', () => {
  it('the zap bumps the sequence: the install retries, and the fault after is refused; the slice, now vm1\'s, is vm1\'s alone', () => {
    const { driver, vms: [a, b] } = twoVms();
    driver.allocate(0, 1, 4);
    const f = a!.mmu.faultin(2, true);
    expect(f.ok).toBe(true);
    complete(reclaimResource(driver, a!.mapping, 1));
    driver.allocate(1, 1, 4);
    expect(a!.mmu.install(2, f as Extract<typeof f, { ok: true }>, 1), 'mmu_invalidate_retry_gfn').toBe('retry');
    expect(a!.mmu.spte(2)).toBeNull();
    expect(fault(a!.mmu, 2, true)).toMatchObject({ ok: false, errno: EFAULT });
    expect(fault(b!.mmu, 2, true)).toMatchObject({ installed: 'installed' });
    b!.mmu.access(2, true, 9);
    expect([clean(a!.mmu), clean(b!.mmu)]).toEqual([true, true]);
  });

  it('while the invalidation is in progress the install retries too', () => {
    const { driver, vms: [a] } = twoVms();
    driver.allocate(0, 1, 4);
    const f = a!.mmu.faultin(1, false) as Extract<ReturnType<KvmBarMmu['faultin']>, { ok: true }>;
    complete(a!.mmu.invalidateRangeStart(1, 4));
    expect(a!.mmu.install(1, f, 1)).toBe('retry');
    a!.mmu.invalidateRangeEnd(1, 4);
    expect(a!.mmu.install(1, f, 1), 'the sequence moved at the end: still a retry').toBe('retry');
    expect(fault(a!.mmu, 1, false)).toMatchObject({ installed: 'installed' });
  });

  it('reclaiming zaps KVM\'s SPTEs through the notifier, flushing TLBs; a VMA whose zap never reaches KVM leaves an SPTE the oracles catch', () => {
    const { driver, vms: [a] } = twoVms();
    driver.allocate(0, 1, 2);
    fault(a!.mmu, 1, true);
    complete(reclaimResource(driver, a!.mapping, 1));
    expect(a!.mmu.spte(1)).toBeNull();
    expect(a!.kvm.mmuInvalidate.inProgress()).toBe(0);

    // No notifier registered: the mapping's zap does not reach KVM (what zap-misses-a-mapping will inject).
    const missed = twoVms({ notify: false });
    missed.driver.allocate(0, 1, 2);
    fault(missed.vms[0]!.mmu, 1, true);
    complete(reclaimResource(missed.driver, missed.vms[0]!.mapping, 1));
    missed.driver.allocate(1, 1, 2);
    expect(missed.vms[0]!.mmu.access(1, true, 5)).toEqual({ done: true, value: 5 });
    expect(missed.vms[0]!.mmu.findings().filter((f) => f.count > 0)).toEqual([
      { kind: 'cross-vm-access', count: 1, firstPage: 1 },
      { kind: 'stale-spte', count: 1, firstPage: 1 },
      { kind: 'unvalidated-mapping', count: 1, firstPage: 1 },
    ]);
  });
});

describe('a vCPU\'s accesses to a virtual BAR (VmConfig.bars)', () => {
  function vmWithBar() {
    const driverLayout = createVendorDriverLayout({ vms: 1, mmioPages: 4, resources: RESOURCES });
    const barPages = new VendorDriver(driverLayout).barPages;
    const kvm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 8, flags: 0 }], vcpus: 1, tracking: MANUAL,
      bars: [{ mmu: createKvmBarMmuLayout(0, BAR_GFN, barPages), mapping: createVfioBarMappingLayout(0, barPages), driver: driverLayout }],
    }));
    kvm.populate();
    return { kvm, bar: kvm.bars[0]! };
  }
  const exitReason = (kvm: Vm) => Atomics.load(kvm.vcpuWords, VcpuWord.EXIT_REASON);
  /** The faults the vCPU took (its private count: the published word lags a step). */
  const faults = (v: Vcpu): number => (v as unknown as { faults: number }).faults;

  it('a store faults in two steps, then reaches the slice; a read through the SPTE needs no fault; RAM is as before', () => {
    const { kvm, bar } = vmWithBar();
    bar.driver.allocate(0, 1, 2);
    const v = new Vcpu(kvm, 0, new Ops([{ gfn: BAR_GFN + 1, value: 42 }, { gfn: BAR_GFN + 1, value: 0, kind: OpKind.READ }, { gfn: 0x100, value: 5 }]));
    retire(v, 1);
    expect(bar.driver.mmio.read32(0)).toBe(42);
    expect(bar.mmu.spte(1)).toMatchObject({ pfn: 0, writable: true });
    expect(faults(v)).toBe(1);
    retire(v, 2);
    expect(faults(v), 'the read went through the SPTE; the RAM store found its page writable').toBe(1);
    expect(kvm.memory.slots[0]!.readU64(0)).toBe(5);
  });

  it('a zap between the halves: the install retries, and the fault after it is refused: KVM_EXIT_MEMORY_FAULT at the BAR page\'s GPA', () => {
    const { kvm, bar } = vmWithBar();
    bar.driver.allocate(0, 1, 2);
    const v = new Vcpu(kvm, 0, new Ops([{ gfn: BAR_GFN + 2, value: 7 }]));
    for (let i = 0; i < 20 && faults(v) === 0; i++) v.step(); // entry, then the first half
    expect(faults(v)).toBe(1);
    complete(reclaimResource(bar.driver, bar.mapping, 1), [v]);
    for (let i = 0; i < 20 && exitReason(kvm) === 0; i++) v.step();
    expect(exitReason(kvm)).toBe(KVM_EXIT_MEMORY_FAULT);
    expect(Atomics.load(kvm.vcpuWords, VcpuWord.MMIO_GPA_LO)).toBe((BAR_GFN + 2) * 4096);
    expect(bar.mmu.spte(2)).toBeNull();
    expect(v.retired).toBe(0);
    expect(clean(bar.mmu)).toBe(true);
  });

  it('kill-vm: the refused access kills the VM (KVM_RUN fails with EIO), and re-entering fails the same way: the guest never runs again', () => {
    const driverLayout = createVendorDriverLayout({ vms: 1, mmioPages: 4, resources: RESOURCES });
    const barPages = new VendorDriver(driverLayout).barPages;
    const kvm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 8, flags: 0 }], vcpus: 1, tracking: MANUAL,
      bars: [{ mmu: createKvmBarMmuLayout(0, BAR_GFN, barPages, { onRefusal: 'kill-vm' }), mapping: createVfioBarMappingLayout(0, barPages), driver: driverLayout }],
    }));
    kvm.populate();
    const v = new Vcpu(kvm, 0, new Ops([{ gfn: BAR_GFN + 1, value: 7 }, { gfn: 0x100, value: 5 }]));
    for (let i = 0; i < 20 && exitReason(kvm) === 0; i++) v.step();
    expect(exitReason(kvm)).toBe(KVM_RUN_EIO);
    expect(kvm.bars[0]!.mmu.dead).toBe(true);
    kvm.bars[0]!.driver.allocate(0, 1, 2); // too late: the VM is dead
    const vmm = new VmmControl(kvm);
    for (let round = 0; round < 3; round++) {
      vmm.reenter(0);
      for (let i = 0; i < 5; i++) v.step();
      expect(vmm.parkedExit(0), `re-entry ${round}`).toBe(KVM_RUN_EIO);
    }
    expect(v.retired).toBe(0);
    expect(kvm.memory.slots[0]!.readU64(0), 'not even RAM is written').toBe(0);
  });
});
