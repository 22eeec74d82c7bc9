import { availableParallelism } from 'node:os';
import { CATALOG } from '../bugs/catalog.ts';
import { demoFlags } from '../scenarios/options.ts';
import { DEMOS } from '../scenarios/demos.ts';
import { type Detection, demoCommand, measureDetection } from '../hunt/detection.ts';
import { Progress } from './progress.ts';
import { HuntPool } from '../hunt/pool.ts';

function rates(d: Detection[]): string {
  return d.map((x) => `${x.strategy} ${x.caught}/${x.acted}/${x.runs}${x.medianSteps !== null ? ` (median ${x.medianSteps} steps)` : ''}`).join(', ');
}

/**
 * `vmemlab catalog`: every bug, what it breaks, where it comes from, and the command that
 * shows it; with --measure, its detection rate over seeds 1..n under each deterministic
 * strategy, measured now.
 */
export async function catalogCommand(json: boolean, measure: number | null = null): Promise<number> {
  const measured = new Map<string, Detection[]>();
  if (measure !== null) {
    const progress = new Progress(json);
    const pool = new HuntPool(availableParallelism());
    try {
      for (const [i, b] of CATALOG.entries()) {
        progress.update(`measuring ${b.name} (${i + 1}/${CATALOG.length})`);
        if (!b.costOnly) measured.set(b.name, await measureDetection(b, measure, ['random', 'pct'], pool));
      }
    } finally {
      await pool.close();
    }
    progress.clear();
  }
  if (json) {
    console.log(JSON.stringify(CATALOG.map((b) => ({ ...b, demo: demoCommand(b), detection: measured.get(b.name) ?? null })), null, 2));
    return 0;
  }
  for (const b of CATALOG) {
    console.log(`${b.name}  (${b.modes.length > 0 ? `modes: ${b.modes.join(', ')}` : 'any tracking'})`);
    console.log(`  wrong:     ${b.wrong}`);
    console.log(`  effect:    ${b.effect}`);
    console.log(`  caught by: ${b.detectedBy}`);
    console.log(`  reference: ${b.reference}`);
    console.log(`  demo:      ${demoCommand(b)}`);
    const demo = DEMOS[b.name].migrate;
    if (demo && b.commands.includes('migrate')) console.log(`  its scenario (migrate --inject ${b.name} uses it): ${demoFlags(demo, 'migrate')}`);
    const mdev = DEMOS[b.name].mdev;
    if (mdev && b.commands.includes('mdev')) console.log(`  its scenario (mdev --inject ${b.name} uses it): ${demoFlags(mdev, 'mdev')}`);
    const d = measured.get(b.name);
    if (d) console.log(`  detection: ${rates(d)} (caught / the bug acted / runs), deterministic, seeds 1-${measure}`);
    else if (b.costOnly) console.log('  detection: none (a cost, not a correctness bug)');
    console.log('');
  }
  if (measure === null) console.log('Detection rates: vmemlab catalog --measure [seeds] measures them now (about a minute); BENCHMARKS.md has the last full figures, free-run included.');
  return 0;
}
