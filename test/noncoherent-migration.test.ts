import { describe, expect, it } from 'vitest';
import { NONCOHERENT_BLOCKER, runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { complete, refusedMigration } from './helpers.ts';
import { RENDER_WBINVD_DRIVER, RenderGuest, renderHandover } from '../src/guest/render-guest.ts';
import { type GuestOp, OpKind, SET_PAT_COHERENT_ACK, SET_PAT_NO_CLFLUSH } from '../src/host/guest-op.ts';
import { CoherentSwitch, GlobalWord } from '../src/host/layout.ts';
import { X86_MEMTYPE_WB, X86_MEMTYPE_WC } from '../src/host/memory-type.ts';
import type { Vm } from '../src/host/vm.ts';
import { DEVICE_WRITER_BASE } from '../src/host/memslot.ts';
import { Prng } from '../src/util/prng.ts';

/**
 * A guest rendering through a device that does not snoop (render workload, dma-engine with
 * snoop=false), migrating with the CPU cache model on: the guest's WC stores and the
 * device's DMA reach memory behind the cache, and the migration thread reads write-back.
 * Each policy the seed discussion weighed, on the same guest.
 */
const RENDER = { cpuCache: 'on', workload: 'render', memoryBytes: '4MiB', vcpus: '2', devices: ['dma-engine:snoop=false,every=4,buffers=32,remap-every=0'] };
const DET = { driver: 'deterministic' as const, watchdogMs: 10_000, burst: 64 };

function render(extra: Record<string, unknown> = {}) {
  return migrationSetup({ ...RENDER, driver: 'deterministic', ...extra } as never).scenario;
}

describe('migrating a guest with a non-coherent device', () => {
  for (const seed of [1, 2, 3]) {
    it(`seed ${seed}: none sends stale cache lines (lost writes, the stale read oracle names the migration thread); clflush-before-read moves every write`, async () => {
      const none = await runMigration(render({ seed: String(seed), noncoherentMigration: 'none' }), DET);
      expect(none.status).toBe('failed');
      expect(none.mismatchCount).toBeGreaterThan(0);
      expect(none.cache!.staleReads.migration).toBeGreaterThan(0);
      expect(none.cache!.migrationPageFlushes).toBe(0);
      expect(none.reason).toMatch(/^the migration thread sent stale data: \d+ of its write-back reads hit a cache line older than memory/);
      expect(failureOf(none)?.kind).toBe('lost-writes');

      const flushed = await runMigration(render({ seed: String(seed), noncoherentMigration: 'clflush-before-read' }), DET);
      expect(flushed.status, `${flushed.reason ?? ''} ${flushed.errors.join('; ')}`).toBe('passed');
      expect(flushed.cache!.staleReads).toEqual({ cpu: 0, device: 0, migration: 0, firstGfn: null });
      expect(flushed.cache!.migrationPageFlushes, 'every page read was flushed first').toBeGreaterThan(0);
      expect(flushed.dma!.devices[0]!.dmaWrites).toBeGreaterThan(0);
    });
  }

  it('block (QEMU\'s answer, the default): the migration is refused at once with the blocker\'s reason, nothing ran', async () => {
    const r = await runMigration(render(), DET);
    expect(r).toMatchObject({ status: 'failed', reason: NONCOHERENT_BLOCKER, info: null, passes: [] });
    expect(failureOf(r)?.kind).toBe('migration-failed');
  });

  it('free-run: clflush-before-read passes with real threads', async () => {
    const { scenario } = migrationSetup({ ...RENDER, driver: 'free', noncoherentMigration: 'clflush-before-read', dirtyLimit: '1MB/s', warmup: '500' } as never);
    const r = await runMigration(scenario, { driver: 'free', watchdogMs: 30_000, burst: 64 });
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(r.cache!.staleReads.migration).toBe(0);
  });

  it('a snooped device leaves KVM ignoring the guest\'s PAT: its WC mapping is WB, nothing is stale, nothing needs flushing', async () => {
    const r = await runMigration(render({ devices: ['dma-engine:every=4,buffers=32,remap-every=0'], noncoherentMigration: 'none' }), DET);
    expect(r.status, `${r.reason ?? ''}`).toBe('passed');
    expect(r.cache!.staleReads).toEqual({ cpu: 0, device: 0, migration: 0, firstGfn: null });
  });

  it('non-coherent DMA unregistered behind the device\'s back: KVM ignores the guest\'s PAT again, the WC buffers are cached, and the device reads stale data', async () => {
    const r = await runMigration(render({ noncoherentMigration: 'clflush-before-read' }), {
      ...DET,
      prepare: (vm) => {
        const u = complete(vm.unregisterNoncoherentDma());
        expect(u.ok).toBe(true);
      },
    });
    expect(r.status).toBe('failed');
    expect(r.cache!.staleReads.device).toBeGreaterThan(0);
    expect(r.reason).toMatch(/^a device read stale data \d+ times: its no-snoop DMA read memory while a newer write sat in the CPU cache \(first gfn 0x[0-9a-f]+\)$/);
  });
});

describe('switch-to-coherent: guest and host return to coherent DMA before the migration reads anything', () => {
  for (const seed of [1, 2, 3]) {
    it(`seed ${seed}: both switched, the migration moves every write without a flush; the host alone sends stale lines while the guest still writes WC`, async () => {
      let source: Vm | undefined;
      const both = await runMigration(render({ seed: String(seed), noncoherentMigration: 'switch-to-coherent' }), { ...DET, prepare: (vm) => { source = vm; } });
      expect(both.status, `${both.reason ?? ''}`).toBe('passed');
      expect(both.cache).toMatchObject({ staleReads: { cpu: 0, device: 0, migration: 0 }, migrationPageFlushes: 0, overwrites: 0 });
      expect([Atomics.load(source!.global, GlobalWord.DEVICES_SNOOP), Atomics.load(source!.global, GlobalWord.COHERENT_SWITCH)]).toEqual([1, CoherentSwitch.DONE]);
      expect(source!.guestPat![source!.memory.slots[0]!.pages - 1], 'the render buffers are WB again').toBe(X86_MEMTYPE_WB);

      const hostOnly = await runMigration(render({ seed: String(seed), noncoherentMigration: 'switch-host-only' }), { ...DET, prepare: (vm) => { source = vm; } });
      expect(hostOnly.status).toBe('failed');
      expect(hostOnly.mismatchCount).toBeGreaterThan(0);
      expect(hostOnly.cache!.staleReads.migration).toBeGreaterThan(0);
      expect(hostOnly.reason).toMatch(/the guest still writes its buffers WC: switch-to-coherent switches the guest too$/);
      expect([Atomics.load(source!.global, GlobalWord.DEVICES_SNOOP), Atomics.load(source!.global, GlobalWord.COHERENT_SWITCH)]).toEqual([1, CoherentSwitch.NONE]);
    });
  }

  it('free-run: switch-to-coherent passes with real threads', async () => {
    const { scenario } = migrationSetup({ ...RENDER, driver: 'free', noncoherentMigration: 'switch-to-coherent', dirtyLimit: '1MB/s', warmup: '500' } as never);
    const r = await runMigration(scenario, { driver: 'free', watchdogMs: 30_000, burst: 64 });
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(r.cache).toMatchObject({ staleReads: { migration: 0 }, migrationPageFlushes: 0, overwrites: 0 });
  });

  it('the driver maps its buffers WB once, at the device\'s request, and says so', () => {
    const area = { baseGfn: 1000, pages: 4 };
    const w = new RenderGuest(area, { pages: 100, gfn: (i: number) => i }, new Prng(1));
    const op = { kind: OpKind.READ, gfn: 0, value: 0, offset: 0 } as GuestOp;
    w.next(op, { iteration: 1 });
    expect(op).toMatchObject({ kind: OpKind.SET_PAT, offset: X86_MEMTYPE_WC });
    w.next(op, { iteration: 1, coherentSwitch: true });
    expect(op).toMatchObject({ kind: OpKind.SET_PAT, gfn: 1000, value: 4, offset: X86_MEMTYPE_WB | SET_PAT_COHERENT_ACK });
    for (let i = 0; i < 10; i++) { w.next(op, { iteration: 1, coherentSwitch: true }); expect(op.kind).toBe(OpKind.WRITE64); }
  });

  it('switch-to-coherent needs a guest with a driver to switch', () => {
    expect(() => migrationSetup({ ...RENDER, workload: 'random', noncoherentMigration: 'switch-to-coherent' } as never))
      .toThrow('--noncoherent-migration: switch-to-coherent asks the guest\'s driver to map its buffers WB again; it needs a guest with one (--workload render or render-wbinvd, not random)');
  });
});

describe('render-wbinvd: a driver that flushes with WBINVD as it maps its buffers WC', () => {
  it('vCPU 0 writes its buffers WB, maps them WC leaving the flush to a WBINVD, then renders; the other vCPUs never touch them', () => {
    const area = { baseGfn: 1000, pages: 4 };
    const other = { pages: 100, gfn: (i: number) => i };
    const op = { kind: OpKind.READ, gfn: 0, value: 0, offset: 0 } as GuestOp;
    const seq = (w: RenderGuest, n: number) => Array.from({ length: n }, () => { w.next(op, { iteration: 1 }); return { ...op }; });
    const driver = seq(new RenderGuest(area, other, new Prng(1), RENDER_WBINVD_DRIVER), 12);
    expect(driver.slice(0, 4).map((o) => [o.kind, o.gfn])).toEqual([1000, 1001, 1002, 1003].map((g) => [OpKind.WRITE64, g]));
    expect(driver[4]).toMatchObject({ kind: OpKind.SET_PAT, gfn: 1000, value: 4, offset: X86_MEMTYPE_WC | SET_PAT_NO_CLFLUSH });
    expect(driver[5]!.kind).toBe(OpKind.WBINVD);
    expect(driver.slice(6).some((o) => o.gfn >= 1000), 'it renders into its buffers').toBe(true);
    expect(renderHandover(area, 'render-wbinvd'), 'the devices wait for those first operations').toEqual({ vcpu: 0, ops: 6 });
    const others = seq(new RenderGuest(area, other, new Prng(2), null), 50);
    expect(others.every((o) => o.kind === OpKind.WRITE64 && o.gfn < 100)).toBe(true);
  });

  it('with KVM executing the WBINVD nothing is stale and nothing overwritten, deterministic and free-run', async () => {
    let source: Vm | undefined;
    const det = await runMigration(render({ workload: 'render-wbinvd', noncoherentMigration: 'clflush-before-read' }), { ...DET, prepare: (vm) => { source = vm; } });
    expect(det.status, `${det.reason ?? ''}`).toBe('passed');
    // The buffers are vCPU 0's and the device's alone: the other vCPU never wrote them.
    const slot = source!.memory.slots[0]!;
    const writers = new Set(Array.from({ length: 64 }, (_, i) => slot.stampOf(slot.pages - 64 + i).writer));
    expect([...writers].every((w) => w === 1 || w === DEVICE_WRITER_BASE), `writers ${[...writers]}`).toBe(true);
    expect(writers.has(1)).toBe(true);
    expect([det.cache!.staleReads.device, det.cache!.overwrites]).toEqual([0, 0]);
    expect(det.dma!.devices[0]!.dmaReads + det.dma!.devices[0]!.dmaWrites, 'the device ran after the handover').toBeGreaterThan(0);
    const { scenario } = migrationSetup({ ...RENDER, workload: 'render-wbinvd', driver: 'free', noncoherentMigration: 'clflush-before-read', dirtyLimit: '1MB/s', warmup: '500' } as never);
    const free = await runMigration(scenario, { driver: 'free', watchdogMs: 30_000, burst: 64 });
    expect(free.status, `${free.reason ?? ''} ${free.errors.join('; ')}`).toBe('passed');
    expect(free.cache!.overwrites).toBe(0);
  });
});

describe('what a scenario with the cache model refuses, naming the setting', () => {
  const refused = refusedMigration;
  it('a no-snoop device without the cache model, the cache model with a confidential guest, unknown values', () => {
    expect(refused({ ...RENDER, cpuCache: 'off' })).toBe('--device: device 0 (dma-engine, snoop=false): no-snoop DMA differs from snooped DMA only with the CPU cache model; add --cpu-cache on');
    expect(refused({ cpuCache: 'on', confidential: 'shared', memoryBytes: '8MiB', devices: ['dma-engine:identity,buffers=16'] })).toBe('--cpu-cache: the CPU cache model is not modelled with a confidential guest\'s private memory; it needs --confidential off');
    expect(refused({ cpuCache: 'big' })).toBe('--cpu-cache: unknown CPU cache mode \'big\' (one of: off, on, self-snoop)');
    expect(refused({ noncoherentMigration: 'pray' })).toBe('--noncoherent-migration: unknown non-coherent migration policy \'pray\' (one of: block, clflush-before-read, switch-to-coherent, switch-host-only, device-state, none)');
    expect(refused({ devices: ['dma-engine:snoop=maybe'], cpuCache: 'on' })).toBe('--device: device 0 \'dma-engine:snoop=maybe\': snoop: \'maybe\' is not true or false');
  });
});
