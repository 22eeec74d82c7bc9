// Names and numbers as in Linux's include/uapi/linux/vfio.h and iommufd.h (docs/reference.md §6).

/** VFIO_IOMMU_MAP_DMA flags. */
export const VFIO_DMA_MAP_FLAG_READ = 1 << 0;
export const VFIO_DMA_MAP_FLAG_WRITE = 1 << 1;

/** VFIO_IOMMU_DIRTY_PAGES flags. */
export const VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0;
export const VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1;
export const VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2;

/** The type1 module parameter's default: DMA mappings per container (U16_MAX). */
export const VFIO_DEFAULT_DMA_ENTRY_LIMIT = 65535;

/** VFIO device features for device DMA logging (VFIO_DEVICE_FEATURE_*). */
export const VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6;
export const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7;
export const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8;

/** IOMMU_HWPT_SET_DIRTY_TRACKING flags. */
export const IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1;
/** IOMMU_HWPT_GET_DIRTY_BITMAP flags: read without clearing (QEMU's last read before an unmap). */
export const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1;

export { EBUSY, EEXIST, EINVAL, ENOENT, ENOSPC } from '../constants.ts';
