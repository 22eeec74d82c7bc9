import { PAGE_SIZE } from '../host/constants.ts';
import { CATALOG } from '../bugs/catalog.ts';
import { MAX_STAMP_ITERATION } from '../host/memslot.ts';
import { DEFAULT_WORKLOAD, parseWorkloadName } from '../guest/workload.ts';
import { describeViolation } from '../oracles/dirty-log-verify.ts';
import type { DirtyLogEvent, DirtyLogTestConfig } from '../scenarios/dirty-log-test.ts';
import { type Driver, type DirtyLogRunResult, runDirtyLogTest } from '../scenarios/run-dirty-log-test.ts';
import { UserError } from '../util/errors.ts';
import { formatSize } from '../util/size.ts';
import { MAX_OP_RATE, bugsAndMode, dirtyRate, fraction, int, memory, positive, ringSize } from './flags.ts';
import { Progress } from './progress.ts';
import { describeIdleBugs } from '../bugs/acted.ts';
import { dirtyLogOutcome } from '../scenarios/outcome.ts';
import { type Expected, checkExpectation } from './expectation.ts';
import { describeVcpuRates } from './vcpu-rates.ts';

export { MODES } from './flags.ts';

/** The options as commander hands them over (strings, or defaults). */
export interface DirtyLogTestFlags {
  mode?: string;
  vcpus: string;
  memory: string;
  slots: string;
  iterations: string;
  ringSize: string;
  workload: string;
  hotFraction: string;
  hotShare: string;
  writePercent: string;
  randomOrder?: boolean;
  writes?: string;
  hostWriteEvery: string;
  driver: string;
  seed: string;
  inject: string[];
  json?: boolean;
  watchdog: string;
  burst: string;
  dirtyLimit?: string;
  opRate?: string;
}

export const DIRTY_LOG_TEST_DEFAULTS = {
  vcpus: '2', memory: '256MiB', slots: '1', iterations: '6', ringSize: '4096', workload: 'random',
  hotFraction: String(DEFAULT_WORKLOAD.hotFraction), hotShare: String(DEFAULT_WORKLOAD.hotShare),
  writePercent: String(DEFAULT_WORKLOAD.writePercent), hostWriteEvery: '64', driver: 'free', seed: '1',
  watchdog: '10', burst: '256',
} as const;

/**
 * The flags a dirty_log_test runs with: what was given, else the injected bugs'
 * demonstration settings (the first bug's win), else the command's defaults.
 */
export function dirtyLogTestFlags(given: Partial<DirtyLogTestFlags>): DirtyLogTestFlags {
  const defined = Object.fromEntries(Object.entries(given).filter(([, v]) => v !== undefined));
  const demos = (given.inject ?? []).map((n) => CATALOG.find((b) => b.name === n)?.dirtyLogTestDemo ?? {}).reverse();
  return { ...DIRTY_LOG_TEST_DEFAULTS, inject: [], ...Object.assign({}, ...demos), ...defined } as DirtyLogTestFlags;
}

/** Turns flags into a validated configuration; every mistake names the flag and the value. */
export function dirtyLogTestConfig(f: DirtyLogTestFlags): { config: DirtyLogTestConfig; driver: Driver; watchdogMs: number; burst: number } {
  const { bugs, mode } = bugsAndMode('dirty-log-test', f.inject, '--mode', f.mode);
  const memoryBytes = memory('--memory', f.memory);
  const slots = int('--slots', f.slots, 1, 32767);
  if (memoryBytes / PAGE_SIZE < slots) throw new UserError(`--slots: ${slots} slots do not fit in ${f.memory} (${memoryBytes / PAGE_SIZE} pages)`);
  const ringEntries = ringSize('--ring-size', f.ringSize);
  const driver = f.driver;
  if (driver !== 'free' && driver !== 'deterministic') throw new UserError(`--driver: unknown driver '${driver}' (free or deterministic)`);
  const vcpus = int('--vcpus', f.vcpus, 1, 64);
  const hostWriteEvery = int('--host-write-every', f.hostWriteEvery, 0);
  const needsHost = bugs.find((b) => b.needsHostWrites);
  if (needsHost && hostWriteEvery === 0) throw new UserError(`--inject ${needsHost.name}: needs host writes; --host-write-every must not be 0`);
  const pages = memoryBytes / PAGE_SIZE;
  const defaultWrites = driver === 'deterministic' ? Math.min(4096, pages * 2) : Math.max(20000, Math.min(200000, pages));
  const config: DirtyLogTestConfig = {
    mode, vcpus, memoryBytes, slots, ringEntries,
    iterations: int('--iterations', f.iterations, 1, MAX_STAMP_ITERATION), // the page stamp holds 16 bits of it
    workload: {
      name: parseWorkloadName(f.workload, '--workload'),
      hotFraction: fraction('--hot-fraction', f.hotFraction),
      hotShare: fraction('--hot-share', f.hotShare),
      writePercent: int('--write-percent', f.writePercent, 0, 100),
      randomOrder: f.randomOrder === true,
      opRate: f.opRate !== undefined ? int('--op-rate', f.opRate, 1, MAX_OP_RATE) : 0,
    },
    dirtyLimit: f.dirtyLimit !== undefined ? dirtyRate('--dirty-limit', f.dirtyLimit) : 0,
    seed: int('--seed', f.seed, 0, 0xffffffff),
    bugs: bugs.map((b) => b.name),
    opsPerIteration: f.writes !== undefined ? int('--writes', f.writes, 1) : defaultWrites,
    hostWriteEvery,
  };
  return { config, driver, watchdogMs: positive('--watchdog', f.watchdog, 'seconds') * 1000, burst: int('--burst', f.burst, 1, 1 << 20) };
}

export function describeConfig(c: DirtyLogTestConfig, driver: Driver): string {
  const tracking = c.mode === 'dirty-ring' ? `dirty-ring (${c.ringEntries} entries)` : c.mode;
  const bugs = c.bugs.length ? `, injected: ${c.bugs.join(', ')}` : '';
  return `dirty_log_test: mode ${tracking}, ${c.vcpus} vCPUs, ${formatSize(c.memoryBytes)} in ${c.slots} slot(s), ` +
    `workload ${c.workload.name}, ${c.iterations} iterations of ${c.opsPerIteration} writes, driver ${driver}, seed ${c.seed}${bugs}`;
}

function iterationLine(e: Extract<DirtyLogEvent, { kind: 'iteration' }>): string {
  return `Iteration ${e.iteration}: dirty ${e.dirty} clean ${e.clean} writes ${e.writes}` +
    (e.hostWrites ? ` host-writes ${e.hostWrites}` : '') + (e.ringFullExits ? ` ring-full-exits ${e.ringFullExits}` : '');
}

/** Exit status: 0 verified, 1 a check failed, 3 the run did not complete (watchdog, deadlock, crash). */
export function exitStatus(r: DirtyLogRunResult): number {
  return r.status === 'passed' ? 0 : r.status === 'failed' ? 1 : 3;
}

export async function dirtyLogTestCommand(given: Partial<DirtyLogTestFlags>, expected?: Expected): Promise<number> {
  const f = dirtyLogTestFlags(given);
  const { config, driver, watchdogMs, burst } = dirtyLogTestConfig(f);
  const json = f.json === true;
  const progress = new Progress(json);
  const out = (line: string): void => { if (!json) { progress.clear(); console.log(line); } };
  out(describeConfig(config, driver));
  const result = await runDirtyLogTest(config, {
    driver, watchdogMs, burst,
    onEvent: (e) => { if (e.kind === 'iteration') out(iterationLine(e)); },
    onTick: (p, names) => {
      const ops = p.reduce((s, x, i) => (names[i]!.startsWith('vcpu') ? s + x : s), 0);
      progress.update(`running: ${ops} guest writes retired`);
    },
  });
  progress.clear();
  const expectation = expected ? checkExpectation(expected, dirtyLogOutcome(result)) : undefined;
  if (json) {
    console.log(JSON.stringify({
      command: 'dirty-log-test', config, driver, status: result.status, seconds: result.seconds,
      iterations: result.iterations, violations: result.violations, errors: result.errors,
      lostHostWrites: result.lostHostWrites, ringHardFull: result.ringHardFull, flushes: result.flushes, steps: result.steps,
      injections: result.injections, vcpus: result.vcpus, expectation,
    }, null, 2));
    return exitStatus(result);
  }
  for (const v of result.violations) console.log(describeViolation(v));
  for (const e of result.errors) console.log(e);
  if (result.lostHostWrites > 0) {
    console.log(`KVM warning: ${result.lostHostWrites} host writes with no running vCPU and no backup bitmap were not logged (mark_page_dirty_in_slot)`);
  }
  if (result.ringHardFull > 0) {
    console.log(`KVM warning: ${result.ringHardFull} pushes into a full dirty ring overwrote entries nobody had collected (WARN_ON_ONCE in kvm_dirty_ring_push)`);
  }
  if (config.dirtyLimit || config.workload.opRate) for (const line of describeVcpuRates(result.vcpus, driver === 'deterministic' ? 'on the step clock' : 'over the run')) console.log(line);
  const steps = result.steps !== undefined ? `, ${result.steps} steps` : '';
  const idle = describeIdleBugs(result.injections, 'dirty-log-test');
  if (idle && result.status !== 'passed') console.log(`note: ${idle}`);
  const verdict = {
    passed: idle ? `PASSED, but ${idle}. Every page verified` : 'PASSED: every page verified',
    failed: 'FAILED', stuck: 'STUCK: the run did not complete', crashed: 'CRASHED: the run did not complete',
  }[result.status];
  console.log(`${verdict} (${result.iterations.length} iterations, ${result.seconds.toFixed(2)} s${steps})`);
  if (result.status !== 'passed' && driver === 'deterministic') {
    console.log(`replay exactly: vmemlab dirty-log-test --driver deterministic --seed ${config.seed} --mode ${config.mode} (with the same other options)`);
  }
  if (expectation) console.log(expectation.line);
  return exitStatus(result);
}

