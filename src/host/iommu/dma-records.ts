import { DeviceWord, IommuWord, MAX_RECORDS, RECORD_WORDS, deviceBase } from './iommu-layout.ts';

/**
 * What the IOMMU hardware records of a device's DMA that went wrong, for the DMA oracle
 * (src/oracles/dma-oracle.ts reads and describes them). Devices check every DMA against the IOMMU's
 * page table as the hardware would, and record what went wrong in shared memory:
 * - a DMA to an IOVA with no mapping, or a write to a read-only mapping, is a device
 *   fault (DMAR fault / AMD-Vi IO_PAGE_FAULT): reported, never a crash; the run goes on or
 *   stops, by configuration;
 * - a DMA through a cached IOTLB translation whose mapping is gone (its unmap already
 *   returned: the entry was freed or now maps another page) is a stale-IOTLB DMA: the
 *   data lands in a page the device no longer owns.
 * Lost DMA writes (a write no dirty source reported) are caught by the stamp oracle.
 */
export const enum DmaRecordKind { UNMAPPED = 1, READ_ONLY = 2, STALE_IOTLB = 3 }

export interface DmaRecord {
  kind: 'unmapped-iova' | 'write-to-read-only' | 'stale-iotlb';
  device: number;
  /** IOVA (bytes) the device used. */
  iova: number;
  write: boolean;
  /** The gfn its cached translation named (stale IOTLB), else -1. */
  cachedGfn: number;
  /** The gfn the page table maps now, or -1 for none. */
  currentGfn: number;
}

const KINDS: Record<number, DmaRecord['kind']> = { 1: 'unmapped-iova', 2: 'write-to-read-only', 3: 'stale-iotlb' };

export class DmaRecords {
  private readonly rec: Int32Array;

  constructor(private readonly words: Int32Array, records: SharedArrayBuffer) {
    this.rec = new Int32Array(records);
  }

  /** Records one event and counts it on the device; a fault stops the run when configured so. */
  report(kind: DmaRecordKind, device: number, iova: number, write: boolean, cachedGfn: number, currentGfn: number): void {
    const b = deviceBase(device);
    Atomics.add(this.words, b + (kind === DmaRecordKind.STALE_IOTLB ? DeviceWord.STALE : DeviceWord.FAULTS), 1);
    const n = Atomics.add(this.rec, 0, 1);
    if (n < MAX_RECORDS) {
      const at = 1 + n * RECORD_WORDS;
      this.rec.set([kind, device, iova, write ? 1 : 0, cachedGfn, currentGfn], at);
    }
    if (kind !== DmaRecordKind.STALE_IOTLB && Atomics.load(this.words, IommuWord.STOP_ON_FAULT) !== 0) {
      Atomics.store(this.words, IommuWord.FAULT_STOP, 1);
    }
  }

  /** Events recorded (more may have happened than were kept: see count()). */
  records(): DmaRecord[] {
    const n = Math.min(Atomics.load(this.rec, 0), MAX_RECORDS);
    const out: DmaRecord[] = [];
    for (let i = 0; i < n; i++) {
      const at = 1 + i * RECORD_WORDS;
      out.push({
        kind: KINDS[this.rec[at]!] ?? 'unmapped-iova', device: this.rec[at + 1]!, iova: this.rec[at + 2]! * 4096,
        write: this.rec[at + 3] === 1, cachedGfn: this.rec[at + 4]!, currentGfn: this.rec[at + 5]!,
      });
    }
    return out;
  }

  count(): number {
    return Atomics.load(this.rec, 0);
  }

  faultStopped(): boolean {
    return Atomics.load(this.words, IommuWord.FAULT_STOP) !== 0;
  }
}

