import { describe, expect, it } from 'vitest';
import { EINVAL, KVM_MEM_DMA, KVM_MEM_GUEST_MEMFD, KVM_MEM_KVM_ONLY, KVM_MEM_LOG_DIRTY_PAGES } from '../src/host/constants.ts';
import { OpKind } from '../src/host/guest-op.ts';
import { type DmaSlotLogging, GlobalWord, type MemslotConfig, createVmLayout } from '../src/host/layout.ts';
import { VMX_EPT_IPAT_BIT, VMX_EPT_MT_EPTE_SHIFT, X86_MEMTYPE_UC, X86_MEMTYPE_WB, X86_MEMTYPE_WC, vmxGetMtMask } from '../src/host/memory-type.ts';
import { spteMtMask } from '../src/host/spte.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { type KernelBugs, Vm } from '../src/host/vm.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { KvmError } from '../src/util/errors.ts';
import { MANUAL, Ops, complete, retire } from './helpers.ts';

/**
 * The memslot flags of the seed discussion's proposals (constants.ts): KVM_MEM_DMA, KVM
 * honouring the guest's PAT in one slot, exclusive with dirty logging; KVM_MEM_KVM_ONLY,
 * a slot the VMM never touches; and slots of device memory (a GPU's VRAM), which
 * vmx_get_mt_mask types UC.
 */
const CACHE = { sets: 64, ways: 4, seed: 1, selfSnoop: false };
const EPT_WB_IPAT_MASK = (X86_MEMTYPE_WB << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT;
const RAM: MemslotConfig = { id: 1, asId: 0, baseGfn: 0x100, pages: 16, flags: 0 };

function vmWith(blob: Partial<MemslotConfig>, o: { bugs?: KernelBugs; dmaSlotLogging?: DmaSlotLogging } = {}) {
  const vm = new Vm(createVmLayout({
    slots: [RAM, { id: 2, asId: 0, baseGfn: 0x200, pages: 8, flags: 0, ...blob }], vcpus: 1, tracking: MANUAL, cpuCache: CACHE,
    ...(o.dmaSlotLogging ? { dmaSlotLogging: o.dmaSlotLogging } : {}),
  }), o.bugs ?? {});
  vm.populate();
  return { vm, blob: vm.memory.slots[1]! };
}

const errno = (f: () => unknown): number => { try { f(); } catch (e) { if (e instanceof KvmError) return e.errno; throw e; } return 0; };

describe('KVM_MEM_DMA: the guest\'s PAT honoured in one slot', () => {
  it('honours the PAT there alone, with no non-coherent DMA registered: a WC store goes to memory', () => {
    const { vm, blob } = vmWith({ flags: KVM_MEM_DMA });
    expect(vm.noncoherentDma()).toBe(false);
    expect([vm.getMtMask(vm.memory.slots[0]!), vm.getMtMask(blob)]).toEqual([EPT_WB_IPAT_MASK, vmxGetMtMask({ isMmio: false, noncoherentDma: true, disabledQuirks: 0 })]);
    const v = new Vcpu(vm, 0, new Ops([{ kind: OpKind.SET_PAT, gfn: 0x200, value: 8, offset: X86_MEMTYPE_WC }, { gfn: 0x200, value: 5 }]));
    retire(v, 2);
    expect(blob.readU64(0), 'WC: in memory at once').toBe(5);
    expect(vm.honoursGuestPat()).toBe(true);
  });

  it('a guest WBINVD with a KVM_MEM_DMA slot and nothing registered VM-wide flushes that slot\'s lines alone', () => {
    const { vm, blob } = vmWith({ flags: KVM_MEM_DMA });
    const ram = vm.memory.slots[0]!;
    const v = new Vcpu(vm, 0, new Ops([{ gfn: 0x100, value: 1 }, { gfn: 0x200, value: 2 }, { kind: OpKind.WBINVD, gfn: 0x100, value: 0 }]));
    retire(v, 3);
    expect(blob.readU64(0), 'the DMA slot\'s dirty line written back').toBe(2);
    expect(ram.readU64(0), 'the RAM slot\'s line still dirty in the cache').toBe(0);
    const bug = vmWith({ flags: KVM_MEM_DMA }, { bugs: { wbinvdNoop: true } });
    retire(new Vcpu(bug.vm, 0, new Ops([{ gfn: 0x200, value: 2 }, { kind: OpKind.WBINVD, gfn: 0x200, value: 0 }])), 2);
    expect(bug.blob.readU64(0), 'wbinvd-noop: nothing flushed').toBe(0);
  });

  it('force-wb: dirty logging zaps the slot, and faults rebuild it WB + IPAT while logging lasts', () => {
    const { vm, blob } = vmWith({ flags: KVM_MEM_DMA });
    complete(vm.enableDirtyLogging(blob));
    expect([...blob.spte].every((s) => s === 0), 'every SPTE of the slot zapped').toBe(true);
    expect(vm.getMtMask(blob)).toBe(EPT_WB_IPAT_MASK);
    const v = new Vcpu(vm, 0, new Ops([{ kind: OpKind.SET_PAT, gfn: 0x200, value: 8, offset: X86_MEMTYPE_WC }, { gfn: 0x200, value: 5 }]));
    retire(v, 2);
    expect(spteMtMask(blob.spte[0]!)).toBe(EPT_WB_IPAT_MASK);
    expect(blob.readU64(0), 'WB: the store sits in the cache').toBe(0);
    expect(vm.flags(blob) & KVM_MEM_LOG_DIRTY_PAGES).not.toBe(0);
  });

  it('refuse: EINVAL, and the slot stays as it was', () => {
    const { vm, blob } = vmWith({ flags: KVM_MEM_DMA }, { dmaSlotLogging: 'refuse' });
    const before = [...blob.spte];
    expect(errno(() => complete(vm.enableDirtyLogging(blob)))).toBe(EINVAL);
    expect(vm.flags(blob)).toBe(KVM_MEM_DMA);
    expect([...blob.spte]).toEqual(before);
  });

  it('dma-slot-with-dirty-logging: logging starts as on any slot, the PAT still honoured, nothing zapped; the bug says it acted', () => {
    const { vm, blob } = vmWith({ flags: KVM_MEM_DMA }, { bugs: { dmaSlotWithDirtyLogging: true } });
    complete(vm.enableDirtyLogging(blob));
    expect(vm.slotHonoursPat(blob)).toBe(true);
    expect(vm.acts.count('dma-slot-with-dirty-logging')).toBe(1);
  });

  it('KVM_SET_USER_MEMORY_REGION on an existing slot changes only KVM_MEM_LOG_DIRTY_PAGES: anything else is EINVAL, nothing changed', () => {
    const { vm, blob } = vmWith({ flags: KVM_MEM_DMA });
    const ram = vm.memory.slots[0]!;
    let err = '';
    try { complete(vm.setMemslotFlags(ram, KVM_MEM_DMA)); } catch (e) { err = (e as Error).message; }
    expect(err).toBe('KVM_SET_USER_MEMORY_REGION: EINVAL: slot 1: KVM_MEM_DMA cannot change on an existing slot (only KVM_MEM_LOG_DIRTY_PAGES can)');
    expect(errno(() => complete(vm.setMemslotFlags(blob, 0)))).toBe(EINVAL);
    expect([vm.flags(ram), vm.flags(blob)]).toEqual([0, KVM_MEM_DMA]);
    complete(vm.setMemslotFlags(ram, KVM_MEM_LOG_DIRTY_PAGES));
    expect(vm.flags(ram)).toBe(KVM_MEM_LOG_DIRTY_PAGES);
    complete(vm.setMemslotFlags(ram, 0));
    expect(vm.flags(ram)).toBe(0);
  });

  it('not on a guest_memfd slot', () => {
    expect(errno(() => createVmLayout({ slots: [{ ...RAM, flags: KVM_MEM_GUEST_MEMFD | KVM_MEM_KVM_ONLY }], vcpus: 1, tracking: MANUAL, privateMem: true }))).toBe(EINVAL);
  });
});

describe('device memory (a VRAM blob): UC in the EPT, and the machine check oracle', () => {
  it('populated UC: the guest\'s WB store is UC (memory at once), its WC mapping WC; no machine check', () => {
    const { vm, blob } = vmWith({ hostMmio: true });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: 0x200, value: 3 }, { kind: OpKind.SET_PAT, gfn: 0x201, value: 1, offset: X86_MEMTYPE_WC }, { gfn: 0x201, value: 4 }]));
    retire(v, 3);
    expect([blob.readU64(0), blob.readU64(1)]).toEqual([3, 4]);
    expect(Atomics.load(vm.global, GlobalWord.MACHINE_CHECKS)).toBe(0);
    expect(spteMtMask(blob.spte[0]!)).toBe(X86_MEMTYPE_UC << VMX_EPT_MT_EPTE_SHIFT);
  });

  it('mmio-mapped-wb: typed as RAM, WB + IPAT: the store is cacheable, a machine check (counted with its gfn)', () => {
    const { vm } = vmWith({ hostMmio: true }, { bugs: { mmioMappedWb: true } });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: 0x203, value: 3 }]));
    retire(v, 1);
    expect(Atomics.load(vm.global, GlobalWord.MACHINE_CHECKS)).toBe(1);
    expect(Atomics.load(vm.global, GlobalWord.MACHINE_CHECK_FIRST_GFN)).toBe(0x203 + 1);
    expect(vm.acts.count('mmio-mapped-wb')).toBeGreaterThan(0);
  });
});

describe('blob resources and the device-state policy in a migration', () => {
  const base = { cpuCache: 'on', workload: 'render', memoryBytes: '4MiB', vcpus: '2', devices: ['dma-engine:snoop=false,every=4,buffers=32,remap-every=0'], driver: 'deterministic' };
  const run = (extra: Record<string, string>) => runMigration(migrationSetup({ ...base, ...extra } as never).scenario, { driver: 'deterministic', watchdogMs: 10_000, burst: 64 });

  for (const blob of ['kvm-only-ram', 'kvm-only-vram']) {
    it(`${blob}: RAM migration never reads the slot; the device saves its 64 pages in the downtime, and every write arrives`, async () => {
      const r = await run({ blob, noncoherentMigration: 'device-state', ...(blob === 'kvm-only-vram' ? { noncoherentRequest: 'none' } : {}) });
      expect(r.status, `${r.reason ?? ''}`).toBe('passed');
      expect(r.kvmOnlyTouches).toEqual({ count: 0, firstGfn: null });
      expect(r.info!.completion!.deviceStatePages).toBe(64);
      expect(r.cache!.machineChecks.count).toBe(0);
    });
  }

  it('kvm-mem-dma with refuse: dirty logging cannot start on the blob\'s slot, and the migration fails at once with KVM\'s answer', async () => {
    const r = await run({ blob: 'ram', noncoherentRequest: 'kvm-mem-dma', dmaSlotLogging: 'refuse', noncoherentMigration: 'switch-host-only' });
    expect(r.status).toBe('failed');
    expect(r.reason).toBe('dirty logging could not start: KVM_SET_USER_MEMORY_REGION: EINVAL: slot 2: KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_DMA slot (the two exclude each other)');
    expect(failureOf(r)?.kind).toBe('migration-failed');
  });

  it('kvm-mem-dma with force-wb: KVM stops honouring the PAT there as logging starts, so the host switching its device suffices', async () => {
    const r = await run({ blob: 'ram', noncoherentRequest: 'kvm-mem-dma', noncoherentMigration: 'switch-host-only' });
    expect(r.status, `${r.reason ?? ''}`).toBe('passed');
    expect(r.cache!.staleReads).toMatchObject({ device: 0, migration: 0 });
  });

  it('clflush-before-read flushes a KVM_MEM_DMA slot alone (the device still does no-snoop DMA there), and that is enough even under dma-slot-with-dirty-logging', async () => {
    const settings = { blob: 'ram', noncoherentRequest: 'kvm-mem-dma', noncoherentMigration: 'clflush-before-read' };
    const forced = await run(settings);
    expect(forced.status, `${forced.reason ?? ''}`).toBe('passed');
    const sent = forced.info!.normalPages + forced.info!.zeroPages;
    expect(forced.cache!.migrationPageFlushes).toBeGreaterThan(0);
    expect(forced.cache!.migrationPageFlushes, 'the blob\'s pages alone: no non-coherent DMA is registered').toBeLessThan(sent / 4);
    const bug = await runMigration(migrationSetup({ ...base, ...settings, inject: ['dma-slot-with-dirty-logging'] } as never).scenario, { driver: 'deterministic', watchdogMs: 10_000, burst: 64 });
    expect(bug.injections).toEqual([expect.objectContaining({ bug: 'dma-slot-with-dirty-logging', idle: null })]);
    expect(bug.status, `${bug.reason ?? ''}`).toBe('passed');
  });

  it('refuses what does not fit, each in one line naming the setting', () => {
    const refused = (extra: Record<string, string>): string => { try { migrationSetup({ ...base, ...extra } as never); } catch (e) { return (e as Error).message; } return ''; };
    expect(refused({ blob: 'ram', workload: 'random' })).toBe('--blob: ram holds a render guest\'s buffers; it needs --workload render or render-wbinvd, not random');
    expect(refused({ noncoherentRequest: 'kvm-mem-dma' })).toBe('--noncoherent-request: kvm-mem-dma sets KVM_MEM_DMA on the blob resource\'s memslot; it needs --blob ram, kvm-only-ram or kvm-only-vram');
    expect(refused({ blob: 'kvm-only-ram', noncoherentMigration: 'clflush-before-read' })).toBe('--blob: kvm-only-ram is a slot RAM migration never reads; it needs --noncoherent-migration device-state (the device saves it)');
    expect(refused({ noncoherentMigration: 'device-state' })).toBe('--noncoherent-migration: device-state has the device save a KVM-only blob; it needs --blob kvm-only-ram or kvm-only-vram');
    expect(refused({ blob: 'ram', dmaSlotLogging: 'refuse' })).toBe('--dma-slot-logging: refuse is what KVM does with a KVM_MEM_DMA slot; it needs --noncoherent-request kvm-mem-dma');
    expect(refused({ blob: 'vram' })).toBe('--blob: unknown blob memory \'vram\' (one of: off, ram, kvm-only-ram, kvm-only-vram)');
  });
});
