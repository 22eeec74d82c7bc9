import { describe, expect, it } from 'vitest';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { DEVICE_DEFAULTS, DEVICE_WRITER_BASE, type DeviceConfig } from '../src/host/devices/device-config.ts';
import { dmaTrackingOf } from '../src/host/devices/device.ts';
import { createDevice } from '../src/host/devices/devices.ts';
import { BufferPages, gfnEnd, iovaWindows } from '../src/host/devices/dma-buffers.ts';
import { BufferState, type DmaDevice } from '../src/host/devices/dma-device.ts';
import { DmaEngine } from '../src/host/devices/dma-engine.ts';
import { Gvt } from '../src/host/devices/gvt.ts';
import { Mdev, mdevAccess } from '../src/host/devices/mdev.ts';
import { VFIO_DMA_MAP_FLAG_READ } from '../src/host/iommu/constants.ts';
import { iommuService } from '../src/host/iommu/iommu-service.ts';
import { DMA_ACTIVE, DMA_QUIESCED, DeviceWord, type IommuBackendKind, IommuWord, IoPte, MailboxOp, MailboxWord, deviceBase } from '../src/host/iommu/iommu-layout.ts';
import { type DirtyTracking, GlobalWord, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { type KernelBugs, Vm } from '../src/host/vm.ts';
import { KvmRingSource } from '../src/host/vmm/kvm-ring-source.ts';
import { GeneratorRole, Step, WaitCode } from '../src/roles/role.ts';
import { type DeviceSetup, attachDevices, deviceWindow, iommuConfigFor } from '../src/scenarios/devices.ts';
import { Prng } from '../src/util/prng.ts';
import { LEGACY, RING, VmmControl, complete } from './helpers.ts';

/**
 * The device models stepped on this thread, one operation at a time, against a model
 * of their seeded choices: which buffer, read or write, which page, which IOVA.
 */
const SLOTS = [
  { id: 1, asId: 0, baseGfn: 0x100, pages: 40, flags: 0 },
  { id: 2, asId: 0, baseGfn: 0x200, pages: 24, flags: 0 },
];
const TOTAL = 64;
/** ceil(0x218 / 1024) * 1024 + 1024 */
const WINDOW0 = 2048;

function gfnAt(i: number): number { return i < 40 ? 0x100 + i : 0x200 + (i - 40); }

const cfg = (kind: DeviceConfig['kind'], o: Partial<DeviceConfig> = {}): DeviceConfig => ({
  ...DEVICE_DEFAULTS, kind, every: 4, buffers: 6, writePercent: 50, remapEvery: 0, strayEvery: 0, iotlbEntries: 32, ...o,
});

type Access = [string, number];

interface Rig {
  vm: Vm; vmm: VmmControl; dev: DmaDevice; role: GeneratorRole; svc: GeneratorRole | null; log: Access[]; index: number;
  setOps(n: number): void; settle(): void; word(k: number): number;
}

function rig(o: {
  devices: DeviceConfig[]; index?: number; backend?: IommuBackendKind; seed?: number; bugs?: KernelBugs;
  attach?: boolean; service?: boolean; tracking?: DirtyTracking;
}): Rig {
  const index = o.index ?? 0;
  const seed = o.seed ?? 7;
  const setup: DeviceSetup = { backend: o.backend ?? 'type1', dmaEntryLimit: 65535, stopOnFault: false, devices: o.devices };
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: o.tracking ?? LEGACY, iommu: iommuConfigFor(setup, SLOTS) }), o.bugs ?? {});
  vm.populate();
  if (o.attach !== false) attachDevices(vm, setup, seed);
  const vmm = new VmmControl(vm);
  vmm.resumeHost();
  const dev = createDevice(vm, index, o.devices[index]!, seed, deviceWindow(setup, index, vm)) as DmaDevice;
  const log: Access[] = [];
  const d = dev as unknown as { store(g: number): void; load(g: number): void };
  const store = d.store.bind(d);
  const load = d.load.bind(d);
  d.store = (g) => { log.push(['w', g]); store(g); };
  d.load = (g) => { log.push(['r', g]); load(g); };
  const role = new GeneratorRole('device', dev.run());
  const svc = o.service === false ? null : new GeneratorRole('iommu', iommuService(vm, (e) => { throw new Error(e.detail); }));
  const setOps = (n: number): void => { Atomics.store(vm.vcpuWords, vm.vcpuBase(0) + VcpuWord.OPS, n); };
  const settle = (): void => {
    let quiet = 0;
    for (let i = 0; i < 100_000; i++) {
      const a = role.step();
      const b = svc === null ? Step.BLOCKED : svc.step();
      if (a === Step.BLOCKED && role.wait.code === WaitCode.GUEST_OPS && b === Step.BLOCKED) { if (++quiet >= 2) return; } else quiet = 0;
    }
    throw new Error('device did not settle');
  };
  const word = (k: number): number => Atomics.load(vm.iommu!.words, deviceBase(index) + k);
  return { vm, vmm, dev, role, svc, log, index, setOps, settle, word };
}

/** An independent model of a DMA device's seeded choices. */
class Model {
  readonly p: Prng;
  cursor: number;
  readonly buffers: { index: number; iova: number; gfn: number; mapped: boolean }[];
  constructor(readonly c: DeviceConfig, device: number, seed: number, base: number) {
    this.p = new Prng(Prng.derive(seed, 4000 + device));
    this.cursor = this.p.below(TOTAL);
    this.buffers = Array.from({ length: c.buffers }, (_, index) => {
      const gfn = this.next();
      return { index, iova: c.identity ? gfn : base + index, gfn, mapped: true };
    });
  }
  next(): number {
    if (this.c.pattern === 'random') return gfnAt(this.p.below(TOTAL));
    const g = gfnAt(this.cursor);
    this.cursor = (this.cursor + 1) % TOTAL;
    return g;
  }
  pick(): Model['buffers'][number] | null {
    const n = this.buffers.length;
    const s = this.p.below(n);
    for (let i = 0; i < n; i++) { const b = this.buffers[(s + i) % n]!; if (b.mapped) return b; }
    return null;
  }
  /** Operation k: what it does. */
  op(k: number): { kind: 'remap'; b: Model['buffers'][number]; old: number } | { kind: 'stray' } | { kind: 'none' } | { kind: 'dma'; b: Model['buffers'][number]; write: boolean } {
    const c = this.c;
    if (c.remapEvery > 0 && !c.identity && k % c.remapEvery === 0) {
      const b = this.pick();
      if (b !== null) { const old = b.gfn; b.gfn = this.next(); return { kind: 'remap', b, old }; }
    }
    if (c.strayEvery > 0 && k % c.strayEvery === 0) return { kind: 'stray' };
    const b = this.pick();
    if (b === null) return { kind: 'none' };
    return { kind: 'dma', b, write: this.p.below(100) < c.writePercent };
  }
}

function pagesStampedBy(vm: Vm, writer: number): Map<number, number> {
  const m = new Map<number, number>();
  for (const s of vm.memory.slots) for (let p = 0; p < s.pages; p++) { const st = s.stampOf(p); if (st.writer === writer) m.set(s.baseGfn + p, st.seq); }
  return m;
}

describe('device configuration and buffer pages', () => {
  it('dmaTrackingOf: gvt is seen by KVM only, an mdev by the IOMMU, a DMA engine as configured', () => {
    expect(dmaTrackingOf(cfg('gvt', { tracking: 'device' }))).toBe('kvm');
    expect(dmaTrackingOf(cfg('gvt', { tracking: 'iommu' }))).toBe('kvm');
    expect(dmaTrackingOf(cfg('mdev', { tracking: 'device' }))).toBe('iommu');
    expect(dmaTrackingOf(cfg('dma-engine', { tracking: 'device' }))).toBe('device');
    expect(dmaTrackingOf(cfg('dma-engine', { tracking: 'iommu' }))).toBe('iommu');
  });

  it('iovaWindows: one window per IOVA device above guest RAM (aligned up, one page gap of 1024), one stray page each; gvt has none', () => {
    expect(gfnEnd(SLOTS)).toBe(0x218);
    expect(gfnEnd([{ baseGfn: 0x300, pages: 10 }, { baseGfn: 0x10, pages: 5 }])).toBe(0x30a);
    const r = iovaWindows([cfg('dma-engine', { buffers: 4 }), cfg('gvt'), cfg('mdev', { buffers: 2 })], 0x218);
    expect(r).toEqual({ windows: [{ base: 2048, pages: 5 }, null, { base: 2053, pages: 3 }], iovaPages: 2056 });
    expect(iovaWindows([cfg('mdev', { buffers: 1 })], 1024).windows[0]).toEqual({ base: 2048, pages: 2 });
  });

  it('BufferPages, sequential: consecutive pages from a seeded start, across slots, wrapping at the end of RAM', () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY }));
    const c = cfg('dma-engine', { pattern: 'sequential', buffers: TOTAL + 5 });
    const start = new Prng(Prng.derive(11, 4003)).below(TOTAL);
    const bp = new BufferPages(c, 3, 11, vm.memory);
    const want = Array.from({ length: TOTAL + 5 }, (_, i) => gfnAt((start + i) % TOTAL));
    expect(bp.initial()).toEqual(want);
    expect(want).toContain(0x127);
    expect(want).toContain(0x200);
    expect(() => (bp as unknown as { gfnAt(i: number): number }).gfnAt(TOTAL)).toThrow('page index out of range');
  });

  it('BufferPages, random: uniform draws from the device\'s own stream (per seed and per device)', () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY }));
    const c = cfg('dma-engine', { pattern: 'random', buffers: 40 });
    const p = new Prng(Prng.derive(5, 4002));
    p.below(TOTAL);
    const want = Array.from({ length: 40 }, () => gfnAt(p.below(TOTAL)));
    expect(new BufferPages(c, 2, 5, vm.memory).initial()).toEqual(want);
    expect(new BufferPages(c, 2, 5, vm.memory).initial()).toEqual(want);
    expect(new BufferPages(c, 2, 6, vm.memory).initial()).not.toEqual(want);
    expect(new BufferPages(c, 1, 5, vm.memory).initial()).not.toEqual(want);
  });

  it('createDevice builds the configured kind; an IOVA device refuses a VM without an IOMMU', () => {
    const r = rig({ devices: [cfg('mdev'), cfg('dma-engine'), cfg('gvt')] });
    const setup: DeviceSetup = { backend: 'type1', dmaEntryLimit: 65535, stopOnFault: false, devices: [cfg('mdev'), cfg('dma-engine'), cfg('gvt')] };
    expect(createDevice(r.vm, 0, cfg('mdev'), 1, deviceWindow(setup, 0, r.vm))).toBeInstanceOf(Mdev);
    expect(createDevice(r.vm, 1, cfg('dma-engine'), 1, deviceWindow(setup, 1, r.vm))).toBeInstanceOf(DmaEngine);
    expect(createDevice(r.vm, 2, cfg('gvt'), 1, null)).toBeInstanceOf(Gvt);
    const bare = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY }));
    expect(() => new DmaEngine(bare, 2, cfg('dma-engine'), 1, { base: 2048, pages: 7 })).toThrow('device 2 (dma-engine) needs an IOMMU');
  });

  it('mdevAccess: write pin, read pin, dma_rw, by buffer index modulo 3', () => {
    expect([0, 1, 2, 3, 4, 5, 7].map(mdevAccess)).toEqual([0, 1, 2, 0, 1, 2, 1]);
  });
});

describe('the DMA engine, step by step', () => {
  /** Runs `ops` operations one at a time (each settled), checking the model's accesses. */
  function drive(r: Rig, m: Model, ops: number, onOp?: (k: number, what: ReturnType<Model['op']>) => void): Access[] {
    const want: Access[] = [];
    for (let k = 1; k <= ops; k++) {
      r.setOps(k * m.c.every);
      r.settle();
      const what = m.op(k);
      if (what.kind === 'dma') want.push([what.write ? 'w' : 'r', what.b.gfn]);
      onOp?.(k, what);
      expect(r.word(DeviceWord.OPS)).toBe(k);
    }
    return want;
  }

  it('is paced by the guest: exactly one operation per `every` guest operations, none before', () => {
    const c = cfg('dma-engine', { every: 5 });
    const r = rig({ devices: [c] });
    r.setOps(4);
    r.settle();
    expect(r.dev.stats().operations).toBe(0);
    expect(r.word(DeviceWord.MODE)).toBe(DMA_ACTIVE);
    r.setOps(5);
    r.settle();
    expect(r.dev.stats().operations).toBe(1);
    r.setOps(9);
    r.settle();
    expect(r.dev.stats().operations).toBe(1);
    r.setOps(22); // catches up from the last one due: 10, 15, 20
    r.settle();
    expect(r.dev.stats().operations).toBe(4);
  });

  it('reads and writes its buffers by IOVA as its seeded stream says, stamping each page written (writer, seq 1, 2, ...)', () => {
    const c0 = cfg('dma-engine');
    // Pick a writePercent that one of the draws hits exactly.
    const probe = new Model(c0, 1, 7, WINDOW0 + 7);
    const draws: number[] = [];
    for (let k = 0; k < 12; k++) { probe.p.below(c0.buffers); draws.push(probe.p.below(100)); }
    const wp = draws.find((d) => d > 5 && d < 95)!;
    const c = { ...c0, writePercent: wp };
    const devices = [cfg('dma-engine'), c];
    const r = rig({ devices, index: 1 });
    const window = WINDOW0 + devices[0]!.buffers + 1;
    expect(r.dev.buffers.map((b) => b.iova)).toEqual([0, 1, 2, 3, 4, 5].map((i) => window + i));
    const m = new Model(c, 1, 7, window);
    expect(r.dev.buffers.map((b) => b.gfn)).toEqual(m.buffers.map((b) => b.gfn));
    const want = drive(r, m, 40);
    expect(r.log).toEqual(want);
    const writes = want.filter((a) => a[0] === 'w');
    expect(writes.length).toBeGreaterThan(0);
    expect(writes.length).toBeLessThan(40);
    const s = r.dev.stats();
    expect(s).toMatchObject({ device: 1, kind: 'dma-engine', tracking: 'iommu', operations: 40, dmaWrites: writes.length, dmaReads: 40 - writes.length, faults: 0, staleIotlb: 0 });
    const touched = new Set(want.map((a) => a[1]));
    expect(s.iotlbMisses).toBe(new Set(m.buffers.filter((b) => want.some((a) => a[1] === b.gfn)).map((b) => b.iova)).size);
    expect(s.iotlbHits).toBe(40 - s.iotlbMisses);
    expect(touched.size).toBeGreaterThan(1);
    // Stamps: the last write to each page, writer DEVICE_WRITER_BASE + 1, seq counting writes.
    const lastSeq = new Map<number, number>();
    writes.forEach((a, i) => lastSeq.set(a[1], i + 1));
    expect(pagesStampedBy(r.vm, DEVICE_WRITER_BASE + 1)).toEqual(lastSeq);
    expect(pagesStampedBy(r.vm, DEVICE_WRITER_BASE).size).toBe(0);
  });

  it('different seeds choose different pages and accesses; the same seed the same', () => {
    const run = (seed: number): Access[] => { const r = rig({ devices: [cfg('dma-engine')], seed }); r.setOps(4 * 30); r.settle(); return r.log; };
    expect(run(3)).toEqual(run(3));
    expect(run(3)).not.toEqual(run(4));
  });

  it('remaps every N operations through the IOMMU service: unmap, then map the same IOVA to the next page; the IOTLB is flushed', () => {
    const c = cfg('dma-engine', { remapEvery: 3, buffers: 4 });
    const r = rig({ devices: [c] });
    const m = new Model(c, 0, 7, WINDOW0);
    let remaps = 0;
    const cached = new Set<number>();
    let misses = 0;
    const want = drive(r, m, 30, (k, what) => {
      if (what.kind === 'remap') {
        remaps++;
        cached.clear();
        const iommu = r.vm.iommu!;
        expect(iommu.table.gfn(what.b.iova)).toBe(what.b.gfn);
        expect(r.dev.buffers[what.b.index]).toMatchObject({ gfn: what.b.gfn, state: BufferState.MAPPED });
        const w = iommu.words;
        const at = deviceBase(0);
        expect([w[at + MailboxWord.OP], w[at + MailboxWord.IOVA], w[at + MailboxWord.PAGES], w[at + MailboxWord.GFN], w[at + MailboxWord.PROT]])
          .toEqual([MailboxOp.MAP, what.b.iova, 1, what.b.gfn, 3]);
        expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(2 * remaps);
        expect(Atomics.load(w, at + MailboxWord.RESP_SEQ)).toBe(2 * remaps);
        expect(Atomics.load(w, at + DeviceWord.INV_ACK)).toBe(Atomics.load(w, IommuWord.INV_GEN));
      } else if (what.kind === 'dma') {
        if (!cached.has(what.b.iova)) { misses++; cached.add(what.b.iova); }
      }
      expect(k).toBeGreaterThan(0);
    });
    expect(remaps).toBe(10);
    expect(r.log).toEqual(want);
    expect(r.vm.iommu!.stats()).toMatchObject({ maps: 4 + 10, unmaps: 10, entries: 4 });
    expect(r.dev.stats()).toMatchObject({ iotlbMisses: misses, iotlbHits: want.length - misses, faults: 0, staleIotlb: 0 });
  });

  it('does not remap with remapEvery 0 or with identity mappings (buffers used in place at IOVA = GPA)', () => {
    for (const o of [{ remapEvery: 0 }, { remapEvery: 2, identity: true }]) {
      const c = cfg('dma-engine', o);
      const r = rig({ devices: [c] });
      const m = new Model(c, 0, 7, WINDOW0);
      if (c.identity) expect(r.dev.buffers.map((b) => b.iova)).toEqual(r.dev.buffers.map((b) => b.gfn));
      const want = drive(r, m, 12);
      expect(r.log).toEqual(want);
      expect(r.vm.iommu!.stats().unmaps).toBe(0);
      expect(Atomics.load(r.vm.iommu!.words, deviceBase(0) + MailboxWord.REQ_SEQ)).toBe(0);
    }
  });

  it('a stray DMA every N operations faults on the never-mapped IOVA past its buffers, and writes nothing', () => {
    const c = cfg('dma-engine', { strayEvery: 3 });
    const r = rig({ devices: [c] });
    const m = new Model(c, 0, 7, WINDOW0);
    const want = drive(r, m, 9);
    expect(r.log).toEqual(want);
    expect((r.dev as DmaEngine).strayIova).toBe(WINDOW0 + 6);
    const rec = { kind: 'unmapped-iova', device: 0, iova: (WINDOW0 + 6) * PAGE_SIZE, write: true, cachedGfn: -1, currentGfn: -1 };
    expect(r.vm.iommu!.dmaRecords.records()).toEqual([rec, rec, rec]);
    expect(r.dev.stats()).toMatchObject({ faults: 3, operations: 9, dmaWrites: want.filter((a) => a[0] === 'w').length, dmaReads: want.filter((a) => a[0] === 'r').length });
  });

  it('stale-iotlb-after-unmap: a remapped IOVA still cached sends the DMA to the old page, recorded as stale', () => {
    const c = cfg('dma-engine', { remapEvery: 4, buffers: 2, writePercent: 100 });
    const r = rig({ devices: [c], bugs: { staleIotlbAfterUnmap: true } });
    const m = new Model(c, 0, 7, WINDOW0);
    const cache = new Map<number, number>();
    const want: Access[] = [];
    const stale: unknown[] = [];
    for (let k = 1; k <= 16; k++) {
      r.setOps(k * 4);
      r.settle();
      const what = m.op(k);
      if (what.kind !== 'dma') continue;
      const hit = cache.get(what.b.iova);
      if (hit === undefined) { cache.set(what.b.iova, what.b.gfn); want.push(['w', what.b.gfn]); continue; }
      want.push(['w', hit]);
      if (hit !== what.b.gfn) stale.push({ kind: 'stale-iotlb', device: 0, iova: what.b.iova * PAGE_SIZE, write: true, cachedGfn: hit, currentGfn: what.b.gfn });
    }
    expect(stale.length).toBeGreaterThan(0);
    expect(r.log).toEqual(want);
    expect(r.vm.iommu!.dmaRecords.records()).toEqual(stale);
    expect(r.dev.stats()).toMatchObject({ staleIotlb: stale.length, faults: 0 });
  });

  it('device mailbox: replies are taken only when answered; a failed unmap frees the buffer for good, a failed map too', () => {
    const c = cfg('dma-engine', { remapEvery: 1, buffers: 3, every: 1 });
    const r = rig({ devices: [c], service: false });
    const w = r.vm.iommu!.words;
    const at = deviceBase(0);
    const answer = (result: number): void => { w[at + MailboxWord.RESULT] = result; Atomics.store(w, at + MailboxWord.RESP_SEQ, Atomics.load(w, at + MailboxWord.REQ_SEQ)); };
    r.setOps(1);
    r.settle();
    expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(1);
    expect(w[at + MailboxWord.OP]).toBe(MailboxOp.UNMAP);
    const first = r.dev.buffers.find((b) => b.state === BufferState.UNMAPPING)!;
    expect(w[at + MailboxWord.IOVA]).toBe(first.iova);
    expect(w[at + MailboxWord.GFN]).toBe(first.gfn);
    // Unanswered: operations go on as DMA on the other buffers, no second request.
    r.setOps(5);
    r.settle();
    expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(1);
    expect(r.log.length).toBe(4);
    expect(r.log.every((a) => a[1] !== first.gfn || r.dev.buffers.some((b) => b !== first && b.gfn === first.gfn))).toBe(true);
    expect(first.state).toBe(BufferState.UNMAPPING);
    // The unmap fails: the buffer is free, no map follows.
    answer(-22);
    r.settle();
    expect(first.state).toBe(BufferState.FREE);
    expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(1);
    // Next op unmaps another buffer; it succeeds: a map of the same IOVA to a new page follows.
    r.setOps(6);
    r.settle();
    expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(2);
    const second = r.dev.buffers.find((b) => b.state === BufferState.UNMAPPING)!;
    answer(0);
    r.settle();
    expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(3);
    expect(w[at + MailboxWord.OP]).toBe(MailboxOp.MAP);
    expect(second.state).toBe(BufferState.MAPPING);
    expect(w[at + MailboxWord.GFN]).toBe(second.gfn);
    answer(-28); // the map fails (ENOSPC): free for good
    r.settle();
    expect(second.state).toBe(BufferState.FREE);
    // The last buffer: unmapped, mapped again successfully.
    r.setOps(7);
    r.settle();
    const third = r.dev.buffers.find((b) => b.state === BufferState.UNMAPPING)!;
    expect(third).toBeDefined();
    answer(0);
    r.settle();
    answer(0);
    r.settle();
    expect(third.state).toBe(BufferState.MAPPED);
    expect(r.dev.buffers.map((b) => b.state).sort()).toEqual([BufferState.MAPPED, BufferState.FREE, BufferState.FREE].sort());
    // Now, with no buffer it may unmap... unmap the last one and fail it: nothing mapped, operations do nothing.
    r.setOps(8);
    r.settle();
    answer(-22);
    r.settle();
    expect(r.dev.buffers.every((b) => b.state === BufferState.FREE)).toBe(true);
    const before = r.log.length;
    r.setOps(20);
    r.settle();
    expect(r.dev.stats().operations).toBe(20);
    expect(r.log.length).toBe(before);
    expect(Atomics.load(w, at + MailboxWord.REQ_SEQ)).toBe(6);
    expect(r.dev.stats().faults).toBe(0);
  });

  it('publishes its DMA counters every 32 operations and whenever it waits, not on every operation', () => {
    const c = cfg('dma-engine', { every: 1 });
    const r = rig({ devices: [c], service: false });
    r.setOps(50);
    const seen: [number, number][] = [];
    for (let i = 0; i < 500 && r.word(DeviceWord.OPS) < 40; i++) {
      r.role.step();
      seen.push([r.word(DeviceWord.OPS), r.word(DeviceWord.DMA_WRITES) + r.word(DeviceWord.DMA_READS)]);
    }
    expect(seen.filter(([o]) => o === 20).every(([, n]) => n === 0)).toBe(true);
    expect(seen.filter(([o]) => o === 33).every(([, n]) => n === 31)).toBe(true);
    r.settle();
    expect(r.word(DeviceWord.DMA_WRITES) + r.word(DeviceWord.DMA_READS)).toBe(50);
  });

  it('pause: it quiesces (publishes, drops its IOTLB, mode QUIESCED), does nothing while paused, and resumes acknowledging invalidations', () => {
    const c = cfg('dma-engine', { every: 1, buffers: 2, writePercent: 100 });
    const r = rig({ devices: [c], service: false });
    r.setOps(30);
    for (let i = 0; i < 500 && r.word(DeviceWord.OPS) < 10; i++) r.role.step();
    expect(r.word(DeviceWord.OPS)).toBe(10);
    expect(r.word(DeviceWord.DMA_WRITES)).toBe(0);
    const eng = r.dev as DmaEngine;
    const missesBefore = eng.iotlb.misses;
    expect(missesBefore).toBe(2);
    r.vmm.pauseHost();
    r.role.step();
    expect(r.vmm.hostPaused()).toBe(true);
    expect(r.word(DeviceWord.MODE)).toBe(DMA_QUIESCED);
    expect(r.word(DeviceWord.DMA_WRITES)).toBe(r.log.length);
    const n = r.log.length;
    for (let i = 0; i < 20; i++) expect(r.role.step()).toBe(Step.BLOCKED);
    expect(r.role.wait.code).toBe(WaitCode.PAUSED);
    expect(r.log.length).toBe(n);
    // An invalidation while it is quiesced does not wait for it.
    complete(r.vm.iommu!.invalidation.invalidateAll());
    const gen = Atomics.load(r.vm.iommu!.words, IommuWord.INV_GEN);
    r.vmm.resumeHost();
    r.role.step();
    expect(r.word(DeviceWord.MODE)).toBe(DMA_ACTIVE);
    expect(r.word(DeviceWord.INV_ACK)).toBe(gen);
    expect(Atomics.load(r.vm.global, GlobalWord.HOST_PAUSED)).toBe(0);
    r.settle();
    expect(r.dev.stats().operations).toBe(30);
    expect(eng.iotlb.misses, 'the IOTLB was dropped at the pause').toBe(missesBefore + 2);
  });
});

describe('dirty tracking of the DMA engine', () => {
  it('iommufd + iommu tracking sets the IOPTE dirty bit of written IOVAs (while HWPT tracking is on); type1 never does', () => {
    for (const backend of ['iommufd', 'type1'] as const) {
      const c = cfg('dma-engine', { writePercent: 100 });
      const r = rig({ devices: [c], backend });
      complete(r.vm.iommu!.hwptSetDirtyTracking(true), [r.role]);
      Atomics.store(r.vm.iommu!.words, IommuWord.HWPT_TRACKING, 1);
      r.setOps(4 * 10);
      r.settle();
      const written = new Set(r.log.map((a) => a[1]));
      const dirty = r.dev.buffers.filter((b) => (r.vm.iommu!.table.flags(b.iova) & IoPte.DIRTY) !== 0).map((b) => b.gfn);
      if (backend === 'iommufd') expect(new Set(dirty)).toEqual(written);
      else expect(dirty).toEqual([]);
    }
  });

  it('iommufd + device tracking logs in the device log and never sets IOPTE dirty bits; iommu tracking never logs', () => {
    for (const tracking of ['device', 'iommu'] as const) {
      const c = cfg('dma-engine', { writePercent: 100, tracking });
      const r = rig({ devices: [c], backend: 'iommufd' });
      const iommu = r.vm.iommu!;
      Atomics.store(iommu.words, IommuWord.HWPT_TRACKING, tracking === 'device' ? 1 : 0);
      iommu.dmaLoggingStart(0);
      r.setOps(4 * 10);
      r.settle();
      const written = [...new Set(r.log.map((a) => iommu.vmPage(a[1])))].sort((a, b) => a - b);
      const reported: number[] = [];
      complete(iommu.dmaLoggingReport(0, (p) => reported.push(p)));
      if (tracking === 'device') {
        expect(reported.sort((a, b) => a - b)).toEqual(written);
        expect(r.dev.buffers.some((b) => (iommu.table.flags(b.iova) & IoPte.DIRTY) !== 0)).toBe(false);
        expect(r.dev.stats().loggedPagesReported).toBe(written.length);
      } else expect(reported).toEqual([]);
    }
  });

  it('untracked-dma: device logging misses the writes, and counts the bug only while logging is on', () => {
    const c = cfg('dma-engine', { writePercent: 100, tracking: 'device' });
    const r = rig({ devices: [c], bugs: { untrackedDma: true } });
    const iommu = r.vm.iommu!;
    r.setOps(4 * 5);
    r.settle();
    expect(r.vm.acts.count('untracked-dma')).toBe(0);
    iommu.dmaLoggingStart(0);
    r.setOps(4 * 12);
    r.settle();
    expect(r.vm.acts.count('untracked-dma')).toBe(7);
    const reported: number[] = [];
    complete(iommu.dmaLoggingReport(0, (p) => reported.push(p)));
    expect(reported).toEqual([]);
  });
});

describe('the mdev: pins, dma_rw and unpins', () => {
  const pins = (r: Rig): Int32Array => (r.vm.iommu as unknown as { pins: Int32Array }).pins;

  it('pins buffers 0, 3 (write) and 1, 4 (read) at start, and reaches buffers 2, 5 by vfio_dma_rw', () => {
    const c = cfg('mdev', { buffers: 6 });
    const r = rig({ devices: [cfg('gvt'), c], index: 1 });
    const window = WINDOW0;
    r.setOps(0);
    r.settle();
    expect(Array.from(pins(r).subarray(window, window + 7))).toEqual([1, 1 << 16, 0, 1, 1 << 16, 0, 0]);
    expect(r.dev.stats()).toMatchObject({ pins: 4, dmaRw: 0, tracking: 'iommu', kind: 'mdev' });
    expect(r.vm.iommu!.lock.tryAcquire(3)).toBe(true);
  });

  it('accesses each buffer its way: write pins write through the pinned page, read pins only read, dma_rw writes and reads, marking type1', () => {
    const c0 = cfg('mdev', { buffers: 6, remapEvery: 13 });
    const probe = new Model(c0, 0, 7, WINDOW0);
    const c = c0;
    const r = rig({ devices: [c] });
    const iommu = r.vm.iommu!;
    expect(Atomics.load(iommu.words, IommuWord.PINNED_SCOPE)).toBe(1);
    r.settle();
    iommu.type1StartDirtyTracking();
    const m = probe;
    const want: Access[] = [];
    let rw = 0;
    const rwWrites = new Set<number>();
    let repins = 0;
    for (let k = 1; k <= 40; k++) {
      r.setOps(k * 4);
      r.settle();
      const what = m.op(k);
      if (what.kind === 'remap') {
        const a = mdevAccess(what.b.index);
        if (a !== 2) repins++;
        rwWrites.delete(what.b.iova); // its dirty bit went to the unmap's bitmap
        const expected = a === 0 ? 1 : a === 1 ? 1 << 16 : 0;
        expect(pins(r)[what.b.iova], `pin of buffer ${what.b.index} after its remap`).toBe(expected);
        continue;
      }
      if (what.kind !== 'dma') continue;
      const a = mdevAccess(what.b.index);
      if (a === 2) { rw++; want.push([what.write ? 'w' : 'r', what.b.gfn]); if (what.write) rwWrites.add(what.b.iova); } else if (a === 0 && what.write) want.push(['w', what.b.gfn]);
      else want.push(['r', what.b.gfn]);
    }
    expect(r.log).toEqual(want);
    expect(r.dev.stats()).toMatchObject({ dmaRw: rw, pins: 4 + repins, faults: 0, operations: 40 });
    expect(rw).toBeGreaterThan(0);
    expect(repins).toBeGreaterThan(0);
    // type1 with a pinned scope: the write-pinned pages and the pages dma_rw wrote.
    const reported: number[] = [];
    complete(iommu.type1GetDirtyBitmap((p) => reported.push(p)));
    const pinned = r.dev.buffers.filter((b) => mdevAccess(b.index) === 0).map((b) => b.iova);
    const want2 = new Set([...pinned, ...rwWrites].map((i) => iommu.vmPage(iommu.table.gfn(i))));
    expect(new Set(reported)).toEqual(want2);
    expect(rwWrites.size).toBeGreaterThan(0);
    expect(iommu.lock.tryAcquire(3)).toBe(true);
  });

  it('remapping a dma_rw buffer unpins nothing, a pinned one unpins before the unmap (its own kind of pin)', () => {
    // buffers 3: indices 0 (write pin), 1 (read pin), 2 (dma_rw); remap every operation.
    const c = cfg('mdev', { buffers: 3, remapEvery: 1 });
    const r = rig({ devices: [c], service: false });
    const w = r.vm.iommu!.words;
    const at = deviceBase(0);
    r.settle();
    for (let k = 1; k <= 6; k++) {
      r.setOps(k * 4);
      r.settle();
      const b = r.dev.buffers.find((x) => x.state === BufferState.UNMAPPING)!;
      // Unpinned before the unmap request: its pin count is 0 now.
      expect(pins(r)[b.iova]).toBe(0);
      expect(Array.from(pins(r).subarray(WINDOW0, WINDOW0 + 3)).filter((p) => p !== 0).length).toBe(b.index === 2 ? 2 : 1);
      // Answer the unmap, then the map, by hand: the device pins it again only after the map succeeded.
      w[at + MailboxWord.RESULT] = 0;
      Atomics.store(w, at + MailboxWord.RESP_SEQ, Atomics.load(w, at + MailboxWord.REQ_SEQ));
      r.settle();
      expect(b.state).toBe(BufferState.MAPPING);
      w[at + MailboxWord.RESULT] = 0;
      Atomics.store(w, at + MailboxWord.RESP_SEQ, Atomics.load(w, at + MailboxWord.REQ_SEQ));
      r.settle();
      expect(b.state).toBe(BufferState.MAPPED);
      expect(pins(r)[b.iova]).toBe([1, 1 << 16, 0][b.index]);
    }
  });

  it('pins that fail (nothing mapped): pin buffers wait for their pin, dma_rw faults on the unmapped IOVA', () => {
    const c = cfg('mdev', { buffers: 3, writePercent: 100 });
    const r = rig({ devices: [c], attach: false });
    const m = new Model(c, 0, 7, WINDOW0);
    const faults: unknown[] = [];
    for (let k = 1; k <= 12; k++) {
      r.setOps(k * 4);
      r.settle();
      const what = m.op(k);
      if (what.kind === 'dma' && what.b.index === 2) faults.push({ kind: 'unmapped-iova', device: 0, iova: what.b.iova * PAGE_SIZE, write: true, cachedGfn: -1, currentGfn: -1 });
    }
    expect(faults.length).toBeGreaterThan(0);
    expect(faults.length).toBeLessThan(12);
    expect(r.log).toEqual([]);
    expect(r.dev.stats()).toMatchObject({ pins: 0, dmaRw: faults.length, faults: faults.length, dmaReads: 0, dmaWrites: 0 });
    expect(r.vm.iommu!.dmaRecords.records()).toEqual(faults);
  });

  it('a stray mdev access faults on the stray IOVA without touching memory', () => {
    const c = cfg('mdev', { buffers: 3, strayEvery: 2 });
    const r = rig({ devices: [c] });
    r.setOps(4 * 4);
    r.settle();
    const rec = { kind: 'unmapped-iova', device: 0, iova: (WINDOW0 + 3) * PAGE_SIZE, write: true, cachedGfn: -1, currentGfn: -1 };
    expect(r.vm.iommu!.dmaRecords.records()).toEqual([rec, rec]);
  });

  it('vfio_dma_rw refuses a write to a read-only mapping (fault, nothing written, lock released) and reads it', () => {
    const c = cfg('mdev', { buffers: 3 });
    const r = rig({ devices: [c] });
    const iommu = r.vm.iommu!;
    iommu.mapDma((WINDOW0 + 3) * PAGE_SIZE, PAGE_SIZE, 0x105 * PAGE_SIZE, VFIO_DMA_MAP_FLAG_READ);
    const mdev = r.dev as Mdev;
    complete(mdev.dmaRw(WINDOW0 + 3, true));
    expect(iommu.dmaRecords.records()).toEqual([{ kind: 'write-to-read-only', device: 0, iova: (WINDOW0 + 3) * PAGE_SIZE, write: true, cachedGfn: -1, currentGfn: 0x105 }]);
    expect(r.log).toEqual([]);
    complete(mdev.dmaRw(WINDOW0 + 3, false));
    expect(r.log).toEqual([['r', 0x105]]);
    expect(r.dev.stats().dmaRw).toBe(2);
    expect(iommu.lock.tryAcquire(3)).toBe(true);
  });

  it('untracked-dma: dma_rw writes are not marked in type1, and count as the bug only while type1 tracking is on', () => {
    const c = cfg('mdev', { buffers: 3 });
    const r = rig({ devices: [c], bugs: { untrackedDma: true } });
    const iommu = r.vm.iommu!;
    const mdev = r.dev as Mdev;
    r.settle();
    complete(mdev.dmaRw(WINDOW0 + 2, true));
    expect(r.vm.acts.count('untracked-dma')).toBe(0);
    iommu.type1StartDirtyTracking();
    complete(mdev.dmaRw(WINDOW0 + 2, true));
    complete(mdev.dmaRw(WINDOW0 + 2, true));
    expect(r.vm.acts.count('untracked-dma')).toBe(2);
    const reported: number[] = [];
    complete(iommu.type1GetDirtyBitmap((p) => reported.push(p)));
    expect(reported).toEqual([iommu.vmPage(r.dev.buffers[0]!.gfn)]);
  });

  it('gpa-as-iova: dma_rw gets the GPA, faults on it, and counts the bug; not when GPA = IOVA, nor without the bug', () => {
    const c = cfg('mdev', { buffers: 3, writePercent: 100 });
    const r = rig({ devices: [c], bugs: { gpaAsIova: true } });
    const m = new Model(c, 0, 7, WINDOW0);
    const recs: unknown[] = [];
    for (let k = 1; k <= 12; k++) {
      r.setOps(k * 4);
      r.settle();
      const what = m.op(k);
      if (what.kind === 'dma' && what.b.index === 2) recs.push({ kind: 'unmapped-iova', device: 0, iova: what.b.gfn * PAGE_SIZE, write: true, cachedGfn: -1, currentGfn: -1 });
    }
    expect(recs.length).toBeGreaterThan(0);
    expect(r.vm.iommu!.dmaRecords.records()).toEqual(recs);
    expect(r.vm.acts.count('gpa-as-iova')).toBe(recs.length);
    for (const o of [{ bugs: { gpaAsIova: true }, identity: true }, { bugs: {}, identity: false }]) {
      const r2 = rig({ devices: [cfg('mdev', { buffers: 3, identity: o.identity })], bugs: o.bugs });
      r2.setOps(4 * 12);
      r2.settle();
      expect(r2.vm.acts.count('gpa-as-iova')).toBe(0);
      expect(r2.dev.stats().faults).toBe(0);
      expect(r2.dev.stats().dmaRw).toBeGreaterThan(0);
    }
  });
});

describe('the gvt device: writes by GPA through KVM', () => {
  it('writes its seeded pages one per `every` guest operations, stamped DEVICE_WRITER_BASE + index with seq 1, 2, ...; only KVM\'s backup bitmap sees them', () => {
    const c = cfg('gvt', { every: 3, pattern: 'random' });
    const devices = [cfg('dma-engine'), c];
    const setup: DeviceSetup = { backend: 'type1', dmaEntryLimit: 65535, stopOnFault: false, devices };
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: RING(256, true), iommu: iommuConfigFor(setup, SLOTS) }));
    vm.populate();
    const vmm = new VmmControl(vm);
    vmm.resumeHost();
    const ring = new KvmRingSource(vm);
    complete(ring.start());
    const g = createDevice(vm, 1, c, 9, null);
    const role = new GeneratorRole('gvt', g.run());
    const setOps = (n: number): void => { Atomics.store(vm.vcpuWords, vm.vcpuBase(0) + VcpuWord.OPS, n); };
    const run = (): void => { for (let i = 0; i < 1000; i++) if (role.step() === Step.BLOCKED && role.wait.code === WaitCode.GUEST_OPS) return; };
    const p = new Prng(Prng.derive(9, 4001));
    p.below(TOTAL);
    setOps(2);
    run();
    expect(g.stats().operations).toBe(0);
    setOps(3);
    run();
    expect(g.stats()).toMatchObject({ operations: 1, dmaWrites: 1, kind: 'gvt', tracking: 'kvm', device: 1 });
    setOps(3 * 8);
    run();
    const want = Array.from({ length: 8 }, () => gfnAt(p.below(TOTAL)));
    const last = new Map<number, number>();
    want.forEach((gfn, i) => last.set(gfn, i + 1));
    expect(pagesStampedBy(vm, DEVICE_WRITER_BASE + 1)).toEqual(last);
    expect(g.stats()).toMatchObject({ operations: 8, dmaWrites: 8 });
    const into = new PageBitmap(vm.memory.totalPages);
    complete(ring.sync(into, false));
    expect(into.count?.() ?? [...Array(vm.memory.totalPages).keys()].filter((i) => into.isDirty(i)).length, 'not in the rings').toBe(0);
    complete(ring.sync(into, true));
    const dirty = [...Array(vm.memory.totalPages).keys()].filter((i) => into.isDirty(i));
    expect(dirty).toEqual([...new Set(want.map((gfn) => vm.iommu!.vmPage(gfn)))].sort((a, b) => a - b));
  });

  it('pause between deciding and writing: paused after the decision, it writes nothing until resumed', () => {
    const c = cfg('gvt', { every: 1, pattern: 'sequential' });
    const devices = [c];
    const setup: DeviceSetup = { backend: 'type1', dmaEntryLimit: 65535, stopOnFault: false, devices };
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu: iommuConfigFor(setup, SLOTS) }));
    vm.populate();
    const vmm = new VmmControl(vm);
    vmm.resumeHost();
    const g = createDevice(vm, 0, c, 4, null);
    const role = new GeneratorRole('gvt', g.run());
    Atomics.store(vm.vcpuWords, vm.vcpuBase(0) + VcpuWord.OPS, 1);
    role.step(); // decides
    vmm.pauseHost();
    role.step(); // writes the decided page
    expect(g.stats().dmaWrites).toBe(1);
    role.step();
    expect(vmm.hostPaused()).toBe(true);
    Atomics.store(vm.vcpuWords, vm.vcpuBase(0) + VcpuWord.OPS, 10);
    for (let i = 0; i < 10; i++) role.step();
    expect(g.stats().dmaWrites).toBe(1);
    vmm.resumeHost();
    for (let i = 0; i < 100; i++) role.step();
    expect(g.stats().dmaWrites).toBe(10);
    const start = new Prng(Prng.derive(4, 4000)).below(TOTAL);
    const stamped = pagesStampedBy(vm, DEVICE_WRITER_BASE);
    expect([...stamped.keys()].sort((a, b) => a - b)).toEqual(Array.from({ length: 10 }, (_, i) => gfnAt((start + i) % TOTAL)).sort((a, b) => a - b));
  });
});
