import { describe, expect, it } from 'vitest';
import { BandwidthLimiter, WINDOW_MS } from '../src/migration/bandwidth-limiter.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';

/**
 * max-bandwidth holds: what the passes send over their time never exceeds the cap by more
 * than 5 % (one frame of overshoot, the first, spread over the run). An upper bound: a
 * slower or busier machine can only send less.
 */
describe('the bandwidth cap', () => {
  it('the limiter lets a window\'s budget through, carries what a whole frame overdraws, and keeps the long-run rate', () => {
    const l = new BandwidthLimiter(1 << 20); // 1 MiB/s: 104857.6 bytes per 100 ms window
    expect(l.waitMs(0)).toBe(0);
    l.charge(1 << 20); // a 1 MiB frame overdraws ten windows
    expect(l.waitMs(50)).toBe(WINDOW_MS - 50);
    for (let t = 100; t < 1000; t += 100) expect(l.waitMs(t), `at ${t} ms`).toBeGreaterThan(0);
    expect(l.waitMs(1000)).toBe(0); // paid off after ten windows
    let sent = 0;
    for (let t = 1000; t < 61_000; t += 1) if (l.waitMs(t) === 0) { l.charge(64 << 10); sent += 64 << 10; }
    expect(sent / 60).toBeLessThanOrEqual((1 << 20) * 1.05);
    expect(sent / 60).toBeGreaterThanOrEqual((1 << 20) * 0.95);
  });

  it('a migration at 1 MiB/s sends at most 5 % more than that over its passes', async () => {
    const { scenario } = migrationSetup({ memoryBytes: '4MiB', vcpus: '1', bandwidth: '1MiB', batchPages: '16', policy: 'force', maxIterations: '2', workload: 'sweep', warmup: '2048' });
    const r = await runMigration(scenario, { driver: 'free', watchdogMs: 20_000, burst: 256, resumeOps: 0 });
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    const bytes = r.passes.reduce((n, p) => n + (p.bandwidth * p.ms) / 1000, 0);
    const ms = r.passes.reduce((n, p) => n + p.ms, 0);
    expect(bytes).toBeGreaterThan(4 << 20); // the sweep wrote every page: the first pass sent them all
    expect((bytes * 1000) / ms).toBeLessThanOrEqual((1 << 20) * 1.05);
  });
});
