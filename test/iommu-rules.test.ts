import { describe, expect, it } from 'vitest';
import { GeneratorRole, type Role, Step, type Steps, type Wait, WaitCode } from '../src/roles/role.ts';
import { EEXIST, EINVAL, ENOENT, PAGE_SIZE } from '../src/host/constants.ts';
import { DEVICE_DEFAULTS, type DeviceConfig } from '../src/host/devices/device-config.ts';
import { DmaEngine } from '../src/host/devices/dma-engine.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import { DeviceIotlb } from '../src/host/iommu/device-iotlb.ts';
import { DmaRecordKind, DmaRecords } from '../src/host/iommu/dma-records.ts';
import { DomainLock, LockHolder, lockHolderName } from '../src/host/iommu/domain-lock.ts';
import { Iommu, type IommuBugs } from '../src/host/iommu/iommu.ts';
import {
  DMA_QUIESCED, DeviceWord, type DmaTracking, type IommuBackendKind, IommuWord, IoPte, MAX_RECORDS, MailboxOp, MailboxWord,
  createIommuLayout, deviceBase,
} from '../src/host/iommu/iommu-layout.ts';
import { type IommuServiceEvent, iommuService } from '../src/host/iommu/iommu-service.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { type KernelBugs, Vm } from '../src/host/vm.ts';
import { LEGACY, drive } from './helpers.ts';

const P = PAGE_SIZE;
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
/** One slot from gfn 0: VM-wide page k is gfn k (so gfn 0 / page 0 are usable). */
const SLOTS = [{ id: 1, asId: 0, baseGfn: 0, pages: 64, flags: 0 }];
/** IOVA pages used by the tests: 64, the third word of the IOVA bitmaps (not the first). */
const IOVA = 0x40;
const PAGES = 1024;

function iommuVm(o: { backend?: IommuBackendKind; limit?: number; devices?: number; tracking?: DmaTracking[]; bugs?: KernelBugs; noIommu?: boolean } = {}) {
  const devices = o.devices ?? 1;
  const iommu = { backend: o.backend ?? 'type1', dmaEntryLimit: o.limit ?? 65535, iovaPages: PAGES, devices, tracking: o.tracking ?? Array<DmaTracking>(devices).fill('iommu') };
  const layout = createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu: o.noIommu ? undefined : iommu });
  const vm = new Vm(layout, o.bugs ?? {});
  vm.populate();
  return { vm, iommu: vm.iommu!, layout };
}

/** An Iommu over the same VM built without injection counters (as a vendor-driver-side user would). */
const bareIommu = (o: ReturnType<typeof iommuVm>, bugs: IommuBugs): Iommu => new Iommu(o.layout.iommu!, o.vm.memory, bugs);

const map = (iommu: Iommu, iovaPage: number, gfn: number, pages = 1, flags = RW) => iommu.mapDma(iovaPage * P, pages * P, gfn * P, flags);

const unmap = (iommu: Iommu, iovaPage: number, pages: number, others: Role[] = []) => drive(iommu.unmapDma(iovaPage * P, pages * P), others).value;

function query(gen: (mark: (p: number) => void) => Steps<number>, others: Role[] = []): { pages: number[]; n: number } {
  const pages: number[] = [];
  const n = drive(gen((p) => pages.push(p)), others).value;
  return { pages: pages.sort((a, b) => a - b), n };
}
const type1Get = (iommu: Iommu) => query((m) => iommu.type1GetDirtyBitmap(m));
const hwptGet = (iommu: Iommu, noClear: boolean, others: Role[] = []) => query((m) => iommu.hwptGetDirtyBitmap(m, noClear), others);
const logReport = (iommu: Iommu, d = 0) => query((m) => iommu.dmaLoggingReport(d, m));
const unmapDirty = (iommu: Iommu): { pages: number[]; n: number } => {
  const pages: number[] = [];
  const n = iommu.takeUnmapDirty((p) => pages.push(p));
  return { pages, n };
};

const config = (kind: DeviceConfig['kind'], over: Partial<DeviceConfig> = {}): DeviceConfig => ({ ...DEVICE_DEFAULTS, kind, buffers: 4, ...over });

function activeEngine(vm: Vm, tracking: 'iommu' | 'device' = 'iommu'): { e: DmaEngine; role: GeneratorRole } {
  const e = new DmaEngine(vm, 0, config('dma-engine', { tracking }), 1, { base: 0x300, pages: 5 });
  const role = new GeneratorRole('device0', e.run());
  expect(role.step()).toBe(Step.BLOCKED);
  expect(Atomics.load(vm.iommu!.words, deviceBase(0) + DeviceWord.MODE)).not.toBe(DMA_QUIESCED);
  return { e, role };
}

/** Runs `gen` up to its first wait and returns it (the procedure is left blocked there). */
function toFirstWait<T>(gen: Steps<T>): Wait {
  for (let i = 0; i < 100; i++) {
    const r = gen.next();
    if (r.done) throw new Error('finished without waiting');
    if (r.value !== undefined) return r.value;
  }
  throw new Error('no wait');
}

describe('DeviceIotlb', () => {
  it('only power-of-two sizes, one entry allowed', () => {
    expect(() => new DeviceIotlb(0)).toThrow(new Error('IOTLB entries must be a power of two, not 0'));
    expect(() => new DeviceIotlb(3)).toThrow(new Error('IOTLB entries must be a power of two, not 3'));
    expect(() => new DeviceIotlb(12)).toThrow(new Error('IOTLB entries must be a power of two, not 12'));
    const one = new DeviceIotlb(1);
    one.fill(5, 9, true, false);
    expect(one.lookup(5)).toBe(9);
    expect(one.lookup(6), 'same (only) slot, other tag').toBe(-1);
  });

  it('is direct-mapped by iova & (entries - 1), counts hits and misses, and caches the dirty bit next to the write permission', () => {
    const t = new DeviceIotlb(4);
    t.fill(0, 100, true, false);
    t.fill(2, 102, false, false);
    expect(t.lookup(0)).toBe(100);
    expect(t.lookup(2)).toBe(102);
    t.fill(4, 104, true, false); // evicts iova 0 (same slot)
    expect(t.lookup(0)).toBe(-1);
    expect(t.lookup(4)).toBe(104);
    expect([t.hits, t.misses]).toEqual([3, 1]);
    expect(t.writable(2)).toBe(false);
    expect(t.dirtyCached(4)).toBe(false);
    t.setDirtyCached(4);
    expect(t.dirtyCached(4)).toBe(true);
    expect(t.writable(4), 'setting the dirty bit keeps the write permission').toBe(true);
    t.invalidateAll();
    expect(t.lookup(4)).toBe(-1);
    expect([t.hits, t.misses]).toEqual([3, 2]);
  });
});

describe('DMA records', () => {
  const fresh = () => {
    const layout = createIommuLayout({ backend: 'type1', dmaEntryLimit: 4, iovaPages: 64, devices: 2, tracking: ['iommu', 'iommu'] }, 64);
    const words = new Int32Array(layout.words);
    return { words, rec: new DmaRecords(words, layout.records) };
  };

  it('keeps each record in its own slot with its fields; stale-IOTLB DMAs never stop the run, faults do with STOP_ON_FAULT', () => {
    const { words, rec } = fresh();
    Atomics.store(words, IommuWord.STOP_ON_FAULT, 1);
    rec.report(DmaRecordKind.STALE_IOTLB, 0, 0x41, false, 7, -1);
    expect(rec.faultStopped(), 'a stale DMA is not a fault').toBe(false);
    rec.report(DmaRecordKind.UNMAPPED, 1, 0x42, true, -1, -1);
    rec.report(DmaRecordKind.READ_ONLY, 1, 0x43, true, -1, 9);
    expect(rec.faultStopped()).toBe(true);
    expect(rec.records()).toEqual([
      { kind: 'stale-iotlb', device: 0, iova: 0x41 * P, write: false, cachedGfn: 7, currentGfn: -1 },
      { kind: 'unmapped-iova', device: 1, iova: 0x42 * P, write: true, cachedGfn: -1, currentGfn: -1 },
      { kind: 'write-to-read-only', device: 1, iova: 0x43 * P, write: true, cachedGfn: -1, currentGfn: 9 },
    ]);
    expect(rec.count()).toBe(3);
    expect([0, 1].map((d) => [Atomics.load(words, deviceBase(d) + DeviceWord.STALE), Atomics.load(words, deviceBase(d) + DeviceWord.FAULTS)])).toEqual([[1, 0], [0, 2]]);
  });

  it('keeps the first MAX_RECORDS records and counts the rest', () => {
    const { rec } = fresh();
    for (let i = 0; i < MAX_RECORDS + 6; i++) rec.report(DmaRecordKind.UNMAPPED, i & 1, i, i % 3 === 0, -1, -1);
    expect(rec.count()).toBe(MAX_RECORDS + 6);
    const all = rec.records();
    expect(all).toHaveLength(MAX_RECORDS);
    expect(all.map((r) => r.iova / P)).toEqual(Array.from({ length: MAX_RECORDS }, (_, i) => i));
    expect(all.map((r) => r.write)).toEqual(Array.from({ length: MAX_RECORDS }, (_, i) => i % 3 === 0));
  });

  it('an unknown kind reads back as unmapped-iova', () => {
    const { rec } = fresh();
    rec.report(9 as DmaRecordKind, 0, 1, true, -1, -1);
    expect(rec.records()[0]!.kind).toBe('unmapped-iova');
  });

  it('the layout sizes its bitmaps one bit per page and the records area for MAX_RECORDS', () => {
    const l = createIommuLayout({ backend: 'type1', dmaEntryLimit: 4, iovaPages: 100, devices: 2, tracking: ['iommu', 'device'] }, 70);
    expect(l.type1Dirty.byteLength).toBe(16);
    expect(l.deviceLogs.map((b) => b.byteLength)).toEqual([16, 16]);
    expect(l.unmapDirty.byteLength).toBe(12);
    expect(l.records.byteLength).toBe((1 + MAX_RECORDS * 8) * 4);
    expect(l.iopte.byteLength).toBe(800);
    expect(l.pins.byteLength).toBe(400);
  });
});

describe('domain lock', () => {
  it('names its holders', () => {
    expect([0, 1, 2, 3, 5, 15, 16, 17].map(lockHolderName)).toEqual([
      'nobody', 'the IOMMU service', 'the migration thread', 'the VMM', 'holder 5', 'holder 15', 'device 0', 'device 1',
    ]);
  });

  it('holds holder + 1 in the lock word; a taken lock refuses tryAcquire and makes acquire wait (parked on the word) until released', () => {
    const words = new Int32Array(createIommuLayout({ backend: 'type1', dmaEntryLimit: 4, iovaPages: 64, devices: 1, tracking: ['iommu'] }, 64).words);
    const lock = new DomainLock(words);
    expect(lock.tryAcquire(LockHolder.SERVICE)).toBe(true);
    expect(Atomics.load(words, IommuWord.LOCK)).toBe(LockHolder.SERVICE + 1);
    expect(lock.tryAcquire(LockHolder.MIGRATION)).toBe(false);
    expect(Atomics.load(words, IommuWord.LOCK)).toBe(LockHolder.SERVICE + 1);
    const gen = lock.acquire(LockHolder.MIGRATION);
    const want = { code: WaitCode.IOMMU_LOCK, arg: 2, arg2: 0, park: { array: words, index: IommuWord.LOCK, value: 2 } };
    expect(gen.next()).toEqual({ done: false, value: want });
    expect(gen.next(), 'still held').toEqual({ done: false, value: want });
    lock.release();
    expect(Atomics.load(words, IommuWord.LOCK)).toBe(0);
    expect(gen.next().done).toBe(true);
    expect(Atomics.load(words, IommuWord.LOCK)).toBe(LockHolder.MIGRATION + 1);
    lock.release();
    const free = lock.acquire(LockHolder.DEVICE + 1);
    expect(free.next().done, 'a free lock is taken at once').toBe(true);
    expect(lockHolderName(Atomics.load(words, IommuWord.LOCK) - 1)).toBe('device 1');
  });
});

describe('map rules', () => {
  it.each([
    ['flags 0', IOVA * P, P, 0, 0, 'flags 0x0: neither READ nor WRITE, or unknown bits'],
    ['unknown flag bit', IOVA * P, P, 0, 7, 'flags 0x7: neither READ nor WRITE, or unknown bits'],
    ['iova unaligned', IOVA * P + 1, P, 0, RW, 'iova 0x40001 is not a multiple of the 4096-byte IOMMU page size'],
    ['iova negative', -P, P, 0, RW, 'iova -4096 is not a multiple of the 4096-byte IOMMU page size'],
    ['iova 2^53', 2 ** 53, P, 0, RW, 'iova 0x20000000000000 is not a multiple of the 4096-byte IOMMU page size'],
    ['size 2^53', 0, 2 ** 53, 0, RW, 'size 0x20000000000000 is not a multiple of the 4096-byte IOMMU page size'],
    ['size negative', IOVA * P, -P, 0, RW, 'size -4096 is not a multiple of the 4096-byte IOMMU page size'],
    ['vaddr negative', IOVA * P, P, -P, RW, 'vaddr -4096 is not a multiple of the 4096-byte IOMMU page size'],
    ['size 0', IOVA * P, 0, 0, RW, 'size 0'],
    ['past the aperture', 1023 * P, 2 * P, 0, RW, 'iova 0x3ff000 + size 0x2000 passes the end of the IOVA aperture (0x400000)'],
    ['vaddr past guest RAM', IOVA * P, 2 * P, 63 * P, RW, 'vaddr 0x40000 is not guest RAM (no memslot)'],
  ])('%s: EINVAL with its reason, nothing mapped', (_w, iova, size, gpa, flags, why) => {
    const { iommu } = iommuVm();
    expect(iommu.mapDma(iova, size, gpa, flags)).toEqual({ ret: -EINVAL, detail: `VFIO_IOMMU_MAP_DMA: EINVAL: ${why}` });
    expect(iommu.stats()).toMatchObject({ maps: 0, mapErrors: 1, entries: 0, pagesMapped: 0 });
    expect(iommu.table.gfn(0)).toBe(-1);
    expect(iommu.table.gfn(IOVA)).toBe(-1);
  });

  it('a map may end exactly at the aperture end and start right before an existing mapping', () => {
    const { iommu } = iommuVm();
    expect(map(iommu, PAGES - 1, 3)).toEqual({ ret: 0, detail: '' });
    expect(map(iommu, IOVA + 4, 20).ret).toBe(0);
    expect(map(iommu, IOVA, 10, 4).ret, 'adjacent, not overlapping').toBe(0);
    expect([iommu.table.gfn(IOVA + 3), iommu.table.gfn(IOVA + 4), iommu.table.gfn(PAGES - 1)]).toEqual([13, 20, 3]);
    expect(iommu.stats()).toMatchObject({ maps: 3, entries: 3, pagesMapped: 6, mapErrors: 0 });
  });

  it('iommufd: an overlap (even of a mapping of gfn 0) is EEXIST, named IOMMU_IOAS_MAP, at the first overlapping page', () => {
    const { iommu } = iommuVm({ backend: 'iommufd' });
    expect(map(iommu, IOVA, 0, 2).ret).toBe(0);
    expect(map(iommu, IOVA - 2, 30, 4)).toEqual({ ret: -EEXIST, detail: 'IOMMU_IOAS_MAP: EEXIST: iova 0x3e000 size 0x4000 overlaps the mapping at 0x40000' });
    expect(map(iommu, IOVA, 5)).toEqual({ ret: -EEXIST, detail: 'IOMMU_IOAS_MAP: EEXIST: iova 0x40000 size 0x1000 overlaps the mapping at 0x40000' });
    expect([iommu.table.gfn(IOVA - 2), iommu.table.gfn(IOVA - 1), iommu.table.gfn(IOVA)]).toEqual([-1, -1, 0]);
    expect(iommu.stats()).toMatchObject({ maps: 1, mapErrors: 2, entries: 1, pagesMapped: 2 });
  });
});

describe('unmap rules', () => {
  it.each([
    [-P, P, 'iova -4096 size 0x1000'],
    [2 ** 53, P, 'iova 0x20000000000000 size 0x1000'],
    [0, 2 ** 53, 'iova 0x0 size 0x20000000000000'],
    [P + 1, P, 'iova 0x1001 size 0x1000'],
    [0, P + 1, 'iova 0x0 size 0x1001'],
    [0, 0, 'iova 0x0 size 0x0'],
    [0, -P, 'iova 0x0 size -4096'],
  ])('unmap(%d, %d): EINVAL, nothing unmapped', (iova, size, what) => {
    const { iommu } = iommuVm();
    map(iommu, 0, 5);
    expect(drive(iommu.unmapDma(iova, size)).value).toEqual({ ret: -EINVAL, detail: `VFIO_IOMMU_UNMAP_DMA: EINVAL: ${what}: not 4096-byte aligned, or empty` });
    expect(iommu.stats()).toMatchObject({ unmaps: 0, unmapErrors: 1, entries: 1, pagesMapped: 1 });
    expect(iommu.table.present(0) && iommu.table.gfn(0)).toBe(5);
  });

  it('a mapping at IOVA 0 and one at the last aperture page unmap whole; the entries are cleared, flags included', () => {
    const { iommu } = iommuVm();
    map(iommu, 0, 5);
    map(iommu, PAGES - 2, 6, 2);
    expect(unmap(iommu, 0, 1)).toEqual({ ret: P, detail: '' });
    expect(unmap(iommu, PAGES - 2, 2)).toEqual({ ret: 2 * P, detail: '' });
    for (const p of [0, PAGES - 2, PAGES - 1]) expect([iommu.table.gfn(p), iommu.table.flags(p)], `iova page ${p}`).toEqual([-1, 0]);
    expect(iommu.stats()).toMatchObject({ unmaps: 2, entries: 0, pagesMapped: 0, unmapErrors: 0 });
  });

  it('unmapping a mapping of gfn 0 frees its IOPTEs (gfn and flags) and leaves its neighbour at IOVA 0 alone', () => {
    const { iommu } = iommuVm();
    map(iommu, 0, 9);
    map(iommu, IOVA, 0, 2);
    expect(unmap(iommu, IOVA, 2).ret).toBe(2 * P);
    expect([0, 1].map((i) => [iommu.table.gfn(IOVA + i), iommu.table.flags(IOVA + i)])).toEqual([[-1, 0], [-1, 0]]);
    expect([iommu.table.gfn(0), iommu.table.flags(0)]).toEqual([9, IoPte.READ | IoPte.WRITE | 8]);
    expect(map(iommu, IOVA + 1, 3).ret, 'the freed IOVA maps again').toBe(0);
  });

  it('past the aperture: type1 unmaps nothing (size 0), iommufd ENOENT', () => {
    const t1 = iommuVm().iommu;
    map(t1, PAGES - 1, 1);
    expect(unmap(t1, PAGES, 1)).toEqual({ ret: 0, detail: '' });
    expect(unmap(t1, PAGES, 4)).toEqual({ ret: 0, detail: '' });
    expect(t1.table.gfn(PAGES - 1)).toBe(1);
    const fd = iommuVm({ backend: 'iommufd' }).iommu;
    expect(unmap(fd, PAGES, 1)).toEqual({ ret: -ENOENT, detail: 'IOMMU_IOAS_UNMAP: ENOENT: nothing is mapped at iova 0x400000 size 0x1000' });
    expect(fd.stats()).toMatchObject({ unmapErrors: 1, unmaps: 0 });
  });

  it.each([['type1', 'VFIO_IOMMU_UNMAP_DMA: EINVAL'], ['iommufd', 'IOMMU_IOAS_UNMAP: ENOENT']] as const)('%s: a split is refused with its reason', (backend, head) => {
    const { iommu } = iommuVm({ backend });
    map(iommu, IOVA, 3, 4);
    expect(unmap(iommu, IOVA + 1, 1).detail).toBe(`${head}: iova 0x41000 size 0x1000 would split a mapping`);
    expect(unmap(iommu, IOVA, 2).detail).toBe(`${head}: iova 0x40000 size 0x2000 would split a mapping`);
    expect(Atomics.load(iommu.words, IommuWord.LOCK), 'the lock is released').toBe(0);
    expect(iommu.stats()).toMatchObject({ entries: 1, pagesMapped: 4, unmapErrors: 2 });
  });

  it('the unmap waits for the active device with the IOTLB_ACK wait parked on its ack word; a map made during the wait survives the unmap', () => {
    const { vm, iommu } = iommuVm();
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 3);
    e.access(IOVA, false);
    const gen = iommu.unmapDma(IOVA * P, 2 * P);
    const w = toFirstWait(gen);
    const ack = deviceBase(0) + DeviceWord.INV_ACK;
    expect(w).toEqual({ code: WaitCode.IOTLB_ACK, arg: 0, arg2: Atomics.load(iommu.words, IommuWord.INV_GEN), park: { array: iommu.words, index: ack, value: Atomics.load(iommu.words, ack) } });
    expect(Atomics.load(iommu.words, IommuWord.LOCK), 'the lock is free during the wait').toBe(0);
    expect(map(iommu, IOVA + 1, 5).ret).toBe(0);
    expect(drive(gen, [role]).value).toEqual({ ret: P, detail: '' });
    expect([iommu.table.gfn(IOVA), iommu.table.present(IOVA + 1), iommu.table.gfn(IOVA + 1)]).toEqual([-1, true, 5]);
    expect(iommu.stats()).toMatchObject({ entries: 1, pagesMapped: 1, unmaps: 1, iotlbInvalidations: 1 });
    e.access(IOVA + 1, true);
    expect(iommu.dmaRecords.records()).toEqual([]);
  });

  it('staleIotlbAfterUnmap without injection counters still unmaps (no wait); with the VM\'s counters it is counted', () => {
    const o = iommuVm({ bugs: { staleIotlbAfterUnmap: true } });
    activeEngine(o.vm);
    const bare = bareIommu(o, { staleIotlbAfterUnmap: true });
    map(bare, IOVA, 3);
    expect(unmap(bare, IOVA, 1)).toEqual({ ret: P, detail: '' });
    map(o.iommu, IOVA, 4);
    expect(unmap(o.iommu, IOVA, 1).ret).toBe(P);
    expect(o.vm.acts.count('stale-iotlb-after-unmap')).toBe(1);
  });
});

describe('pins', () => {
  it('pin only IOVAs inside the aperture that are mapped (page 0 and the last page included)', () => {
    const { iommu } = iommuVm();
    map(iommu, 0, 5);
    map(iommu, 1, 2);
    map(iommu, PAGES - 1, 7);
    expect(iommu.pinPage(0, false)).toBe(5);
    expect(iommu.pinPage(PAGES - 1, true)).toBe(7);
    expect(iommu.pinPage(-1, false)).toBe(-EINVAL);
    expect(iommu.pinPage(PAGES, false)).toBe(-EINVAL);
    expect(iommu.pinPage(0.5, false)).toBe(-EINVAL);
    expect(iommu.pinPage(2, false), 'nothing mapped').toBe(-EINVAL);
  });

  it('readPinDirties: a read pin under type1 tracking is counted as the bug acting; a write pin or tracking off is not', () => {
    const { iommu, vm } = iommuVm({ bugs: { readPinDirties: true } });
    map(iommu, IOVA, 3, 2);
    expect(iommu.type1Tracking).toBe(false);
    iommu.pinPage(IOVA, false);
    iommu.type1StartDirtyTracking();
    expect(iommu.type1Tracking).toBe(true);
    iommu.pinPage(IOVA + 1, true);
    expect(vm.acts.count('read-pin-dirties')).toBe(0);
    iommu.pinPage(IOVA + 1, false);
    expect(vm.acts.count('read-pin-dirties')).toBe(1);
    iommu.type1StopDirtyTracking();
    expect(iommu.type1Tracking).toBe(false);
  });

  it('readPinDirties without injection counters: the read pin still works', () => {
    const o = iommuVm();
    const bare = bareIommu(o, { readPinDirties: true });
    map(bare, IOVA, 3);
    bare.type1StartDirtyTracking();
    expect(bare.pinPage(IOVA, false)).toBe(3);
  });
});

describe('type1 dirty tracking', () => {
  const pinnedScope = (iommu: Iommu) => Atomics.store(iommu.words, IommuWord.PINNED_SCOPE, 1);

  it('pinned scope: pages past the first bitmap word; read pins never dirty; the refill keeps only write-pinned pages; counts exact', () => {
    const { iommu } = iommuVm();
    pinnedScope(iommu);
    map(iommu, IOVA, 40, 4);
    iommu.pinPage(IOVA, false);
    iommu.pinPage(IOVA + 1, true);
    iommu.type1StartDirtyTracking();
    expect(type1Get(iommu)).toEqual({ pages: [41], n: 1 });
    iommu.markType1(IOVA + 2); // a dma_rw write
    expect(type1Get(iommu)).toEqual({ pages: [41, 42], n: 2 });
    expect(type1Get(iommu)).toEqual({ pages: [41], n: 1 });
    iommu.unpinPage(IOVA + 1, true);
    expect(type1Get(iommu), 'the last refill').toEqual({ pages: [41], n: 1 });
    expect(type1Get(iommu)).toEqual({ pages: [], n: 0 });
  });

  it('no pinned scope: every present page, n counted; a page whose unmap waits for the IOTLB flush is not reported', () => {
    const { vm, iommu } = iommuVm();
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 40);
    map(iommu, IOVA + 1, 41);
    map(iommu, 0, 0);
    iommu.type1StartDirtyTracking();
    expect(type1Get(iommu)).toEqual({ pages: [0, 40, 41], n: 3 });
    e.access(IOVA, false);
    const gen = iommu.unmapDma(IOVA * P, P);
    toFirstWait(gen);
    expect(type1Get(iommu)).toEqual({ pages: [0, 41], n: 2 });
    drive(gen, [role]);
    expect(unmapDirty(iommu)).toEqual({ pages: [40], n: 1 });
  });

  it('a still-pinned page that was unmapped is not reported by later queries', () => {
    const { iommu } = iommuVm();
    pinnedScope(iommu);
    map(iommu, IOVA, 40);
    iommu.type1StartDirtyTracking();
    iommu.pinPage(IOVA, true);
    expect(unmap(iommu, IOVA, 1).ret).toBe(P);
    expect(unmapDirty(iommu)).toEqual({ pages: [40], n: 1 });
    expect(type1Get(iommu)).toEqual({ pages: [], n: 0 });
    expect(type1Get(iommu)).toEqual({ pages: [], n: 0 });
  });

  it('unmapping one page collects it and leaves its neighbour\'s dirty bit for the next query; page 0 is collected too', () => {
    const { iommu } = iommuVm();
    pinnedScope(iommu);
    map(iommu, IOVA, 40);
    map(iommu, IOVA + 1, 41);
    map(iommu, IOVA + 2, 0);
    map(iommu, IOVA + 3, 43);
    iommu.type1StartDirtyTracking();
    iommu.markType1(IOVA);
    iommu.markType1(IOVA + 1);
    iommu.markType1(IOVA + 2);
    expect(unmap(iommu, IOVA, 1).ret).toBe(P);
    expect(unmap(iommu, IOVA + 2, 1).ret).toBe(P);
    expect(unmap(iommu, IOVA + 3, 1).ret, 'clean').toBe(P);
    expect(unmapDirty(iommu)).toEqual({ pages: [0, 40], n: 2 });
    expect(type1Get(iommu)).toEqual({ pages: [41], n: 1 });
  });

  it('with tracking off an unmap collects nothing', () => {
    const { iommu } = iommuVm();
    map(iommu, IOVA, 40);
    iommu.pinPage(IOVA, true);
    expect(unmap(iommu, IOVA, 1).ret).toBe(P);
    expect(unmapDirty(iommu)).toEqual({ pages: [], n: 0 });
  });
});

describe('device DMA logging', () => {
  it('logDma says whether it logged; an unmap takes its page\'s bit only; page 0 is reported', () => {
    const { iommu } = iommuVm({ tracking: ['device'] });
    map(iommu, IOVA, 40);
    map(iommu, IOVA + 1, 41);
    map(iommu, IOVA + 2, 0);
    expect(iommu.logDma(0, IOVA)).toBe(false);
    iommu.dmaLoggingStart(0);
    expect(iommu.logDma(0, IOVA)).toBe(true);
    expect(iommu.logDma(0, IOVA + 1)).toBe(true);
    expect(iommu.logDma(0, IOVA + 2)).toBe(true);
    expect(unmap(iommu, IOVA, 1).ret).toBe(P);
    expect(unmapDirty(iommu)).toEqual({ pages: [40], n: 1 });
    expect(logReport(iommu)).toEqual({ pages: [0, 41], n: 2 });
    expect(Atomics.load(iommu.words, deviceBase(0) + DeviceWord.LOG_REPORTED)).toBe(2);
  });

  it('staleIotlbAfterUnmap: a logged write through the stale entry maps no page and is not reported', () => {
    const { vm, iommu } = iommuVm({ tracking: ['device'], bugs: { staleIotlbAfterUnmap: true } });
    const { e } = activeEngine(vm, 'device');
    map(iommu, IOVA, 40);
    iommu.dmaLoggingStart(0);
    e.access(IOVA, false);
    expect(unmap(iommu, IOVA, 1).ret).toBe(P);
    e.access(IOVA, true);
    expect(iommu.dmaRecords.records().map((r) => [r.kind, r.cachedGfn, r.currentGfn])).toEqual([['stale-iotlb', 40, -1]]);
    expect(logReport(iommu)).toEqual({ pages: [], n: 0 });
  });
});

describe('iommufd HWPT dirty tracking', () => {
  it('disabling keeps the IOPTE dirty bits; enabling clears them all', () => {
    const { vm, iommu } = iommuVm({ backend: 'iommufd' });
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 40);
    map(iommu, PAGES - 1, 41);
    drive(iommu.hwptSetDirtyTracking(true), [role]);
    expect(iommu.hwptTracking).toBe(true);
    e.access(IOVA, true);
    e.access(PAGES - 1, true);
    drive(iommu.hwptSetDirtyTracking(false));
    expect(iommu.hwptTracking).toBe(false);
    expect(hwptGet(iommu, true)).toEqual({ pages: [40, 41], n: 2 });
    drive(iommu.hwptSetDirtyTracking(true), [role]);
    expect(hwptGet(iommu, true)).toEqual({ pages: [], n: 0 });
    expect(iommu.table.flags(PAGES - 1) & IoPte.DIRTY).toBe(0);
  });

  it('page 0 is reported', () => {
    const { vm, iommu } = iommuVm({ backend: 'iommufd' });
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 0);
    drive(iommu.hwptSetDirtyTracking(true), [role]);
    e.access(IOVA, true);
    expect(hwptGet(iommu, false, [role])).toEqual({ pages: [0], n: 1 });
  });

  it('staleIotlbAfterUnmap: the dirty bit a stale write sets on a freed IOPTE maps no page and is not reported', () => {
    const { vm, iommu } = iommuVm({ backend: 'iommufd', bugs: { staleIotlbAfterUnmap: true } });
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 40);
    drive(iommu.hwptSetDirtyTracking(true), [role]);
    e.access(IOVA, false);
    expect(unmap(iommu, IOVA, 1).ret).toBe(P);
    e.access(IOVA, true);
    expect(iommu.table.flags(IOVA)).toBe(IoPte.DIRTY);
    expect(hwptGet(iommu, true)).toEqual({ pages: [], n: 0 });
  });
});

describe('IOMMU service', () => {
  function service() {
    const { vm, iommu } = iommuVm({ devices: 2 });
    const events: IommuServiceEvent[] = [];
    const svc = new GeneratorRole('iommu-service', iommuService(vm, (ev) => events.push(ev)));
    const post = (d: number, op: number, iovaPage: number, gfn: number): number => {
      const w = iommu.words;
      const b = deviceBase(d);
      w[b + MailboxWord.OP] = op;
      w[b + MailboxWord.IOVA] = iovaPage;
      w[b + MailboxWord.PAGES] = 1;
      w[b + MailboxWord.GFN] = gfn;
      w[b + MailboxWord.PROT] = RW;
      const seq = Atomics.add(w, b + MailboxWord.REQ_SEQ, 1) + 1;
      Atomics.add(w, IommuWord.DOORBELL, 1);
      return seq;
    };
    const answer = (d: number) => [Atomics.load(iommu.words, deviceBase(d) + MailboxWord.RESP_SEQ), iommu.words[deviceBase(d) + MailboxWord.RESULT]];
    return { vm, iommu, events, svc, post, answer };
  }

  it('needs a VM with an IOMMU', () => {
    const { vm } = iommuVm({ noIommu: true });
    expect(() => iommuService(vm, () => {}).next()).toThrow(new Error('the IOMMU service needs a VM with an IOMMU'));
  });

  it('parks on the doorbell when idle; a request posted after a served pass is served on the next step, without parking', () => {
    const { iommu, svc, post, answer, events } = service();
    expect(svc.step()).toBe(Step.BLOCKED);
    expect(svc.wait).toEqual({ code: WaitCode.IOMMU_REQUEST, arg: 0, arg2: 0, park: { array: iommu.words, index: IommuWord.DOORBELL, value: 0 } });
    expect(post(1, MailboxOp.MAP, IOVA, 40)).toBe(1);
    expect(svc.step()).toBe(Step.PROGRESS);
    expect(answer(1)).toEqual([1, 0]);
    post(0, MailboxOp.MAP, IOVA + 1, 41);
    expect(svc.step(), 'served at once').toBe(Step.PROGRESS);
    expect(answer(0)).toEqual([1, 0]);
    expect(svc.step()).toBe(Step.BLOCKED);
    expect(svc.wait.park).toEqual({ array: iommu.words, index: IommuWord.DOORBELL, value: 2 });
    expect(events).toEqual([]);
    expect([iommu.table.gfn(IOVA), iommu.table.gfn(IOVA + 1)]).toEqual([40, 41]);
  });

  it('an unknown request answers -EINVAL and is reported; a type1 UNMAP of nothing answers 0 and reports nothing; an UNMAP answers 0, not the bytes', () => {
    const { iommu, svc, post, answer, events } = service();
    svc.step();
    post(1, 9, IOVA, 40);
    svc.step();
    expect(answer(1)).toEqual([1, -EINVAL]);
    expect(events).toEqual([{ kind: 'iommu-error', device: 1, detail: 'unknown mailbox request 9' }]);
    expect(iommu.stats()).toMatchObject({ maps: 0, unmaps: 0, mapErrors: 0, unmapErrors: 0 });
    post(0, MailboxOp.UNMAP, IOVA, 0);
    svc.step();
    expect(answer(0)).toEqual([1, 0]);
    expect(events).toHaveLength(1);
    map(iommu, IOVA, 40);
    post(0, MailboxOp.UNMAP, IOVA, 0);
    for (let i = 0; i < 10 && answer(0)[0] !== 2; i++) svc.step();
    expect(answer(0)).toEqual([2, 0]);
    expect(iommu.table.gfn(IOVA)).toBe(-1);
    expect(events).toHaveLength(1);
  });

  it('notifies the device waiting on its response word', async () => {
    const { iommu, svc, post } = service();
    svc.step();
    const index = deviceBase(1) + MailboxWord.RESP_SEQ;
    const waitAsync = (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number, t: number): { async: boolean; value: Promise<string> | string } }).waitAsync;
    const waiting = waitAsync(iommu.words, index, 0, 5000);
    expect(waiting.async).toBe(true);
    post(1, MailboxOp.MAP, IOVA, 40);
    svc.step();
    expect(await waiting.value).toBe('ok');
  });
});
