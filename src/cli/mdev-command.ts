import { describeIdleBugs } from '../scenarios/demos.ts';
import { type MdevConfig, type MdevResult, type MdevVmReport, describeStop, mdevSetup } from '../scenarios/mdev.ts';
import { runMdevWatched } from '../scenarios/off-thread.ts';
import { mdevOutcome } from '../scenarios/outcome.ts';
import type { Driver } from '../scenarios/run-roles.ts';
import { type Resolved, buildMdev } from '../scenarios/settings.ts';
import { type Expected, checkExpectation } from './expectation.ts';
import { Progress } from './progress.ts';

export function describeMdevConfig(c: MdevConfig, driver: Driver): string {
  const { resources, layouts } = mdevSetup(c);
  const bar = resources.map((r) => `${r.name} ${r.maxPages}`).join(', ');
  const mmio = layouts[0]!.config.bars![0]!.driver.mmio.pages;
  const mapping = c.mapping === 'static' ? 'mapped statically at mmap (no validate callback)' : `mapped on fault, prefetch ${c.prefetch}`;
  const bugs = c.bugs.length ? `, injected: ${c.bugs.join(', ')}` : '';
  return `mdev: ${c.vms} VMs of ${c.vcpus} vCPUs share one mediated device (BAR pages: ${bar}; ${mmio} MMIO pages), ${mapping}; ` +
    `a refused access: ${c.onRefusal}; vm0's guest: ${c.guest}; ${c.migration === 'none' ? '' : `then vm0 migrates (${c.migration}); `}${c.reallocations} ${c.mapping === 'static' ? 'announcements of the same slices' : 'reallocations'}; driver ${driver}, seed ${c.seed}${bugs}`;
}

function vmLine(v: MdevVmReport): string {
  const counts = `${v.faults} faults, ${v.installs} SPTEs installed, ${v.retries} retried, ${v.zapped} zapped, ${v.prefetched} prefetched, ${v.refused} refused`;
  return `vm${v.vm} (${v.guest}): ${counts}; ${v.stopped ? `STOPPED: ${describeStop(v.stopped)}` : 'ran to the end'}`;
}

/** Exit status: 0 no finding, 1 a finding or a cooperative guest refused, 3 the run did not complete. */
function exitStatus(r: MdevResult): number {
  return r.status === 'passed' ? 0 : r.status === 'failed' ? 1 : 3;
}

export async function mdevCommand(settings: Resolved, json: boolean, expected?: Expected): Promise<number> {
  const { config, driver, watchdogMs, burst } = buildMdev(settings);
  const progress = new Progress(json);
  if (!json) console.log(describeMdevConfig(config, driver));
  const result = await runMdevWatched(config, {
    driver, watchdogMs, burst,
    onTick: (p, names) => progress.update(`running: vendor driver ${p[names.indexOf('vendor-driver')] ?? 0} steps`),
  });
  progress.clear();
  const expectation = expected ? checkExpectation(expected, mdevOutcome(result)) : undefined;
  if (json) {
    console.log(JSON.stringify({
      command: 'mdev', config, driver, status: result.status, seconds: result.seconds, steps: result.steps, vms: result.vms,
      vendor: result.vendor, migration: result.migration, injections: result.injections, errors: result.errors, expectation,
    }, null, 2));
    return exitStatus(result);
  }
  const v = result.vendor;
  if (v) {
    console.log(`vendor driver: ${v.grants} grants, ${v.revokes} revocations (${v.evictions} to make room), ${v.refusedGrants} grants found no room; ${v.unmapped} BAR entries unmapped`);
    for (const u of v.unresponsive) console.log(`note: vm${u.vm} did not acknowledge ${u.resource}'s change (epoch ${u.epoch}) in time; the vendor driver stopped waiting for it`);
  }
  for (const vm of result.vms) console.log(vmLine(vm));
  const m = result.migration;
  if (m) {
    if (m.refused !== null) console.log(`migration of vm0 (${m.mode}): refused: ${m.refused}`);
    else {
      const dev = m.device.map((p) => `${p.name} ${p.pages}`).join(', ');
      console.log(`migration of vm0 (${m.mode}): ${m.pages} RAM pages and the device's state (${dev} pages) in ${m.streamBytes} stream bytes; `
        + `the destination's device ${m.deviceStateEqual ? 'holds what the source saved' : 'DIFFERS from what the source saved'}, its BAR ${m.startedUnmapped ? 'started unmapped' : 'was mapped at mmap'}; `
        + `the resumed guest faulted ${m.faults} time(s)${m.stopped ? `, and was STOPPED: ${describeStop(m.stopped)}` : ''}`);
    }
  }
  for (const vm of result.vms) if (vm.leftAtEnd > 0) console.log(`vm${vm.vm}: ${vm.leftAtEnd} SPTE(s) still breaching isolation at the end (the end-of-run sweep)`);
  for (const e of result.errors) console.log(e);
  const idle = describeIdleBugs(result.injections, 'mdev');
  if (idle && result.status !== 'passed') console.log(`note: ${idle}`);
  const stopped = result.vms.filter((x) => x.stopped !== null).map((x) => `vm${x.vm}`);
  const others = stopped.length > 0 ? `; ${stopped.join(', ')} stopped for refused accesses, the others ran on` : '';
  const steps = result.steps !== undefined ? `, ${result.steps} steps` : '';
  const verdict = {
    passed: `${idle ? `PASSED, but ${idle}. ` : 'PASSED: '}no VM reached MMIO it did not hold${others}`,
    failed: 'FAILED', stuck: 'STUCK: the run did not complete', crashed: 'CRASHED: the run did not complete',
  }[result.status];
  console.log(`${verdict} (${result.seconds.toFixed(2)} s${steps})`);
  if (result.status !== 'passed' && driver === 'deterministic') {
    console.log(`replay exactly: vmemlab mdev --driver deterministic --seed ${config.seed} (with the same other options)`);
  }
  if (expectation) console.log(expectation.line);
  return exitStatus(result);
}
