import { describe, expect, it } from 'vitest';
import { DeterministicDriver, RandomScheduler } from '../src/drivers/deterministic.ts';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { DEVICE_DEFAULTS, DEVICE_WRITER_BASE, type DeviceConfig, type DeviceKind } from '../src/host/devices/device-config.ts';
import { createDevice } from '../src/host/devices/devices.ts';
import type { Device } from '../src/host/devices/device.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { GeneratorRole, type Role } from '../src/roles/role.ts';
import { type DeviceSetup, attachDevices, deviceWindow, iommuConfigFor } from '../src/scenarios/devices.ts';
import { buildRole } from '../src/scenarios/roles.ts';
import { slotLayout } from '../src/scenarios/dirty-log-test.ts';
import { LEGACY } from './helpers.ts';

/**
 * One suite, run against every device kind (as rust-vmm's vm-memory runs one suite
 * against every backend): the contract every Device keeps, whatever its path to memory.
 */
const KINDS: DeviceKind[] = ['dma-engine', 'mdev', 'gvt'];
const EVERY = 8;

function rig(kind: DeviceKind): { vm: Vm; device: Device; driver: DeterministicDriver; vmm: VmmControl; ops: () => number } {
  const config: DeviceConfig = { ...DEVICE_DEFAULTS, kind, every: EVERY, buffers: 16, remapEvery: 8 };
  const setup: DeviceSetup = { backend: 'type1', dmaEntryLimit: 65535, stopOnFault: false, devices: [config] };
  const slots = slotLayout(1 << 20, 1);
  const vm = new Vm(createVmLayout({ slots, vcpus: 1, tracking: LEGACY, iommu: iommuConfigFor(setup, slots) }));
  vm.populate();
  attachDevices(vm, setup, 1);
  const vmm = new VmmControl(vm);
  vmm.resumeHost();
  const device = createDevice(vm, 0, config, 1, deviceWindow(setup, 0, vm));
  const roles: Role[] = [
    buildRole({ kind: 'vcpu', index: 0, workload: { ...DEFAULT_WORKLOAD, name: 'hotset', hotFraction: 0.05 }, seed: 1 }, vm, () => {}),
    buildRole({ kind: 'iommu-service' }, vm, () => {}),
    new GeneratorRole('device0', device.run()),
  ];
  return { vm, device, driver: new DeterministicDriver(roles, new RandomScheduler(1)), vmm, ops: () => vm.guestOps() };
}

/** Pages whose stamp names device 0 as the last writer. */
function stampedByDevice(vm: Vm): number {
  let n = 0;
  for (const s of vm.memory.slots) for (let p = 0; p < s.pages; p++) if (s.stampOf(p).writer === DEVICE_WRITER_BASE) n++;
  return n;
}

describe.each(KINDS)('the Device contract: %s', (kind) => {
  it('is paced by the guest: no DMA before the guest ran, about one operation per `every` guest operations after', () => {
    const r = rig(kind);
    expect(r.device.stats()).toMatchObject({ device: 0, kind, operations: 0, dmaWrites: 0 });
    r.driver.run(() => r.ops() >= 4000);
    const s = r.device.stats();
    const due = Math.floor(r.ops() / EVERY);
    expect(s.operations).toBeGreaterThan(due / 2);
    expect(s.operations).toBeLessThanOrEqual(due);
  });

  it('writes guest memory, and stamps every page it writes (the stamp oracle sees it like a vCPU)', () => {
    const r = rig(kind);
    r.driver.run(() => r.ops() >= 4000);
    const s = r.device.stats();
    expect(s.dmaWrites).toBeGreaterThan(0);
    const pages = stampedByDevice(r.vm);
    expect(pages).toBeGreaterThan(0);
    expect(pages).toBeLessThanOrEqual(s.dmaWrites);
  });

  it('honours the VMM\'s pause: paused, it does no DMA until resumed', () => {
    const r = rig(kind);
    r.driver.run(() => r.ops() >= 2000);
    r.vmm.pauseHost();
    r.driver.run(() => r.vmm.hostPaused(), r.driver.stepCount + 100_000);
    expect(r.vmm.hostPaused()).toBe(true);
    const before = r.device.stats();
    r.driver.run(() => r.ops() >= 6000);
    expect(r.device.stats().dmaWrites + r.device.stats().dmaReads, 'nothing while paused').toBe(before.dmaWrites + before.dmaReads);
    r.vmm.resumeHost();
    r.driver.run(() => r.ops() >= 10_000);
    expect(r.device.stats().operations).toBeGreaterThan(before.operations);
  });

  it('does not fault, and touches nothing outside guest memory, in a clean configuration', () => {
    const r = rig(kind);
    r.driver.run(() => r.ops() >= 4000);
    expect(r.device.stats()).toMatchObject({ faults: 0, staleIotlb: 0 });
    expect(r.vm.iommu!.dmaRecords.count()).toBe(0);
  });
});
