import { PAGE_SIZE } from '../constants.ts';

/**
 * A mediated device's physical MMIO as the host sees it (a vGPU's BAR: registers and VRAM):
 * shared memory of `pages` pages that the vendor driver carves into slices for the VMs
 * sharing the device, at run time (vendor-driver.ts). Each page records its owner (the VM
 * whose slice holds it, as VM id + 1; 0 free) and a generation bumped every time it
 * changes hands, so that an access through a mapping made for an earlier owner can be
 * told from one through a current mapping (the isolation oracles). A pfn here is a page
 * index into this region.
 */
export interface DeviceMmioLayout {
  pages: number;
  /** The MMIO's contents. */
  data: SharedArrayBuffer;
  /** Per page: owner (VM id + 1, 0 free), generation. */
  pageWords: SharedArrayBuffer;
}

export const enum MmioPageWord { OWNER = 0, GENERATION = 1, WORDS = 2 }

export function createDeviceMmioLayout(pages: number): DeviceMmioLayout {
  if (!Number.isInteger(pages) || pages < 1) throw new Error(`device MMIO: ${pages} pages`);
  return { pages, data: new SharedArrayBuffer(pages * PAGE_SIZE), pageWords: new SharedArrayBuffer(pages * MmioPageWord.WORDS * 4) };
}

/** No VM owns the page. */
export const NO_OWNER = -1;

export class DeviceMmio {
  readonly pages: number;
  readonly u32: Uint32Array;
  private readonly w: Int32Array;

  constructor(readonly layout: DeviceMmioLayout) {
    this.pages = layout.pages;
    this.u32 = new Uint32Array(layout.data);
    this.w = new Int32Array(layout.pageWords);
  }

  /** The VM whose slice holds physical page `pfn`, or NO_OWNER. */
  owner(pfn: number): number {
    return Atomics.load(this.w, pfn * MmioPageWord.WORDS + MmioPageWord.OWNER) - 1;
  }

  /** How many times page `pfn` changed hands. */
  generation(pfn: number): number {
    return Atomics.load(this.w, pfn * MmioPageWord.WORDS + MmioPageWord.GENERATION);
  }

  /** Page `pfn` goes to `vm` (NO_OWNER: freed); its generation moves on. */
  setOwner(pfn: number, vm: number): void {
    Atomics.store(this.w, pfn * MmioPageWord.WORDS + MmioPageWord.OWNER, vm + 1);
    Atomics.add(this.w, pfn * MmioPageWord.WORDS + MmioPageWord.GENERATION, 1);
  }

  /** The first 32-bit word of page `pfn` (a register, or the start of a VRAM page). */
  read32(pfn: number): number {
    return Atomics.load(this.u32, (pfn * PAGE_SIZE) / 4);
  }

  write32(pfn: number, value: number): void {
    Atomics.store(this.u32, (pfn * PAGE_SIZE) / 4, value >>> 0);
  }
}
