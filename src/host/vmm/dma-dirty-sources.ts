import type { PageBitmap } from '../dirty-bitmap.ts';
import type { Iommu } from '../iommu/iommu.ts';
import { usesIommuTracking } from '../iommu/iommu-layout.ts';
import type { Steps } from '../../roles/role.ts';
import type { DirtySource, SourceTally } from './dirty-source.ts';

/**
 * The DMA dirty sources userspace reads next to KVM's log (QEMU's VFIO listener's
 * log_sync), each a DirtySource: started with logging, read at every sync, their pages
 * ORed into the migration's bitmap. Which a VM has depends on its devices
 * (dmaDirtySourcesFor); the dirty bits of ranges unmapped meanwhile, which the unmaps
 * collected, are always one.
 */
abstract class DmaSource implements DirtySource {
  readonly dma = true;
  abstract readonly name: string;
  constructor(protected readonly iommu: Iommu) {}
  abstract start(): Steps;
  abstract stop(): void;
  /** Reports every page it has into `mark` (VM-wide pages); returns how many. */
  protected abstract read(mark: (vmPage: number) => void): Steps<number>;

  *sync(into: PageBitmap, _final: boolean, tally?: SourceTally): Steps<number> {
    const before = tally ? into.count() : 0;
    const n: number = yield* this.read((p) => into.mark(p));
    tally?.(this.name, into.count() - before);
    return n;
  }
}

/**
 * VFIO type1's VFIO_IOMMU_DIRTY_PAGES: START, then GET_BITMAP at every sync. Without a
 * pinned scope every mapped page on every query; with one, pinned and dma_rw-written pages.
 */
export class Type1DirtySource extends DmaSource {
  readonly name = 'VFIO_IOMMU_DIRTY_PAGES (type1)';
  *start(): Steps { this.iommu.type1StartDirtyTracking(); }
  stop(): void { this.iommu.type1StopDirtyTracking(); }
  protected read(mark: (p: number) => void): Steps<number> { return this.iommu.type1GetDirtyBitmap(mark); }
}

/** iommufd's hardware dirty bits: IOMMU_HWPT_SET_DIRTY_TRACKING, then IOMMU_HWPT_GET_DIRTY_BITMAP (read and clear) at every sync. */
export class IommufdDirtySource extends DmaSource {
  readonly name = 'IOMMU_HWPT_GET_DIRTY_BITMAP (iommufd)';
  start(): Steps { return this.iommu.hwptSetDirtyTracking(true); }
  stop(): void { this.iommu.hwptSetDirtyTracking(false).next(); }
  protected read(mark: (p: number) => void): Steps<number> { return this.iommu.hwptGetDirtyBitmap(mark, false); }
}

/** A device's own DMA logging: VFIO_DEVICE_FEATURE_DMA_LOGGING_START, then _REPORT (only the pages it wrote). */
export class DmaLoggingSource extends DmaSource {
  readonly name: string;
  constructor(iommu: Iommu, private readonly device: number) {
    super(iommu);
    this.name = `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (device ${device})`;
  }
  *start(): Steps { this.iommu.dmaLoggingStart(this.device); }
  stop(): void { this.iommu.dmaLoggingStop(this.device); }
  protected read(mark: (p: number) => void): Steps<number> { return this.iommu.dmaLoggingReport(this.device, mark); }
}

/** The dirty bits of ranges unmapped since the last sync, which each unmap collected before it freed its entries. */
export class UnmappedRangesSource extends DmaSource {
  readonly name = 'dirty bits of unmapped ranges';
  *start(): Steps { /* collected by the unmaps */ }
  stop(): void {}
  protected *read(mark: (p: number) => void): Steps<number> {
    const n = this.iommu.takeUnmapDirty(mark);
    yield undefined;
    return n;
  }
}

/** The DMA dirty sources a VM's devices need, in the order they are read. */
export function dmaDirtySourcesFor(iommu: Iommu): DirtySource[] {
  const t = iommu.layout.config.tracking;
  const out: DirtySource[] = [];
  if (usesIommuTracking(t)) out.push(iommu.backend === 'type1' ? new Type1DirtySource(iommu) : new IommufdDirtySource(iommu));
  t.forEach((how, d) => { if (how === 'device') out.push(new DmaLoggingSource(iommu, d)); });
  out.push(new UnmappedRangesSource(iommu));
  return out;
}
