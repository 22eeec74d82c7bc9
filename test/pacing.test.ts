import { describe, expect, it } from 'vitest';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { type MigrationScenario, runMigration } from '../src/scenarios/migration.ts';
import { runDirtyLogTest } from '../src/scenarios/run-dirty-log-test.ts';
import type { DirtyLogTestConfig } from '../src/scenarios/dirty-log-test.ts';
import { TokenBucket, bucketFor } from '../src/util/token-bucket.ts';
import { cli } from './cli-helper.ts';

/**
 * Guest dirty-rate limits (QEMU's set-vcpu-dirty-limit and the dirty-limit capability),
 * the guest operation rate, and the bandwidth cap. Under the deterministic driver they
 * pace by the step clock (1 us per step), so the figures asserted here are exact for the
 * seed and the same on every machine.
 */
const DET = { driver: 'deterministic' as const, watchdogMs: 10_000, burst: 256 };
const FREE = { driver: 'free' as const, watchdogMs: 10_000, burst: 256 };

function migration(o: Partial<MigrationScenario> = {}, params: Partial<MigrationScenario['params']> = {}): MigrationScenario {
  return {
    tracking: 'dirty-ring', vcpus: 2, memoryBytes: 4 << 20, slots: 1, ringEntries: 4096, workload: DEFAULT_WORKLOAD, seed: 1,
    bugs: [], hostWriteEvery: 0,
    params: { bandwidth: 8 << 20, downtimeLimitMs: 2, maxIterations: 4, timeoutMs: 1e9, policy: 'force', batchPages: 32, warmupOps: 2000, ...params },
    ...o,
  };
}

describe('the token bucket', () => {
  it('holds a long run to its rate and saves up at most its capacity', () => {
    const b = new TokenBucket(1000, 10, 0);
    expect(b.available(0)).toBe(10);
    b.take(10);
    expect(b.available(0)).toBe(0);
    expect(b.msUntil(1)).toBe(1);
    expect(b.available(5)).toBe(5);
    expect(b.available(1000)).toBe(10); // capped
    let taken = 0;
    const clock = { t: 1000, nowMs() { return this.t; } };
    for (; clock.t < 2000; clock.t += 0.25) while (b.tryTake(clock)) taken++;
    expect(taken).toBeGreaterThanOrEqual(1000);
    expect(taken).toBeLessThanOrEqual(1010);
    expect(bucketFor(10, 0).capacity).toBe(1);
    expect(() => new TokenBucket(0, 1, 0)).toThrow(RangeError);
  });
});

describe('a vCPU dirty limit (set-vcpu-dirty-limit)', () => {
  it('holds each vCPU of a guest that would dirty far more to the limit, on the step clock, within 5 %', async () => {
    // dirty_log_test's random writes over 16 MiB: almost every write finds its page
    // write-protected and would dirty a new page; 1000 pages/s per vCPU is a trickle of that.
    const c: DirtyLogTestConfig = {
      mode: 'dirty-ring', vcpus: 2, memoryBytes: 16 << 20, slots: 1, iterations: 2, ringEntries: 1024, workload: DEFAULT_WORKLOAD, seed: 1, bugs: [],
      opsPerIteration: 3000, hostWriteEvery: 0, dirtyLimit: 1000,
    };
    const r = await runDirtyLogTest(c, DET);
    expect(r.status, r.errors.join('; ')).toBe('passed');
    for (const v of r.vcpus) {
      expect(v.dirtyLimit).toBe(1000);
      expect(v.dirtied, `vcpu${v.vcpu} dirtied pages`).toBeGreaterThan(1000);
      expect(v.dirtyPagesPerSecond / 1000, `vcpu${v.vcpu}: ${v.dirtyPagesPerSecond} pages/s`).toBeGreaterThan(0.95);
      expect(v.dirtyPagesPerSecond / 1000).toBeLessThan(1.05);
      expect(v.pacedMs, 'deterministic: paced steps are not sleeps').toBe(0);
    }
    const unlimited = await runDirtyLogTest({ ...c, dirtyLimit: 0 }, DET);
    for (const v of unlimited.vcpus) expect(v.dirtyPagesPerSecond, 'unlimited, the guest dirties far more').toBeGreaterThan(10_000);
  });

  it('a paced vCPU stops at once with its write unretired; dirty_log_test verifies in every mode (paced stops every iteration)', async () => {
    for (const mode of ['dirty-ring', 'dirty-log', 'clear-log'] as const) {
      for (const seed of [1, 2, 3]) {
        const c: DirtyLogTestConfig = {
          mode, vcpus: 2, memoryBytes: 1 << 20, slots: 1, iterations: 3, ringEntries: 256, workload: DEFAULT_WORKLOAD, seed, bugs: [],
          opsPerIteration: 600, hostWriteEvery: 64, dirtyLimit: 20_000,
        };
        const r = await runDirtyLogTest(c, DET);
        expect(r.status, `${mode} seed ${seed}: ${r.errors.join('; ')} ${r.violations.length} violations`).toBe('passed');
        // A token bucket: at most the rate over the run plus what it saved up at the start (50 ms of it).
        for (const v of r.vcpus) expect(v.dirtied).toBeLessThanOrEqual((20_000 * v.dirtied) / v.dirtyPagesPerSecond + 1001);
      }
    }
  });

  it('under free-run a paced vCPU sleeps outside guest mode: flushes do not wait for it and the migration completes verified', async () => {
    const r = await runMigration(migration({ dirtyLimit: 500 }, { warmupOps: 20_000 }), FREE);
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    // What the limit guarantees on any machine: never above it (a slow machine may stay below).
    // (The rate over the interval, plus the 50 ms the bucket saves up.)
    for (const v of r.info!.vcpus) expect(v.dirtied).toBeLessThanOrEqual(Math.ceil((500 * v.dirtied) / v.dirtyPagesPerSecond) + 25 + 1);
    expect(r.info!.vcpus.some((v) => v.pacedMs > 0)).toBe(true);
  });
});

describe('the guest operation rate', () => {
  it('each vCPU retires at most its rate, and about that many when it could do more (step clock)', async () => {
    const r = await runMigration(migration({ vcpus: 1, workload: { ...DEFAULT_WORKLOAD, opRate: 20_000 } }, { warmupOps: 2000, maxIterations: 3 }), DET);
    expect(r.status, r.reason ?? '').toBe('passed');
    for (const v of r.info!.vcpus) {
      expect(v.ops).toBeGreaterThan(10_000);
      expect(v.opsPerSecond / 20_000, `vcpu${v.vcpu}: ${v.opsPerSecond} ops/s`).toBeGreaterThan(0.95);
      expect(v.opsPerSecond / 20_000).toBeLessThan(1.05);
    }
  });
});

describe('the dirty-limit policy (QEMU\'s dirty-limit capability)', () => {
  it('a guest that never converges fails under policy fail; under dirty-limit, after two passes that dirtied more than half of what they sent, every vCPU gets the quota and it converges', async () => {
    const s = migration({ memoryBytes: 8 << 20 }, { bandwidth: 32 << 20, downtimeLimitMs: 20, maxIterations: 10, policy: 'fail', batchPages: 64 });
    const plain = await runMigration(s, DET);
    expect(plain.status).toBe('failed');
    expect(plain.reason).toMatch(/^did not converge in 10 passes/);
    expect(plain.info!.dirtyLimit).toBe(0);
    const dl = await runMigration({ ...s, params: { ...s.params, policy: 'dirty-limit', vcpuDirtyLimit: 1024 } }, DET);
    expect(dl.status, dl.reason ?? '').toBe('passed');
    expect(dl.info!.dirtyLimit).toBe(1024);
    const limits = dl.passes.map((p) => p.dirtyLimit);
    expect(limits.slice(0, 2), 'not engaged before two high passes').toEqual([0, 0]);
    expect(limits[limits.length - 1]).toBe(1024);
    const engaged = limits.indexOf(1024);
    for (let i = engaged; i < limits.length; i++) expect(limits[i]).toBe(1024);
    expect(dl.passes[dl.passes.length - 1]!.dirtyFound).toBeLessThan(dl.passes[engaged - 1]!.dirtyFound);
  });

  it('needs the dirty ring, as QEMU\'s dirty-limit capability does; its quota needs the policy', async () => {
    const a = await cli('migrate', '--policy', 'dirty-limit', '--tracking', 'dirty-log', '--memory', '1MiB');
    expect(a.code).toBe(2);
    expect(a.err).toMatch(/--policy: dirty-limit needs the dirty ring .*--tracking dirty-log/);
    const b = await cli('migrate', '--vcpu-dirty-limit', '1MB/s', '--memory', '1MiB');
    expect(b.code).toBe(2);
    expect(b.err).toMatch(/--vcpu-dirty-limit: '1MB\/s' .* needs --policy dirty-limit/);
  });
});

describe('rates on the command line and in scenario files', () => {
  it('zero, negative, not a number or above the limit: one line naming the option and the value, exit 2', async () => {
    for (const [flag, value] of [['--dirty-limit', '0'], ['--dirty-limit', '-5'], ['--dirty-limit', 'fast'], ['--dirty-limit', '1e9'], ['--dirty-limit', '1024/s'], ['--op-rate', '0'], ['--op-rate', '2.5']] as const) {
      const r = await cli('dirty-log-test', flag, value, '--memory', '1MiB');
      expect(r.code, `${flag} ${value}`).toBe(2);
      expect(r.err.trim().split('\n'), `${flag} ${value}`).toHaveLength(1);
      expect(r.err).toContain(flag);
      expect(r.err).toContain(`'${value}'`);
    }
    const ok = await cli('dirty-log-test', '--dirty-limit', '4MiB/s', '--memory', '1MiB', '--iterations', '1', '--driver', 'deterministic', '--json');
    expect(ok.code, ok.err).toBe(0);
    expect(JSON.parse(ok.out).config.dirtyLimit).toBe(1024);
  });
});

describe('the bandwidth cap', () => {
  it('holds on average when a frame is bigger than a 100 ms window\'s budget (1 MiB/s with 128 KiB frames), within 5 %', async () => {
    // Random writes during warm-up make most pages non-zero, so pass 1 sends about 8 MiB in
    // full pages: 64 frames, each 128 KiB against a budget of 102 KiB per 100 ms window.
    const r = await runMigration(migration({ vcpus: 1, memoryBytes: 8 << 20 }, { bandwidth: 1 << 20, batchPages: 32, warmupOps: 12_000, maxIterations: 1 }), DET);
    expect(r.status, r.reason ?? '').toBe('passed');
    const p = r.passes[0]!;
    expect(p.pagesSent - p.zeroPages).toBeGreaterThan(1800);
    expect(p.bandwidth / (1 << 20), `${p.bandwidth} bytes/s`).toBeGreaterThan(0.95);
    expect(p.bandwidth / (1 << 20)).toBeLessThan(1.05);
    expect(PAGE_SIZE).toBe(4096);
  });
});
