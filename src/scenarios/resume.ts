import type { WorkloadOptions } from '../guest/workload.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import { GlobalWord, type VmLayout, VcpuWord } from '../host/layout.ts';
import { type SweepCheck, checkSweepPattern } from '../oracles/sweep-pattern.ts';
import { type RoleSpec, vmFor } from './roles.ts';
import { type Driver, runRoles } from './run-roles.ts';

/** How long a resumed guest runs by default: 1.5 passes over each vCPU's share of memory (every page written again, and a sweep crosses the end of its slice). */
export function defaultResumeOps(pages: number, vcpus: number): number {
  return Math.ceil((1.5 * pages) / vcpus);
}

export interface ResumeOptions {
  workload: WorkloadOptions;
  seed: number;
  /** Operations every vCPU retires after the resume before the guest is stopped; 0: it stays paused (QEMU's -S). */
  opsPerVcpu: number;
  driver: Driver;
  watchdogMs: number;
  burst: number;
  /** Run the sweep-pattern oracle (the guest is migration-test's sweep, and nothing else wrote its bytes). */
  sweepCheck: boolean;
  /** Aborting it stops the resumed guest at once (Ctrl-C): the run ends stuck, unchecked. */
  cancel?: AbortSignal;
}

/** What happened on the destination after the migration completed. */
export interface DestinationRun {
  /** passed: resumed (or left paused) and every check held; failed: a check did not hold; stuck / crashed: the resumed guest did not finish. */
  status: 'passed' | 'failed' | 'stuck' | 'crashed';
  /** The sweep-pattern oracle right after completion, before the resume (null unless asked for). */
  atCompletion: SweepCheck | null;
  /** The same after the resumed guest ran and was stopped. */
  afterResume: SweepCheck | null;
  /** The resumed run: operations its vCPUs retired, and how long it took (thread start-up included). */
  resumed: { vcpus: number; ops: number; seconds: number; steps?: number } | null;
  errors: string[];
}

/**
 * The destination after a completed migration: checks the sweep pattern (when the guest
 * is migration-test's), resumes the guest on its own vCPUs, continuing the workload from
 * the migrated memory (resume.ts in src/guest), lets it run, stops it, checks again.
 * `layout` is the destination's memory, which nothing else may write meanwhile.
 */
export async function resumeDestination(layout: VmLayout, o: ResumeOptions): Promise<DestinationRun> {
  const memory = new GuestMemory(layout);
  const vcpus = layout.config.vcpus;
  const sweep = o.sweepCheck;
  const out: DestinationRun = { status: 'passed', atCompletion: null, afterResume: null, resumed: null, errors: [] };
  if (sweep) {
    out.atCompletion = checkSweepPattern(memory, vcpus);
    if (!out.atCompletion.ok) out.status = 'failed';
  }
  if (o.opsPerVcpu === 0) return out;

  const vm = vmFor(layout, []);
  vm.populate();
  Atomics.store(vm.global, GlobalWord.ITERATION, 1); // what the source's guest saw (runMigration)
  const specs: RoleSpec[] = [];
  for (let i = 0; i < vcpus; i++) specs.push({ kind: 'vcpu', index: i, workload: o.workload, seed: o.seed, resume: true });
  specs.push({ kind: 'destination-vmm', opsPerVcpu: o.opsPerVcpu });
  const started = performance.now();
  const run = await runRoles({
    driver: o.driver, specs, primary: 'destination-vmm', vm, layoutOf: () => layout, bugs: [], seed: o.seed,
    onEvent: () => {}, watchdogMs: o.watchdogMs, burst: o.burst, cancel: o.cancel,
  });
  let ops = 0;
  for (let v = 0; v < vcpus; v++) ops += Atomics.load(vm.vcpuWords, vm.vcpuBase(v) + VcpuWord.OPS);
  out.resumed = { vcpus, ops, seconds: (performance.now() - started) / 1000, steps: run.steps };
  if (run.status !== 'done') {
    out.status = run.status;
    out.errors.push(...run.errors.map((e) => `destination: ${e}`));
    return out;
  }
  if (sweep) {
    out.afterResume = checkSweepPattern(memory, vcpus);
    if (!out.afterResume.ok) out.status = 'failed';
  }
  return out;
}
