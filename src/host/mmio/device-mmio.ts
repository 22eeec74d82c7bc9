import { PAGE_SIZE } from '../constants.ts';
import { type DeviceMmioLayout, MmioPageWord } from '../bar-layouts.ts';
export { type DeviceMmioLayout, MmioPageWord, createDeviceMmioLayout } from '../bar-layouts.ts';

/** No VM owns the page. */
export const NO_OWNER = -1;

/**
 * A mediated device's physical MMIO (its layout, and why the pages carry owners and
 * generations, in bar-layouts.ts): each page's owner and generation, and its words.
 */
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

  /** Pages [pfn, pfn + count) as bytes (a view: the device's own access to its memory). */
  bytesOf(pfn: number, count: number): Uint8Array {
    return new Uint8Array(this.layout.data, pfn * PAGE_SIZE, count * PAGE_SIZE);
  }
}
