/**
 * Device backends (docs/architecture.md, actors): each its own role (a worker thread under
 * free-run), one kind per file.
 * - dma-engine: a virtio-style DMA engine behind the IOMMU: reads and writes buffers by
 *   IOVA through its device IOTLB (an assigned device, or vhost with a device IOTLB);
 * - mdev: a mediated device behind the emulated IOMMU: pins pages by IOVA
 *   (vfio_pin_pages, separate read and write pins) and reads and writes others with
 *   vfio_dma_rw by IOVA, without pinning;
 * - gvt: a GVT-g-style device that writes by GPA through the host's write-guest path
 *   (kvm_write_guest): it bypasses the IOMMU and only KVM's dirty log sees it.
 */
export type DeviceKind = 'dma-engine' | 'mdev' | 'gvt';
export const DEVICE_KINDS: readonly DeviceKind[] = ['dma-engine', 'mdev', 'gvt'];

export interface DeviceConfig {
  kind: DeviceKind;
  /** One DMA operation per `every` guest operations (all vCPUs together). */
  every: number;
  /** Buffers mapped at a time, one 4 KiB IOVA mapping each (dma-engine, mdev). */
  buffers: number;
  /** Percentage of operations that write (the rest read). */
  writePercent: number;
  /** Every n operations the driver unmaps a buffer and maps its IOVA to another page (0: never). */
  remapEvery: number;
  /** Which guest pages buffers (and gvt's writes) use: anywhere at random, or consecutive pages. */
  pattern: 'random' | 'sequential';
  /** dma-engine: the IOMMU's dirty tracking (type1 container / iommufd HWPT) or its own DMA logging. */
  tracking: 'iommu' | 'device';
  /** A DMA to an IOVA nothing maps every n operations, to exercise fault reporting (0: never). */
  strayEvery: number;
  /** IOTLB entries (dma-engine; a power of two). */
  iotlbEntries: number;
  /**
   * The VMM maps all guest RAM at IOVA = GPA, one mapping per memslot, as QEMU does for
   * an assigned device without a vIOMMU; buffers are then guest pages used in place and
   * never remapped. Otherwise each buffer is its own 4 KiB mapping in the device's window.
   */
  identity: boolean;
  /**
   * The device's DMA snoops the CPU caches (the default). false: PCIe No Snoop, as a GPU a
   * virtio-gpu backend drives: its DMA reads and writes DRAM only (with the CPU cache model,
   * cpu-cache.ts), and VFIO registers non-coherent DMA with KVM (kvm_vfio_update_coherency),
   * which then honours the guest's PAT.
   */
  snoop: boolean;
}

export const DEVICE_DEFAULTS: Omit<DeviceConfig, 'kind'> = {
  every: 16, buffers: 64, writePercent: 75, remapEvery: 32, pattern: 'random', tracking: 'iommu', strayEvery: 0, iotlbEntries: 32, identity: false, snoop: true,
};

export { DEVICE_WRITER_BASE } from '../memslot.ts';

/** Whether the device does DMA by IOVA through the IOMMU (and has a window of IOVAs). */
export function usesIommu(kind: DeviceKind): boolean {
  return kind !== 'gvt';
}
