import { describe, expect, it } from 'vitest';
import {
  type ConvergenceParams, NO_THROTTLE, POLICY, type PassMeasure, type Throttle, autoConverge, dirtyLimit, expectedDowntime, fail, force,
  notConverged, triggerThrottle,
} from '../src/migration/convergence.ts';
import { BandwidthLimiter } from '../src/migration/bandwidth-limiter.ts';

/** The convergence policies as plain functions: no migration needed (QEMU's rules, migration/ram.c). */
const P: ConvergenceParams = { bandwidth: 100 << 20, downtimeLimitMs: 300, maxIterations: 5, timeoutMs: 60_000, vcpuDirtyLimit: 512 };
const MiB = 1 << 20;

/** A pass that sent `sentMiB` and found `foundPages` dirty, leaving `leftMiB`. */
function pass(n: number, o: { sentMiB?: number; foundPages?: number; leftMiB?: number; elapsedMs?: number; ms?: number } = {}): PassMeasure {
  return { pass: n, ms: o.ms ?? 1000, bytesSent: (o.sentMiB ?? 100) * MiB, pagesFound: o.foundPages ?? 0, remainingBytes: (o.leftMiB ?? 0) * MiB, elapsedMs: o.elapsedMs ?? n * 1000 };
}

describe('the expected downtime', () => {
  it('is what is left over the bandwidth the pass achieved, bounded by the limit', () => {
    expect(expectedDowntime(pass(1, { sentMiB: 50, leftMiB: 10 }), P)).toEqual({ bandwidth: 50 * MiB, expectedMs: 200 });
    expect(expectedDowntime(pass(1, { sentMiB: 400, leftMiB: 10 }), P).expectedMs, 'a pass faster than the limit counts at the limit').toBe(100);
    expect(expectedDowntime(pass(1, { sentMiB: 400, leftMiB: 10 }), { ...P, bandwidth: 0 }).expectedMs, 'unlimited: the measured bandwidth').toBe(25);
    expect(expectedDowntime(pass(1, { sentMiB: 0, leftMiB: 1 }), P).expectedMs).toBe(Infinity);
    // QEMU's migration_iteration_run switches over when must_precopy <= threshold_size: 0 <= 0 with no bandwidth measured.
    expect(expectedDowntime(pass(1, { sentMiB: 0, leftMiB: 0 }), P).expectedMs, 'nothing left converges even with no bandwidth measured (a stopped VM whose memory is all private)').toBe(0);
  });
});

describe('migration_trigger_throttle', () => {
  it('fires the second time a pass dirtied more than half of what it sent, and counts passes between', () => {
    const high = pass(1, { sentMiB: 100, foundPages: 51 * 256 });
    const low = pass(1, { sentMiB: 100, foundPages: 49 * 256 });
    expect(triggerThrottle(high, NO_THROTTLE)).toEqual({ now: false, highPasses: 1 });
    expect(triggerThrottle(high, { ...NO_THROTTLE, highPasses: 1 })).toEqual({ now: true, highPasses: 0 });
    expect(triggerThrottle(low, { ...NO_THROTTLE, highPasses: 1 }), 'a low pass keeps the count (dirty_rate_high_cnt is not reset)').toEqual({ now: false, highPasses: 1 });
    // Exactly half is not more than half (bytes_dirty_period > bytes_dirty_threshold).
    const half = pass(1, { sentMiB: 100, foundPages: 50 * 256 });
    expect(triggerThrottle(half, NO_THROTTLE)).toEqual({ now: false, highPasses: 0 });
    expect(triggerThrottle(half, { ...NO_THROTTLE, highPasses: 1 })).toEqual({ now: false, highPasses: 1 });
  });
});

describe('the policies', () => {
  const dirtying = (n: number): PassMeasure => pass(n, { sentMiB: 100, foundPages: 80 * 256, leftMiB: 80 });
  const run = (policy: (typeof POLICY)[keyof typeof POLICY], passes: number): { decisions: string[]; throttles: Throttle[] } => {
    let t = NO_THROTTLE;
    const decisions: string[] = [];
    const throttles: Throttle[] = [];
    for (let i = 1; i <= passes; i++) {
      const m = dirtying(i);
      const v = policy(m, expectedDowntime(m, P).expectedMs, t, P);
      t = v.throttle;
      decisions.push(v.decision);
      throttles.push(t);
      if (v.decision !== 'continue') break;
    }
    return { decisions, throttles };
  };

  it('every policy switches over once the expected downtime is within the limit, the limit itself included', () => {
    const m = pass(3, { sentMiB: 100, leftMiB: 20 });
    for (const p of Object.values(POLICY)) expect(p(m, 200, NO_THROTTLE, P).decision).toBe('switchover');
    // QEMU switches over when pending <= threshold_size (bandwidth x downtime-limit).
    for (const [name, p] of Object.entries(POLICY)) expect(p(m, P.downtimeLimitMs, NO_THROTTLE, P).decision, name).toBe('switchover');
    for (const [name, p] of Object.entries(POLICY)) expect(p(m, P.downtimeLimitMs + 0.001, NO_THROTTLE, P).decision, name).toBe('continue');
  });

  it('dirty-limit holds no vCPU before its trigger fires', () => {
    const quiet = pass(1, { sentMiB: 100, foundPages: 10 * 256, leftMiB: 80 });
    expect(dirtyLimit(quiet, 1000, NO_THROTTLE, P).throttle.dirtyLimit).toBe(0);
    const high = pass(1, { sentMiB: 100, foundPages: 80 * 256, leftMiB: 80 });
    expect(dirtyLimit(high, 1000, NO_THROTTLE, P).throttle.dirtyLimit, 'the first high pass only counts').toBe(0);
    expect(dirtyLimit(high, 1000, { ...NO_THROTTLE, dirtyLimit: 100, highPasses: 1 }, P).throttle.dirtyLimit, 'set once: a later trigger keeps it').toBe(100);
  });

  it('dirty-limit and auto-converge fail at the time limit, whatever the passes', () => {
    const late = pass(2, { sentMiB: 100, foundPages: 80 * 256, leftMiB: 80, elapsedMs: P.timeoutMs });
    expect(dirtyLimit(late, 1000, NO_THROTTLE, P).decision).toBe('fail');
    expect(autoConverge(late, 1000, NO_THROTTLE, P).decision).toBe('fail');
  });

  it('fail: continues up to max-iterations, then fails; force switches over there instead', () => {
    expect(run(fail, 10).decisions).toEqual(['continue', 'continue', 'continue', 'continue', 'fail']);
    expect(run(force, 10).decisions).toEqual(['continue', 'continue', 'continue', 'continue', 'switchover']);
    expect(fail(pass(1, { elapsedMs: 60_000, leftMiB: 80 }), 800, NO_THROTTLE, P).decision, 'the time limit too').toBe('fail');
  });

  it('auto-converge: 20 %, then +10 % at each trigger, at most 99 %; not bound by max-iterations; fails at the time limit', () => {
    const { decisions, throttles } = run(autoConverge, 40);
    expect(decisions.slice(0, 39).every((d) => d === 'continue')).toBe(true);
    const steps = [...new Set(throttles.map((t) => t.cpuPercent))];
    expect(steps).toEqual([0, 20, 30, 40, 50, 60, 70, 80, 90, 99]);
    expect(throttles.every((t) => t.dirtyLimit === 0)).toBe(true);
    expect(autoConverge(pass(9, { elapsedMs: 60_000, leftMiB: 80 }), 800, throttles.at(-1)!, P).decision).toBe('fail');
  });

  it('dirty-limit: once triggered, every vCPU gets vcpu-dirty-limit, once; not bound by max-iterations', () => {
    const { decisions, throttles } = run(dirtyLimit, 10);
    expect(decisions.every((d) => d === 'continue')).toBe(true);
    expect(throttles.map((t) => t.dirtyLimit)).toEqual([0, 512, 512, 512, 512, 512, 512, 512, 512, 512]);
    expect(throttles.every((t) => t.cpuPercent === 0)).toBe(true);
    const defaults = dirtyLimit(dirtying(2), 800, { ...NO_THROTTLE, highPasses: 1 }, { ...P, vcpuDirtyLimit: undefined });
    expect(defaults.throttle.dirtyLimit, "QEMU's default: 1 MB/s").toBe(256);
  });

  it('says why a migration did not converge, with what held the guest', () => {
    expect(notConverged(5, 812.34, P, NO_THROTTLE)).toBe('did not converge in 5 passes (expected downtime 812.3 ms > limit 300 ms)');
    expect(notConverged(9, 400, P, { ...NO_THROTTLE, cpuPercent: 99 })).toBe('did not converge in 9 passes (expected downtime 400.0 ms > limit 300 ms, throttle 99 %)');
    expect(notConverged(9, 400, P, { ...NO_THROTTLE, dirtyLimit: 256 })).toBe('did not converge in 9 passes (expected downtime 400.0 ms > limit 300 ms, dirty limit 256 pages/s per vCPU)');
  });
});

describe('the bandwidth limiter', () => {
  it('lets a frame go while the 100 ms window has budget, and carries what a frame overdrew into the next windows', () => {
    const l = new BandwidthLimiter(1000_000); // 100 kB per window
    expect(l.waitMs(0)).toBe(0);
    l.charge(250_000);
    expect(l.waitMs(10)).toBe(90);
    expect(l.waitMs(100), 'one window later: 150 kB still owed').toBe(100);
    expect(l.waitMs(200), 'two: 50 kB owed, under the budget').toBe(0);
    expect(new BandwidthLimiter(0).waitMs(5), 'unlimited').toBe(0);
  });

  it('a window that used exactly its budget is full', () => {
    const l = new BandwidthLimiter(1000); // 100 B per window
    expect(l.waitMs(0)).toBe(0);
    l.charge(100);
    expect(l.waitMs(30)).toBe(70);
  });

  it('after an idle stretch the windows stay aligned to when the first began: a frame then waits for the end of its own window', () => {
    const l = new BandwidthLimiter(1000);
    expect(l.waitMs(100)).toBe(0); // windows from 100 ms on
    l.charge(100);
    expect(l.waitMs(150)).toBe(50);
    expect(l.waitMs(1050), 'nine windows later: nothing owed').toBe(0);
    l.charge(100);
    expect(l.waitMs(1060), 'the window that began at 1000 ms ends at 1100').toBe(40);
  });
});
