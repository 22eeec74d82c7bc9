import type { InjectionCounters } from '../injections.ts';

/**
 * The injectable mistakes of mapping a mediated device's MMIO on fault (src/bugs/catalog.ts
 * says what each breaks): the vendor driver's, VFIO's and KVM's. Each site counts in
 * `acts` when the mistake changed what happened.
 */
export interface BarBugs {
  /** The vendor frees a slice without unmap_mapping_range first. */
  reassignWithoutZap?: boolean;
  /** unmap_mapping_range over a slice one page short: its last page's mapping survives. */
  zapMissesAMapping?: boolean;
  /** The device has no validate callback, yet its slices are allocated at run time: the whole BAR is mapped 1:1 at mmap time. */
  mapWholeBarWithoutValidate?: boolean;
  /** KVM installs a BAR SPTE without mmu_invalidate_retry_gfn. */
  noInvalidateRetry?: boolean;
  /** KVM's prefetch maps neighbouring BAR pages nothing validated, guessing their pfns contiguous. */
  prefetchUnvalidatedMmio?: boolean;
  /** KVM's prefetch ignores an invalidation in progress over the neighbours. */
  prefetchDuringInvalidation?: boolean;
  /** KVM builds a writable SPTE from a read-only PFNMAP entry. */
  ignoreReadonlyPfnmap?: boolean;
  /** A refused access completes: a read returns zeros, a write is dropped, and the VM runs on. */
  refusedAccessReadsZeros?: boolean;
}

/** The bugs and where they count. */
export interface BarInjection {
  readonly bugs: BarBugs;
  readonly acts: InjectionCounters | null;
}

export const NO_BAR_BUGS: BarInjection = { bugs: {}, acts: null };
