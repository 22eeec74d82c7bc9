/**
 * The bandwidth cap: what a migration's passes send over their time, against max-bandwidth,
 * at 1, 4 and 16 MiB/s (a guest whose every page holds data, so each page is a full 4 KiB
 * record; 16-page frames). The figure is achieved / cap; it must stay within 5 %.
 *
 *   tsx bench/bandwidth.ts
 */
import { runMigration } from '../src/scenarios/migration.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { type Figure, emit } from './harness.ts';

const figures: Figure[] = [];
for (const mib of [1, 4, 16]) {
  const memory = `${Math.max(8, mib * 10)}MiB`; // at least ten seconds of sending
  const { scenario } = migrationSetup({ memoryBytes: memory, vcpus: '1', bandwidth: `${mib}MiB`, batchPages: '16', policy: 'force', maxIterations: '2', workload: 'sweep', warmup: String(Math.max(8, mib * 10) * 512) });
  const r = await runMigration(scenario, { driver: 'free', watchdogMs: 60_000, burst: 256, resumeOps: 0 });
  const bytes = r.passes.reduce((n, p) => n + (p.bandwidth * p.ms) / 1000, 0);
  const ms = r.passes.reduce((n, p) => n + p.ms, 0);
  const ratio = (bytes * 1000) / ms / (mib << 20);
  figures.push({
    id: `bandwidth/${mib}MiB`, what: `max-bandwidth ${mib} MiB/s: achieved over the passes / cap`, figure: ratio.toFixed(3), value: ratio,
    target: { kind: 'max', value: 1.05, text: '<= 1.05' },
    detail: `${(bytes / 1048576).toFixed(1)} MiB in ${(ms / 1000).toFixed(1)} s over ${r.passes.length} passes of a ${memory} guest (${r.status})`,
  });
}
emit(figures);
