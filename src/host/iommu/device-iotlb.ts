/**
 * A device's IOTLB (ATS translation cache, or vhost's device IOTLB): direct-mapped, in
 * the device's own memory. Each entry caches an IOVA page's gfn, whether it may be
 * written, and whether its IOPTE's dirty bit is already set (hardware does not set it
 * again through such an entry, which is why reading-and-clearing dirty bits needs an
 * IOTLB flush). Invalidation drops every entry.
 */
export class DeviceIotlb {
  private readonly tag: Int32Array;
  private readonly gfns: Int32Array;
  private readonly bits: Uint8Array;
  private readonly mask: number;
  hits = 0;
  misses = 0;

  constructor(entries: number) {
    if (entries < 1 || (entries & (entries - 1)) !== 0) throw new Error(`IOTLB entries must be a power of two, not ${entries}`);
    this.tag = new Int32Array(entries);
    this.gfns = new Int32Array(entries);
    this.bits = new Uint8Array(entries);
    this.mask = entries - 1;
  }

  /** The cached gfn of `iova`, or -1 on a miss. */
  lookup(iova: number): number {
    const i = iova & this.mask;
    if (this.tag[i] === iova + 1) { this.hits++; return this.gfns[i]!; }
    this.misses++;
    return -1;
  }

  writable(iova: number): boolean { return (this.bits[iova & this.mask]! & 1) !== 0; }
  dirtyCached(iova: number): boolean { return (this.bits[iova & this.mask]! & 2) !== 0; }
  setDirtyCached(iova: number): void { this.bits[iova & this.mask]! |= 2; }

  fill(iova: number, gfn: number, writable: boolean, dirty: boolean): void {
    const i = iova & this.mask;
    this.tag[i] = iova + 1;
    this.gfns[i] = gfn;
    this.bits[i] = (writable ? 1 : 0) | (dirty ? 2 : 0);
  }

  invalidateAll(): void {
    this.tag.fill(0);
  }
}
