import { injectedBugs } from '../bugs/injected.ts';
import { GeneratorRole, type Role } from '../roles/role.ts';
import type { RoleFactory } from '../drivers/free-run-worker.ts';
import { createWorkload, type WorkloadOptions } from '../guest/workload.ts';
import { resumeWorkload } from '../guest/resume.ts';
import { Vcpu } from '../host/vcpu.ts';
import type { VmLayout } from '../host/layout.ts';
import { Vm } from '../host/vm.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import { Prng } from '../util/prng.ts';
import { type DirtyLogEvent, type DirtyLogTestConfig, dirtyLogCollector } from './dirty-log-test.ts';
import { hostWriter } from '../host/vmm/host-writer.ts';
import type { MessagePort } from 'node:worker_threads';
import { GuestMemory } from '../host/guest-memory.ts';
import { PortChannel, QueueChannel } from '../migration/channel.ts';
import { StepClock, WALL_CLOCK } from '../roles/clock.ts';
import { Destination } from '../migration/destination.ts';
import { DestinationRole, QueueSource } from '../migration/destination-role.ts';
import { RingChannel, RingSource } from '../migration/stream-ring.ts';
import { runResumedGuest } from '../migration/incoming.ts';
import { type MigrationEvent, type MigrationParams, precopy } from '../migration/precopy.ts';
import { type DeviceSetup, deviceArea, deviceWindow } from './devices.ts';
import { createDevice } from '../host/devices/devices.ts';
import { type IommuServiceEvent, iommuService } from '../host/iommu/iommu-service.ts';
import { type KvmCpuExecEvent, type KvmCpuExecOptions, kvmCpuExec } from '../host/vmm/kvm-cpu-exec.ts';
import { MemoryAttributes } from '../host/memory-attributes.ts';
import { ConversionInjection } from '../host/vmm/conversion-bugs.ts';
import { ConversionOracle } from '../oracles/private-memory-oracle.ts';
import { MdevGuest, type MdevGuestBar, type MdevGuestKind } from '../guest/mdev-guest.ts';
import { type BarVmStop, barVmm } from '../host/vmm/bar-vmm.ts';
import { type VendorEvent, vendorWorkload } from '../host/mmio/vendor-workload.ts';

/**
 * How long the vendor driver waits for a VM to acknowledge a change: 5 s of wall clock
 * under free-run (a busy machine's guest answers in well under that), 100 ms of the step
 * clock (100 000 steps) under the deterministic driver.
 */
const VENDOR_ACK_TIMEOUT_MS = 5000;
const VENDOR_ACK_TIMEOUT_STEP_MS = 100;

/** A role described as plain data, so a worker thread can build it from its workerData. */
export type RoleSpec =
  /** `resume`: a destination's vCPU, continuing the workload from the migrated memory. */
  | { kind: 'vcpu'; index: number; workload: WorkloadOptions; seed: number; resume?: boolean; clockSteps?: () => number }
  /** The migration thread: frames go to `queue` (same thread, step clock), `ring` (the in-process destination on another thread) or `port` (the TCP bridge). */
  | { kind: 'migration'; params: MigrationParams; bugs: string[]; destWords: SharedArrayBuffer; queue?: Uint8Array[]; clockSteps?: () => number; port?: MessagePort; ring?: SharedArrayBuffer }
  | { kind: 'destination'; layout: VmLayout; destWords: SharedArrayBuffer; queue?: Uint8Array[]; ring?: SharedArrayBuffer }
  | { kind: 'dirty-log-collector'; config: DirtyLogTestConfig; clockSteps?: () => number }
  | { kind: 'host-writer'; every: number; seed: number }
  /** The destination's VMM once it resumed the guest: runs it for a while, then stops it. */
  | { kind: 'destination-vmm'; opsPerVcpu: number }
  /** A device backend (src/host/devices); `setup` is the scenario's whole device list. */
  | { kind: 'device'; index: number; setup: DeviceSetup; seed: number }
  | { kind: 'iommu-service' }
  /** A confidential guest's VMM: serves conversion exits (kvm-cpu-exec.ts), the private memory oracle watching. */
  | { kind: 'vmm'; bugs: string[]; design?: KvmCpuExecOptions['design'] }
  /** A vCPU of VM `vm` among several sharing a mediated device, its guest driving the device (mdev-guest.ts). */
  | { kind: 'bar-vcpu'; vm: number; index: number; guest: MdevGuestKind; bar: MdevGuestBar; seed: number }
  /** VM `vm`'s VMM: stops the VM on a refused BAR access (bar-vmm.ts). */
  | { kind: 'bar-vmm'; vm: number }
  /** The mediated device's vendor driver, reallocating its MMIO between the VMs (`layouts`, one per VM). */
  | { kind: 'vendor-driver'; layouts: VmLayout[]; bugs: string[]; events: number; static: boolean; vcpus: number; seed: number; clockSteps?: () => number };

export function roleName(spec: RoleSpec): string {
  switch (spec.kind) {
    case 'vcpu': return `vcpu${spec.index}`;
    case 'dirty-log-collector': return 'collector';
    case 'host-writer': return 'host-writer';
    case 'migration': return 'migration';
    case 'destination': return 'destination';
    case 'destination-vmm': return 'destination-vmm';
    case 'device': return `device${spec.index}`;
    case 'iommu-service': return 'iommu-service';
    case 'vmm': return 'vmm';
    case 'bar-vcpu': return `vm${spec.vm}.vcpu${spec.index}`;
    case 'bar-vmm': return `vm${spec.vm}.vmm`;
    case 'vendor-driver': return 'vendor-driver';
  }
}

/** Builds the Vm view every role of one VM shares (one per thread). */
export function vmFor(layout: VmLayout, bugs: readonly string[]): Vm {
  return new Vm(layout, injectedBugs(bugs).kernel);
}

/** The free-run worker's role factory (workers/role.ts hands it to the driver). */
export const workerRole: RoleFactory<RoleSpec> = (data, report) => buildRole(data.spec, vmFor(data.layout, data.bugs), report);

export function buildRole(spec: RoleSpec, vm: Vm, report: (e: never) => void): Role {
  switch (spec.kind) {
    case 'vcpu': {
      const ranges = vm.memory.slots.map((s) => ({ baseGfn: s.baseGfn, pages: s.pages }));
      const vcpus = vm.layout.config.vcpus;
      const workload = spec.resume
        ? resumeWorkload(spec.workload, vm.memory, spec.index, vcpus, spec.seed)
        : createWorkload(spec.workload, ranges, spec.index, vcpus, spec.seed);
      const clock = spec.clockSteps ? new StepClock(spec.clockSteps) : WALL_CLOCK;
      return new Vcpu(vm, spec.index, workload, { clock, opRate: spec.workload.opRate });
    }
    case 'dirty-log-collector':
      return new GeneratorRole('collector', dirtyLogCollector(vm, spec.config, report as (e: DirtyLogEvent) => void, spec.clockSteps ? new StepClock(spec.clockSteps) : WALL_CLOCK));
    case 'host-writer':
      return new GeneratorRole('host-writer', hostWriter(vm, new VmmControl(vm), spec.every, new Prng(Prng.derive(spec.seed, 2000))));
    case 'migration': {
      const words = new Int32Array(spec.destWords);
      const channel = spec.ring ? new RingChannel(spec.ring, words) : spec.port ? new PortChannel(words, spec.port) : new QueueChannel(words, spec.queue!);
      const clock = spec.clockSteps ? new StepClock(spec.clockSteps) : WALL_CLOCK;
      const bugs = injectedBugs(spec.bugs);
      return new GeneratorRole('migration', precopy(vm, channel, words, clock, spec.params, { ...bugs.migration, harvestSkipEvery: bugs.harvestSkipEvery }, report as (e: MigrationEvent) => void));
    }
    case 'destination': {
      // The destination's memory is created for this migration (runMigration): fresh.
      const memory = new GuestMemory(spec.layout);
      const dest = new Destination(memory, new Int32Array(spec.destWords), undefined, true);
      if (spec.layout.attributes !== null) dest.attributes = new MemoryAttributes(spec.layout.attributes, memory);
      return new DestinationRole(dest, spec.ring ? new RingSource(spec.ring) : new QueueSource(spec.queue!));
    }
    case 'destination-vmm':
      return new GeneratorRole('destination-vmm', runResumedGuest(vm, spec.opsPerVcpu));
    case 'device': {
      const config = spec.setup.devices[spec.index]!;
      const name = `device${spec.index}`;
      return new GeneratorRole(name, createDevice(vm, spec.index, config, spec.seed, deviceWindow(spec.setup, spec.index, vm), deviceArea(spec.setup)).run());
    }
    case 'iommu-service':
      return new GeneratorRole('iommu-service', iommuService(vm, report as (e: IommuServiceEvent) => void));
    case 'vmm':
      return new GeneratorRole('vmm', kvmCpuExec(vm, {
        injection: new ConversionInjection(injectedBugs(spec.bugs).conversion, vm.acts), watch: new ConversionOracle(vm), report: report as (e: KvmCpuExecEvent) => void,
        ...(spec.design !== undefined ? { design: spec.design } : {}),
      }));
    case 'bar-vcpu': {
      const guest = new MdevGuest(spec.bar, spec.guest, spec.vm, spec.index, new Prng(Prng.derive(spec.seed, 4000 + spec.vm * 256 + spec.index)));
      return new Vcpu(vm, spec.index, guest, { name: roleName(spec) });
    }
    case 'bar-vmm':
      return new GeneratorRole(roleName(spec), barVmm(vm, spec.vm, report as (e: BarVmStop) => void));
    case 'vendor-driver': {
      // Its own view of every VM: its zaps reach each VM's KVM through that VM's MMU notifier.
      const vms = spec.layouts.map((l) => vmFor(l, spec.bugs));
      const clock = spec.clockSteps ? new StepClock(spec.clockSteps) : WALL_CLOCK;
      const o = { events: spec.events, static: spec.static, vcpus: spec.vcpus, prng: new Prng(Prng.derive(spec.seed, 5000)), clock, ackTimeoutMs: clock.virtual ? VENDOR_ACK_TIMEOUT_STEP_MS : VENDOR_ACK_TIMEOUT_MS };
      return new GeneratorRole('vendor-driver', vendorWorkload(vms, o, report as (e: VendorEvent) => void));
    }
  }
}
