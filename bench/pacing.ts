/**
 * Guest dirty-rate limits (QEMU's set-vcpu-dirty-limit and dirty-limit capability):
 *
 *   tsx bench/pacing.ts limits        the achieved dirty rate of a vCPU held to 1 000 ...
 *                                     1 000 000 pages/s (free-run, a CPU burner on the other core)
 *   tsx bench/pacing.ts convergence   guests held to 10, 25, 50, 100 and 200 % of the bandwidth,
 *                                     each tracking mode: what converged, against what
 *                                     remaining / bandwidth predicts
 *   tsx bench/pacing.ts policies      a guest that never converges by itself under fail,
 *                                     auto-converge and dirty-limit
 */
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import type { TrackingMode } from '../src/bugs/catalog.ts';
import type { ConvergencePolicy } from '../src/migration/precopy.ts';
import { type MigrationScenario, runMigration } from '../src/scenarios/migration.ts';
import { runDirtyLogTest } from '../src/scenarios/run-dirty-log-test.ts';
import { type Figure, caseArgs, emit, settle, withBurner } from './harness.ts';

const MiB = 1 << 20;

/**
 * One vCPU writing random pages of 64 MiB, the dirty ring reaped by the collector on every
 * ring-full exit: it wants to dirty far more than any limit below. Iteration 1 warms up
 * (compiled code, committed memory); iterations 2 and 3 are measured, release to stop,
 * each about 2 s so that what the bucket saved up while the vCPU was stopped (50 ms of
 * its rate) weighs 2.5 % at most.
 */
async function limits(): Promise<Figure[]> {
  const figures: Figure[] = [];
  const run = async (limit: number, opsPerIteration: number, iterations: number) => {
    await settle();
    const r = await runDirtyLogTest({
      mode: 'dirty-ring', vcpus: 1, memoryBytes: 64 * MiB, slots: 1, iterations, ringEntries: 16384, workload: DEFAULT_WORKLOAD, seed: 1, bugs: [],
      opsPerIteration, hostWriteEvery: 0, dirtyLimit: limit,
    }, { driver: 'free', watchdogMs: 30_000, burst: 256 });
    if (r.status !== 'passed') throw new Error(`limit ${limit}: ${r.status} ${r.errors.join('; ')}`);
    const measured = r.iterations.slice(1);
    const ms = measured.reduce((n, i) => n + i.ms, 0);
    const dirtied = measured.reduce((n, i) => n + i.dirtied, 0);
    const ops = measured.reduce((n, i) => n + i.writes, 0);
    return { rate: (dirtied * 1000) / ms, opsRate: (ops * 1000) / ms, dirtied, ms, paced: r.vcpus[0]!.pacedMs };
  };
  await withBurner(async () => {
    const demand = await run(0, 2_000_000, 3);
    for (const limit of [1_000, 10_000, 100_000, 1_000_000]) {
      // Calibrate the iteration length: operations per second at this limit (hits included).
      const probe = await run(limit, Math.max(1000, limit / 2), 2);
      const m = await run(limit, Math.max(2000, Math.round(probe.opsRate * 2)), 3);
      const ratio = m.rate / limit;
      figures.push({
        id: `pacing/dirty-limit/${limit}`,
        what: `a vCPU held to ${limit.toLocaleString('en')} pages/s (set-vcpu-dirty-limit), free-run, a CPU burner on the other core: achieved / limit`,
        figure: `${ratio.toFixed(3)} (${Math.round(m.rate).toLocaleString('en')} pages/s)`,
        value: Math.abs(ratio - 1),
        target: { kind: 'max', value: 0.05, text: 'within 5 %' },
        detail: `${m.dirtied} pages dirtied in ${(m.ms / 1000).toFixed(2)} s of running (iterations 2 and 3, release to stop; iteration 1 warms up), paced ${m.paced.toFixed(0)} ms in all; `
          + `the same guest unlimited dirtied ${Math.round(demand.rate).toLocaleString('en')} pages/s beside the same burner (its demand)`,
      });
    }
  });
  return figures;
}

/**
 * Random writes over 16 MiB (almost every write dirties a new page), 2 vCPUs, 16 MiB/s:
 * each vCPU held to a fraction of the bandwidth. Prediction: after pass 1 the remaining
 * pages shrink by dirty rate / bandwidth each pass (capped at memory); it converges when
 * remaining / bandwidth is under the downtime limit.
 */
async function convergence(): Promise<Figure[]> {
  const figures: Figure[] = [];
  const memoryBytes = 16 * MiB;
  const pages = memoryBytes / PAGE_SIZE;
  const bandwidth = 16 * MiB;
  const limitMs = 300;
  const maxIterations = 8;
  const bwPages = bandwidth / PAGE_SIZE;
  for (const mode of ['dirty-ring', 'dirty-log', 'clear-log'] as TrackingMode[]) {
    for (const pct of [10, 25, 50, 100, 200]) {
      const perVcpu = Math.round((bwPages * pct) / 100 / 2);
      const s: MigrationScenario = {
        tracking: mode, vcpus: 2, memoryBytes, slots: 1, ringEntries: 4096, workload: DEFAULT_WORKLOAD, seed: 1, bugs: [], hostWriteEvery: 0,
        dirtyLimit: perVcpu,
        params: { bandwidth, downtimeLimitMs: limitMs, maxIterations, timeoutMs: 60_000, policy: 'fail', batchPages: 256, warmupOps: pages },
      };
      await settle();
      const r = await runMigration(s, { driver: 'free', watchdogMs: 30_000, burst: 256, resumeOps: 0 });
      const i = r.info;
      if (i === null) throw new Error(`${mode} ${pct} %: ${r.status} ${r.reason ?? ''} ${r.errors.join('; ')}`);
      const converged = i.status === 'completed';
      // The prediction from pass 1's remaining pages and the configured rates.
      const ratio = pct / 100;
      let rem = r.passes[0]!.dirtyFound;
      let predictedPasses = 1;
      while ((rem / bwPages) * 1000 > limitMs && predictedPasses < maxIterations) { rem = Math.min(pages, rem * ratio); predictedPasses++; }
      const predicted = (rem / bwPages) * 1000 <= limitMs;
      const achieved = i.vcpus.reduce((n, v) => n + v.dirtyPagesPerSecond, 0);
      const outcome = converged
        ? `completed in ${(i.totalTimeMs / 1000).toFixed(2)} s, downtime ${i.downtimeMs.toFixed(0)} ms, ${r.passes.length} passes`
        : `did not converge in ${r.passes.length} passes`;
      figures.push({
        id: `pacing/convergence/${mode}/${pct}`,
        what: `convergence, ${mode}, guest held to ${pct} % of 16 MiB/s (${perVcpu} pages/s per vCPU, 2 vCPUs), 16 MiB, downtime limit 300 ms`,
        figure: `${outcome}; predicted: ${predicted ? `converges in ${predictedPasses} passes` : 'never converges'}${converged === predicted ? '' : ' (MISMATCH)'}`,
        value: converged === predicted ? 1 : 0,
        detail: `achieved dirty rate ${Math.round(achieved)} pages/s (${((achieved / bwPages) * 100).toFixed(0)} % of the bandwidth); pass 1 left ${r.passes[0]!.dirtyFound} pages; `
          + `passes (sent/dirty): ${r.passes.map((p) => `${p.pagesSent}/${p.dirtyFound}`).join(' ')}; expected downtime ${i.expectedDowntimeMs.toFixed(0)} ms`,
      });
    }
  }
  return figures;
}

/** A guest dirtying far more than its bandwidth, under each policy. */
async function policies(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const policy of ['fail', 'auto-converge', 'dirty-limit'] as ConvergencePolicy[]) {
    const s: MigrationScenario = {
      tracking: 'dirty-ring', vcpus: 2, memoryBytes: 64 * MiB, slots: 1, ringEntries: 4096, workload: DEFAULT_WORKLOAD, seed: 1, bugs: [], hostWriteEvery: 0,
      params: { bandwidth: 32 * MiB, downtimeLimitMs: 300, maxIterations: 12, timeoutMs: 30_000, policy, batchPages: 256, warmupOps: 16384, vcpuDirtyLimit: 256 },
    };
    await settle();
    const r = await runMigration(s, { driver: 'free', watchdogMs: 30_000, burst: 256, resumeOps: 0 });
    const i = r.info!;
    const ops = i.vcpus.reduce((n, v) => n + v.opsPerSecond, 0);
    figures.push({
      id: `pacing/policy/${policy}`,
      what: `policy ${policy}: random writes over 64 MiB, 2 vCPUs, 32 MiB/s, downtime limit 300 ms${policy === 'dirty-limit' ? ', vcpu-dirty-limit 1 MB/s' : ''}`,
      figure: i.status === 'completed'
        ? `completed in ${(i.totalTimeMs / 1000).toFixed(2)} s, downtime ${i.downtimeMs.toFixed(0)} ms, ${r.passes.length} passes, guest ${(ops / 1e6).toFixed(2)} M ops/s`
        : `did not converge in ${r.passes.length} passes (guest ${(ops / 1e6).toFixed(2)} M ops/s)`,
      value: i.status === 'completed' ? i.totalTimeMs : NaN,
      detail: `throttle ${i.throttlePercent} %, dirty limit ${i.dirtyLimit} pages/s; per pass (sent/dirty/throttle/limit): ${r.passes.map((p) => `${p.pagesSent}/${p.dirtyFound}/${p.throttle}/${p.dirtyLimit}`).join(' ')}; `
        + `each vCPU: ${i.vcpus.map((v) => `${Math.round(v.opsPerSecond)} ops/s, ${Math.round(v.dirtyPagesPerSecond)} pages/s, paced ${v.pacedMs.toFixed(0)} ms`).join('; ')}`,
    });
  }
  return figures;
}

const which = caseArgs()[0];
const cases: Record<string, () => Promise<Figure[]>> = { limits, convergence, policies };
const fn = which ? cases[which] : undefined;
if (!fn) throw new Error(`bench/pacing.ts: unknown case ${which} (${Object.keys(cases).join(', ')})`);
emit(await fn());
