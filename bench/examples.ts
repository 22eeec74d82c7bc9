/**
 * Every shipped example, run again and again as a user runs it (`vmemlab run FILE`, a
 * fresh process each time), checked against its own `expect:`:
 *
 *   tsx bench/examples.ts [runs] [burn]
 *
 * `burn`: with a CPU-burning process beside each run (one of the two cores busy). An
 * example's outcome must be a property of the scenario, not of the machine: the target
 * is every run, with and without the burner.
 */
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type Figure, caseArgs, emit, median, withBurner } from './harness.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const runs = Number(caseArgs()[0] ?? 20);
const burn = caseArgs()[1] === 'burn';
const files = readdirSync(new URL('../examples/', import.meta.url)).filter((f) => f.endsWith('.yaml')).sort();

async function measure(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const f of files) {
    let met = 0;
    const seconds: number[] = [];
    const misses: string[] = [];
    let expected = '?';
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      const r = spawnSync(process.execPath, ['--import', 'tsx', 'bench/cli.ts', 'run', `examples/${f}`, '--json'], { cwd: root, encoding: 'utf8', maxBuffer: 256 << 20, timeout: 300_000 });
      seconds.push((performance.now() - t0) / 1000);
      let doc: { expectation?: { met: boolean; expected: string; outcome: string } } = {};
      try { doc = JSON.parse(r.stdout); } catch { misses.push(`run ${i + 1}: no JSON (exit ${r.status}): ${r.stderr.trim().split('\n').slice(-1)[0] ?? ''}`); continue; }
      expected = doc.expectation?.expected ?? expected;
      if (doc.expectation?.met) met++;
      else misses.push(`run ${i + 1}: ${doc.expectation?.outcome ?? 'no outcome'}`);
      process.stderr.write(doc.expectation?.met ? '.' : 'x');
    }
    process.stderr.write(` ${f}\n`);
    figures.push({
      id: `examples/${f}${burn ? '/burn' : ''}`,
      what: `examples/${f} reaches its expected outcome (${expected})${burn ? ', a CPU burner beside each run' : ''}`,
      figure: `${met}/${runs}`, value: met / runs,
      target: { kind: 'min', value: 1, text: `${runs}/${runs}` },
      detail: `each run a fresh \`vmemlab run examples/${f}\` process (from sources), median ${median(seconds).toFixed(1)} s${misses.length ? `; missed: ${misses.slice(0, 5).join('; ')}` : ''}`,
    });
  }
  return figures;
}

emit(burn ? await withBurner(measure) : await measure());
