import type { PageBitmap } from '../dirty-bitmap.ts';
import type { Memslot } from '../memslot.ts';
import type { Steps } from '../../roles/role.ts';

/** Called with the name of a source (or of a part of one) and the pages it newly added to the bitmap: a sync's breakdown. */
export type SourceTally = (source: string, newPages: number) => void;

/**
 * Userspace's view of one dirty log: what QEMU's memory listeners do with log_start,
 * log_sync, log_clear and log_stop (KVM's log, VFIO's dirty tracking), and what
 * cloud-hypervisor calls `Migratable::{start_dirty_log, dirty_log, stop_dirty_log}`.
 * A migration ORs every source of its VM into one bitmap (dirty-log.ts), as Firecracker
 * ORs KVM's log with its own for device writes.
 */
export interface DirtySource {
  /** How reports name it ("the vCPUs' dirty rings", "VFIO_IOMMU_DIRTY_PAGES (type1)", ...). */
  readonly name: string;
  /** Whether it reports DMA (the IOMMU, devices) rather than KVM's log. */
  readonly dma: boolean;
  /** Logging on: KVM_MEM_LOG_DIRTY_PAGES on every slot; VFIO's dirty tracking started. */
  start(): Steps;
  /**
   * Pulls what it logged since the last sync into `into` (VM-wide page numbers).
   * `final`: the VM is stopped (the ring's backup bitmap is read only then). Returns the
   * pages it reported. `tally` learns the pages each part newly added.
   */
  sync(into: PageBitmap, final: boolean, tally?: SourceTally): Steps<number>;
  /**
   * Just before the pages of the 64-page chunk holding `page` (slot-relative) are copied,
   * with the chunk's bits as `dirty` has them (VM-wide): QEMU's log_clear, where manual
   * protect's KVM_CLEAR_DIRTY_LOG re-protects them.
   */
  beforeCopy?(slot: Memslot, page: number, dirty: PageBitmap): Steps;
  /** After a frame of `pages` pages was copied. */
  afterCopy?(pages: number): Steps;
  /** After every page of `slot` this pass sends was copied. */
  afterSlot?(slot: Memslot): Steps;
  /** At the end of a pass's copy, and around a ring-full reap: anything the source deferred is done now. */
  settle?(): Steps;
  /** Logging off (VFIO's dirty tracking stopped; QEMU's log_global_stop). */
  stop(): void;
}

/** Counts of one source over a migration. */
export interface DirtySourceStats {
  source: string;
  /** Queries made (one per sync). */
  syncs: number;
  /** Pages it reported, over all queries (a page reported in two queries counts twice). */
  pagesReported: number;
}
