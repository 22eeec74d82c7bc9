import { CacheAccess, lineKey } from '../cpu-cache.ts';
import { DEVICE_WRITER_BASE, Memslot } from '../memslot.ts';
import { IoPte } from '../iommu/iommu-layout.ts';
import type { Vm } from '../vm.ts';

/** Where one DMA went: the guest frame it reached, or an IOMMU fault (nothing mapped there, or not with that permission). */
export type DmaAccess = { gfn: number; value: number } | { fault: string };

/**
 * A device assigned to a confidential guest with VFIO, as the NIC of the shared device
 * assignment thread: it has no IOTLB of its own, so each DMA translates its IOVA in the
 * IOMMU's page table and reaches the page behind it in the VMM's (shared) memory, the only
 * memory type1 or iommufd can map. It never reaches guest_memfd: a device that writes a
 * private page writes that page's shared backing, which KVM no longer maps to the guest.
 * On a VM with the CPU cache model its DMA snoops the caches, or with `snoop` false
 * (PCIe No Snoop) reaches memory only (cpu-cache.ts).
 */
export class PassthroughDma {
  private seq = 0;
  readonly writer: number;

  constructor(readonly vm: Vm, index = 0) {
    if (vm.iommu === null) throw new Error('PassthroughDma: the VM has no IOMMU');
    this.writer = DEVICE_WRITER_BASE + index;
  }

  private translate(iova: number, want: number): number | string {
    const t = this.vm.iommu!.table;
    if (!t.inRange(iova)) return `IOVA page 0x${iova.toString(16)} is outside the aperture`;
    if ((t.flags(iova) & want) === 0) return `nothing maps IOVA 0x${(iova * 4096).toString(16)} for ${want === IoPte.WRITE ? 'writing' : 'reading'}`;
    return t.gfn(iova);
  }

  /** A DMA write of `value` into the first 8 bytes of IOVA page `iova`, stamped as the device's. */
  write(iova: number, value: number, snoop = true): DmaAccess {
    const gfn = this.translate(iova, IoPte.WRITE);
    if (typeof gfn === 'string') return { fault: gfn };
    const slot = this.vm.memory.findSlot(gfn)!;
    const page = gfn - slot.baseGfn;
    const cache = this.vm.cache;
    if (cache === null) slot.writeU64Stamped(page, value, this.writer, ++this.seq, 0);
    else {
      const line = new Uint32Array(4);
      Memslot.stampedBytes(line, value, this.writer, ++this.seq, 0);
      cache.dmaWrite(snoop ? CacheAccess.DMA_SNOOP : CacheAccess.DMA_NO_SNOOP, lineKey(slot.firstPage + page, 0), 0, new Uint8Array(line.buffer));
    }
    return { gfn, value };
  }

  /** A DMA read of the first 8 bytes of IOVA page `iova`. */
  read(iova: number, snoop = true): DmaAccess {
    const gfn = this.translate(iova, IoPte.READ);
    if (typeof gfn === 'string') return { fault: gfn };
    const slot = this.vm.memory.findSlot(gfn)!;
    const page = gfn - slot.baseGfn;
    const cache = this.vm.cache;
    if (cache === null) return { gfn, value: slot.readU64(page) };
    const w = new Uint32Array(2);
    cache.dmaRead(snoop ? CacheAccess.DMA_SNOOP : CacheAccess.DMA_NO_SNOOP, lineKey(slot.firstPage + page, 0), 0, new Uint8Array(w.buffer));
    return { gfn, value: w[0]! + w[1]! * 4294967296 };
  }
}
