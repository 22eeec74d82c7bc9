import { PAGE_SIZE } from '../host/constants.ts';

/**
 * Whether a pre-copy migration has converged, and what to do when it has not: the
 * decision after each pass, as small functions handed to the engine (precopy.ts), as
 * cloud-hypervisor hands `is_converged` to its memory iterations. QEMU's rules
 * (migration/ram.c, migration.c): switch over when the expected downtime (what is left
 * over the bandwidth) is within the limit; a throttling policy acts when dirtying
 * outpaced half the transfer twice (migration_trigger_throttle); at the iteration or
 * time limit, fail or force.
 */
export type ConvergencePolicy = 'fail' | 'force' | 'auto-converge' | 'dirty-limit';
export const POLICIES: readonly ConvergencePolicy[] = ['fail', 'force', 'auto-converge', 'dirty-limit'];

/** QEMU's default vcpu-dirty-limit: 1 MB/s (DEFAULT_MIGRATE_VCPU_DIRTY_LIMIT), in 4 KiB pages per second. */
export const DEFAULT_VCPU_DIRTY_LIMIT = 256;

/** What a pass measured. */
export interface PassMeasure {
  pass: number;
  /** The pass's copy and closing sync, ms. */
  ms: number;
  /** Bytes it sent (pages with their headers). */
  bytesSent: number;
  /** Pages newly found dirty while it ran (its ring-full reaps and its closing sync). */
  pagesFound: number;
  /** What is left to send. */
  remainingBytes: number;
  /** Since the migration began, ms. */
  elapsedMs: number;
}

export interface ConvergenceParams {
  /** max-bandwidth, bytes per second; 0 for unlimited. */
  bandwidth: number;
  downtimeLimitMs: number;
  maxIterations: number;
  timeoutMs: number;
  /** dirty-limit: each vCPU's quota, pages dirtied per second. */
  vcpuDirtyLimit?: number;
}

/** What the throttling policies hold on the guest, and QEMU's dirty_rate_high_cnt. */
export interface Throttle {
  /** auto-converge's cpu-throttle-percentage. */
  cpuPercent: number;
  /** dirty-limit's quota per vCPU, pages/s; 0: not engaged. */
  dirtyLimit: number;
  /** Passes in which dirtying outpaced half the transfer, since the last throttle step. */
  highPasses: number;
}

export const NO_THROTTLE: Throttle = { cpuPercent: 0, dirtyLimit: 0, highPasses: 0 };

export type Decision = 'continue' | 'switchover' | 'fail';

export interface Verdict { decision: Decision; throttle: Throttle }

export type Policy = (m: PassMeasure, expectedMs: number, t: Throttle, p: ConvergenceParams) => Verdict;

/** The bandwidth a pass achieved (bytes/s), bounded by the limit, and the expected downtime: remaining / bandwidth. */
export function expectedDowntime(m: PassMeasure, p: ConvergenceParams): { bandwidth: number; expectedMs: number } {
  const ms = Math.max(m.ms, 1e-3);
  const bandwidth = (m.bytesSent * 1000) / ms;
  const bw = p.bandwidth > 0 ? Math.min(bandwidth, p.bandwidth) : bandwidth;
  // Nothing left converges whatever the bandwidth (QEMU: must_precopy <= threshold_size, 0 <= 0), even after a pass that sent nothing.
  if (m.remainingBytes === 0) return { bandwidth, expectedMs: 0 };
  return { bandwidth, expectedMs: bw > 0 ? (m.remainingBytes * 1000) / bw : Infinity };
}

/**
 * migration_trigger_throttle: this pass dirtied more than half of what it sent
 * (throttle-trigger-threshold 50 %), and so did one before it since the last step.
 * Returns whether to throttle now, and the count carried.
 */
export function triggerThrottle(m: PassMeasure, t: Throttle): { now: boolean; highPasses: number } {
  if (m.pagesFound * PAGE_SIZE > 0.5 * m.bytesSent && t.highPasses + 1 >= 2) return { now: true, highPasses: 0 };
  return { now: false, highPasses: m.pagesFound * PAGE_SIZE > 0.5 * m.bytesSent ? t.highPasses + 1 : t.highPasses };
}

const atLimits = (m: PassMeasure, p: ConvergenceParams, passesCount: boolean): boolean =>
  (passesCount && m.pass >= p.maxIterations) || m.elapsedMs >= p.timeoutMs;

/** Fail at the iteration or time limit. */
export const fail: Policy = (m, expectedMs, t, p) => ({
  decision: expectedMs <= p.downtimeLimitMs ? 'switchover' : atLimits(m, p, true) ? 'fail' : 'continue', throttle: t,
});

/** Switch over anyway at the iteration or time limit (the downtime is what it is). */
export const force: Policy = (m, expectedMs, t, p) => ({
  decision: expectedMs <= p.downtimeLimitMs || atLimits(m, p, true) ? 'switchover' : 'continue', throttle: t,
});

/** QEMU's auto-converge (mig_throttle_guest_down): cpu-throttle-initial 20 %, +10 % a step, at most 99 %; until the time limit. */
export const autoConverge: Policy = (m, expectedMs, t, p) => {
  if (expectedMs <= p.downtimeLimitMs) return { decision: 'switchover', throttle: t };
  const trig = triggerThrottle(m, t);
  const cpuPercent = trig.now ? (t.cpuPercent === 0 ? 20 : Math.min(99, t.cpuPercent + 10)) : t.cpuPercent;
  return { decision: atLimits(m, p, false) ? 'fail' : 'continue', throttle: { ...t, cpuPercent, highPasses: trig.highPasses } };
};

/** QEMU's dirty-limit capability (migration_dirty_limit_guest): every vCPU held to vcpu-dirty-limit, once; until the time limit. */
export const dirtyLimit: Policy = (m, expectedMs, t, p) => {
  if (expectedMs <= p.downtimeLimitMs) return { decision: 'switchover', throttle: t };
  const trig = triggerThrottle(m, t);
  const limit = trig.now && t.dirtyLimit === 0 ? p.vcpuDirtyLimit ?? DEFAULT_VCPU_DIRTY_LIMIT : t.dirtyLimit;
  return { decision: atLimits(m, p, false) ? 'fail' : 'continue', throttle: { ...t, dirtyLimit: limit, highPasses: trig.highPasses } };
};

export const POLICY: Record<ConvergencePolicy, Policy> = { fail, force, 'auto-converge': autoConverge, 'dirty-limit': dirtyLimit };

/** Why a migration that gave up did not converge. */
export function notConverged(pass: number, expectedMs: number, p: ConvergenceParams, t: Throttle): string {
  const held = t.cpuPercent ? `, throttle ${t.cpuPercent} %` : t.dirtyLimit ? `, dirty limit ${t.dirtyLimit} pages/s per vCPU` : '';
  return `did not converge in ${pass} passes (expected downtime ${expectedMs.toFixed(1)} ms > limit ${p.downtimeLimitMs} ms${held})`;
}
