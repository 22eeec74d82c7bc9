import { spawnWorker } from '../drivers/spawn.ts';
import { heartbeatStarted, watchWedged } from '../drivers/wedge-watch.ts';
import { UserError } from '../util/errors.ts';
import type { MigrationEvent } from '../migration/migration-stats.ts';
import type { DirtyLogEvent, DirtyLogTestConfig } from './dirty-log-test.ts';
import { type MigrationRunOptions, type MigrationRunResult, type MigrationScenario, roleNames, runMigration } from './migration.ts';
import { type DirtyLogRunOptions, type DirtyLogRunResult, roleSpecs, runDirtyLogTest } from './run-dirty-log-test.ts';
import { roleName } from './roles.ts';
import { type MdevConfig, type MdevResult, type MdevRunOptions, mdevRoleSpecs, mdevSetup, runMdev } from './mdev.ts';

/**
 * Deterministic runs of the commands (migrate, dirty-log-test, replay) step on a thread of
 * their own while this one watches: the deterministic driver runs every role on one thread,
 * so a step that never returns would hang the thread it runs on, with nothing left to
 * notice, and Ctrl-C would wait for the run to end. Off the main thread, a watchdog names
 * the role that stopped stepping and terminates the thread, and Ctrl-C ends the run at once.
 */

/** What crosses to the run's thread: the options that are data (no callbacks, signals or VMs). */
type MigrationData = Pick<MigrationRunOptions, 'driver' | 'watchdogMs' | 'burst' | 'strategy' | 'replay' | 'replayThenStrategy' | 'resumeOps' | 'fault'>;
type DirtyLogData = Pick<DirtyLogRunOptions, 'driver' | 'watchdogMs' | 'burst' | 'strategy' | 'replay' | 'fault'>;
type MdevData = Pick<MdevRunOptions, 'driver' | 'watchdogMs' | 'burst' | 'strategy' | 'replay' | 'fault'>;

export type OffThreadTask =
  | { kind: 'migration'; scenario: MigrationScenario; options: MigrationData }
  | { kind: 'dirty-log-test'; config: DirtyLogTestConfig; options: DirtyLogData }
  | { kind: 'mdev'; config: MdevConfig; options: MdevData };

type Message =
  | { type: 'event'; event: MigrationEvent | DirtyLogEvent }
  | { type: 'result'; result: MigrationRunResult | DirtyLogRunResult | MdevResult }
  | { type: 'error'; name: string; message: string; stack?: string };

/** The run's side (workers/deterministic-run.ts): runs the task, posting its events and then its result or error. */
export async function runOffThreadTask(task: OffThreadTask, heartbeat: SharedArrayBuffer, post: (m: Message) => void): Promise<void> {
  heartbeatStarted(heartbeat);
  const onEvent = (event: MigrationEvent | DirtyLogEvent): void => post({ type: 'event', event });
  try {
    const result = task.kind === 'migration'
      ? await runMigration(task.scenario, { ...task.options, heartbeat, onEvent })
      : task.kind === 'mdev'
        ? await runMdev(task.config, { ...task.options, heartbeat })
        : await runDirtyLogTest(task.config, { ...task.options, heartbeat, onEvent });
    post({ type: 'result', result });
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    post({ type: 'error', name: err.name, message: err.message, stack: err.stack });
  }
}

interface Watch {
  watchdogMs: number;
  onEvent?: (e: MigrationEvent | DirtyLogEvent) => void;
  cancel?: AbortSignal;
}

type Ended = { how: 'result'; result: MigrationRunResult | DirtyLogRunResult | MdevResult } | { how: 'stuck'; error: string; steps?: number; seconds: number };

/** Runs a task on its own thread under the wedge watchdog; a UserError thrown there is thrown here as one. */
function runWatched(task: OffThreadTask, names: readonly string[], o: Watch): Promise<Ended> {
  return new Promise<Ended>((resolve, reject) => {
    let result: Ended | null = null;
    let failed: Error | null = null;
    let cancelled = false;
    const started = performance.now();
    const watch = watchWedged(names, o.watchdogMs, () => void worker.terminate());
    const worker = spawnWorker('deterministic-run', { task, heartbeat: watch.heartbeat });
    const onAbort = (): void => { cancelled = true; void worker.terminate(); };
    o.cancel?.addEventListener('abort', onAbort, { once: true });
    worker.on('message', (m: Message) => {
      if (m.type === 'event') o.onEvent?.(m.event);
      else {
        if (m.type === 'result') result = { how: 'result', result: m.result };
        else failed = m.name === 'UserError' ? new UserError(m.message) : Object.assign(new Error(m.message), { name: m.name, stack: m.stack });
        void worker.terminate(); // its run is over; nothing it left behind (a timer) keeps it
      }
    });
    worker.on('error', (e) => { failed ??= e; });
    worker.on('exit', (code) => {
      o.cancel?.removeEventListener('abort', onAbort);
      const wedged = watch.stop();
      const seconds = (performance.now() - started) / 1000;
      if (wedged) resolve({ how: 'stuck', error: `watchdog: ${wedged.summary} (the deterministic driver steps one role at a time: every other role waits for it)`, steps: wedged.steps, seconds });
      else if (failed) reject(failed);
      else if (result) resolve(result);
      else if (cancelled) resolve({ how: 'stuck', error: 'cancelled (Ctrl-C) before it finished', seconds });
      else reject(new Error(`the deterministic run's thread exited (code ${code}) without a result`));
    });
  });
}

/** runMigration; under the deterministic driver on a watched thread of its own (options that are callbacks other than onEvent, or a VM, keep it here). */
export async function runMigrationWatched(s: MigrationScenario, o: MigrationRunOptions): Promise<MigrationRunResult> {
  if (o.driver !== 'deterministic' || o.prepare || o.onStep || o.heartbeat) return runMigration(s, o);
  const { driver, watchdogMs, burst, strategy, replay, replayThenStrategy, resumeOps, fault } = o;
  const options: MigrationData = { driver, watchdogMs, burst, strategy, replay, replayThenStrategy, resumeOps, fault };
  const end = await runWatched({ kind: 'migration', scenario: s, options }, roleNames(s), { watchdogMs, cancel: o.cancel, onEvent: o.onEvent as Watch['onEvent'] });
  if (end.how === 'result') return end.result as MigrationRunResult;
  return {
    status: 'stuck', info: null, passes: [], reason: null, mismatches: [], mismatchCount: 0, pagesCompared: 0,
    errors: [end.error], seconds: end.seconds, steps: end.steps, injections: [],
  };
}

/** runDirtyLogTest; under the deterministic driver on a watched thread of its own. */
export async function runDirtyLogTestWatched(c: DirtyLogTestConfig, o: DirtyLogRunOptions & { cancel?: AbortSignal }): Promise<DirtyLogRunResult> {
  if (o.driver !== 'deterministic' || o.heartbeat) return runDirtyLogTest(c, o);
  const { driver, watchdogMs, burst, strategy, replay, fault } = o;
  const iterations: Extract<DirtyLogEvent, { kind: 'iteration' }>[] = [];
  const onEvent = (e: DirtyLogEvent): void => { if (e.kind === 'iteration') iterations.push(e); o.onEvent?.(e); };
  const end = await runWatched({ kind: 'dirty-log-test', config: c, options: { driver, watchdogMs, burst, strategy, replay, fault } },
    roleSpecs(c).map(roleName), { watchdogMs, onEvent: onEvent as Watch['onEvent'], cancel: o.cancel });
  if (end.how === 'result') return end.result as DirtyLogRunResult;
  return {
    status: 'stuck', iterations, violations: [], errors: [end.error], lostHostWrites: 0, ringHardFull: 0, flushes: 0,
    seconds: end.seconds, steps: end.steps, injections: [], vcpus: [],
  };
}

/** runMdev; under the deterministic driver on a watched thread of its own. */
export async function runMdevWatched(c: MdevConfig, o: MdevRunOptions & { cancel?: AbortSignal }): Promise<MdevResult> {
  if (o.driver !== 'deterministic' || o.heartbeat) return runMdev(c, o);
  const { driver, watchdogMs, burst, strategy, replay, fault } = o;
  const end = await runWatched({ kind: 'mdev', config: c, options: { driver, watchdogMs, burst, strategy, replay, fault } },
    mdevRoleSpecs(c, mdevSetup(c)).map(roleName), { watchdogMs, cancel: o.cancel });
  if (end.how === 'result') return end.result as MdevResult;
  return { status: 'stuck', vms: [], vendor: null, migration: null, injections: [], errors: [end.error], seconds: end.seconds, steps: end.steps };
}
