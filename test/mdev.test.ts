import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MDEV_DEFAULTS, type MdevConfig, type MdevResult, describeStop, runMdev } from '../src/scenarios/mdev.ts';
import { mdevSettings } from '../src/scenarios/settings.ts';
import { mdevOutcome } from '../src/scenarios/outcome.ts';
import { cli } from './cli-helper.ts';
import { MDEV_BLOCKER } from '../src/scenarios/mdev-migration.ts';
import { loadMdevState } from '../src/host/mmio/mdev-state.ts';
import { VendorDriver, createVendorDriverLayout } from '../src/host/mmio/vendor-driver.ts';

/**
 * Several VMs sharing one mediated device: the vendor driver reallocates its MMIO between
 * them while their guests drive it, under both drivers; a refused access stops only its VM,
 * reported with the VM, vCPU, address and reason. Free-run outcomes asserted here are the
 * invariants (no isolation finding, cooperative VMs never stopped), never counts.
 */
const DET = { driver: 'deterministic' as const, watchdogMs: 10_000, burst: 64 };
const FREE = { driver: 'free' as const, watchdogMs: 20_000, burst: 64 };
const config = (c: Partial<MdevConfig>): MdevConfig => ({ ...MDEV_DEFAULTS, ...c });
const findings = (r: MdevResult): string[] => r.vms.flatMap((v) => v.findings.filter((f) => f.count > 0).map((f) => `vm${v.vm} ${f.kind}`));

describe('several VMs share a mediated device mapped on fault', () => {
  it('deterministic, 4 VMs: every VM faults its slices in, the vendor reallocates and zaps; no finding, nobody stopped; the same run twice', async () => {
    const c = config({ vms: 4, reallocations: 48, seed: 3 });
    const r = await runMdev(c, DET);
    expect(r.status, r.errors.join('; ')).toBe('passed');
    expect(findings(r)).toEqual([]);
    expect(r.vms.map((v) => v.stopped)).toEqual([null, null, null, null]);
    expect(r.vendor!.grants).toBeGreaterThan(0);
    expect(r.vendor!.revokes).toBeGreaterThan(0);
    expect(r.vendor!.unresponsive).toEqual([]);
    expect(r.vms.reduce((n, v) => n + v.zapped, 0), 'revocations zapped SPTEs').toBeGreaterThan(0);
    for (const v of r.vms) expect(v.faults, `vm${v.vm} faulted its BAR in`).toBeGreaterThan(0);
    const again = await runMdev(c, DET);
    expect(again.steps).toBe(r.steps);
    expect(again.vms.map((v) => v.faults)).toEqual(r.vms.map((v) => v.faults));
  });

  it('free-run with worker threads, 3 VMs: no finding, and no cooperative VM stopped', async () => {
    const r = await runMdev(config({ vms: 3, reallocations: 32 }), FREE);
    expect(r.status, r.errors.join('; ')).toBe('passed');
    expect(findings(r)).toEqual([]);
    expect(r.vms.every((v) => v.stopped === null)).toBe(true);
    expect(r.vendor!.grants + r.vendor!.revokes).toBeGreaterThan(0);
  });

  it('free-run with a hostile vm0: whatever it manages to do, nothing reaches another VM, and only vm0 can be stopped', async () => {
    const r = await runMdev(config({ vms: 2, guest: 'lingering', reallocations: 32 }), FREE);
    expect(r.status, r.errors.join('; ')).toBe('passed');
    expect(findings(r)).toEqual([]);
    expect(r.vms[1]!.stopped).toBeNull();
    if (r.vms[0]!.stopped) expect(r.vms[0]!.stopped.reason).toMatch(/^(not-allocated|past-allocation)$/);
  });

  it('a refused access stops its VM alone: the report names the VM, vCPU, page, GPA, the vendor\'s reason and the path', async () => {
    const r = await runMdev(config({ guest: 'eager' }), DET);
    expect(r.status).toBe('passed');
    const s = r.vms[0]!.stopped!;
    expect(s).toMatchObject({ vm: 0, errno: 14 });
    expect(s.reason).toMatch(/^(not-allocated|past-allocation)$/);
    expect(s.gpa).toBe((0x10000 + s.barPage!) * 4096);
    expect(s.how).toBe('KVM_RUN failed (KVM_EXIT_MEMORY_FAULT); the VMM stopped the VM with an internal error');
    expect(describeStop(s)).toMatch(/^vm0 stopped: vcpu\d (read|wrote) BAR page \d+ \(gpa 0x1[0-9a-f]{4}000\), refused: (not-allocated|past-allocation) \(errno 14\); KVM_RUN failed/);
    expect(r.vms[1]!.stopped).toBeNull();
    expect(mdevOutcome(r)).toEqual({ verdict: 'passed', facts: ['vm-stopped'] });
  });

  it('kill-vm: KVM kills the VM (every KVM_RUN fails with EIO); a scribbler writing its read-only status page is refused as read-only', async () => {
    const killed = await runMdev(config({ guest: 'eager', onRefusal: 'kill-vm' }), DET);
    expect(killed.vms[0]!.stopped!.how).toBe('KVM killed the VM (kvm_vm_dead): KVM_RUN failed with EIO');
    expect(mdevOutcome(killed).facts).toEqual(['vm-stopped', 'vm-killed']);
    const scribbler = await runMdev(config({ guest: 'scribbler' }), DET);
    expect(scribbler.vms[0]!.stopped).toMatchObject({ barPage: 0, reason: 'read-only', write: true });
    expect(findings(scribbler)).toEqual([]);
  });

  it('a lingering guest keeps writing a revoked resource: refused once the vendor unmapped it (installs retried meanwhile), nothing breached', async () => {
    for (const seed of [1, 2, 3]) {
      const r = await runMdev(config({ guest: 'lingering', seed }), DET);
      expect(r.status, `seed ${seed}: ${r.errors.join('; ')}`).toBe('passed');
      expect(r.vms[0]!.stopped?.reason, `seed ${seed}`).toMatch(/^(not-allocated|past-allocation)$/);
      expect(r.vms[0]!.stopped?.write, `seed ${seed}: the lingering write`).toBe(true);
    }
  });

  it('the static mapping: no validate callback, each VM\'s slices mapped 1:1 at mmap: nothing is refused or zapped', async () => {
    const r = await runMdev(config({ vms: 3, mapping: 'static' }), DET);
    expect(r.status, r.errors.join('; ')).toBe('passed');
    for (const v of r.vms) expect([v.refused, v.zapped, v.retries], `vm${v.vm}`).toEqual([0, 0, 0]);
    expect(r.vendor!.grants + r.vendor!.revokes).toBe(0);
  });

  it('prefetch mapped: neighbours the VMA maps get SPTEs at the first fault, and fewer faults are needed; still no finding', async () => {
    const off = await runMdev(config({ seed: 4 }), DET);
    const mapped = await runMdev(config({ seed: 4, prefetch: 'mapped' }), DET);
    expect(mapped.status, mapped.errors.join('; ')).toBe('passed');
    expect(mapped.vms.reduce((n, v) => n + v.prefetched, 0)).toBeGreaterThan(0);
    expect(off.vms.reduce((n, v) => n + v.prefetched, 0), 'KVM never prefetches PFNMAP pages').toBe(0);
  });

  it('a wedged vendor driver: the watchdog names it, and the run ends stuck', async () => {
    const r = await runMdev(config({}), { ...FREE, watchdogMs: 1500, fault: { role: 'vendor-driver', afterSteps: 5, kind: 'wedge' } });
    expect(r.status).toBe('stuck');
    expect(r.errors[0]).toMatch(/^watchdog: vendor-driver stopped stepping/);
    expect(r.errors[0]).toContain('\n  vm1.vcpu0 ');
  });

  it('vmemlab mdev prints the VMs, the vendor and the verdict; --json parses; a bug\'s demonstration takes its settings', async () => {
    const r = await cli('mdev', '--driver', 'deterministic', '--mdev-guest', 'lingering');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^mdev: 2 VMs of 2 vCPUs share one mediated device/m);
    expect(r.out).toMatch(/^vm0 \(lingering\): .*STOPPED: vm0 stopped: vcpu\d wrote BAR page/m);
    expect(r.out).toMatch(/^vm1 \(cooperative\): .*ran to the end$/m);
    expect(r.out).toMatch(/^PASSED: no VM reached MMIO it did not hold; vm0 stopped for refused accesses, the others ran on/m);
    const bug = await cli('mdev', '--driver', 'deterministic', '--inject', 'ignore-readonly-pfnmap', '--json');
    expect(bug.code).toBe(1);
    const doc = JSON.parse(bug.out);
    expect(doc.config.guest, 'the demonstration\'s guest').toBe('scribbler');
    expect(doc.vms[0].findings.find((f: { kind: string }) => f.kind === 'read-only-write').count).toBeGreaterThan(0);
  });

  it('bad input: one line naming the flag or the field and the value, exit 2', async () => {
    for (const [args, msg] of [
      [['mdev', '--vms', '0'], /^vmemlab: --vms: '0' is not a whole number from 1 to 16$/],
      [['mdev', '--vms', '16', '--vcpus', '16'], /^vmemlab: --vms: 16 VMs of 16 vCPUs are 273 actors; at most 255/],
      [['mdev', '--mdev-guest', 'rude'], /^vmemlab: --mdev-guest: unknown guest driver 'rude'/],
      [['mdev', '--inject', 'copy-before-clear'], /^vmemlab: --inject copy-before-clear: this bug shows in 'vmemlab migrate', not in 'vmemlab mdev'$/],
      [['mdev', '--bar-prefetch', 'always'], /^vmemlab: --bar-prefetch: unknown prefetch rule 'always' \(off or mapped\)$/],
      [['run', 'examples/mdev-shared.yaml', '--bandwidth', '1MiB'], /^vmemlab: --bandwidth: examples\/mdev-shared\.yaml is kind: mdev; this option is for vmemlab migrate$/],
    ] as [string[], RegExp][]) {
      const r = await cli(...args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.err.trim(), args.join(' ')).toMatch(msg);
    }
    const dir = mkdtempSync(join(tmpdir(), 'vmemlab-mdev-'));
    const file = join(dir, 'bad.yaml');
    writeFileSync(file, 'kind: mdev\nexpect: passed\nvm: {vcpus: 2, memory: 1GiB}\n');
    const r = await cli('run', file);
    expect(r.code).toBe(2);
    expect(r.err.trim()).toBe(`vmemlab: ${file}: vm.memory: not for kind: mdev (it is for dirty-log-test, migrate)`);
  });

  it('vm0 migrates with its device\'s state (a device record, not RAM): the destination\'s device holds what was saved, its BAR starts unmapped and the guest faults it in again', async () => {
    for (const driver of [DET, FREE]) {
      const r = await runMdev(config({ migration: 'device-state', reallocations: 16 }), driver);
      expect(r.status, `${driver.driver}: ${r.errors.join('; ')}`).toBe('passed');
      const m = r.migration!;
      expect(m).toMatchObject({ mode: 'device-state', refused: null, error: null, deviceStateEqual: true, startedUnmapped: true, findings: [], stopped: null });
      expect(m.device.slice(0, 2), 'the status and doorbell pages travel with the data').toEqual([{ name: 'status', pages: 2 }, { name: 'doorbells', pages: 4 }]);
      expect(m.pages, 'vm0\'s RAM in page frames').toBe(16);
      expect(m.faults, 'the destination faulted its BAR in again').toBeGreaterThan(0);
    }
  });

  it('the device blocks the migration: refused before anything is sent, reported as such', async () => {
    const r = await runMdev(config({ migration: 'blocker' }), DET);
    expect(r.status).toBe('passed');
    expect(r.migration).toMatchObject({ refused: MDEV_BLOCKER, pages: 0, streamBytes: 0 });
    expect(mdevOutcome(r).facts).toContain('migration-blocked');
  });

  it('the destination\'s device loads all or nothing: no room for one resource, nothing left allocated, and the reason', () => {
    const driver = new VendorDriver(createVendorDriverLayout({ vms: 1, mmioPages: 3, resources: [{ name: 'a', barOffset: 0, maxPages: 2, writable: true }, { name: 'b', barOffset: 2, maxPages: 2, writable: true }] }));
    expect(() => loadMdevState(driver, 0, [{ name: 'a', pages: 2 }, { name: 'b', pages: 2 }], new Uint8Array(4 * 4096))).toThrow('no room for 2 pages of b for vm0');
    expect([driver.sliceOf(0, 0), driver.sliceOf(0, 1)]).toEqual([null, null]);
    expect(() => loadMdevState(driver, 0, [{ name: 'c', pages: 1 }], new Uint8Array(4096))).toThrow('this device has no resource c');
    loadMdevState(driver, 0, [{ name: 'a', pages: 2 }], new Uint8Array(2 * 4096).fill(9));
    expect(driver.mmio.read32(driver.sliceOf(0, 0)!.pfn + 1)).toBe(0x09090909);
  });

  it('mdevSettings: the demonstration of prefetch-during-invalidation turns the mapped prefetch on', () => {
    expect(mdevSettings({ inject: ['prefetch-during-invalidation'] }).config).toMatchObject({ prefetch: 'mapped', reallocations: 96 });
  });
});
