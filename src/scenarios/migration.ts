import { MessageChannel } from 'node:worker_threads';
import { type TrackingMode, injectedBugs } from '../bugs/catalog.ts';
import { DeadlockError, DeterministicDriver, RandomScheduler } from '../drivers/deterministic.ts';
import { type FreeRunActor, runFreeRun } from '../drivers/free-run.ts';
import type { GeneratorRole, Role } from '../drivers/role.ts';
import type { WorkloadOptions } from '../guest/workload.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import { GlobalWord, type VmConfig, createVmLayout } from '../host/layout.ts';
import { VmmControl } from '../host/vmm.ts';
import { DEST_WORDS } from '../migration/channel.ts';
import type { MigrationBugs, MigrationEvent, MigrationInfo, MigrationParams, PassStats } from '../migration/precopy.ts';
import { type StampMismatch, compareMemory } from '../oracles/stamp-oracle.ts';
import { Prng } from '../util/prng.ts';
import { slotLayout } from './dirty-log-test.ts';
import { type RoleSpec, buildRole, roleName, vmFor } from './roles.ts';
import type { Driver } from './run-dirty-log-test.ts';

export interface MigrationScenario {
  tracking: TrackingMode;
  vcpus: number;
  memoryBytes: number;
  slots: number;
  ringEntries: number;
  workload: WorkloadOptions;
  seed: number;
  bugs: string[];
  hostWriteEvery: number;
  params: MigrationParams;
}

export interface MigrationRunOptions {
  driver: Driver;
  watchdogMs: number;
  burst: number;
  onEvent?: (e: MigrationEvent) => void;
  onTick?: (progress: number[], names: string[]) => void;
}

export interface MigrationRunResult {
  /** passed: completed and verified; failed: lost writes or the migration failed; stuck / crashed: did not complete. */
  status: 'passed' | 'failed' | 'stuck' | 'crashed';
  info: MigrationInfo | null;
  passes: PassStats[];
  reason: string | null;
  mismatches: StampMismatch[];
  mismatchCount: number;
  pagesCompared: number;
  errors: string[];
  seconds: number;
  steps?: number;
}

export function migrationVmConfig(s: MigrationScenario): VmConfig {
  const bugs = injectedBugs(s.bugs);
  const tracking: VmConfig['tracking'] = s.tracking === 'dirty-ring'
    ? { kind: 'ring', entries: s.ringEntries, withBitmap: s.hostWriteEvery > 0 && !bugs.noBackupBitmap }
    : { kind: 'bitmap', manualProtect: s.tracking === 'clear-log', initiallySet: false };
  return { slots: slotLayout(s.memoryBytes, s.slots), vcpus: s.vcpus, tracking };
}

export function migrationBugs(names: readonly string[]): MigrationBugs {
  return {
    copyBeforeReset: names.includes('copy-before-reset'),
    copyBeforeClear: names.includes('copy-before-clear'),
    skipFinalSync: names.includes('skip-final-sync'),
  };
}

/** Migrates a running, writing VM to an in-process destination and compares memory. */
export async function runMigration(s: MigrationScenario, o: MigrationRunOptions): Promise<MigrationRunResult> {
  const config = migrationVmConfig(s);
  const source = createVmLayout(config);
  const target = createVmLayout(config);
  const destWords = new SharedArrayBuffer(DEST_WORDS * 4);
  const vm = vmFor(source, s.bugs);
  vm.populate();
  vmFor(target, []).populate();
  Atomics.store(vm.global, GlobalWord.ITERATION, 1);
  new VmmControl(vm).resumeHost();

  const result: MigrationRunResult = {
    status: 'passed', info: null, passes: [], reason: null, mismatches: [], mismatchCount: 0, pagesCompared: 0, errors: [], seconds: 0,
  };
  const onEvent = (e: MigrationEvent): void => {
    if (e.kind === 'pass') result.passes.push(e.stats);
    else { result.info = e.info; if (e.kind === 'failed') { result.status = 'failed'; result.reason = e.reason; } }
    o.onEvent?.(e);
  };
  const specs: RoleSpec[] = [];
  for (let i = 0; i < s.vcpus; i++) specs.push({ kind: 'vcpu', index: i, workload: s.workload, seed: s.seed });
  if (s.hostWriteEvery > 0) specs.push({ kind: 'host-writer', every: s.hostWriteEvery, seed: s.seed });
  const started = performance.now();

  if (o.driver === 'deterministic') {
    const queue: Uint8Array[] = [];
    let driver: DeterministicDriver | null = null;
    const clock = () => driver?.stepCount ?? 0;
    specs.push({ kind: 'migration', params: s.params, bugs: s.bugs, destWords, queue, clockSteps: clock });
    specs.push({ kind: 'destination', layout: target, destWords, queue });
    const roles: Role[] = specs.map((spec) => buildRole(spec, vm, onEvent as (e: unknown) => void));
    const migration = roles[roles.length - 2] as GeneratorRole;
    driver = new DeterministicDriver(roles, new RandomScheduler(Prng.derive(s.seed, 3000)));
    try {
      driver.run(() => migration.finished);
    } catch (e) {
      if (!(e instanceof DeadlockError)) throw e;
      result.status = 'stuck';
      result.errors.push(e.message);
    }
    result.steps = driver.stepCount;
  } else {
    const { port1, port2 } = new MessageChannel();
    specs.push({ kind: 'migration', params: s.params, bugs: s.bugs, destWords, port: port1 });
    specs.push({ kind: 'destination', layout: target, destWords, port: port2 });
    const names = specs.map(roleName);
    const actors: FreeRunActor[] = specs.map((spec, i) => ({
      name: names[i]!,
      primary: spec.kind === 'migration',
      transfer: 'port' in spec && spec.port ? [spec.port] : [],
      data: { layout: spec.kind === 'destination' ? target : source, bugs: s.bugs, spec, burst: o.burst },
    }));
    const outcome = await runFreeRun(actors, {
      watchdogMs: o.watchdogMs,
      onEvent: (_a, e) => onEvent(e as MigrationEvent),
      onTick: o.onTick ? (p) => o.onTick!(p, names) : undefined,
    });
    if (outcome.status === 'watchdog') { result.status = 'stuck'; result.errors.push(outcome.report); }
    else if (outcome.status === 'crashed') { result.status = 'crashed'; result.errors.push(`${outcome.role} crashed: ${outcome.message}`); }
  }
  if (result.info?.status === 'completed') {
    const cmp = compareMemory(new GuestMemory(source), new GuestMemory(target));
    result.pagesCompared = cmp.pages;
    result.mismatches = cmp.mismatches;
    result.mismatchCount = cmp.count;
    if (cmp.count > 0) result.status = 'failed';
  } else if (result.status === 'passed') {
    result.status = 'failed';
    result.errors.push('the migration thread ended without completing');
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}
