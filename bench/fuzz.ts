/**
 * The long fuzzing run: the suite's generated cases (test/fuzz-cases.ts), by the hundred
 * thousand, with a seed of its own: every entry point (flags, scenario files, litmus files,
 * replay files, the migration stream) must accept or refuse each input in lines that name
 * where, never throw anything else, never take long, never grow memory without bound.
 *
 *   tsx bench/fuzz.ts [cases, default 100000] [seed, default 1]
 *
 * Cases are spread over the kinds in proportion to their cost (litmus runs its test).
 * Reports per kind: cases, accepted, refused, bugs (must be 0), the slowest case, and the
 * peak memory; a bug is printed with its counterexample.
 */
import fc from 'fast-check';
import { CASES, type CaseKind, type Verdict } from '../test/fuzz-cases.ts';
import { type Figure, caseArgs, emit } from './harness.ts';

const [casesArg = '100000', seedArg = '1'] = caseArgs();
const total = Number(casesArg);
const seed = Number(seedArg);
const SHARE: Record<CaseKind, number> = { flags: 0.3, scenario: 0.2, litmus: 0.1, replay: 0.2, stream: 0.2 };
const figures: Figure[] = [];
let peak = process.memoryUsage().rss;
let bugs = 0;
const started = performance.now();
for (const kind of Object.keys(CASES) as CaseKind[]) {
  const runs = Math.max(1, Math.round(total * SHARE[kind]));
  const seen = { accepted: 0, refused: 0, bug: 0 };
  let slowest = 0;
  const t0 = performance.now();
  const samples = fc.sample(CASES[kind] as fc.Arbitrary<() => Verdict>, { seed, numRuns: runs });
  for (const run of samples) {
    const t = performance.now();
    const v = run();
    slowest = Math.max(slowest, performance.now() - t);
    seen[v.kind]++;
    if (v.kind === 'bug') {
      bugs++;
      if (seen.bug <= 5) process.stderr.write(`fuzz ${kind}: BUG: ${v.what}\n`);
    }
    if ((seen.accepted + seen.refused + seen.bug) % 1000 === 0) peak = Math.max(peak, process.memoryUsage().rss);
  }
  peak = Math.max(peak, process.memoryUsage().rss);
  const s = (performance.now() - t0) / 1000;
  figures.push({
    id: `fuzz/${kind}`, what: `${kind}: generated inputs with no outcome but accepted or refused naming where`,
    figure: `${seen.bug} bugs in ${runs} cases`, value: seen.bug, target: { kind: 'max', value: 0, text: 'no bugs' },
    detail: `${seen.accepted} accepted, ${seen.refused} refused, ${seen.bug} other outcomes; slowest case ${slowest.toFixed(0)} ms; ${s.toFixed(1)} s; seed ${seed}`,
  });
}
figures.push({
  id: 'fuzz/memory', what: 'peak resident memory over the whole run', figure: `${(peak / 1048576).toFixed(0)} MiB`, value: peak / 1048576,
  detail: `${total} cases in ${((performance.now() - started) / 1000).toFixed(0)} s`,
});
emit(figures);
if (bugs > 0) process.exitCode = 1;
