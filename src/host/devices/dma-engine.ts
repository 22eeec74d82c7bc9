import { IOPTE_PRESENT } from '../iommu/io-page-table.ts';
import { Acted } from '../injections.ts';
import { DeviceIotlb } from '../iommu/device-iotlb.ts';
import { DeviceWord, IoPte, IommuWord } from '../iommu/iommu-layout.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import { DmaRecordKind } from '../iommu/dma-records.ts';
import type { DeviceArea, IovaWindow } from './dma-buffers.ts';
import { type Buffer, DmaDevice } from './dma-device.ts';
import type { DeviceConfig } from './device-config.ts';

/**
 * A virtio-style DMA engine behind the IOMMU: every DMA translates its IOVA through the
 * device IOTLB, walking the I/O page table on a miss. A write sets the IOPTE's dirty bit
 * when the HWPT tracks dirty pages and the IOTLB entry does not already know it is set
 * (iommufd hardware dirty tracking), or logs the IOVA in the device's own DMA log (VFIO
 * device DMA logging), after the data is in memory.
 */
export class DmaEngine extends DmaDevice {
  readonly iotlb: DeviceIotlb;
  private readonly hwDirty: boolean;

  constructor(vm: Vm, index: number, config: DeviceConfig, seed: number, window: IovaWindow, sharedArea: DeviceArea | null = null) {
    super(vm, index, config, seed, window, sharedArea);
    this.iotlb = new DeviceIotlb(config.iotlbEntries);
    this.hwDirty = config.tracking === 'iommu' && this.iommu.backend === 'iommufd';
  }

  protected override dropTranslations(): void { this.iotlb.invalidateAll(); }

  protected override publish(): void {
    super.publish();
    Atomics.store(this.words, this.base + DeviceWord.IOTLB_HITS, this.iotlb.hits);
    Atomics.store(this.words, this.base + DeviceWord.IOTLB_MISSES, this.iotlb.misses);
  }

  protected *dma(b: Buffer, write: boolean): Steps {
    this.access(b.iova, write);
    yield undefined;
  }

  protected stray(): void { this.access(this.strayIova, true); }

  /** One DMA to `iova`: translate (IOTLB, else the page table), then read or write the page. */
  access(iova: number, write: boolean): void {
    const t = this.iommu.table;
    const tlb = this.iotlb;
    let gfn = tlb.lookup(iova);
    if (gfn >= 0) {
      // The oracle: a cached translation is only legal while its mapping exists (or its unmap has not returned).
      if (t.gfn(iova) !== gfn) this.fault(DmaRecordKind.STALE_IOTLB, iova, write, gfn);
    } else {
      const f = t.flags(iova);
      if ((f & IOPTE_PRESENT) === 0) { this.fault(DmaRecordKind.UNMAPPED, iova, write); return; }
      gfn = t.gfn(iova);
      tlb.fill(iova, gfn, (f & IoPte.WRITE) !== 0, (f & IoPte.DIRTY) !== 0);
    }
    if (!write) { this.load(gfn); return; }
    if (!tlb.writable(iova)) { this.fault(DmaRecordKind.READ_ONLY, iova, write); return; }
    if (this.hwDirty && !tlb.dirtyCached(iova) && Atomics.load(this.words, IommuWord.HWPT_TRACKING) !== 0) {
      t.or(iova, IoPte.DIRTY);
      tlb.setDirtyCached(iova);
    }
    this.store(gfn);
    if (this.config.tracking === 'device') {
      if (!this.vm.bugs.untrackedDma) this.iommu.logDma(this.index, iova);
      else if (Atomics.load(this.words, this.base + DeviceWord.LOGGING) !== 0) this.vm.acts.acted(Acted.UNTRACKED_DMA);
    }
  }
}
