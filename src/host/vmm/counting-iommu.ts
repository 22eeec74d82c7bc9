import { Iommu, type IoctlResult } from '../iommu/iommu.ts';
import { LockHolder } from '../iommu/domain-lock.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import type { IoctlCounts } from './conversion-design.ts';

/**
 * The VMM's file descriptor of the VM's container: the same IOMMU (every view over the
 * layout shares its state), with each map and unmap ioctl counted by name as it is
 * issued, failed ones included, so a design's ioctls per conversion are what it asked
 * of the kernel, not what succeeded.
 */
export class CountingIommu extends Iommu {
  constructor(vm: Vm, private readonly counts: IoctlCounts) {
    const iommu = vm.iommu;
    if (iommu === null) throw new Error('CountingIommu: the VM has no IOMMU (VmConfig.iommu)');
    super(iommu.layout, vm.memory, vm.bugs, vm.acts);
  }

  /** VFIO_IOMMU_MAP_DMA's name on this backend (IOMMU_IOAS_MAP under iommufd). */
  get mapName(): string { return this.backend === 'type1' ? 'VFIO_IOMMU_MAP_DMA' : 'IOMMU_IOAS_MAP'; }
  get unmapName(): string { return this.backend === 'type1' ? 'VFIO_IOMMU_UNMAP_DMA' : 'IOMMU_IOAS_UNMAP'; }

  override mapDma(iova: number, size: number, gpa: number, flags: number): IoctlResult {
    this.counts.add(this.mapName);
    return super.mapDma(iova, size, gpa, flags);
  }

  override *unmapDma(iova: number, size: number, holder: number = LockHolder.SERVICE): Steps<IoctlResult> {
    this.counts.add(this.unmapName);
    return yield* super.unmapDma(iova, size, holder);
  }
}
