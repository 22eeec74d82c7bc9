import { IoPte } from './iommu-layout.ts';

/** Present: mapped with some permission. */
export const IOPTE_PRESENT = IoPte.READ | IoPte.WRITE;
/** The first page of a mapping (a type1 vfio_dma entry, an iommufd area): unmaps may not split mappings. */
export const IOPTE_HEAD = 8;

/**
 * The I/O page table of the domain, flat over the IOVA space: per IOVA page, the guest
 * frame it maps (gfn + 1; 0 for none) and its flags. An unmap clears the permission bits
 * first and the gfn only once every device IOTLB dropped the translation: between the
 * two the entry is "unmapping", and DMA through a cached copy of it is still legal.
 */
export class IoPageTable {
  readonly e: Int32Array;

  constructor(buffer: SharedArrayBuffer, readonly pages: number) {
    this.e = new Int32Array(buffer);
  }

  /** The gfn the entry holds (present or unmapping), or -1. */
  gfn(iova: number): number {
    return Atomics.load(this.e, 2 * iova) - 1;
  }

  flags(iova: number): number {
    return Atomics.load(this.e, 2 * iova + 1);
  }

  present(iova: number): boolean {
    return (this.flags(iova) & IOPTE_PRESENT) !== 0;
  }

  /** Writes an entry: the gfn first, then the flags that make it present. */
  set(iova: number, gfn: number, flags: number): void {
    Atomics.store(this.e, 2 * iova, gfn + 1);
    Atomics.store(this.e, 2 * iova + 1, flags);
  }

  /** Clears the permission bits (the HEAD and DIRTY bits stay for the unmap to finish). */
  revoke(iova: number): number {
    return Atomics.and(this.e, 2 * iova + 1, ~IOPTE_PRESENT);
  }

  clear(iova: number): void {
    Atomics.store(this.e, 2 * iova + 1, 0);
    Atomics.store(this.e, 2 * iova, 0);
  }

  /** Sets flag bits; returns the old flags (the hardware's dirty bit update). */
  or(iova: number, bits: number): number {
    return Atomics.or(this.e, 2 * iova + 1, bits);
  }

  /** Clears flag bits; returns the old flags (read-and-clear of the dirty bit). */
  and(iova: number, keep: number): number {
    return Atomics.and(this.e, 2 * iova + 1, keep);
  }

  inRange(iova: number): boolean {
    return Number.isInteger(iova) && iova >= 0 && iova < this.pages;
  }
}
