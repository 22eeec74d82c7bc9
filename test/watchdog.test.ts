import { mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { runDirtyLogTest } from '../src/scenarios/run-dirty-log-test.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { runDirtyLogTestWatched, runMigrationWatched } from '../src/scenarios/off-thread.ts';
import { UserError } from '../src/util/errors.ts';
import type { DirtyLogTestConfig } from '../src/scenarios/dirty-log-test.ts';
import { fingerprint } from '../src/hunt/failure.ts';

/**
 * A wedged actor: one role's thread loops for ever inside a step (injected), while the
 * others wait on it or run on. The watchdog names that actor and where it is, ends the
 * run as stuck, and terminates every thread, whatever kind of role is wedged.
 */
const WATCHDOG_MS = 1500;

describe('the watchdog names a wedged actor (free-run)', () => {
  for (const role of ['collector', 'vcpu0', 'vcpu1', 'host-writer']) {
    it(`dirty-log-test: ${role} wedged`, async () => {
      const started = Date.now();
      const r = await runDirtyLogTest({
        mode: 'dirty-ring', vcpus: 2, memoryBytes: 4 << 20, slots: 1, iterations: 1000, ringEntries: 4096,
        workload: DEFAULT_WORKLOAD, seed: 1, bugs: [], opsPerIteration: 20_000, hostWriteEvery: 64,
      }, { driver: 'free', watchdogMs: WATCHDOG_MS, burst: 256, fault: { role, afterSteps: 20, kind: 'wedge' } });
      expect(r.status).toBe('stuck');
      expect(r.errors[0]).toMatch(new RegExp(`^watchdog: ${role} stopped stepping \\d+\\.\\d s ago, inside ${role.startsWith('vcpu') ? 'KVM_RUN \\(its guest operation was in the (translate|walk|fault|store) phase' : 'a step'}`));
      // The others are listed with what they wait for, and the wedged one is not blamed on them.
      for (const other of ['collector', 'vcpu0', 'vcpu1', 'host-writer'].filter((x) => x !== role)) expect(r.errors[0]).toContain(`\n  ${other} `);
      expect(Date.now() - started).toBeLessThan(30_000);
    });
  }

  for (const role of ['vcpu0', 'migration', 'destination', 'device0', 'iommu-service']) {
    it(`migrate: ${role} wedged`, async () => {
      const { scenario } = migrationSetup({ memoryBytes: '8MiB', vcpus: '2', devices: ['dma-engine:every=64,remap-every=8'], bandwidth: '16MiB' });
      const r = await runMigration(scenario, { driver: 'free', watchdogMs: WATCHDOG_MS, burst: 256, resumeOps: 0, fault: { role, afterSteps: 20, kind: 'wedge' } });
      expect(r.status).toBe('stuck');
      expect(r.errors[0]).toMatch(new RegExp(`^watchdog: ${role} stopped stepping \\d+\\.\\d s ago, inside`));
      expect(r.errors[0]).toMatch(/its thread no longer answers and is terminated/);
    });
  }
});

describe('the watchdog names a wedged actor (the deterministic driver, on a thread of its own)', () => {
  const config: DirtyLogTestConfig = {
    mode: 'dirty-ring', vcpus: 2, memoryBytes: 2 << 20, slots: 1, iterations: 50, ringEntries: 4096,
    workload: DEFAULT_WORKLOAD, seed: 1, bugs: [], opsPerIteration: 2000, hostWriteEvery: 64,
  };
  for (const role of ['collector', 'vcpu1', 'host-writer']) {
    it(`dirty-log-test: ${role} wedged; the iterations before it are kept`, async () => {
      const events: string[] = [];
      const r = await runDirtyLogTestWatched(config, {
        driver: 'deterministic', watchdogMs: WATCHDOG_MS, burst: 256, fault: { role, afterSteps: 3000, kind: 'wedge' },
        onEvent: (e) => events.push(e.kind),
      });
      expect(r.status).toBe('stuck');
      expect(r.errors).toHaveLength(1);
      expect(r.errors[0]).toMatch(new RegExp(`^watchdog: ${role} stopped stepping \\d+\\.\\d s ago, inside step \\d+; its worker was terminated \\(the deterministic driver steps one role at a time: every other role waits for it\\)$`));
      expect(r.steps).toBeGreaterThan(3000);
      expect(r.iterations.length).toBe(events.filter((k) => k === 'iteration').length);
    });
  }

  for (const role of ['vcpu0', 'migration', 'destination', 'device0', 'iommu-service']) {
    it(`migrate: ${role} wedged`, async () => {
      const { scenario } = migrationSetup({ memoryBytes: '2MiB', vcpus: '2', devices: ['dma-engine:every=64,remap-every=8'], driver: 'deterministic' });
      const r = await runMigrationWatched(scenario, { driver: 'deterministic', watchdogMs: WATCHDOG_MS, burst: 256, resumeOps: 0, fault: { role, afterSteps: 20, kind: 'wedge' } });
      expect(r.status).toBe('stuck');
      expect(r.errors[0]).toMatch(new RegExp(`^watchdog: ${role} stopped stepping \\d+\\.\\d s ago, inside step \\d+; its worker was terminated`));
      expect(r.info).toBeNull();
    });
  }

  it('a run that is not wedged gives what it gives on this thread: the same steps, schedule and fingerprint', async () => {
    const { scenario } = migrationSetup({ memoryBytes: '2MiB', vcpus: '2', driver: 'deterministic', inject: ['copy-before-reset'] });
    const o = { driver: 'deterministic', watchdogMs: 10_000, burst: 256, resumeOps: 0 } as const;
    const passes: number[] = [];
    const there = await runMigrationWatched(scenario, { ...o, onEvent: (e) => { if (e.kind === 'pass') passes.push(e.stats.pass); } });
    const here = await runMigration(scenario, o);
    expect(there.status).toBe(here.status);
    expect(there.steps).toBe(here.steps);
    expect(there.schedule).toEqual(here.schedule);
    expect(fingerprint(there)).toBe(fingerprint(here));
    expect(passes).toEqual(here.passes.map((p) => p.pass));
  });

  it('Ctrl-C ends a deterministic run at once, stuck, saying so', async () => {
    const cancel = new AbortController();
    let iterations = 0;
    const r = await runDirtyLogTestWatched({ ...config, iterations: 100_000 }, {
      driver: 'deterministic', watchdogMs: 60_000, burst: 256, cancel: cancel.signal,
      onEvent: (e) => { if (e.kind === 'iteration' && ++iterations === 2) cancel.abort(); },
    });
    expect(r.status).toBe('stuck');
    expect(r.errors).toEqual(['cancelled (Ctrl-C) before it finished']);
    expect(r.iterations.length).toBeGreaterThanOrEqual(2);
  });

  it('a user mistake found on its thread is a UserError here; a crashing step is an internal error', async () => {
    const { scenario } = migrationSetup({ memoryBytes: '2MiB', vcpus: '2', driver: 'deterministic' });
    const o = { driver: 'deterministic', watchdogMs: 10_000, burst: 256, resumeOps: 0 } as const;
    await expect(runMigrationWatched(scenario, { ...o, replay: new Uint8Array([0, 1, 200]) })).rejects.toBeInstanceOf(UserError);
    const crash = runMigrationWatched(scenario, { ...o, fault: { role: 'vcpu0', afterSteps: 5, kind: 'crash' } });
    await expect(crash).rejects.toThrow('injected crash in vcpu0 after 5 steps');
    await expect(crash).rejects.not.toBeInstanceOf(UserError);
  });
});

describe('a fault of the VMM thread\'s own', () => {
  it('an exception while it handles a worker\'s event ends the run and is thrown (an internal error), not lost in the worker', async () => {
    const { scenario } = migrationSetup({ memoryBytes: '4MiB', vcpus: '2' });
    const started = Date.now();
    await expect(runMigration(scenario, {
      driver: 'free', watchdogMs: 10_000, burst: 256, resumeOps: 0,
      onEvent: (e) => { if (e.kind === 'pass') throw new Error('a broken event handler'); },
    })).rejects.toThrow('a broken event handler');
    expect(Date.now() - started).toBeLessThan(30_000);
  });
});

describe('Ctrl-C', () => {
  it('after the migration completed, stops the resumed guest at once: the run ends stuck, saying so', async () => {
    const { scenario } = migrationSetup({ memoryBytes: '4MiB', vcpus: '2' });
    const cancel = new AbortController();
    const started = Date.now();
    const r = await runMigration(scenario, {
      driver: 'free', watchdogMs: 10_000, burst: 256, resumeOps: 1e12, cancel: cancel.signal,
      onEvent: (e) => { if (e.kind === 'completed') cancel.abort(); },
    });
    expect(r.info?.status).toBe('completed');
    expect(r.status).toBe('stuck');
    expect(r.destination?.errors.join('\n')).toContain('cancelled (Ctrl-C) before it finished');
    expect(Date.now() - started).toBeLessThan(30_000);
  });
});

describe('hunt', () => {
  it('a deterministic run tells its watcher when stepping is over, so the memory comparison after it is never taken for a wedge', async () => {
    const { runHuntTask } = await import('../src/hunt/hunt-run.ts');
    const { scenario } = migrationSetup({ memoryBytes: '2MiB', vcpus: '2', driver: 'deterministic' });
    const heartbeat = new SharedArrayBuffer(12);
    const r = await runHuntTask({ scenario, strategy: 'random', seed: 1, watchdogMs: WATCHDOG_MS, burst: 256, heartbeat });
    expect(r.failure).toBeNull();
    const hb = new Int32Array(heartbeat);
    expect(Atomics.load(hb, 2)).toBe(2); // 0 queued, 1 stepping, 2 stepping over
    expect(Atomics.load(hb, 0)).toBe(r.steps);
  });

  it('a deterministic run wedged inside a step is ended by the hunt\'s watchdog: its worker terminated, the run reported stuck with the role', async () => {
    const { hunt } = await import('../src/hunt/hunt.ts');
    const outDir = mkdtempSync(join(tmpdir(), 'vmemlab-wedged-hunt-'));
    const { scenario } = migrationSetup({ memoryBytes: '2MiB', vcpus: '2', driver: 'deterministic' });
    const started = Date.now();
    const { report, lines } = await hunt({
      scenario, strategies: ['random'], seeds: 2, shard: { index: 1, count: 1 }, all: true, workers: 2, watchdogMs: WATCHDOG_MS, burst: 256,
      fault: { role: 'vcpu1', afterSteps: 200, kind: 'wedge' }, outDir,
    });
    // Its worker was terminated before it handed back a schedule: no replay file claims to replay it (hunt --shrink would refuse it).
    expect(report.replayFiles).toEqual([]);
    expect(readdirSync(outDir).filter((f) => f.endsWith('.vmreplay'))).toEqual([]);
    const runs = lines.filter((l) => l.type === 'run');
    expect(runs).toHaveLength(2);
    for (const r of runs) {
      expect(r.type === 'run' && r.failure).toBe('stuck');
      expect(r.type === 'run' && r.summary).toMatch(/^wedged: vcpu1 stopped stepping \d+\.\d s ago, inside step \d+; its worker was terminated$/);
    }
    expect(report.strategies[0]!.failures).toBe(2);
    expect(Date.now() - started).toBeLessThan(60_000);
  });
});
