import { defineConfig } from 'vitest/config';

/**
 * The tests Stryker runs against each mutant of the protocol core (npm run mutation):
 * the in-process suites, which exercise src/host, src/migration and src/oracles on this
 * thread (code that only runs inside worker threads is not instrumented: coverage cannot
 * see it, and every mutant would pay for thread start-up).
 */
/** VMEMLAB_MUTATION_TESTS=a.test.ts,b.test.ts: a part's own tests (its unit tests, when the whole set would take hours on two cores). */
const only = process.env['VMEMLAB_MUTATION_TESTS']?.split(',').filter(Boolean).map((f) => `test/${f}`);
/** VMEMLAB_MUTATION_GREP=regex: of those files, the tests whose names match (a suite's quick cases: every mutant re-runs the tests that cover it). */
const grep = process.env['VMEMLAB_MUTATION_GREP'];

export default defineConfig({
  test: {
    include: only ?? [
      'test/dirty-ring.test.ts', 'test/dirty-log-ioctls.test.ts', 'test/write-path.test.ts', 'test/dirty-sources.test.ts', 'test/tracepoints.test.ts',
      'test/guest-memory.test.ts', 'test/iommu.test.ts', 'test/convergence.test.ts', 'test/migration-stream.test.ts', 'test/litmus.test.ts',
      'test/migration-bugs.test.ts',
    ],
    ...(grep ? { testNamePattern: grep } : {}),
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
