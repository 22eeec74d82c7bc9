/**
 * The deterministic driver: steps per second on one thread.
 *
 *   tsx bench/deterministic.ts <dirty-log-test|vcpus>
 *
 * dirty-log-test: runDirtyLogTest with driver 'deterministic' (2 vCPUs, ring mode,
 *   1 MiB of guest memory so the collector's per-iteration verification is small, host
 *   writes on): the whole run, every role and the collector's checks included; figure =
 *   driver steps / wall time of the run.
 * vcpus: the DeterministicDriver with a RandomScheduler over two Vcpu roles directly
 *   (bitmap with manual protect, logging on, every page writable after a warm-up), so
 *   nearly every step is a vCPU phase.
 */
import { DeterministicDriver, RandomScheduler } from '../src/drivers/deterministic.ts';
import { DEFAULT_WORKLOAD, createWorkload } from '../src/guest/workload.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { GlobalWord } from '../src/host/layout.ts';
import { runDirtyLogTest } from '../src/scenarios/run-dirty-log-test.ts';
import { type Figure, BITMAP_MANUAL, caseArgs, consume, drive, emit, median, mps, now, singleSlotVm } from './harness.ts';

const REPS = 5;
const WARMUP = 2;
const TARGET = { kind: 'min', value: 1e6, text: '>= 1 M steps/s' } as const;

async function dirtyLogTest(): Promise<Figure> {
  const run = async (seed: number): Promise<{ steps: number; seconds: number }> => {
    const r = await runDirtyLogTest({
      mode: 'dirty-ring', vcpus: 2, memoryBytes: 1 << 20, slots: 1, iterations: 4, ringEntries: 1024,
      workload: DEFAULT_WORKLOAD, seed, bugs: [], opsPerIteration: 100_000, hostWriteEvery: 64,
    }, { driver: 'deterministic', watchdogMs: 10_000, burst: 256 });
    if (r.status !== 'passed') throw new Error(`dirty_log_test ${r.status}: ${r.errors.join('; ')}`);
    return { steps: r.steps!, seconds: r.seconds };
  };
  for (let i = 0; i < WARMUP; i++) await run(100 + i);
  const rates: number[] = [];
  let steps = 0;
  let seconds = 0;
  for (let i = 0; i < REPS; i++) {
    const r = await run(1 + i);
    rates.push(r.steps / r.seconds);
    steps = r.steps;
    seconds = r.seconds;
  }
  const rate = median(rates);
  return {
    id: 'deterministic/dirty-log-test',
    what: 'deterministic driver: runDirtyLogTest (2 vCPUs, ring, host writes, 1 MiB), whole run',
    figure: `${mps(rate)}steps/s`,
    value: rate,
    target: TARGET,
    detail: `4 iterations of 100000 guest writes; ~${(steps / 1e6).toFixed(2)} M steps in ~${seconds.toFixed(2)} s per run; median of ${REPS} seeds (${WARMUP} warm-up runs)`,
  };
}

function vcpus(): Figure {
  const pages = 1024;
  const vm = singleSlotVm(pages, 2, BITMAP_MANUAL);
  const slot = vm.memory.slots[0]!;
  drive(vm.enableDirtyLogging(slot));
  Atomics.store(vm.global, GlobalWord.ITERATION, 1);
  const ranges = [{ baseGfn: slot.baseGfn, pages }];
  const roles = [0, 1].map((i) => new Vcpu(vm, i, createWorkload(DEFAULT_WORKLOAD, ranges, i, 2, 5)));
  const driver = new DeterministicDriver(roles, new RandomScheduler(9));
  const STEPS = 2_000_000;
  const run = (): number => {
    const start = driver.stepCount;
    const t0 = now();
    driver.run(() => false, start + STEPS);
    const seconds = (now() - t0) / 1000;
    return STEPS / seconds;
  };
  for (let i = 0; i < WARMUP + 1; i++) run(); // the first pass also faults every page in
  const rates: number[] = [];
  for (let i = 0; i < REPS; i++) rates.push(run());
  consume(roles[0]!.retired + roles[1]!.retired);
  const rate = median(rates);
  const ops = roles[0]!.retired + roles[1]!.retired;
  return {
    id: 'deterministic/vcpus',
    what: 'deterministic driver over two Vcpu roles (random scheduler), steady state',
    figure: `${mps(rate)}steps/s`,
    value: rate,
    target: TARGET,
    detail: `bitmap (manual protect), 4 MiB, logging on; ${REPS} x ${STEPS / 1e6} M steps, median (${WARMUP + 1} warm-up); ${(driver.stepCount / ops).toFixed(2)} steps per guest write overall`,
  };
}

const [which = 'dirty-log-test'] = caseArgs();
emit([which === 'vcpus' ? vcpus() : await dirtyLogTest()]);
