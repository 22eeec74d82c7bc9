import { describe, expect, it } from 'vitest';
import { GlobalWord } from '../src/host/layout.ts';
import { Step, WaitCode } from '../src/roles/role.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { MANUAL, makeVm, retire, vcpuWith, refusedMigration } from './helpers.ts';

/**
 * The conversion designs (src/host/vmm/conversion-design.ts) running a confidential guest
 * in a migration scenario (`--conversion-design`): the VMM boots the guest in its own
 * thread with the design, serves every conversion exit through it, and the same checks
 * hold as with QEMU's design (test/cvm-migration.test.ts).
 */
const CVM = { confidential: 'shared', workload: 'convert', memoryBytes: '8MiB', vcpus: '2', batchPages: '8', devices: ['dma-engine:identity,every=8,buffers=16,remap-every=0'] };
const DET = { driver: 'deterministic' as const, watchdogMs: 10_000, burst: 64 };
const DESIGNS = ['notifier', 'in-place', 'kvm-iommu'] as const;

function cvm(extra: Record<string, unknown> = {}) {
  return migrationSetup({ ...CVM, driver: 'deterministic', ...extra } as never).scenario;
}

describe('a confidential guest migrates under each conversion design', () => {
  for (const design of DESIGNS) {
    for (const seed of [1, 2]) {
      it(`${design}, deterministic seed ${seed}: conversions and DMA during the migration; shared memory and attributes equal, nothing private read or left mapped`, async () => {
        const r = await runMigration(cvm({ conversionDesign: design, seed: String(seed) }), DET);
        expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
        const c = r.confidential!;
        expect(c.conversions, 'the guest converted memory').toBeGreaterThan(0);
        expect(c).toMatchObject({ attributeMismatches: 0, findings: [], privateTouches: 0, staleStores: 0 });
        expect(c.sharedPages, 'at least the bounce buffers are shared').toBeGreaterThanOrEqual(256);
        expect(r.dma!.faults, 'the device only ever reached mapped shared buffers').toBe(0);
        expect(r.dma!.devices[0]!.dmaWrites, 'the device wrote the bounce buffers').toBeGreaterThan(0);
        // The design's own figures, as the VM stopped: the boot's conversion included.
        const d = c.design!;
        expect(d.name).toBe(design);
        expect(d.stats.conversions).toBe(c.conversions + 1);
        expect(d.stats.pagesMapped, 'the device reaches exactly the shared pages').toBe(c.sharedPages);
        if (design === 'kvm-iommu') {
          expect(d.stats.iommuEntries, 'KVM keeps the table: nothing in the container').toBe(0);
          expect(r.dma!.iommu.maps).toBe(0);
        } else {
          expect(d.stats.iommuEntries, 'one 4 KiB mapping per shared page').toBe(c.sharedPages);
        }
        // In place a private page keeps its memory in guest_memfd's one file: only shared pages are compared.
        expect(r.pagesCompared).toBe(design === 'in-place' ? c.sharedPages : 2048);
      });
    }
  }

  for (const design of ['in-place', 'kvm-iommu'] as const) {
    it(`${design}, free-run: the same guest with worker threads passes the same checks`, async () => {
      const { scenario } = migrationSetup({ ...CVM, conversionDesign: design, driver: 'free', dirtyLimit: '1MB/s', iommu: 'iommufd', warmup: '200' } as never);
      const r = await runMigration(scenario, { driver: 'free', watchdogMs: 30_000, burst: 64 });
      expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
      expect(r.confidential).toMatchObject({ attributeMismatches: 0, findings: [], privateTouches: 0 });
      expect(r.confidential!.design?.name).toBe(design);
    });
  }

  it('inplace-convert-while-pinned: a page turns private while VFIO still pins and maps it; the oracle finds the mapping left on every seed, and the bug acted', async () => {
    for (const seed of [1, 2, 3]) {
      const r = await runMigration(cvm({ conversionDesign: 'in-place', seed: String(seed), inject: ['inplace-convert-while-pinned'] }), DET);
      expect(r.status, `seed ${seed}`).toBe('failed');
      expect(r.reason).toMatch(/^the private memory oracle: mapping-left: slot 1 gfn 0x[0-9a-f]+: converted to private, still mapped in the IOMMU at IOVA 0x[0-9a-f]+ \(and \d+ more\)$/);
      expect(failureOf(r)?.kind).toBe('private-memory');
      expect(r.injections.find((i) => i.bug === 'inplace-convert-while-pinned')!.acted).toBeGreaterThan(0);
    }
  });

  it('a design whose set-up fails stops the VM before the guest ran: the run fails with the design\'s error, and nothing hangs', async () => {
    // Past the scenario's own check (which refuses this before it runs): VFIO's registration check inside the design.
    const s = cvm({ conversionDesign: 'notifier' });
    const r = await runMigration({ ...s, devices: { ...s.devices!, dmaEntryLimit: 1000 } }, DET);
    expect(r.status).toBe('failed');
    expect(r.reason).toMatch(/^the VMM could not boot the guest \(conversion design notifier\): vfio conversion listener: possibly running out of DMA mappings/);
    expect(r.confidential?.conversions ?? 0, 'no vCPU ever converted anything').toBe(0);
  });
});

describe('the VMM boots the guest before the vCPUs run (GlobalWord.VM_START_PENDING)', () => {
  it('a vCPU created while the boot is pending waits for vm_start, then runs', () => {
    const vm = makeVm({ tracking: MANUAL });
    Atomics.store(vm.global, GlobalWord.VM_START_PENDING, 1);
    const v = vcpuWith(vm, 0, [{ gfn: 0x100, value: 7 }]);
    expect(v.step()).toBe(Step.BLOCKED);
    expect(v.wait.code).toBe(WaitCode.VM_START);
    expect(v.retired).toBe(0);
    Atomics.store(vm.global, GlobalWord.VM_START_PENDING, 0);
    retire(v, 1);
    expect(v.retired).toBe(1);
  });
});

describe('a conversion design in a scenario refuses what it cannot run, naming the setting', () => {
  const refused = refusedMigration;
  it('without a confidential guest, without a device, an unknown design', () => {
    expect(refused({ conversionDesign: 'notifier' })).toBe('--conversion-design: notifier is how the VMM converts a confidential guest\'s memory; it needs --confidential shared or blocker');
    expect(refused({ ...CVM, devices: [], conversionDesign: 'in-place' })).toBe('--conversion-design: in-place is a way to keep an assigned device in step with conversions; add one (--device dma-engine,identity)');
    expect(refused({ ...CVM, conversionDesign: 'magic' })).toBe('--conversion-design: unknown conversion design \'magic\' (one of: rdm, notifier, in-place, kvm-iommu)');
  });
  it('the in-place bug needs the in-place design (its demonstration settings choose it unless another was given)', () => {
    expect(refused({ ...CVM, conversionDesign: 'notifier', inject: ['inplace-convert-while-pinned'] })).toBe('--inject inplace-convert-while-pinned: this bug lives in the in-place conversion design; it needs --conversion-design in-place, not notifier');
    expect(migrationSetup({ ...CVM, inject: ['inplace-convert-while-pinned'] } as never).scenario.conversionDesign).toBe('in-place');
  });
  it('KVM keeping the IOMMU table maps nothing through the container: type1\'s limit does not refuse it', () => {
    expect(refused({ ...CVM, memoryBytes: '256MiB' })).toMatch(/^--memory: 256MiB of guest_memfd memory can take 65536 DMA mappings/);
    expect(refused({ ...CVM, memoryBytes: '256MiB', conversionDesign: 'kvm-iommu' })).toBe('accepted');
  });
});
