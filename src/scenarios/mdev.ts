import { type InjectionReport, injectionReport } from '../bugs/acted.ts';
import type { Strategy } from '../drivers/strategy.ts';
import { MDEV_GUEST_KINDS, type MdevGuestKind } from '../guest/mdev-guest.ts';
import { BarMmuWord } from '../host/bar-layouts.ts';
import type { BarFindingName } from '../host/mmio/kvm-bar-mmu.ts';
import { type VendorEvent, type VendorStats, allocateFixedResources } from '../host/mmio/vendor-workload.ts';
import type { BarVmStop } from '../host/vmm/bar-vmm.ts';
import type { Vm } from '../host/vm.ts';
import { vmFor } from './roles.ts';
import { type MdevConfig, mdevRoleSpecs, mdevSetup } from './mdev-setup.ts';
import { type MdevMigrationReport, migrateMdevVm } from './mdev-migration.ts';
import { type Driver, type RunRolesOptions, runRoles } from './run-roles.ts';

export { MDEV_BAR_GFN, MDEV_DEFAULTS, type MdevConfig, type MdevSetup, mdevRoleSpecs, mdevSetup } from './mdev-setup.ts';

/** What one VM of the run saw. */
export interface MdevVmReport {
  vm: number;
  guest: MdevGuestKind;
  /** Why and how it was stopped, or null: it ran to the end. */
  stopped: BarVmStop | null;
  findings: { kind: BarFindingName; count: number; firstPage: number | null }[];
  faults: number;
  installs: number;
  /** Installs that found an invalidation since their lookup and faulted again. */
  retries: number;
  zapped: number;
  prefetched: number;
  refused: number;
  /** SPTEs the end-of-run sweep found breaching isolation (no access went through them yet). */
  leftAtEnd: number;
}

export interface MdevRunOptions {
  driver: Driver;
  watchdogMs: number;
  burst: number;
  strategy?: Strategy;
  replay?: Uint8Array;
  onTick?: RunRolesOptions['onTick'];
  heartbeat?: SharedArrayBuffer;
  fault?: RunRolesOptions['fault'];
}

export interface MdevResult {
  /** passed: no isolation finding and no cooperative VM stopped; failed: one of them; stuck, crashed: the run did not complete. */
  status: 'passed' | 'failed' | 'stuck' | 'crashed';
  vms: MdevVmReport[];
  vendor: VendorStats | null;
  /** vm0's migration after the run (MdevConfig.migration), or null. */
  migration: MdevMigrationReport | null;
  injections: InjectionReport[];
  errors: string[];
  seconds: number;
  steps?: number;
  schedule?: Uint8Array;
}

export function checkMdevConfig(c: MdevConfig): void {
  if (!MDEV_GUEST_KINDS.includes(c.guest)) throw new Error(`mdev: guest ${c.guest}`);
}

/**
 * Several VMs sharing one mediated device whose MMIO is mapped on fault (docs/mdev.md),
 * run under either driver (the VMs, the device and the roles: mdev-setup.ts); then what
 * the isolation oracles and counters saw in each VM, and vm0's migration if asked for.
 */
export async function runMdev(c: MdevConfig, o: MdevRunOptions): Promise<MdevResult> {
  checkMdevConfig(c);
  const setup = mdevSetup(c);
  const vms: Vm[] = setup.layouts.map((l) => vmFor(l, c.bugs));
  const driver = vms[0]!.bars[0]!.driver;
  allocateFixedResources(driver, c.vms, c.vcpus, c.mapping === 'static');
  for (const vm of vms) {
    const { mapping } = vm.bars[0]!;
    if (c.mapping === 'static') {
      mapping.mmapStatic(setup.resources.map((res, r) => {
        const s = driver.sliceOf(mapping.vm, r)!;
        return { barPage: res.barOffset, pfn: s.pfn, pages: s.pages, writable: res.writable };
      }));
    } else mapping.mmapWholeBar(); // only with map-whole-bar-without-validate: a device without validate maps it all at mmap time
  }
  const stops: BarVmStop[] = [];
  let vendor: VendorStats | null = null;
  const onEvent = (e: BarVmStop | VendorEvent): void => {
    if (e.kind === 'vm-stopped') stops.push(e);
    else vendor = e.stats;
  };
  const started = performance.now();
  const specs = mdevRoleSpecs(c, setup);
  const run = await runRoles({
    driver: o.driver, specs, primary: 'vendor-driver', vm: vms[0]!, vmOf: (s) => ('vm' in s ? vms[s.vm]! : vms[0]!),
    layoutOf: (s) => setup.layouts['vm' in s ? s.vm : 0]!, bugs: c.bugs, seed: c.seed, onEvent: (e) => onEvent(e as BarVmStop | VendorEvent),
    watchdogMs: o.watchdogMs, burst: o.burst, strategy: o.strategy, replay: o.replay, onTick: o.onTick, heartbeat: o.heartbeat, fault: o.fault,
  });
  const reports = vms.map((vm, k): MdevVmReport => {
    const mmu = vm.bars[0]!.mmu;
    if (run.status !== 'crashed') mmu.audit();
    return {
      vm: k, guest: k === 0 ? c.guest : 'cooperative', stopped: stops.find((s) => s.vm === k) ?? null, findings: mmu.findings(),
      faults: mmu.stat(BarMmuWord.FAULTS), installs: mmu.stat(BarMmuWord.INSTALLS), retries: mmu.stat(BarMmuWord.RETRIES),
      zapped: mmu.stat(BarMmuWord.ZAPPED), prefetched: mmu.stat(BarMmuWord.PREFETCHED), refused: mmu.stat(BarMmuWord.REFUSED),
      leftAtEnd: mmu.stat(BarMmuWord.AUDIT_FOUND),
    };
  });
  const errors = [...run.errors];
  let status: MdevResult['status'] = run.status === 'done' ? 'passed' : run.status;
  for (const r of reports) {
    for (const f of r.findings.filter((x) => x.count > 0)) {
      errors.push(`vm${r.vm}: ${f.count} ${f.kind} finding(s), the first at BAR page ${f.firstPage}`);
      if (status === 'passed') status = 'failed';
    }
    if (r.stopped !== null && r.guest === 'cooperative') {
      errors.push(`${describeStop(r.stopped)} (its guest follows the device's protocol)`);
      if (status === 'passed') status = 'failed';
    }
  }
  let migration: MdevMigrationReport | null = null;
  if (c.migration !== 'none' && run.status === 'done') {
    migration = await migrateMdevVm(c, vms[0]!, mdevSetup(c, 1, true), { ...o, stopped: reports[0]!.stopped !== null });
    if (migration.error !== null) {
      errors.push(`vm0's migration failed: ${migration.error}`);
      if (status === 'passed') status = 'failed';
    }
  }
  return {
    status, vms: reports, vendor, migration, injections: injectionReport(vms[0]!, c.bugs), errors,
    seconds: (performance.now() - started) / 1000, steps: run.steps, schedule: run.schedule,
  };
}

/** "vm0 stopped: vcpu1 wrote BAR page 6 (gpa 0x10006000): not-allocated (errno 14); KVM_RUN failed ...". */
export function describeStop(s: BarVmStop): string {
  const where = s.barPage === null ? `gpa 0x${s.gpa.toString(16)}, outside the BAR` : `BAR page ${s.barPage} (gpa 0x${s.gpa.toString(16)})`;
  return `vm${s.vm} stopped: vcpu${s.vcpu} ${s.write ? 'wrote' : 'read'} ${where}, refused: ${s.reason} (errno ${s.errno}); ${s.how}`;
}
