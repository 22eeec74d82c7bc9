import type { DirtyLogEvent, DirtyLogTestConfig } from '../scenarios/dirty-log-test.ts';
import type { Driver, DirtyLogRunResult } from '../scenarios/run-dirty-log-test.ts';
import { runDirtyLogTestWatched } from '../scenarios/off-thread.ts';
import { type Resolved, buildDirtyLogTest } from '../scenarios/settings.ts';
import { describeViolation } from '../oracles/dirty-log-verify.ts';
import { formatSize } from '../util/size.ts';
import { Progress } from './progress.ts';
import { describeIdleBugs } from '../scenarios/demos.ts';
import { dirtyLogOutcome } from '../scenarios/outcome.ts';
import { type Expected, checkExpectation } from './expectation.ts';
import { describeVcpuRates } from './vcpu-rates.ts';

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

export async function dirtyLogTestCommand(settings: Resolved, json: boolean, expected?: Expected): Promise<number> {
  const { config, driver, watchdogMs, burst } = buildDirtyLogTest(settings);
  const progress = new Progress(json);
  const out = (line: string): void => { if (!json) { progress.clear(); console.log(line); } };
  out(describeConfig(config, driver));
  const result = await runDirtyLogTestWatched(config, {
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

