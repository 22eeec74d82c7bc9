import { type CatalogEntry } from '../bugs/catalog.ts';
import { dirtyLogTestSetup, mdevSettings, migrationSetup } from '../scenarios/settings.ts';
import { runMdev } from '../scenarios/mdev.ts';
import type { InjectionReport } from '../bugs/acted.ts';
import type { Strategy } from '../drivers/strategy.ts';
import { runDirtyLogTest } from '../scenarios/run-dirty-log-test.ts';
import { type HuntStrategy, hunt } from './hunt.ts';
import type { HuntPool } from './pool.ts';

export interface Detection {
  strategy: HuntStrategy;
  caught: number;
  /** Runs in which the bug acted: detection is caught / acted / runs. */
  acted: number;
  runs: number;
  /** Median steps of the runs that caught it (deterministic strategies). */
  medianSteps: number | null;
}

/** The one-line command that demonstrates a catalogued bug. */
export function demoCommand(b: CatalogEntry, seeds = 8): string {
  if (b.commands.includes('migrate')) return `vmemlab hunt --inject ${b.name} --seeds ${seeds} --strategy random,pct`;
  if (b.commands.includes('mdev')) return `vmemlab mdev --inject ${b.name} --driver deterministic`;
  return `vmemlab dirty-log-test --inject ${b.name} --driver deterministic`;
}

/**
 * How often a bug is caught over seeds 1..n with its demonstration scenario: a hunt with
 * every seed (migrate bugs), or runs of the command that shows it (dirty_log_test, mdev).
 */
export async function measureDetection(b: CatalogEntry, seeds: number, strategies: HuntStrategy[], pool: HuntPool): Promise<Detection[]> {
  if (b.commands.includes('migrate')) {
    const { scenario, watchdogMs, burst } = migrationSetup({ inject: [b.name], driver: 'deterministic' });
    const { report } = await hunt({ scenario, strategies, seeds, shard: { index: 1, count: 1 }, all: true, workers: pool.workers, pool, watchdogMs, burst });
    return report.strategies.map((r) => ({ strategy: r.strategy, caught: r.failures, acted: r.acted ?? 0, runs: r.runs, medianSteps: r.medianStepsToDetection }));
  }
  const out: Detection[] = [];
  for (const strategy of strategies) {
    let caught = 0;
    let acted = 0;
    const steps: number[] = [];
    for (let seed = 1; seed <= seeds; seed++) {
      const free = strategy === 'free';
      const driver = free ? 'free' as const : 'deterministic' as const;
      const run = { driver, strategy: free ? undefined : strategy as Strategy };
      let r: { status: string; steps?: number; injections: InjectionReport[] };
      if (b.commands.includes('mdev')) {
        const { config, watchdogMs, burst } = mdevSettings({ inject: [b.name], driver, seed });
        r = await runMdev(config, { ...run, watchdogMs: free ? watchdogMs : 2000, burst });
      } else {
        const { config, watchdogMs, burst } = dirtyLogTestSetup({ inject: [b.name], driver, seed });
        r = await runDirtyLogTest(config, { ...run, watchdogMs: free ? watchdogMs : 2000, burst });
      }
      if (r.status !== 'passed') { caught++; if (r.steps !== undefined) steps.push(r.steps); }
      if (r.injections.some((x) => x.acted > 0)) acted++;
    }
    steps.sort((x, y) => x - y);
    out.push({ strategy, caught, acted, runs: seeds, medianSteps: steps.length ? steps[Math.floor((steps.length - 1) / 2)]! : null });
  }
  return out;
}
