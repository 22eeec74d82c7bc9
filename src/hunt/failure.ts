import type { MigrationRunResult } from '../scenarios/migration.ts';

/** What went wrong in a run, in one word: what the hunt counts and shrinking preserves. */
export type FailureKind = 'lost-writes' | 'device-fault' | 'stale-iotlb' | 'sweep-broken' | 'guest-stalled' | 'migration-failed' | 'stuck' | 'crashed';

export interface Failure {
  kind: FailureKind;
  /** One line for people. */
  summary: string;
}

/** The failure a run shows, or null when it passed. */
export function failureOf(r: MigrationRunResult): Failure | null {
  if (r.status === 'passed') return null;
  if (r.status === 'stuck') return { kind: 'stuck', summary: r.errors[0]?.split('\n')[0] ?? 'no progress' };
  if (r.status === 'crashed') return { kind: 'crashed', summary: r.errors[0] ?? 'a worker crashed' };
  // The DMA oracle's findings first: a stale-IOTLB DMA or a device fault is the cause when pages are lost too.
  if (r.dma && r.dma.staleIotlb > 0) return { kind: 'stale-iotlb', summary: `${r.dma.staleIotlb} DMA(s) through stale IOTLB entries` };
  if (r.dma && r.dma.faults > 0) return { kind: 'device-fault', summary: `${r.dma.faults} device fault(s)` };
  if (r.mismatchCount > 0) {
    const m = r.mismatches[0]!;
    return { kind: 'lost-writes', summary: `${r.mismatchCount} lost write(s), first slot ${m.slot} gfn 0x${m.gfn.toString(16)}` };
  }
  const d = r.destination;
  if (d && (d.atCompletion?.ok === false || d.afterResume?.ok === false)) return { kind: 'sweep-broken', summary: 'the destination\'s sweep pattern is broken' };
  if (r.reason?.startsWith('the guest stalled')) return { kind: 'guest-stalled', summary: r.reason };
  return { kind: 'migration-failed', summary: r.reason ?? r.errors[0] ?? 'the migration failed' };
}

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
