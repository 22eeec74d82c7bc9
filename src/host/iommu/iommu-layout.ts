import { LINE_WORDS } from '../cache-line.ts';

/**
 * The IOMMU's shared state (docs/architecture.md, principle 1): one DMA address space (a VFIO
 * type1 container, or an iommufd IOAS with one hardware page table) that every device
 * behind the IOMMU is attached to, as QEMU puts the devices of one address space in one
 * container. IOVAs are numbered in 4 KiB pages, like GPAs.
 */
export type IommuBackendKind = 'type1' | 'iommufd';

export interface IommuConfig {
  backend: IommuBackendKind;
  /** type1's dma_entry_limit module parameter; iommufd has no such limit. */
  dmaEntryLimit: number;
  /** Size of the IOVA space in pages: the I/O page table has one entry per page. */
  iovaPages: number;
  /** Devices attached (IOTLB acknowledgement lines, mailboxes, DMA logs). */
  devices: number;
  /** What tracks each device's DMA writes: the IOMMU (type1 container / iommufd HWPT), the device's own DMA logging, or only KVM's log (writes by GPA). */
  tracking: DmaTracking[];
}

export type DmaTracking = 'iommu' | 'device' | 'kvm';

export interface IommuLayout {
  config: IommuConfig;
  /** Two words per IOVA page: gfn + 1 (0: none) and IoPte flags. */
  iopte: SharedArrayBuffer;
  /** type1's dirty bitmap over IOVA pages (pinned pages and dma_rw writes). */
  type1Dirty: SharedArrayBuffer;
  /** Pin counts per IOVA page: write pins in the low 16 bits, read pins in the high 16. */
  pins: SharedArrayBuffer;
  /** Per device: its DMA log over IOVA pages (VFIO device DMA logging). */
  deviceLogs: SharedArrayBuffer[];
  /**
   * Dirty bits collected from the ranges unmapped while tracking was on, by VM-wide page:
   * QEMU reads a range's dirty bits as it unmaps it and marks its own RAM bitmap.
   */
  unmapDirty: SharedArrayBuffer;
  /** Control words: see IommuWord, DeviceWord, MailboxWord. */
  words: SharedArrayBuffer;
  /** Oracle records: faults and stale-IOTLB DMAs (see dma-oracle.ts). */
  records: SharedArrayBuffer;
}

/** IoPte flags word. READ/WRITE: present with that permission; DIRTY: the hardware dirty bit (iommufd). */
export const IoPte = { READ: 1, WRITE: 2, DIRTY: 4 } as const;

/** Global words, each group on its own line. */
export const IommuWord = {
  /** The domain lock (type1's iommu->lock): 0 free, else holder + 1. */
  LOCK: 0,
  /** IOTLB invalidation generation, bumped by every invalidation (iotlb-invalidation.ts). */
  INV_GEN: LINE_WORDS,
  INVALIDATIONS: LINE_WORDS + 1,
  /** Service counters. */
  MAPS: 2 * LINE_WORDS, UNMAPS: 2 * LINE_WORDS + 1, MAP_ERRORS: 2 * LINE_WORDS + 2, UNMAP_ERRORS: 2 * LINE_WORDS + 3,
  /** Mappings (type1: vfio_dma entries) and pages mapped now. */
  ENTRIES: 2 * LINE_WORDS + 4, PAGES_MAPPED: 2 * LINE_WORDS + 5,
  /** Non-zero while type1 dirty tracking (VFIO_IOMMU_DIRTY_PAGES START) is on. */
  TYPE1_TRACKING: 3 * LINE_WORDS,
  /** Non-zero while the HWPT's dirty tracking (IOMMU_HWPT_SET_DIRTY_TRACKING) is on. */
  HWPT_TRACKING: 3 * LINE_WORDS + 1,
  /** Non-zero when every device in the container declared a pinned page dirty scope. */
  PINNED_SCOPE: 3 * LINE_WORDS + 2,
  /** Bumped (and notified) by every mailbox request: the service parks on it. */
  DOORBELL: 4 * LINE_WORDS,
  /** Non-zero: the run stops at the first device fault (otherwise faults are counted and it goes on). */
  STOP_ON_FAULT: 5 * LINE_WORDS,
  /** Set by the first device fault when STOP_ON_FAULT is on. */
  FAULT_STOP: 5 * LINE_WORDS + 1,
} as const;
const GLOBAL_LINES = 6;

/** Words a device writes (its first line). */
export const DeviceWord = {
  /** DMA_ACTIVE or DMA_QUIESCED: a quiesced device holds no translations (like a vCPU outside guest mode). */
  MODE: 0,
  /** IOTLB invalidation generation acknowledged. */
  INV_ACK: 1,
  DMA_WRITES: 2, DMA_READS: 3, IOTLB_HITS: 4, IOTLB_MISSES: 5, FAULTS: 6, STALE: 7,
  PINS: 8, DMA_RW: 9,
  /** Non-zero while device DMA logging is started. */
  LOGGING: 10,
  /** Pages it reported through DMA logging. */
  LOG_REPORTED: 11,
  /** Operations done (the watchdog's progress). */
  OPS: 12,
} as const;
export const DMA_QUIESCED = 0;
export const DMA_ACTIVE = 1;

/** A device's mailbox to the IOMMU service: the request line (device writes), then the response line (service writes). */
export const MailboxWord = {
  REQ_SEQ: LINE_WORDS, OP: LINE_WORDS + 1, IOVA: LINE_WORDS + 2, PAGES: LINE_WORDS + 3, GFN: LINE_WORDS + 4, PROT: LINE_WORDS + 5,
  RESP_SEQ: 2 * LINE_WORDS, RESULT: 2 * LINE_WORDS + 1,
} as const;
export const enum MailboxOp { MAP = 1, UNMAP = 2 }
const DEVICE_LINES = 3;

export function deviceBase(device: number): number {
  return (GLOBAL_LINES + device * DEVICE_LINES) * LINE_WORDS;
}

export const RECORD_WORDS = 8;
export const MAX_RECORDS = 64;

export function createIommuLayout(config: IommuConfig, totalPages: number): IommuLayout {
  const bitmapBytes = Math.ceil(config.iovaPages / 32) * 4;
  return {
    config,
    iopte: new SharedArrayBuffer(config.iovaPages * 8),
    type1Dirty: new SharedArrayBuffer(bitmapBytes),
    pins: new SharedArrayBuffer(config.iovaPages * 4),
    deviceLogs: Array.from({ length: config.devices }, () => new SharedArrayBuffer(bitmapBytes)),
    unmapDirty: new SharedArrayBuffer(Math.ceil(totalPages / 32) * 4),
    words: new SharedArrayBuffer((GLOBAL_LINES + config.devices * DEVICE_LINES) * LINE_WORDS * 4),
    records: new SharedArrayBuffer((1 + MAX_RECORDS * RECORD_WORDS) * 4),
  };
}

/** Whether some device relies on the IOMMU's own dirty tracking (type1 container or iommufd HWPT). */
export function usesIommuTracking(tracking: readonly DmaTracking[]): boolean {
  return tracking.includes('iommu');
}
