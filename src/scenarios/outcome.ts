import type { MigrationRunResult } from './migration.ts';
import { confidentialVerdict } from './confidential.ts';
import type { DirtyLogRunResult } from './run-dirty-log-test.ts';
import type { MdevResult } from './mdev.ts';

/** What went wrong in a run, in one word: what a hunt counts, shrinking preserves, and a scenario file may expect. */
export type FailureKind =
  | 'lost-writes' | 'device-fault' | 'stale-iotlb' | 'sweep-broken' | 'guest-stalled' | 'not-converged' | 'migration-failed'
  | 'lost-dirty-pages' | 'stuck' | 'crashed' | 'private-memory' | 'stale-data' | 'blocker-ignored' | 'machine-check' | 'kvm-only-touched'
  | 'isolation-broken' | 'guest-refused';

export interface Failure {
  kind: FailureKind;
  /** One line for people. */
  summary: string;
}

/**
 * Facts about a run beyond its verdict that a scenario may expect. Only count-based ones:
 * a time-based fact (the downtime over its limit) depends on how fast the machine is.
 * - final-sync-surprise: the final sync found more pages than the expected downtime was
 *   computed from (the ring's backup bitmap, read only at completion, is the usual cause).
 * - vm-stopped: a VM sharing a mediated device was stopped for a refused access (its
 *   guest misbehaved; isolation held); vm-killed: KVM killed it (--on-refused-access kill-vm);
 *   migration-blocked: the mediated device's migration blocker refused vm0's migration.
 */
export type OutcomeFact = 'final-sync-surprise' | 'vm-stopped' | 'vm-killed' | 'migration-blocked';

/** The verdict ('passed' or the failure kind) and the facts a run shows. */
export interface Outcome {
  verdict: 'passed' | FailureKind;
  facts: OutcomeFact[];
}

export const VERDICTS: readonly Outcome['verdict'][] = [
  'passed', 'lost-writes', 'device-fault', 'stale-iotlb', 'sweep-broken', 'guest-stalled', 'not-converged', 'migration-failed',
  'lost-dirty-pages', 'stuck', 'crashed', 'private-memory', 'stale-data', 'blocker-ignored', 'machine-check', 'kvm-only-touched',
  'isolation-broken', 'guest-refused',
];
export const FACTS: readonly OutcomeFact[] = ['final-sync-surprise', 'vm-stopped', 'vm-killed', 'migration-blocked'];

/** The failure a migration shows, or null when it passed. */
export function failureOf(r: MigrationRunResult): Failure | null {
  if (r.status === 'passed') return null;
  if (r.status === 'stuck') return { kind: 'stuck', summary: r.errors[0]?.split('\n')[0] ?? 'no progress' };
  if (r.status === 'crashed') return { kind: 'crashed', summary: r.errors[0] ?? 'a worker crashed' };
  // A confidential guest's private memory reached, read or left mapped: the cause of whatever else broke.
  const priv = r.confidential ? confidentialVerdict(r.confidential) : null;
  if (priv !== null) return { kind: 'private-memory', summary: priv };
  // A migration that a blocker should have refused: whatever it lost follows from its running at all.
  if (r.blockerIgnored !== undefined) return { kind: 'blocker-ignored', summary: r.blockerIgnored };
  // A machine check stops the host: nothing after it counts.
  if (r.cache && r.cache.machineChecks.count > 0) return { kind: 'machine-check', summary: `${r.cache.machineChecks.count} cacheable access(es) to device memory` };
  // The VMM reading a slot only KVM maps: what it sent was never its to read.
  if (r.kvmOnlyTouches && r.kvmOnlyTouches.count > 0) return { kind: 'kvm-only-touched', summary: `the VMM touched ${r.kvmOnlyTouches.count} page(s) of a KVM-only slot` };
  // A device that consumed stale data (the stale read oracle): the guest's memory type was not honoured.
  if (r.cache && r.cache.staleReads.device > 0) return { kind: 'stale-data', summary: `a device read stale data ${r.cache.staleReads.device} time(s)` };
  // A dirty line written back over a newer UC/WC store or no-snoop DMA: the newer data is gone.
  if (r.cache && r.cache.overwrites > 0) return { kind: 'stale-data', summary: `a write-back overwrote newer data ${r.cache.overwrites} time(s)` };
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
  if (r.reason?.startsWith('did not converge')) return { kind: 'not-converged', summary: r.reason };
  return { kind: 'migration-failed', summary: r.reason ?? r.errors[0] ?? 'the migration failed' };
}

/** The failure a dirty_log_test shows, or null when it passed. */
export function dirtyLogFailureOf(r: DirtyLogRunResult): Failure | null {
  if (r.status === 'passed') return null;
  if (r.status === 'stuck' || r.status === 'crashed') return { kind: r.status, summary: r.errors[0]?.split('\n')[0] ?? r.status };
  if (r.violations.length > 0) return { kind: 'lost-dirty-pages', summary: `${r.violations.length} page(s) contradict the dirty log` };
  return { kind: 'migration-failed', summary: r.errors[0] ?? 'the test failed' };
}

export function migrationOutcome(r: MigrationRunResult): Outcome {
  const facts: OutcomeFact[] = [];
  const c = r.info?.completion;
  if (c && c.finalSync.reduce((n, s) => n + s.pages, 0) > c.estimatedPages) facts.push('final-sync-surprise');
  return { verdict: failureOf(r)?.kind ?? 'passed', facts };
}

/** The failure several VMs sharing a mediated device show: an isolation finding first, then a cooperative guest refused. */
export function mdevFailureOf(r: MdevResult): Failure | null {
  if (r.status === 'passed') return null;
  if (r.status === 'stuck' || r.status === 'crashed') return { kind: r.status, summary: r.errors[0]?.split('\n')[0] ?? r.status };
  const found = r.vms.flatMap((v) => v.findings.filter((f) => f.count > 0).map((f) => `vm${v.vm}: ${f.kind}`));
  if (found.length > 0) return { kind: 'isolation-broken', summary: found.join(', ') };
  if (r.migration?.error) return { kind: 'migration-failed', summary: r.migration.error };
  return { kind: 'guest-refused', summary: r.errors[0] ?? 'a cooperative guest was refused' };
}

export function mdevOutcome(r: MdevResult): Outcome {
  const facts: OutcomeFact[] = [];
  if (r.vms.some((v) => v.stopped !== null)) facts.push('vm-stopped');
  if (r.vms.some((v) => v.stopped?.how.startsWith('KVM killed') === true)) facts.push('vm-killed');
  if (r.migration?.mode === 'blocker' && r.migration.refused !== null) facts.push('migration-blocked');
  return { verdict: mdevFailureOf(r)?.kind ?? 'passed', facts };
}

export function dirtyLogOutcome(r: DirtyLogRunResult): Outcome {
  return { verdict: dirtyLogFailureOf(r)?.kind ?? 'passed', facts: [] };
}

/** Whether a run's outcome is what a scenario expects (its verdict, and every fact it names). */
export function meetsExpectation(o: Outcome, expected: Outcome): boolean {
  return o.verdict === expected.verdict && expected.facts.every((f) => o.facts.includes(f));
}

export function describeOutcome(o: Outcome): string {
  return [o.verdict, ...o.facts].join(', ');
}
