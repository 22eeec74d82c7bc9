/**
 * Hunting benchmarks (issue 5):
 *
 *   tsx bench/hunt.ts throughput   seeds per second of `hunt` (deterministic, random) with
 *                                  1 and 2 workers, on the default hunt scenario
 *   tsx bench/hunt.ts shrink       for every catalogued migrate bug: its first failing seed
 *                                  (random strategy), shrunk: steps, actors and pages of the
 *                                  minimal replay
 *   tsx bench/hunt.ts detection    for every catalogued bug: detection rate over seeds
 *                                  1-16 and median steps of the runs that caught it, per
 *                                  deterministic strategy; free-run detection in 10-second
 *                                  hunts
 */
import { CATALOG } from '../src/bugs/catalog.ts';
import { DEFAULT_HUNT_JOB } from '../src/scenarios/jobs.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { type Detection, measureDetection } from '../src/hunt/detection.ts';
import { runHuntTask } from '../src/hunt/hunt-run.ts';
import { hunt } from '../src/hunt/hunt.ts';
import type { ReplayFile } from '../src/hunt/replay-file.ts';
import { shrink } from '../src/hunt/shrink.ts';
import { VMEMLAB_VERSION } from '../src/version.ts';
import { HuntPool } from '../src/hunt/pool.ts';
import { type Figure, caseArgs, emit, median } from './harness.ts';

const SEEDS = 16;
const FREE_SECONDS = 10;

async function throughput(): Promise<Figure[]> {
  const { scenario, watchdogMs, burst } = migrationSetup({ ...DEFAULT_HUNT_JOB, driver: 'deterministic' });
  const figures: Figure[] = [];
  const rates: number[] = [];
  for (const workers of [1, 2]) {
    const pool = new HuntPool(workers);
    try {
      // Warm the pool (worker start-up and the first run's compilation are not the hunt's pace).
      await hunt({ scenario, strategies: ['random'], seeds: workers, shard: { index: 1, count: 1 }, all: true, workers, pool, watchdogMs, burst });
      const reps: number[] = [];
      for (let rep = 0; rep < 3; rep++) {
        const t = performance.now();
        const { report } = await hunt({ scenario, strategies: ['random'], seeds: 12, shard: { index: 1, count: 1 }, all: true, workers, pool, watchdogMs, burst });
        if (report.strategies[0]!.runs !== 12) throw new Error('runs lost');
        reps.push(12 / ((performance.now() - t) / 1000));
      }
      const rate = median(reps);
      rates.push(rate);
      figures.push({
        id: `hunt/throughput/${workers}-worker${workers > 1 ? 's' : ''}`,
        what: `hunt seeds per second, ${workers} worker${workers > 1 ? 's' : ''} (deterministic, random strategy, the default hunt scenario: ${String(DEFAULT_HUNT_JOB.vcpus)} vCPUs, ${String(DEFAULT_HUNT_JOB.memoryBytes)}, ${String(DEFAULT_HUNT_JOB.workload)}, dirty ring)`,
        figure: `${rate.toFixed(1)} seeds/s`, value: rate,
        detail: `12 seeds per hunt on a warm pool, median of 3 hunts (${reps.map((r) => r.toFixed(1)).join(', ')} seeds/s)${workers > 1 ? `; ${(rate / rates[0]!).toFixed(2)}x one worker` : ''}`,
      });
    } finally {
      await pool.close();
    }
  }
  return figures;
}

/** Free-run hunts of one bug's demonstration scenario for `seconds`: runs and catches. */
async function freeRun(bug: string, seconds: number): Promise<{ caught: number; runs: number }> {
  const { scenario, watchdogMs, burst } = migrationSetup({ inject: [bug], driver: 'deterministic' });
  let caught = 0;
  let runs = 0;
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end || runs === 0) {
    const r = await runHuntTask({ scenario, strategy: 'free', seed: runs + 1, watchdogMs, burst });
    runs++;
    if (r.failure !== null) caught++;
  }
  return { caught, runs };
}

async function detection(): Promise<Figure[]> {
  const figures: Figure[] = [];
  const pool = new HuntPool(2);
  try {
    for (const b of CATALOG) {
      if (b.costOnly) continue;
      const det: Detection[] = await measureDetection(b, SEEDS, ['random', 'pct'], pool);
      const free = b.commands.includes('migrate') ? await freeRun(b.name, FREE_SECONDS) : null;
      const parts = det.map((d) => `${d.strategy} ${d.caught}/${d.runs}`);
      if (free) parts.push(`free ${free.caught}/${free.runs} in ${FREE_SECONDS} s`);
      figures.push({
        id: `hunt/detection/${b.name}`,
        what: `detection of ${b.name}, its demonstration scenario, seeds 1-${SEEDS} per deterministic strategy${free ? `, free-run for ${FREE_SECONDS} s` : ''}`,
        figure: parts.join(', '), value: det.reduce((n, d) => n + d.caught, 0) / det.reduce((n, d) => n + d.runs, 0),
        detail: `${det.map((d) => `${d.strategy}: ${d.caught} of ${d.runs} seeds caught it, median ${d.medianSteps ?? '-'} steps per catching run`).join('; ')}`
          + `${free ? `; free-run: ${free.caught} of ${free.runs} runs in ${FREE_SECONDS} s` : ' (a dirty_log_test bug: no free-run migration)'}`,
      });
    }
  } finally {
    await pool.close();
  }
  return figures;
}

async function shrinking(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const b of CATALOG) {
    if (b.costOnly || !b.commands.includes('migrate')) continue;
    const { scenario, watchdogMs, burst } = migrationSetup({ inject: [b.name], driver: 'deterministic' });
    let run = null;
    for (let seed = 1; seed <= 8 && run === null; seed++) {
      const r = await runHuntTask({ scenario, strategy: 'random', seed, watchdogMs, burst });
      if (r.failure !== null) run = r;
    }
    if (run === null) throw new Error(`${b.name}: no failure on seeds 1-8`);
    const file: ReplayFile = {
      format: 'vmemlab-replay', formatVersion: 1, vmemlabVersion: VMEMLAB_VERSION, command: 'migrate', scenario: { ...scenario, seed: run.seed },
      driver: 'deterministic', strategy: 'random', seed: run.seed, schedule: run.schedule, failure: run.failure!, fingerprint: run.fingerprint, created: new Date().toISOString(),
    };
    const res = await shrink(file);
    const { before: x, after: y } = res;
    figures.push({
      id: `hunt/shrink/${b.name}`,
      what: `the minimal replay of ${b.name} (random strategy, seed ${run.seed}, shrunk by vmemlab shrink): steps, actors, pages`,
      figure: `${y.steps} steps, ${y.actors} actors, ${y.pages} pages`, value: y.steps,
      detail: `from ${x.steps} steps, ${x.actors} actors (${x.vcpus} vCPUs), ${x.pages} pages to ${y.steps} steps, ${y.actors} actors (${y.vcpus} vCPUs), ${y.pages} pages; `
        + `${res.runs} runs in ${res.seconds.toFixed(1)} s; failure kept: ${res.file.failure.kind}; accepted: ${res.changes.join('; ') || 'nothing'}`,
    });
  }
  return figures;
}

const [which] = caseArgs();
emit(which === 'detection' ? await detection() : which === 'shrink' ? await shrinking() : await throughput());
process.exit(0);
