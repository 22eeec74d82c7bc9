import { describe, expect, it } from 'vitest';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { CacheStat, lineKey } from '../src/host/cpu-cache.ts';
import { OpKind } from '../src/host/guest-op.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { X86_MEMTYPE_UC, X86_MEMTYPE_WB, X86_MEMTYPE_WC } from '../src/host/memory-type.ts';
import { SPTE_MT_SET, spteMtMask } from '../src/host/spte.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { Vm } from '../src/host/vm.ts';
import { type MigrationScenario, runMigration } from '../src/scenarios/migration.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { MANUAL, Ops, complete, retire } from './helpers.ts';

/**
 * The CPU cache model inside a VM (VmConfig.cpuCache): vCPU accesses take the memory type
 * their SPTE and the guest's PAT give them, KVM's faults give SPTEs vmx_get_mt_mask's type,
 * and a migration reading through the cache moves exactly what the guest wrote.
 */
const G = 0x100;
const CACHE = { sets: 64, ways: 4, seed: 1, selfSnoop: false };

function cachedVm() {
  const vm = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: G, pages: 16, flags: 0 }], vcpus: 1, tracking: MANUAL, cpuCache: CACHE }));
  vm.populate();
  const slot = vm.memory.slots[0]!;
  return { vm, slot, dram: (page: number) => slot.readU64(page), key: (page: number) => lineKey(slot.firstPage + page, 0) };
}

describe('a vCPU\'s accesses through the cache', () => {
  it('with KVM ignoring the guest\'s PAT (no non-coherent DMA, the quirk on) every store is WB: it sits in the cache, DRAM changes at the write-back', () => {
    const { vm, slot, dram, key } = cachedVm();
    const v = new Vcpu(vm, 0, new Ops([
      { kind: OpKind.SET_PAT, gfn: G, value: 4, offset: X86_MEMTYPE_WC },
      { gfn: G + 1, value: 42 },
    ]));
    retire(v, 2);
    expect(vm.guestPat![slot.firstPage + 1]).toBe(X86_MEMTYPE_WC);
    expect(vm.cache!.state(key(1)), 'the PAT\'s WC was ignored: WB + IPAT').toBe('dirty');
    expect(dram(1)).toBe(0);
    vm.cache!.wbinvd();
    expect(dram(1)).toBe(42);
    expect(slot.stampOf(1)).toMatchObject({ writer: 1, seq: 1 });
  });

  it('non-coherent DMA registered: every SPTE zapped, the next fault gives WB without IPAT, and the guest\'s WC store goes to DRAM', () => {
    const { vm, slot, dram, key } = cachedVm();
    expect(complete(vm.registerNoncoherentDma())).toBe(16);
    const v = new Vcpu(vm, 0, new Ops([
      { kind: OpKind.SET_PAT, gfn: G, value: 1, offset: X86_MEMTYPE_WC },
      { gfn: G, value: 7 },
      { gfn: G + 2, value: 8 },
    ]));
    retire(v, 3);
    expect(slot.spte[0]! & SPTE_MT_SET, 'the fault computed the type').not.toBe(0);
    expect(spteMtMask(slot.spte[0]!), 'EPT WB, IPAT clear').toBe(X86_MEMTYPE_WB << 3);
    expect(dram(0), 'WC: straight to DRAM').toBe(7);
    expect(vm.cache!.state(key(0))).toBe('invalid');
    expect(vm.cache!.state(key(2)), 'a page the PAT leaves WB is cached').toBe('dirty');
    expect(dram(2)).toBe(0);
  });

  it('page aliasing: the guest\'s SET_PAT flushes the page (cpa_flush), but a line the migration thread caches afterwards is what its next WB read returns after a UC store', () => {
    const { vm, slot, key } = cachedVm();
    complete(vm.registerNoncoherentDma());
    const v = new Vcpu(vm, 0, new Ops([
      { gfn: G + 3, value: 1 }, // WB: the line is cached, dirty
      { kind: OpKind.SET_PAT, gfn: G + 3, value: 1, offset: X86_MEMTYPE_UC },
      { gfn: G + 3, value: 2 }, // UC: memory only
    ]));
    retire(v, 2);
    expect(vm.cache!.state(key(3)), 'set_memory_uc flushed the line').toBe('invalid');
    expect(slot.readU64(3)).toBe(1);
    const page = new Uint8Array(4096);
    vm.cache!.readPage(slot.firstPage + 3, page, 0); // the migration thread's read fills clean lines
    retire(v, 1);
    expect(slot.readU64(3)).toBe(2);
    vm.cache!.readPage(slot.firstPage + 3, page, 0);
    expect(new DataView(page.buffer).getUint32(0, true), 'its next WB read: the stale cached line').toBe(1);
    expect(vm.cache!.staleReads()).toMatchObject({ migration: 1, cpu: 0, device: 0 });
    vm.cache!.clflushPage(slot.firstPage + 3);
    vm.cache!.readPage(slot.firstPage + 3, page, 0);
    expect(new DataView(page.buffer).getUint32(0, true), 'flushed first, it reads memory').toBe(2);
  });

  it('a guest WBINVD is executed only while non-coherent DMA is registered (kvm_emulate_wbinvd): otherwise the dirty line stays', () => {
    const { vm, dram, key } = cachedVm();
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 5 }, { kind: OpKind.WBINVD, gfn: G }, { gfn: G, value: 6 }, { kind: OpKind.WBINVD, gfn: G }]));
    retire(v, 2);
    expect([vm.cache!.state(key(0)), dram(0)], 'skipped: every device snoops').toEqual(['dirty', 0]);
    complete(vm.registerNoncoherentDma(), [v]);
    retire(v, 2);
    expect([vm.cache!.state(key(0)), dram(0)], 'executed: written back and invalidated').toEqual(['invalid', 6]);
  });

  it('the fault path computes the type only on a VM with the cache model: elsewhere SPTEs keep no memory type bits', () => {
    const vm = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: G, pages: 4, flags: 0 }], vcpus: 1, tracking: MANUAL }));
    vm.populate();
    complete(vm.registerNoncoherentDma());
    retire(new Vcpu(vm, 0, new Ops([{ gfn: G, value: 1 }])), 1);
    expect(vm.memory.slots[0]!.spte[0]! & SPTE_MT_SET).toBe(0);
    expect(vm.cache).toBeNull();
  });
});

describe('a migration with the cache model reads through it and moves exactly what the guest wrote', () => {
  function scenario(o: Partial<MigrationScenario> = {}): MigrationScenario {
    return {
      tracking: 'dirty-ring', vcpus: 2, memoryBytes: 4 << 20, slots: 2, ringEntries: 256, workload: DEFAULT_WORKLOAD, seed: 1,
      bugs: [], hostWriteEvery: 16, cpuCache: { sets: 256, ways: 8, seed: 3, selfSnoop: false },
      params: { bandwidth: 32 << 20, downtimeLimitMs: 2, maxIterations: 8, timeoutMs: 1e9, policy: 'force', batchPages: 32, warmupOps: 2000 },
      ...o,
    };
  }

  for (const seed of [1, 2, 3]) {
    it(`deterministic seed ${seed}: vCPUs and host writes through the cache, the destination equal to the source's architectural memory`, async () => {
      let cache: Vm['cache'] = null;
      const r = await runMigration(scenario({ seed }), { driver: 'deterministic', watchdogMs: 10_000, burst: 64, prepare: (vm) => { cache = vm.cache; } });
      expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
      expect(r.pagesCompared).toBe(1024);
      const c = cache as Vm['cache'];
      expect(c!.stat(CacheStat.WRITEBACKS), 'dirty lines were evicted and written back').toBeGreaterThan(0);
      expect(c!.stat(CacheStat.HITS)).toBeGreaterThan(0);
    });
  }

  it('free-run, with a device doing snooped DMA beside the vCPUs: passes', async () => {
    const { scenario: s } = migrationSetup({ memoryBytes: '4MiB', vcpus: '2', devices: ['dma-engine:every=4,buffers=32,remap-every=0'], hostWriteEvery: '0', driver: 'free', dirtyLimit: '2MB/s', warmup: '500' } as never);
    const r = await runMigration({ ...s, cpuCache: { sets: 256, ways: 8, seed: 3, selfSnoop: false } }, { driver: 'free', watchdogMs: 30_000, burst: 64 });
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(r.dma!.devices[0]!.dmaWrites).toBeGreaterThan(0);
  });
});
