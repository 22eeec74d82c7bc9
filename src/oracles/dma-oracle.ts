import type { DmaRecord } from '../host/iommu/dma-records.ts';
import { hex } from '../util/hex.ts';

export type { DmaRecord };

/**
 * The DMA oracle's findings in words: device faults (a DMA to an IOVA nothing maps, a
 * write to a read-only mapping) and stale-IOTLB DMAs, as the IOMMU recorded them
 * (src/host/iommu/dma-records.ts). Lost DMA writes are the stamp oracle's.
 */

export function describeDmaRecord(r: DmaRecord): string {
  const what = r.write ? 'write' : 'read';
  switch (r.kind) {
    case 'unmapped-iova': return `DEVICE FAULT: device ${r.device} ${what} to IOVA ${hex(r.iova)}, which nothing maps`;
    case 'write-to-read-only': return `DEVICE FAULT: device ${r.device} write to IOVA ${hex(r.iova)}, mapped read-only (gfn ${hex(r.currentGfn)})`;
    case 'stale-iotlb': return `STALE IOTLB: device ${r.device} ${what} to IOVA ${hex(r.iova)} through a cached translation to gfn ${hex(r.cachedGfn)} after its unmap returned ` +
      `(the IOVA now ${r.currentGfn < 0 ? 'maps nothing' : `maps gfn ${hex(r.currentGfn)}`})`;
  }
}
