import { LINE_WORDS } from './cache-line.ts';

/**
 * Every injectable bug (src/bugs/catalog.ts describes each), in the order of its "acted"
 * counter: each injection site counts how often the bug actually changed what happened
 * (a flush skipped, a push past the soft limit, an entry dropped, ...), so that a run
 * in which it never acted is not reported as if the bug had been tried.
 */
export const INJECTABLE_BUGS = [
  'skip-tlb-shootdown', 'ring-full-ignored', 'harvest-skips-entry', 'clear-without-protect', 'untracked-host-write',
  'no-backup-bitmap', 'ring-full-exit-unhandled', 'copy-before-reset', 'copy-before-clear', 'skip-final-sync',
  'untracked-dma', 'stale-iotlb-after-unmap', 'gpa-as-iova', 'read-pin-dirties',
  'convert-without-unmap', 'discard-before-unmap', 'map-before-shared', 'attributes-before-zap', 'rdm-bitmap-drift',
  'split-huge-mapping', 'migrate-private-pages', 'inplace-convert-while-pinned',
  'no-zap-on-noncoherent-transition', 'migrate-noncoherent-without-flush', 'missing-migration-blocker',
  'wbinvd-noop', 'noncoherent-unbalanced', 'dma-slot-with-dirty-logging', 'mmio-mapped-wb', 'vmm-touches-kvm-only-slot',
  'reassign-without-zap', 'no-invalidate-retry', 'prefetch-unvalidated-mmio', 'prefetch-during-invalidation', 'ignore-readonly-pfnmap',
  'zap-misses-a-mapping', 'refused-access-reads-zeros', 'map-whole-bar-without-validate',
] as const;
export type BugName = (typeof INJECTABLE_BUGS)[number];

/** Counter index of each bug: its position in INJECTABLE_BUGS. */
export const enum Acted {
  SKIP_TLB_SHOOTDOWN = 0, RING_FULL_IGNORED, HARVEST_SKIPS_ENTRY, CLEAR_WITHOUT_PROTECT, UNTRACKED_HOST_WRITE,
  NO_BACKUP_BITMAP, RING_FULL_EXIT_UNHANDLED, COPY_BEFORE_RESET, COPY_BEFORE_CLEAR, SKIP_FINAL_SYNC,
  UNTRACKED_DMA, STALE_IOTLB_AFTER_UNMAP, GPA_AS_IOVA, READ_PIN_DIRTIES,
  CONVERT_WITHOUT_UNMAP, DISCARD_BEFORE_UNMAP, MAP_BEFORE_SHARED, ATTRIBUTES_BEFORE_ZAP, RDM_BITMAP_DRIFT,
  SPLIT_HUGE_MAPPING, MIGRATE_PRIVATE_PAGES, INPLACE_CONVERT_WHILE_PINNED,
  NO_ZAP_ON_NONCOHERENT_TRANSITION, MIGRATE_NONCOHERENT_WITHOUT_FLUSH, MISSING_MIGRATION_BLOCKER,
  WBINVD_NOOP, NONCOHERENT_UNBALANCED, DMA_SLOT_WITH_DIRTY_LOGGING, MMIO_MAPPED_WB, VMM_TOUCHES_KVM_ONLY_SLOT,
  REASSIGN_WITHOUT_ZAP, NO_INVALIDATE_RETRY, PREFETCH_UNVALIDATED_MMIO, PREFETCH_DURING_INVALIDATION, IGNORE_READONLY_PFNMAP,
  ZAP_MISSES_A_MAPPING, REFUSED_ACCESS_READS_ZEROS, MAP_WHOLE_BAR_WITHOUT_VALIDATE,
}
if (INJECTABLE_BUGS.indexOf('map-whole-bar-without-validate') !== (Acted.MAP_WHOLE_BAR_WITHOUT_VALIDATE as number)) throw new Error('injections.ts: Acted out of step with INJECTABLE_BUGS');

/** Three lines of counters, room for every bug (the sites are rare paths: contention does not matter). */
export const INJECTION_WORDS = 3 * LINE_WORDS;
if (INJECTABLE_BUGS.length > INJECTION_WORDS) throw new Error(`injections.ts: ${INJECTABLE_BUGS.length} bugs, ${INJECTION_WORDS} counters`);

export function isBugName(name: string): name is BugName {
  return (INJECTABLE_BUGS as readonly string[]).includes(name);
}

/** The run-wide "acted" counters, shared by every thread of a VM. */
export class InjectionCounters {
  private readonly words: Int32Array;

  constructor(buffer: SharedArrayBuffer) {
    this.words = new Int32Array(buffer);
  }

  acted(bug: Acted, times = 1): void {
    Atomics.add(this.words, bug, times);
  }

  count(name: BugName): number {
    return Atomics.load(this.words, INJECTABLE_BUGS.indexOf(name));
  }
}
