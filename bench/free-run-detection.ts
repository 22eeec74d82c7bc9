/**
 * Detection rate of every catalogued bug under the free-run driver (real worker threads,
 * real races) in short runs: how many runs out of N caught it, and that clean runs of
 * the same configuration all verify. Not a speed figure: a rate over seeds.
 *
 *   tsx bench/free-run-detection.ts [runs] [dirty-log-test|migrate]
 *
 * dirty-log-test (default): the dirty-log bugs in short dirty-log tests. migrate: every
 * bug the migration can lose writes to, with the scenario `vmemlab migrate --inject NAME`
 * demonstrates it with (the catalog's settings, chosen for the deterministic driver), and
 * clean runs of each of those scenarios; caught = the stamp oracle found lost writes.
 */
import { failureOf } from '../src/hunt/failure.ts';
import { CATALOG } from '../src/bugs/catalog.ts';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import type { DirtyLogTestConfig } from '../src/scenarios/dirty-log-test.ts';
import { runDirtyLogTest } from '../src/scenarios/run-dirty-log-test.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { type Figure, caseArgs, emit } from './harness.ts';

const runs = Number(caseArgs()[0] ?? 10);
const which = caseArgs()[1] ?? 'dirty-log-test';

function config(mode: DirtyLogTestConfig['mode'], bugs: string[], seed: number): DirtyLogTestConfig {
  return {
    mode, vcpus: 2, memoryBytes: 64 << 20, slots: 1, iterations: 3, ringEntries: 1024,
    workload: DEFAULT_WORKLOAD, seed, bugs, opsPerIteration: 20000, hostWriteEvery: 64,
  };
}

const figures: Figure[] = [];
const cases: { name: string; mode: DirtyLogTestConfig['mode']; bugs: string[] }[] = [
  ...(['dirty-ring', 'dirty-log', 'clear-log'] as const).map((mode) => ({ name: 'clean', mode, bugs: [] })),
  ...CATALOG.filter((b) => b.commands.includes('dirty-log-test')).flatMap((b) => b.modes.map((mode) => ({ name: b.name, mode, bugs: [b.name] }))),
];
if (which === 'migrate') {
  for (const bug of CATALOG.filter((b) => b.commands.includes('migrate') && !b.costOnly)) {
    let caught = 0;
    let verified = 0;
    let seconds = 0;
    let what = '';
    for (let seed = 1; seed <= runs; seed++) {
      for (const inject of [[bug.name], []]) {
        // The bug's demonstration scenario, with the bug injected or not (same settings).
        const demo = migrationSetup({ inject: [bug.name], seed, tracking: bug.modes[0] });
        const { watchdogMs, burst } = demo;
        const scenario = { ...demo.scenario, bugs: inject };
        what = `${scenario.workload.name}, ${scenario.memoryBytes >> 20} MiB, ${scenario.vcpus} vCPUs, ${scenario.tracking}`;
        const r = await runMigration(scenario, { driver: 'free', watchdogMs, burst, resumeOps: 0 });
        seconds += r.seconds;
        // Lost writes (stamp oracle), the DMA oracle's records, or the guest-progress check: any failure kind.
        if (inject.length > 0 && failureOf(r) !== null) caught++;
        if (inject.length === 0 && r.status === 'passed') verified++;
      }
    }
    figures.push({
      id: `free-run-detection/migrate/${bug.name}`,
      what: `free-run detection of ${bug.name} in a migration (${what})`,
      figure: `${caught}/${runs}`, value: caught / runs,
      detail: `caught (${bug.detectedBy}) in ${caught} of ${runs} free-run migrations (seeds 1-${runs}); the same scenario without the bug verified ${verified}/${runs}; ${(seconds / (2 * runs)).toFixed(2)} s per run`,
    });
  }
  emit(figures);
  process.exit(0);
}
for (const c of cases) {
  let caught = 0;
  let seconds = 0;
  for (let seed = 1; seed <= runs; seed++) {
    const r = await runDirtyLogTest(config(c.mode, c.bugs, seed), { driver: 'free', watchdogMs: 1000, burst: 256 });
    seconds += r.seconds;
    if (r.status !== 'passed') caught++;
  }
  const clean = c.bugs.length === 0;
  const rateValue = clean ? (runs - caught) / runs : caught / runs;
  figures.push({
    id: `free-run-detection/${c.name}/${c.mode}`,
    what: clean ? `clean runs that verify, ${c.mode}` : `free-run detection of ${c.name}, ${c.mode}`,
    figure: `${clean ? runs - caught : caught}/${runs}`,
    value: rateValue,
    target: clean ? { kind: 'min', value: 1, text: 'all verify' } : { kind: 'min', value: 0.5, text: 'most runs' },
    detail: `2 vCPUs, 64 MiB, 3 iterations of 20000 writes, host write every 64, ring 1024; ${(seconds / runs).toFixed(2)} s per run`,
  });
}
emit(figures);
