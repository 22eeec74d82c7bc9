import { heartbeatStarted } from '../drivers/wedge-watch.ts';
import type { Strategy } from '../drivers/strategy.ts';
import { type MigrationRunOptions, type MigrationScenario, runMigration } from '../scenarios/migration.ts';
import { type Failure, failureOf, fingerprint } from './failure.ts';

/** One run of a hunt: a scenario with one seed, under a strategy of the deterministic driver or under free-run. */
export interface HuntTask {
  scenario: MigrationScenario;
  strategy: Strategy | 'free';
  seed: number;
  watchdogMs: number;
  burst: number;
  /** Deterministic: replay this schedule instead (vmemlab replay, shrinking). */
  replay?: Uint8Array;
  /** Deterministic: the driver's heartbeat ([0] steps, [1] the role stepping, [2] 1 once the task started, 2 once the driver stopped stepping), watched by the hunt's thread. */
  heartbeat?: SharedArrayBuffer;
  /** Tests only: crash or wedge one role after some steps. */
  fault?: MigrationRunOptions['fault'];
}

export interface HuntRun {
  seed: number;
  strategy: Strategy | 'free';
  failure: Failure | null;
  /** Deterministic: steps the run took. */
  steps: number | null;
  seconds: number;
  fingerprint: string;
  /** Deterministic failures: the schedule that replays them. */
  schedule: Uint8Array | null;
  /** Whether an injected bug acted in the run (null: none injected). */
  acted: boolean | null;
  /** Pool runs: the bytes of ArrayBuffers and SharedArrayBuffers its worker still held from earlier runs when this one began (after a collection). */
  heldBytes?: number;
}

/** Runs one task (on a pool worker, or in-process). */
export async function runHuntTask(t: HuntTask): Promise<HuntRun> {
  if (t.heartbeat) heartbeatStarted(t.heartbeat);
  const strategy = t.strategy === 'free' ? undefined : t.strategy;
  const free = strategy === undefined;
  const r = await runMigration({ ...t.scenario, seed: t.seed }, {
    driver: free ? 'free' : 'deterministic', strategy, replay: t.replay,
    watchdogMs: t.watchdogMs, burst: t.burst, resumeOps: 0, heartbeat: t.heartbeat, fault: t.fault,
  });
  const failure = failureOf(r);
  return {
    seed: t.seed, strategy: t.strategy, failure, steps: r.steps ?? null, seconds: r.seconds, fingerprint: fingerprint(r),
    schedule: failure !== null && !free ? r.schedule ?? null : null,
    acted: r.injections.length ? r.injections.some((x) => x.acted > 0) : null,
  };
}

export default runHuntTask;
