import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    // Two test files at a time on this 2-core machine: most files are one busy thread
    // (the deterministic driver), and every test is built to hold under load (the suite
    // also runs beside a CPU burner), so the pair takes about 1.2x less wall time.
    maxWorkers: 2,
  },
});
