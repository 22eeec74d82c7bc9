import type { KernelBugs } from '../host/vm.ts';
import type { ConversionBugs } from '../host/vmm/conversion-bugs.ts';
import type { MigrationBugs } from '../migration/precopy.ts';

/**
 * Bug names (src/bugs/catalog.ts) decoded, once, into the flags each piece of code that
 * honours an injected bug reads: the kernel's, the VMM's, the migration thread's.
 */
/** The injected bugs as the pieces of code that honour them see them. */
export interface InjectedBugs {
  kernel: KernelBugs;
  /** Userspace harvest drops every Nth entry (0: never). */
  harvestSkipEvery: number;
  /** The VMM leaves out the backup bitmap. */
  noBackupBitmap: boolean;
  /** The VMM ignores ring-full exits. */
  ringFullExitUnhandled: boolean;
  /** The migration thread's mistakes. */
  migration: MigrationBugs;
  /** The VMM's conversion mistakes: pass them to GuestMemfdRam and vfioContainer (as a ConversionInjection with vm.acts). */
  conversion: ConversionBugs;
  /** QEMU's device model registers no migration blocker for a device doing non-coherent DMA. */
  missingMigrationBlocker: boolean;
}

export function injectedBugs(names: readonly string[]): InjectedBugs {
  const has = (n: string): boolean => names.includes(n);
  return {
    kernel: {
      skipTlbShootdown: has('skip-tlb-shootdown'),
      ringFullIgnored: has('ring-full-ignored'),
      clearWithoutProtect: has('clear-without-protect'),
      untrackedHostWrite: has('untracked-host-write'),
      staleIotlbAfterUnmap: has('stale-iotlb-after-unmap'),
      readPinDirties: has('read-pin-dirties'),
      untrackedDma: has('untracked-dma'),
      gpaAsIova: has('gpa-as-iova'),
      attributesBeforeZap: has('attributes-before-zap'),
      noZapOnNoncoherentTransition: has('no-zap-on-noncoherent-transition'),
      wbinvdNoop: has('wbinvd-noop'),
      noncoherentUnbalanced: has('noncoherent-unbalanced'),
      dmaSlotWithDirtyLogging: has('dma-slot-with-dirty-logging'),
      mmioMappedWb: has('mmio-mapped-wb'),
      reassignWithoutZap: has('reassign-without-zap'),
      zapMissesAMapping: has('zap-misses-a-mapping'),
      mapWholeBarWithoutValidate: has('map-whole-bar-without-validate'),
      noInvalidateRetry: has('no-invalidate-retry'),
      prefetchUnvalidatedMmio: has('prefetch-unvalidated-mmio'),
      prefetchDuringInvalidation: has('prefetch-during-invalidation'),
      ignoreReadonlyPfnmap: has('ignore-readonly-pfnmap'),
      refusedAccessReadsZeros: has('refused-access-reads-zeros'),
    },
    harvestSkipEvery: has('harvest-skips-entry') ? 16 : 0,
    noBackupBitmap: has('no-backup-bitmap'),
    ringFullExitUnhandled: has('ring-full-exit-unhandled'),
    migration: {
      copyBeforeReset: has('copy-before-reset'),
      copyBeforeClear: has('copy-before-clear'),
      skipFinalSync: has('skip-final-sync'),
      ringFullExitUnhandled: has('ring-full-exit-unhandled'),
      migratePrivatePages: has('migrate-private-pages'),
      noncoherentWithoutFlush: has('migrate-noncoherent-without-flush'),
      vmmTouchesKvmOnlySlot: has('vmm-touches-kvm-only-slot'),
    },
    missingMigrationBlocker: has('missing-migration-blocker'),
    conversion: {
      convertWithoutUnmap: has('convert-without-unmap'),
      discardBeforeUnmap: has('discard-before-unmap'),
      mapBeforeShared: has('map-before-shared'),
      rdmBitmapDrift: has('rdm-bitmap-drift'),
      splitHugeMapping: has('split-huge-mapping'),
      inplaceConvertWhilePinned: has('inplace-convert-while-pinned'),
    },
  };
}
