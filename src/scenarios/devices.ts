import { PAGE_SIZE } from '../host/constants.ts';
import { type DeviceConfig, usesIommu } from '../host/devices/device-config.ts';
import { type DeviceStats, deviceStats, dmaTrackingOf } from '../host/devices/device.ts';
export type { DeviceStats };
import { BufferPages, type DeviceArea, type GuestRange, type IovaWindow, gfnEnd, iovaWindows } from '../host/devices/dma-buffers.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../host/iommu/constants.ts';
import { LockHolder } from '../host/iommu/domain-lock.ts';
import type { IommuStats } from '../host/iommu/iommu.ts';
import { type IommuBackendKind, type IommuConfig, IommuWord } from '../host/iommu/iommu-layout.ts';
import type { Vm } from '../host/vm.ts';
import type { DmaRecord } from '../host/iommu/dma-records.ts';
import { UserError } from '../util/errors.ts';
import { runAlone } from '../roles/role.ts';
import { KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET, KvmVirtioDevice } from '../host/kvm-virtio-device.ts';
import { KvmVfio } from '../host/kvm-vfio.ts';
import type { NoncoherentRequest } from './options.ts';

/** The IOMMU and devices of a scenario. */
export interface DeviceSetup {
  backend: IommuBackendKind;
  dmaEntryLimit: number;
  /** Stop the run at the first device fault (otherwise count and go on; either way the run fails). */
  stopOnFault: boolean;
  devices: DeviceConfig[];
  /**
   * The part of a confidential guest's bounce buffers its devices use (set by the
   * scenario): devices DMA only there, and nothing is mapped before the guest runs; VFIO's
   * RAM discard listener maps shared memory as the VMM's conversion thread registers it.
   */
  sharedArea?: GuestRange;
  /** Where the devices' buffers are when the guest says (a render guest's buffers, render-guest.ts); mapped before the guest runs. */
  bufferArea?: DeviceArea;
  /** How KVM learns of a device doing non-coherent DMA (options.ts NoncoherentRequest); default vfio. */
  noncoherentRequest?: NoncoherentRequest;
}

/** The range the devices take their buffers from, if the scenario gives one. */
export function deviceArea(setup: DeviceSetup): DeviceArea | null {
  return setup.sharedArea ?? setup.bufferArea ?? null;
}

export const NO_DEVICES: DeviceSetup = { backend: 'type1', dmaEntryLimit: VFIO_DEFAULT_DMA_ENTRY_LIMIT, stopOnFault: false, devices: [] };


/** The VM's IOMMU configuration, or undefined when the scenario has no devices. */
export function iommuConfigFor(setup: DeviceSetup, slots: readonly { baseGfn: number; pages: number }[]): IommuConfig | undefined {
  if (setup.devices.length === 0) return undefined;
  return {
    backend: setup.backend, dmaEntryLimit: setup.dmaEntryLimit, devices: setup.devices.length,
    iovaPages: iovaWindows(setup.devices, gfnEnd(slots)).iovaPages, tracking: setup.devices.map(dmaTrackingOf),
  };
}

/** Checks what the backends cannot do, naming the device. */
export function checkDeviceSetup(setup: DeviceSetup, where: string): void {
  setup.devices.forEach((d, i) => {
    if (d.kind === 'mdev' && setup.backend !== 'type1') {
      throw new UserError(`${where}: device ${i} (mdev) pins pages through VFIO type1's emulated IOMMU; use the type1 backend`);
    }
  });
}

/**
 * What the VMM does before the guest runs: declare the container's dirty scope (pinned
 * when every device in it pins, as mdevs do), and map each IOVA device's initial buffers
 * (one VFIO_IOMMU_MAP_DMA of 4 KiB each). A map the IOMMU refuses (dma_entry_limit) is
 * the user's configuration error.
 */
export function attachDevices(vm: Vm, setup: DeviceSetup, seed: number): void {
  const iommu = vm.iommu;
  if (iommu === null) return;
  const onIommu = setup.devices.filter((d) => usesIommu(d.kind));
  Atomics.store(iommu.words, IommuWord.PINNED_SCOPE, onIommu.length > 0 && onIommu.every((d) => d.kind === 'mdev') ? 1 : 0);
  Atomics.store(iommu.words, IommuWord.STOP_ON_FAULT, setup.stopOnFault ? 1 : 0);
  const { windows } = iovaWindows(setup.devices, gfnEnd(vm.memory.slots));
  const rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
  if (!iommu.lock.tryAcquire(LockHolder.VMM)) throw new Error('the IOMMU lock is taken before the VM runs');
  try {
    if (setup.sharedArea !== undefined) return; // VFIO's RAM discard listener maps shared memory (kvm-cpu-exec.ts)
    if (onIommu.some((d) => d.identity)) {
      for (const s of vm.memory.slots) {
        const r = iommu.mapDma(s.baseGfn * PAGE_SIZE, s.pages * PAGE_SIZE, s.baseGfn * PAGE_SIZE, rw);
        if (r.ret < 0) throw new UserError(`guest RAM, slot ${s.id}: ${r.detail}`);
      }
    }
    setup.devices.forEach((d, i) => {
      const w = windows[i];
      if (w == null || d.identity) return;
      new BufferPages(d, i, seed, setup.bufferArea !== undefined ? { slots: [setup.bufferArea] } : vm.memory).initial().forEach((gfn, b) => {
        const r = iommu.mapDma((w.base + b) * PAGE_SIZE, PAGE_SIZE, gfn * PAGE_SIZE, rw);
        if (r.ret < 0) throw new UserError(`device ${i} (${d.kind}), buffer ${b}: ${r.detail}`);
      });
    });
  } finally {
    iommu.lock.release();
  }
  if (setup.devices.some((d) => !d.snoop)) requestNoncoherent(vm, setup.noncoherentRequest ?? 'vfio', setup.devices);
}

/** Tells KVM, before the guest runs, that a device does non-coherent DMA, the scenario's way (or not at all). */
function requestNoncoherent(vm: Vm, how: NoncoherentRequest, devices: readonly DeviceConfig[]): void {
  switch (how) {
    // KVM_DEV_VFIO_FILE_ADD of each device's file, in order: VFIO registers non-coherent DMA
    // once for all of them when one cannot be made to snoop (kvm_vfio_update_coherency).
    case 'vfio': {
      const kv = new KvmVfio(vm, vm.bugs.noncoherentUnbalanced === true);
      for (const [i, d] of devices.entries()) runAlone(kv.fileAdd(d.snoop), `KVM_DEV_VFIO_FILE_ADD of device ${i}`);
      return;
    }
    case 'capability': runAlone(vm.enableCapNoncoherentDma(), 'enabling the non-coherent DMA capability'); return;
    // Kept for the run: releasing it (closing its fd) would unregister.
    case 'kvm-virtio-device': runAlone(new KvmVirtioDevice(vm).setAttr(KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET), 'KVM_SET_DEVICE_ATTR NONCOHERENT_SET'); return;
    case 'none': return;
  }
}

export function deviceWindow(setup: DeviceSetup, index: number, vm: Vm): IovaWindow | null {
  return iovaWindows(setup.devices, gfnEnd(vm.memory.slots)).windows[index] ?? null;
}

/** The run's IOMMU and device statistics and oracle records. */
export interface DmaReport {
  iommu: IommuStats;
  devices: DeviceStats[];
  /** Device faults and stale-IOTLB DMAs, in the order recorded (the first 64). */
  records: DmaRecord[];
  faults: number;
  staleIotlb: number;
}

export function dmaReport(vm: Vm, setup: DeviceSetup): DmaReport | null {
  const iommu = vm.iommu;
  if (iommu === null) return null;
  const devices = setup.devices.map((d, i) => deviceStats(iommu, i, d));
  return {
    iommu: iommu.stats(), devices, records: iommu.dmaRecords.records(),
    faults: devices.reduce((s, d) => s + d.faults, 0), staleIotlb: devices.reduce((s, d) => s + d.staleIotlb, 0),
  };
}
