import { DeviceWord, type DmaTracking, deviceBase } from '../iommu/iommu-layout.ts';
import type { Iommu } from '../iommu/iommu.ts';
import type { Steps } from '../../roles/role.ts';
import type { DeviceConfig, DeviceKind } from './device-config.ts';

/**
 * What every device kind is (as Firecracker's `VirtioDevice` is to its devices): a role
 * doing DMA into guest memory, paced by the guest's operations, that honours the VMM's
 * pause and the IOMMU's invalidations, stamps every page it writes, and counts what it
 * did in its shared counters. One file per kind: dma-engine.ts, mdev.ts, gvt.ts.
 */
export interface Device {
  readonly index: number;
  readonly config: DeviceConfig;
  /** The device's role body: runs until the run ends. */
  run(): Steps;
  /** What it did so far. */
  stats(): DeviceStats;
}

export interface DeviceStats {
  device: number;
  kind: DeviceKind;
  tracking: DmaTracking;
  operations: number;
  dmaWrites: number;
  dmaReads: number;
  iotlbHits: number;
  iotlbMisses: number;
  pins: number;
  dmaRw: number;
  faults: number;
  staleIotlb: number;
  /** Pages reported through its DMA logging. */
  loggedPagesReported: number;
}

/** How a device's DMA is dirty-tracked: gvt by KVM's log, an mdev by the IOMMU (pins, dma_rw), a DMA engine as configured. */
export function dmaTrackingOf(d: DeviceConfig): DmaTracking {
  return d.kind === 'gvt' ? 'kvm' : d.kind === 'mdev' ? 'iommu' : d.tracking;
}

/** Device `index`'s counters, as published (readable from any thread with the VM's IOMMU). */
export function deviceStats(iommu: Iommu, index: number, config: DeviceConfig): DeviceStats {
  const at = (k: number): number => Atomics.load(iommu.words, deviceBase(index) + k);
  return {
    device: index, kind: config.kind, tracking: dmaTrackingOf(config), operations: at(DeviceWord.OPS), dmaWrites: at(DeviceWord.DMA_WRITES), dmaReads: at(DeviceWord.DMA_READS),
    iotlbHits: at(DeviceWord.IOTLB_HITS), iotlbMisses: at(DeviceWord.IOTLB_MISSES), pins: at(DeviceWord.PINS), dmaRw: at(DeviceWord.DMA_RW),
    faults: at(DeviceWord.FAULTS), staleIotlb: at(DeviceWord.STALE), loggedPagesReported: at(DeviceWord.LOG_REPORTED),
  };
}
