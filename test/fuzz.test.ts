import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CASES, type CaseKind, type Verdict } from './fuzz-cases.ts';

/**
 * Every entry point against generated input (fixed seeds: the suite is deterministic;
 * bench/fuzz.ts runs the same cases by the hundred thousand): input is accepted or refused
 * as the user's mistake, each line naming the flag or the file; never another exception,
 * never a stack trace. Bounds on time and memory per case are asserted generously: a
 * parse that took seconds, or memory that grew without bound, would be a finding.
 */
const RUNS: Record<CaseKind, number> = { flags: 400, scenario: 300, litmus: 150, replay: 300, stream: 400 };

describe('fuzzing the entry points', () => {
  for (const kind of Object.keys(CASES) as CaseKind[]) {
    it(`${kind}: ${RUNS[kind]} generated inputs, each accepted or refused in lines that name where`, () => {
      const seen = { accepted: 0, refused: 0 };
      const rss = process.memoryUsage().rss;
      fc.assert(fc.property(CASES[kind] as fc.Arbitrary<() => Verdict>, (run) => {
        const t = performance.now();
        const v = run();
        expect(v.kind === 'bug' ? v.what : 'ok').toBe('ok');
        expect(performance.now() - t, 'one case').toBeLessThan(10_000);
        seen[v.kind as 'accepted' | 'refused']++;
      }), { seed: 42, numRuns: RUNS[kind] });
      // Both outcomes occur: the generators reach past the checks and into them.
      expect(seen.refused, 'refused').toBeGreaterThan(0);
      if (kind !== 'stream') expect(seen.accepted, 'accepted').toBeGreaterThan(0);
      expect(process.memoryUsage().rss - rss, 'memory grown').toBeLessThan(1 << 30);
    });
  }
});
