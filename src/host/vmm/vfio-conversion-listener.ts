import { ENOENT, PAGE_SIZE } from '../constants.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../iommu/constants.ts';
import { LockHolder } from '../iommu/domain-lock.ts';
import type { Iommu } from '../iommu/iommu.ts';
import { RDM_OK, type RamDiscardResult, type RamSection } from './ram-block-attributes.ts';
import type { Steps } from '../../roles/role.ts';

/**
 * A listener of the conversion notifier list (conversion-notifier.ts): told after
 * KVM_SET_MEMORY_ATTRIBUTES which part of its section changed kind.
 */
export interface ConversionListener {
  /** The section's pages became shared; the listener may object with -errno. */
  notifyToShared(section: RamSection): Steps<RamDiscardResult>;
  /** The section's pages became private: the listener drops every reference to them. */
  notifyToPrivate(section: RamSection): Steps;
}

/**
 * VFIO on the conversion notifier list (the seed's option 1): what its RamDiscardListener
 * does (hw/vfio/listener.c), only registered elsewhere. To shared: one mapping per 4 KiB
 * page at IOVA = GPA, so that any page can be unmapped alone when it turns private again;
 * a failed map unmaps the whole section and returns the error (the rollback). To private:
 * one unmap of the section; a failure is only reported, as vfio_ram_discard_notify_discard
 * does.
 */
export class VfioConversionListener implements ConversionListener {
  constructor(readonly iommu: Iommu, private readonly report: (detail: string) => void = () => {}) {}

  *notifyToShared(section: RamSection): Steps<RamDiscardResult> {
    const flags = VFIO_DMA_MAP_FLAG_READ | (section.readonly === true ? 0 : VFIO_DMA_MAP_FLAG_WRITE);
    for (let off = 0; off < section.size; off += PAGE_SIZE) {
      const iova = section.offsetWithinAddressSpace + off;
      yield* this.iommu.lock.acquire(LockHolder.VMM);
      const r = this.iommu.mapDma(iova, PAGE_SIZE, iova, flags);
      this.iommu.lock.release();
      if (r.ret !== 0) {
        yield* this.notifyToPrivate(section);
        return { ret: r.ret, detail: `vfio_conversion_notify_to_shared: ${r.detail}` };
      }
    }
    return RDM_OK;
  }

  *notifyToPrivate(section: RamSection): Steps {
    const r = yield* this.iommu.unmapDma(section.offsetWithinAddressSpace, section.size, LockHolder.VMM);
    // iommufd's ENOENT is "nothing mapped there", which a discard of a partly private range meets.
    if (r.ret < 0 && !(this.iommu.backend === 'iommufd' && r.ret === -ENOENT)) this.report(`vfio_conversion_notify_to_private: ${r.detail}`);
  }
}
