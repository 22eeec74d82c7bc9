import { DeadlockError, DeterministicDriver, RandomScheduler, ReplayScheduler } from '../drivers/deterministic.ts';
import { type FreeRunActor, runFreeRun } from '../drivers/free-run.ts';
import { GeneratorRole, type Role } from '../drivers/role.ts';
import { createVmLayout } from '../host/layout.ts';
import { VmmControl } from '../host/vmm.ts';
import type { DirtyLogViolation } from '../oracles/dirty-log-verify.ts';
import { Prng } from '../util/prng.ts';
import { type DirtyLogEvent, type DirtyLogTestConfig, vmConfigFor } from './dirty-log-test.ts';
import { type RoleSpec, buildRole, roleName, vmFor } from './roles.ts';

export type Driver = 'free' | 'deterministic';

export interface DirtyLogRunOptions {
  driver: Driver;
  watchdogMs: number;
  /** Free-run: guest operations per vCPU burst. */
  burst: number;
  onEvent?: (e: DirtyLogEvent) => void;
  onTick?: (progress: number[], names: string[]) => void;
  /** Deterministic: replay this schedule instead of drawing one from the seed. */
  replay?: Uint8Array;
  /** Tests: make this role's worker throw after some steps. */
  crash?: { role: string; afterSteps: number };
}

export type IterationEvent = Extract<DirtyLogEvent, { kind: 'iteration' }>;

export interface DirtyLogRunResult {
  /** passed: verified; failed: a check failed; stuck: watchdog or deadlock; crashed: a worker threw. */
  status: 'passed' | 'failed' | 'stuck' | 'crashed';
  iterations: IterationEvent[];
  violations: DirtyLogViolation[];
  errors: string[];
  lostHostWrites: number;
  flushes: number;
  seconds: number;
  /** Deterministic driver: steps taken and the schedule that replays them. */
  steps?: number;
  schedule?: Uint8Array;
}

export function roleSpecs(c: DirtyLogTestConfig): RoleSpec[] {
  const specs: RoleSpec[] = [];
  for (let i = 0; i < c.vcpus; i++) specs.push({ kind: 'vcpu', index: i, workload: c.workload, seed: c.seed });
  if (c.hostWriteEvery > 0) specs.push({ kind: 'host-writer', every: c.hostWriteEvery, seed: c.seed });
  specs.push({ kind: 'dirty-log-collector', config: c });
  return specs;
}

/** Runs dirty_log_test under either driver and gathers what the collector reported. */
export async function runDirtyLogTest(c: DirtyLogTestConfig, o: DirtyLogRunOptions): Promise<DirtyLogRunResult> {
  const layout = createVmLayout(vmConfigFor(c));
  const setupVm = vmFor(layout, c.bugs);
  setupVm.populate();
  const vmm = new VmmControl(setupVm);
  for (let v = 0; v < c.vcpus; v++) vmm.requestStop(v); // vCPUs wait for iteration 1
  vmm.pauseHost();

  const result: DirtyLogRunResult = {
    status: 'passed', iterations: [], violations: [], errors: [], lostHostWrites: 0, flushes: 0, seconds: 0,
  };
  const onEvent = (e: DirtyLogEvent): void => {
    if (e.kind === 'iteration') result.iterations.push(e);
    else if (e.kind === 'violation') { result.violations.push(...e.violations); result.status = 'failed'; }
    else if (e.kind === 'error') { result.errors.push(e.message); result.status = 'failed'; }
    else { result.lostHostWrites = e.lostHostWrites; result.flushes = e.flushes; }
    o.onEvent?.(e);
  };
  const specs = roleSpecs(c);
  const started = performance.now();

  if (o.driver === 'deterministic') {
    const roles: Role[] = specs.map((s) => buildRole(s, setupVm, onEvent));
    const collector = roles[roles.length - 1] as GeneratorRole;
    const scheduler = o.replay ? new ReplayScheduler(o.replay) : new RandomScheduler(Prng.derive(c.seed, 3000));
    const driver = new DeterministicDriver(roles, scheduler);
    try {
      driver.run(() => collector.finished);
    } catch (e) {
      if (!(e instanceof DeadlockError)) throw e;
      result.status = 'stuck';
      result.errors.push(e.message);
    }
    result.steps = driver.stepCount;
    result.schedule = driver.recorded;
  } else {
    const names = specs.map(roleName);
    const actors: FreeRunActor[] = specs.map((spec, i) => ({
      name: names[i]!,
      primary: spec.kind === 'dirty-log-collector',
      data: {
        layout, bugs: c.bugs, spec, burst: o.burst,
        crashAfterSteps: o.crash?.role === names[i] ? o.crash.afterSteps : undefined,
      },
    }));
    const outcome = await runFreeRun(actors, {
      watchdogMs: o.watchdogMs,
      onEvent: (_actor, e) => onEvent(e as DirtyLogEvent),
      onTick: o.onTick ? (p) => o.onTick!(p, names) : undefined,
    });
    if (outcome.status === 'watchdog') { result.status = 'stuck'; result.errors.push(outcome.report); }
    else if (outcome.status === 'crashed') { result.status = 'crashed'; result.errors.push(`${outcome.role} crashed: ${outcome.message}`); }
  }
  if (result.status === 'passed' && result.iterations.length < c.iterations) {
    result.status = 'failed';
    result.errors.push(`the collector stopped after ${result.iterations.length} of ${c.iterations} iterations`);
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}
