import { GlobalWord, createVmLayout } from '../host/layout.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import type { DirtyLogViolation } from '../oracles/dirty-log-verify.ts';
import { type InjectionReport, injectionReport } from '../bugs/acted.ts';
import { type VcpuRate, dirtyLimits, vcpuCounters, vcpuRates } from '../host/vmm/vcpu-stats.ts';
import { type DirtyLogEvent, type DirtyLogTestConfig, vmConfigFor } from './dirty-log-test.ts';
import { type RoleSpec, vmFor } from './roles.ts';
import { type Driver, type RunRolesOptions, runRoles } from './run-roles.ts';

export type { Driver };
import type { Strategy } from '../drivers/strategy.ts';

export interface DirtyLogRunOptions {
  driver: Driver;
  watchdogMs: number;
  /** Free-run: guest operations per vCPU burst. */
  burst: number;
  onEvent?: (e: DirtyLogEvent) => void;
  onTick?: (progress: number[], names: string[]) => void;
  /** Deterministic: replay this schedule instead of drawing one from the seed. */
  replay?: Uint8Array;
  /** Deterministic: the scheduling strategy (default random). */
  strategy?: Strategy;
  /** Tests only: crash or wedge one role after some steps. */
  fault?: RunRolesOptions['fault'];
  /** Deterministic: the driver's heartbeat, for a watchdog on another thread (src/scenarios/off-thread.ts). */
  heartbeat?: SharedArrayBuffer;
}

export type IterationEvent = Extract<DirtyLogEvent, { kind: 'iteration' }>;

export interface DirtyLogRunResult {
  /** passed: verified; failed: a check failed; stuck: watchdog or deadlock; crashed: a worker threw. */
  status: 'passed' | 'failed' | 'stuck' | 'crashed';
  iterations: IterationEvent[];
  violations: DirtyLogViolation[];
  errors: string[];
  lostHostWrites: number;
  /** Pushes into a full ring (KVM's WARN_ON_ONCE in kvm_dirty_ring_push). */
  ringHardFull: number;
  flushes: number;
  seconds: number;
  /** Deterministic driver: steps taken and the schedule that replays them. */
  steps?: number;
  schedule?: Uint8Array;
  /** How often each injected bug acted. */
  injections: InjectionReport[];
  /** Each vCPU's achieved operation and dirty page rates over the run (step-clock seconds under the deterministic driver). */
  vcpus: VcpuRate[];
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
    status: 'passed', iterations: [], violations: [], errors: [], lostHostWrites: 0, ringHardFull: 0, flushes: 0, seconds: 0,
    injections: [], vcpus: [],
  };
  const onEvent = (e: DirtyLogEvent): void => {
    if (e.kind === 'iteration') result.iterations.push(e);
    else if (e.kind === 'violation') { result.violations.push(...e.violations); result.status = 'failed'; }
    else if (e.kind === 'error') { result.errors.push(e.message); result.status = 'failed'; }
    o.onEvent?.(e);
  };
  if (c.dirtyLimit) vmm.setDirtyLimit(c.dirtyLimit);
  const countersAtStart = vcpuCounters(vmm);
  const specs = roleSpecs(c);
  const started = performance.now();

  const run = await runRoles({
    driver: o.driver, specs, primary: 'dirty-log-collector', vm: setupVm, layoutOf: () => layout, bugs: c.bugs, seed: c.seed,
    onEvent: (e) => onEvent(e as DirtyLogEvent), watchdogMs: o.watchdogMs, burst: o.burst, onTick: o.onTick, replay: o.replay, strategy: o.strategy, fault: o.fault, heartbeat: o.heartbeat,
  });
  if (run.status !== 'done') result.status = run.status;
  result.errors.push(...run.errors);
  result.steps = run.steps;
  result.schedule = run.schedule;
  // KVM's own counters, read from shared memory whatever way the run ended.
  result.lostHostWrites = setupVm.lostHostWrites();
  result.flushes = Atomics.load(setupVm.global, GlobalWord.FLUSHES);
  result.ringHardFull = (setupVm.rings ?? []).reduce((n, r) => n + r.hardFullWarnings, 0);
  result.injections = injectionReport(setupVm, c.bugs);
  // Over the time the vCPUs ran (each iteration from release to stop), by the run's clock.
  const ms = result.iterations.reduce((n, it) => n + it.ms, 0);
  result.vcpus = vcpuRates(countersAtStart, vcpuCounters(vmm), ms, dirtyLimits(vmm));
  if (result.status === 'passed' && result.iterations.length < c.iterations) {
    result.status = 'failed';
    result.errors.push(`the collector stopped after ${result.iterations.length} of ${c.iterations} iterations`);
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}
