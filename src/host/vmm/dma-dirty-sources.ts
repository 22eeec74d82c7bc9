import type { PageBitmap } from '../dirty-bitmap.ts';
import type { Iommu } from '../iommu/iommu.ts';
import { usesIommuTracking } from '../iommu/iommu-layout.ts';
import type { Steps } from '../../roles/role.ts';

/** One DMA dirty source as the migration reads it: QEMU's VFIO listener's log_sync. */
interface DmaSource {
  readonly name: string;
  start(): Steps;
  stop(): void;
  read(mark: (vmPage: number) => void): Steps<number>;
}

export interface DmaSourceStats {
  source: string;
  /** Queries made (one per sync). */
  syncs: number;
  /** Pages it reported, over all queries (a page reported in two queries counts twice). */
  pagesReported: number;
}

/**
 * Userspace's side of DMA dirty tracking, next to DirtyLogSync for KVM's log: the sources
 * the devices need, started with logging and read at every sync, their pages ORed into the
 * migration's bitmap (as QEMU's VFIO listener does, and as Firecracker ORs KVM's log with
 * its own bitmap for device writes). Plus the dirty bits of ranges unmapped meanwhile,
 * which the unmaps collected.
 */
export class DmaDirtySync {
  private readonly sources: DmaSource[] = [];
  private readonly counts: DmaSourceStats[] = [];

  constructor(readonly iommu: Iommu) {
    const t = iommu.layout.config.tracking;
    if (usesIommuTracking(t)) {
      if (iommu.backend === 'type1') {
        this.sources.push({
          name: 'VFIO_IOMMU_DIRTY_PAGES (type1)',
          *start() { iommu.type1StartDirtyTracking(); },
          stop: () => iommu.type1StopDirtyTracking(),
          read: (mark) => iommu.type1GetDirtyBitmap(mark),
        });
      } else {
        this.sources.push({
          name: 'IOMMU_HWPT_GET_DIRTY_BITMAP (iommufd)',
          start: () => iommu.hwptSetDirtyTracking(true),
          stop: () => { iommu.hwptSetDirtyTracking(false).next(); },
          read: (mark) => iommu.hwptGetDirtyBitmap(mark, false),
        });
      }
    }
    t.forEach((how, d) => {
      if (how !== 'device') return;
      this.sources.push({
        name: `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (device ${d})`,
        *start() { iommu.dmaLoggingStart(d); },
        stop: () => iommu.dmaLoggingStop(d),
        read: (mark) => iommu.dmaLoggingReport(d, mark),
      });
    });
    this.sources.push({
      name: 'dirty bits of unmapped ranges',
      *start() { /* collected by the unmaps */ }, stop: () => {},
      *read(mark) { const n = iommu.takeUnmapDirty(mark); yield undefined; return n; },
    });
    for (const s of this.sources) this.counts.push({ source: s.name, syncs: 0, pagesReported: 0 });
  }

  /** Starts every source (VFIO_IOMMU_DIRTY_PAGES START, SET_DIRTY_TRACKING, DMA_LOGGING_START). */
  *start(): Steps { for (const s of this.sources) yield* s.start(); }
  stop(): void { for (const s of this.sources) s.stop(); }

  /** Reads every source into `into` (VM-wide pages); `tally` learns what each newly added. */
  *sync(into: PageBitmap, tally?: (source: string, newPages: number) => void): Steps {
    const mark = (p: number): void => into.mark(p);
    for (let i = 0; i < this.sources.length; i++) {
      const before = tally ? into.count() : 0;
      const n: number = yield* this.sources[i]!.read(mark);
      this.counts[i]!.syncs++;
      this.counts[i]!.pagesReported += n;
      tally?.(this.sources[i]!.name, into.count() - before);
    }
  }

  stats(): DmaSourceStats[] { return this.counts.map((c) => ({ ...c })); }
}
