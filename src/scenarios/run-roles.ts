import { heartbeatStopped } from '../drivers/wedge-watch.ts';
import { DeadlockError, DeterministicDriver } from '../drivers/deterministic.ts';
import { type Strategy, schedulerFor } from '../drivers/strategy.ts';
import { type FreeRunActor, runFreeRun } from '../drivers/free-run.ts';
import { type InjectedFault, actOnFault } from '../drivers/actor-words.ts';
import type { GeneratorRole, Role } from '../roles/role.ts';
import type { VmLayout } from '../host/layout.ts';
import type { Vm } from '../host/vm.ts';
import { type RoleSpec, buildRole, roleName } from './roles.ts';

export type Driver = 'free' | 'deterministic';

export interface RunRolesOptions {
  driver: Driver;
  specs: RoleSpec[];
  /** The run ends when this role finishes. */
  primary: RoleSpec['kind'];
  /** Deterministic: the one Vm view every role shares. Free-run: each worker builds its own. */
  vm: Vm;
  /** Deterministic, several VMs: the view of the VM a role belongs to (default: `vm`). */
  vmOf?: (spec: RoleSpec) => Vm;
  /** Free-run: the layout a role's worker maps (a destination has its own). */
  layoutOf: (spec: RoleSpec) => VmLayout;
  bugs: string[];
  seed: number;
  onEvent: (e: unknown) => void;
  watchdogMs: number;
  burst: number;
  onTick?: (progress: number[], names: string[]) => void;
  replay?: Uint8Array;
  /** Deterministic: how the scheduler picks (default random). */
  strategy?: Strategy;
  /** Deterministic with `replay`: once the schedule ends, the strategy finishes the run (instead of stopping it). */
  replayThenStrategy?: boolean;
  /** Deterministic: called after every step with its number and the role's name. */
  onStep?: (stepNo: number, role: string) => void;
  /** Tests only: crash or wedge one role after some steps. */
  fault?: { role: string } & InjectedFault;
  /** Deterministic: the driver's heartbeat for a watchdog on another thread (DeterministicDriver.heartbeat). */
  heartbeat?: SharedArrayBuffer;
  /** Free-run: aborting it ends the run at once (Ctrl-C), as stuck, with the reason. */
  cancel?: AbortSignal;
  /** Deterministic: receives the driver before it runs (step clocks read its step count). */
  onDriver?: (d: DeterministicDriver) => void;
}

export interface RunRolesOutcome {
  /** done: the primary role finished; stuck: watchdog or deadlock; crashed: a worker threw. */
  status: 'done' | 'stuck' | 'crashed';
  errors: string[];
  steps?: number;
  schedule?: Uint8Array;
}

/** Tests only: the role, with a crash or a step that never returns after some steps (the deterministic driver's side of InjectedFault). */
function faulty(role: Role, fault: InjectedFault): Role {
  let steps = 0;
  const step = role.step.bind(role);
  role.step = () => {
    if (steps++ === fault.afterSteps) actOnFault(role.name, fault);
    return step();
  };
  return role;
}

/** Runs a set of roles under either driver until the primary role finishes. */
export async function runRoles(o: RunRolesOptions): Promise<RunRolesOutcome> {
  if (o.driver === 'deterministic') {
    // vCPUs pace themselves (dirty limit, operation rate) and the collector times iterations by the step clock.
    let driver: DeterministicDriver | null = null;
    const clockSteps = (): number => driver?.stepCount ?? 0;
    const specs = o.specs.map((s) => (s.kind === 'vcpu' || s.kind === 'dirty-log-collector' || s.kind === 'vendor-driver' ? { ...s, clockSteps } : s));
    const roles: Role[] = specs.map((s) => {
      const role = buildRole(s, o.vmOf?.(s) ?? o.vm, o.onEvent as (e: never) => void);
      return o.fault?.role === roleName(s) ? faulty(role, o.fault) : role;
    });
    const primary = roles[o.specs.findIndex((s) => s.kind === o.primary)] as GeneratorRole;
    const scheduler = schedulerFor(o.strategy ?? 'random', o.seed, roles.length, o.replay, o.replayThenStrategy);
    driver = new DeterministicDriver(roles, scheduler);
    if (o.heartbeat) driver.heartbeat = new Int32Array(o.heartbeat);
    if (o.onStep) {
      const onStep = o.onStep;
      driver.onStep = (n, r) => onStep(n, roles[r]!.name);
    }
    o.onDriver?.(driver);
    const out: RunRolesOutcome = { status: 'done', errors: [] };
    try {
      driver.run(() => primary.finished);
    } catch (e) {
      if (!(e instanceof DeadlockError)) throw e;
      out.status = 'stuck';
      out.errors.push(e.message);
    } finally {
      // Stepping is over; what follows (the memory comparison) takes no steps and is not a wedge.
      if (o.heartbeat) heartbeatStopped(o.heartbeat);
    }
    out.steps = driver.stepCount;
    out.schedule = driver.recorded;
    return out;
  }
  const names = o.specs.map(roleName);
  const actors: FreeRunActor[] = o.specs.map((spec, i) => ({
    name: names[i]!,
    primary: spec.kind === o.primary,
    transfer: 'port' in spec && spec.port ? [spec.port] : [],
    data: {
      layout: o.layoutOf(spec), bugs: o.bugs, spec, burst: o.burst,
      fault: o.fault?.role === names[i] ? { afterSteps: o.fault.afterSteps, kind: o.fault.kind } : undefined,
    },
  }));
  const outcome = await runFreeRun(actors, {
    watchdogMs: o.watchdogMs,
    cancel: o.cancel,
    onEvent: (_actor, e) => o.onEvent(e),
    onTick: o.onTick ? (p) => o.onTick!(p, names) : undefined,
  });
  if (outcome.status === 'watchdog') return { status: 'stuck', errors: [outcome.report] };
  if (outcome.status === 'cancelled') return { status: 'stuck', errors: ['cancelled (Ctrl-C) before it finished'] };
  if (outcome.status === 'crashed') return { status: 'crashed', errors: [`${outcome.role} crashed: ${outcome.message}`] };
  return { status: 'done', errors: [] };
}
