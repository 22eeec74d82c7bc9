import type { MigrationRunResult } from '../scenarios/migration.ts';

export { type Failure, type FailureKind, failureOf } from '../scenarios/outcome.ts';

/**
 * Everything a deterministic replay must reproduce exactly: the verdict, the steps, the
 * lost pages with both sides' stamps, and the DMA oracle's records.
 */
export function fingerprint(r: MigrationRunResult): string {
  return JSON.stringify({
    status: r.status, reason: r.reason, steps: r.steps ?? null, mismatchCount: r.mismatchCount,
    mismatches: r.mismatches.map((m) => ({ slot: m.slot, gfn: m.gfn, source: m.source, destination: m.destination })),
    dma: r.dma ? { faults: r.dma.faults, staleIotlb: r.dma.staleIotlb, records: r.dma.records } : null,
    passes: r.passes.map((p) => [p.pagesSent, p.zeroPages, p.dirtyFound]),
  });
}
