import { describe, expect, it } from 'vitest';
import { DeterministicDriver, RandomScheduler } from '../src/drivers/deterministic.ts';
import { GeneratorRole, type Role, Step, type Steps, type Wait, WaitCode } from '../src/roles/role.ts';
import { EEXIST, EINVAL, ENOENT, ENOSPC, PAGE_SIZE } from '../src/host/constants.ts';
import { DEVICE_DEFAULTS, type DeviceConfig } from '../src/host/devices/device-config.ts';
import { DmaEngine } from '../src/host/devices/dma-engine.ts';
import { Mdev } from '../src/host/devices/mdev.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import type { Iommu } from '../src/host/iommu/iommu.ts';
import {
  DMA_QUIESCED, DeviceWord, type DmaTracking, type IommuBackendKind, IommuWord, IoPte, MailboxOp, MailboxWord, deviceBase,
} from '../src/host/iommu/iommu-layout.ts';
import { type IommuServiceEvent, iommuService } from '../src/host/iommu/iommu-service.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { type KernelBugs, Vm } from '../src/host/vm.ts';
import { type DeviceSetup, attachDevices, iommuConfigFor } from '../src/scenarios/devices.ts';
import { UserError } from '../src/util/errors.ts';
import { LEGACY, drive } from './helpers.ts';

const P = PAGE_SIZE;
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
/** The guest's one slot: 64 pages from gfn BASE, VM-wide pages 0..63 (so vmPage(BASE + k) === k). */
const BASE = 0x100;
const SLOTS = [{ id: 1, asId: 0, baseGfn: BASE, pages: 64, flags: 0 }];
/** IOVA pages the tests map (well inside the 1024-page aperture, away from the devices' windows at 0x300). */
const IOVA = 0x10;

function iommuVm(o: { backend?: IommuBackendKind; limit?: number; devices?: number; tracking?: DmaTracking[]; bugs?: KernelBugs } = {}): { vm: Vm; iommu: Iommu } {
  const devices = o.devices ?? 1;
  const iommu = { backend: o.backend ?? 'type1', dmaEntryLimit: o.limit ?? 65535, iovaPages: 1024, devices, tracking: o.tracking ?? Array<DmaTracking>(devices).fill('iommu') };
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu }), o.bugs ?? {});
  vm.populate();
  return { vm, iommu: vm.iommu! };
}

/** Maps `pages` IOVA pages from `iovaPage` to guest frames from BASE + `page`. */
const map = (iommu: Iommu, iovaPage: number, page: number, pages = 1, flags = RW) => iommu.mapDma(iovaPage * P, pages * P, (BASE + page) * P, flags);

const unmap = (iommu: Iommu, iovaPage: number, pages: number, others: Role[] = []) => drive(iommu.unmapDma(iovaPage * P, pages * P), others);

/** Collects what a dirty query reports (VM-wide pages, sorted). */
function query(gen: (mark: (p: number) => void) => Steps<number>, others: Role[] = []): { pages: number[]; n: number; waits: Wait[] } {
  const pages: number[] = [];
  const r = drive(gen((p) => pages.push(p)), others);
  return { pages: pages.sort((a, b) => a - b), n: r.value, waits: r.waits };
}

const config = (kind: DeviceConfig['kind'], over: Partial<DeviceConfig> = {}): DeviceConfig => ({ ...DEVICE_DEFAULTS, kind, buffers: 4, ...over });
const word = (iommu: Iommu, device: number, w: number): number => Atomics.load(iommu.words, deviceBase(device) + w);

/** A DMA engine whose role has run its first step: DMA active, waiting for guest operations (there are none, so it only acknowledges). */
function activeEngine(vm: Vm, tracking: 'iommu' | 'device' = 'iommu', index = 0): { e: DmaEngine; role: GeneratorRole } {
  const e = new DmaEngine(vm, index, config('dma-engine', { tracking }), 1, { base: 0x300 + 8 * index, pages: 5 });
  const role = new GeneratorRole(`device${index}`, e.run());
  expect(role.step(), 'the idle device blocks on guest operations').toBe(Step.BLOCKED);
  expect(word(vm.iommu!, index, DeviceWord.MODE), 'the device is DMA-active').not.toBe(DMA_QUIESCED);
  return { e, role };
}

const mdev = (vm: Vm): Mdev => new Mdev(vm, 0, config('mdev'), 1, { base: 0x300, pages: 5 });
const allZero = (vm: Vm): boolean => vm.memory.slots.every((s) => Array.from({ length: s.pages }, (_, p) => s.isZeroPage(p)).every(Boolean));

describe('map rules (VFIO_IOMMU_MAP_DMA / IOMMU_IOAS_MAP)', () => {
  it('an overlapping map fails with EEXIST and changes nothing', () => {
    const { iommu } = iommuVm();
    expect(map(iommu, IOVA, 0, 4).ret).toBe(0);
    const tail = map(iommu, IOVA + 2, 10);
    expect(tail.ret, tail.detail).toBe(-EEXIST);
    const head = map(iommu, IOVA - 2, 20, 3);
    expect(head.ret, head.detail).toBe(-EEXIST);
    expect(head.detail).toMatch(/overlaps/);
    expect(iommu.table.gfn(IOVA + 2), 'the existing mapping kept its page').toBe(BASE + 2);
    expect([iommu.table.gfn(IOVA - 2), iommu.table.gfn(IOVA - 1)], 'the refused map left no partial entries').toEqual([-1, -1]);
    expect(iommu.stats()).toMatchObject({ maps: 1, mapErrors: 2, entries: 1, pagesMapped: 4 });
  });

  it.each([
    ['iova not page-aligned', IOVA * P + 1, P, BASE * P, /iova/],
    ['size not page-aligned', IOVA * P, P / 2, BASE * P, /size/],
    ['vaddr not page-aligned', IOVA * P, P, BASE * P + 8, /vaddr/],
    ['size 0', IOVA * P, 0, BASE * P, /size 0/],
    ['vaddr below guest RAM', IOVA * P, P, (BASE - 1) * P, /not guest RAM/],
    ['vaddr running past the end of guest RAM', IOVA * P, 2 * P, (BASE + 63) * P, /not guest RAM/],
    ['iova past the aperture', 1023 * P, 2 * P, BASE * P, /aperture/],
  ])('%s: EINVAL, nothing mapped', (_what, iova, size, gpa, why) => {
    const { iommu } = iommuVm();
    const r = iommu.mapDma(iova, size, gpa, RW);
    expect(r.ret, r.detail).toBe(-EINVAL);
    expect(r.detail).toMatch(why);
    expect(iommu.stats()).toMatchObject({ entries: 0, pagesMapped: 0, mapErrors: 1 });
    expect(iommu.table.gfn(IOVA)).toBe(-1);
  });

  it('flags without READ or WRITE: EINVAL', () => {
    const { iommu } = iommuVm();
    expect(map(iommu, IOVA, 0, 1, 0).ret).toBe(-EINVAL);
    expect(map(iommu, IOVA, 0, 1, RW | 4).ret).toBe(-EINVAL);
  });

  it('type1: dma_entry_limit N admits N maps (one entry each, whatever their size); the next is ENOSPC until an unmap frees one', () => {
    const { iommu } = iommuVm({ limit: 4 });
    expect(map(iommu, IOVA, 0, 8).ret, 'an 8-page map is one entry').toBe(0);
    for (let i = 1; i < 4; i++) expect(map(iommu, IOVA + 8 + i, i + 8).ret, `map ${i + 1} of 4`).toBe(0);
    const over = map(iommu, IOVA + 20, 20);
    expect(over.ret, over.detail).toBe(-ENOSPC);
    expect(over.detail).toMatch(/^VFIO_IOMMU_MAP_DMA: ENOSPC: .*dma_entry_limit/);
    expect(iommu.table.gfn(IOVA + 20)).toBe(-1);
    expect(iommu.stats()).toMatchObject({ entries: 4, pagesMapped: 11, dmaEntryLimit: 4 });
    expect(unmap(iommu, IOVA + 9, 1).value.ret).toBe(P);
    expect(map(iommu, IOVA + 20, 20).ret, 'fits again after an unmap').toBe(0);
  });

  it('iommufd has no entry limit', () => {
    const { iommu } = iommuVm({ backend: 'iommufd', limit: 4 });
    for (let i = 0; i < 10; i++) expect(map(iommu, IOVA + i, i).ret, `map ${i + 1}`).toBe(0);
    expect(iommu.stats()).toMatchObject({ entries: 10, dmaEntryLimit: null });
  });
});

describe('unmap rules (VFIO_IOMMU_UNMAP_DMA / IOMMU_IOAS_UNMAP)', () => {
  it.each([
    ['type1', 'starts inside', EINVAL, 1, 3], ['type1', 'ends inside', EINVAL, 0, 2], ['type1', 'both', EINVAL, 1, 2],
    ['iommufd', 'starts inside', ENOENT, 1, 3], ['iommufd', 'both', ENOENT, 1, 2],
  ] as const)('%s: an unmap that %s a mapping would split it: errno %i (EINVAL, iommufd ENOENT), mapping intact', (backend, _w, errno, off, pages) => {
    const { iommu } = iommuVm({ backend });
    map(iommu, IOVA, 0, 4);
    const r = unmap(iommu, IOVA + off, pages).value;
    expect(r.ret, r.detail).toBe(-errno);
    expect(r.detail).toMatch(/split/);
    for (let i = 0; i < 4; i++) expect(iommu.table.present(IOVA + i) && iommu.table.gfn(IOVA + i), `iova page ${i}`).toBe(BASE + i);
    expect(iommu.stats()).toMatchObject({ entries: 1, pagesMapped: 4, unmaps: 0, unmapErrors: 1 });
  });

  it('unaligned or empty unmap: EINVAL', () => {
    const { iommu } = iommuVm();
    expect(drive(iommu.unmapDma(IOVA * P + 1, P)).value.ret).toBe(-EINVAL);
    expect(drive(iommu.unmapDma(IOVA * P, 0)).value.ret).toBe(-EINVAL);
  });

  it('unmapping nothing: type1 returns 0 (size 0), iommufd ENOENT', () => {
    const t1 = iommuVm().iommu;
    expect(unmap(t1, IOVA, 4).value).toEqual({ ret: 0, detail: '' });
    const fd = iommuVm({ backend: 'iommufd' }).iommu;
    const r = unmap(fd, IOVA, 4).value;
    expect(r.ret, r.detail).toBe(-ENOENT);
    expect(r.detail).toMatch(/^IOMMU_IOAS_UNMAP: ENOENT: /);
  });

  it.each<IommuBackendKind>(['type1', 'iommufd'])('%s: unmapping whole mappings returns their bytes and frees their entries', (backend) => {
    const { iommu } = iommuVm({ backend });
    map(iommu, IOVA, 0, 3);
    map(iommu, IOVA + 3, 5);
    map(iommu, IOVA + 4, 9);
    expect(iommu.stats()).toMatchObject({ entries: 3, pagesMapped: 5 });
    expect(unmap(iommu, IOVA, 4).value.ret, 'two whole mappings').toBe(4 * P);
    expect(iommu.stats()).toMatchObject({ entries: 1, pagesMapped: 1, unmaps: 1, unmapErrors: 0 });
    for (let i = 0; i < 4; i++) expect(iommu.table.gfn(IOVA + i), `iova page ${i} freed`).toBe(-1);
    expect(iommu.table.gfn(IOVA + 4)).toBe(BASE + 9);
    expect(map(iommu, IOVA + 1, 30).ret, 'the freed IOVA can be mapped again').toBe(0);
  });
});

describe('device IOTLB invalidation on unmap', () => {
  it('an unmap blocks on IOTLB_ACK until the device that cached the translation steps; the entry stays until then', () => {
    const { vm, iommu } = iommuVm();
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 5);
    e.access(IOVA, false);
    const gen = iommu.unmapDma(IOVA * P, P);
    let r = gen.next();
    while (!r.done && r.value === undefined) r = gen.next();
    expect(r.done, 'the unmap returned before the device acknowledged').toBe(false);
    expect(r.value).toMatchObject({ code: WaitCode.IOTLB_ACK, arg: 0 });
    expect(gen.next().value, 'still blocked: nobody stepped the device').toMatchObject({ code: WaitCode.IOTLB_ACK });
    expect(iommu.table.present(IOVA), 'permissions revoked').toBe(false);
    expect(iommu.table.gfn(IOVA), 'the entry is kept while a device may use it').toBe(BASE + 5);
    expect(role.step()).toBe(Step.PROGRESS);
    expect(drive(gen).value.ret).toBe(P);
    expect(iommu.table.gfn(IOVA)).toBe(-1);
    expect(e.iotlb.lookup(IOVA), 'the device dropped its translation').toBe(-1);
    expect(iommu.dmaRecords.records()).toEqual([]);
  });

  it('a quiesced device does not hold the unmap up', () => {
    const { vm, iommu } = iommuVm();
    const { e } = activeEngine(vm);
    map(iommu, IOVA, 5);
    e.access(IOVA, true);
    Atomics.store(iommu.words, deviceBase(0) + DeviceWord.MODE, DMA_QUIESCED);
    const r = unmap(iommu, IOVA, 1); // throws if it blocks: nobody is stepped
    expect(r.value.ret).toBe(P);
    expect(r.waits).toEqual([]);
  });

  it('staleIotlbAfterUnmap: the unmap returns at once and a later DMA through the cached entry is a stale-iotlb record', () => {
    const { vm, iommu } = iommuVm({ bugs: { staleIotlbAfterUnmap: true } });
    const { e } = activeEngine(vm);
    map(iommu, IOVA, 5);
    e.access(IOVA, false);
    const r = unmap(iommu, IOVA, 1);
    expect(r.value.ret).toBe(P);
    expect(r.waits, 'no invalidation wait').toEqual([]);
    e.access(IOVA, true);
    expect(iommu.dmaRecords.records()).toEqual([{ kind: 'stale-iotlb', device: 0, iova: IOVA * P, write: true, cachedGfn: BASE + 5, currentGfn: -1 }]);
    expect(word(iommu, 0, DeviceWord.STALE)).toBe(1);
    expect(word(iommu, 0, DeviceWord.FAULTS), 'a stale DMA is not a fault').toBe(0);
  });

  it('without the bug the same DMA after the unmap misses the IOTLB and faults: no stale-iotlb record', () => {
    const { vm, iommu } = iommuVm();
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 5);
    e.access(IOVA, false);
    expect(unmap(iommu, IOVA, 1, [role]).value.ret).toBe(P);
    e.access(IOVA, true);
    expect(iommu.dmaRecords.records().map((x) => x.kind)).toEqual(['unmapped-iova']);
    expect(word(iommu, 0, DeviceWord.STALE)).toBe(0);
  });

  it('a DMA through the cached entry between revoke and acknowledgement is legal', () => {
    const { vm, iommu } = iommuVm();
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 5);
    e.access(IOVA, false);
    const gen = iommu.unmapDma(IOVA * P, P);
    while (gen.next().value === undefined) { /* to the IOTLB_ACK wait */ }
    e.access(IOVA, true);
    expect(e.writes, 'the write went through').toBe(1);
    expect(iommu.dmaRecords.count()).toBe(0);
    expect(drive(gen, [role]).value.ret).toBe(P);
  });
});

describe('device faults (DMA oracle)', () => {
  it('a DMA to an unmapped IOVA is a recorded fault counted on the device; nothing is written', () => {
    const { vm, iommu } = iommuVm({ devices: 2 });
    const { e } = activeEngine(vm, 'iommu', 1);
    map(iommu, IOVA, 5);
    expect(() => e.access(IOVA + 1, true)).not.toThrow();
    expect(iommu.dmaRecords.records()).toEqual([{ kind: 'unmapped-iova', device: 1, iova: (IOVA + 1) * P, write: true, cachedGfn: -1, currentGfn: -1 }]);
    expect(word(iommu, 1, DeviceWord.FAULTS)).toBe(1);
    expect(e.writes).toBe(0);
    expect(allZero(vm), 'guest memory untouched').toBe(true);
    expect(iommu.dmaRecords.faultStopped(), 'STOP_ON_FAULT is off').toBe(false);
  });

  it('a write to a read-only mapping is a write-to-read-only fault; nothing is written', () => {
    const { vm, iommu } = iommuVm();
    const { e } = activeEngine(vm);
    map(iommu, IOVA, 5, 1, VFIO_DMA_MAP_FLAG_READ);
    e.access(IOVA, true);
    expect(iommu.dmaRecords.records().map((r) => [r.kind, r.currentGfn])).toEqual([['write-to-read-only', BASE + 5]]);
    expect(allZero(vm)).toBe(true);
  });

  it('with STOP_ON_FAULT the first fault sets the stop', () => {
    const { vm, iommu } = iommuVm();
    Atomics.store(iommu.words, IommuWord.STOP_ON_FAULT, 1);
    activeEngine(vm).e.access(IOVA, false);
    expect(iommu.dmaRecords.faultStopped()).toBe(true);
  });

  it('an mdev\'s vfio_dma_rw to an unmapped IOVA faults under the lock and releases it', () => {
    const { vm, iommu } = iommuVm();
    drive(mdev(vm).dmaRw(IOVA, true));
    expect(iommu.dmaRecords.records().map((r) => r.kind)).toEqual(['unmapped-iova']);
    expect(Atomics.load(iommu.words, IommuWord.LOCK), 'domain lock released').toBe(0);
    expect(allZero(vm)).toBe(true);
  });
});

describe('iommufd HWPT dirty bits', () => {
  function hwpt(tracking = true) {
    const { vm, iommu } = iommuVm({ backend: 'iommufd' });
    const dev = activeEngine(vm);
    map(iommu, IOVA, 5);
    map(iommu, IOVA + 1, 6);
    if (tracking) drive(iommu.hwptSetDirtyTracking(true), [dev.role]);
    const get = (noClear = false, others: Role[] = [dev.role]) => query((m) => iommu.hwptGetDirtyBitmap(m, noClear), others);
    const dirty = (iova: number): boolean => (iommu.table.flags(iova) & IoPte.DIRTY) !== 0;
    return { vm, iommu, ...dev, get, dirty };
  }

  it('a write sets the IOPTE dirty bit; a read does not; an IOTLB entry that knows it is set does not set it again', () => {
    const { e, iommu, dirty } = hwpt();
    e.access(IOVA + 1, false);
    expect(dirty(IOVA + 1), 'read').toBe(false);
    e.access(IOVA, true);
    expect(dirty(IOVA), 'first write').toBe(true);
    iommu.table.and(IOVA, ~IoPte.DIRTY); // cleared behind the device's back, without an IOTLB flush
    e.access(IOVA, true);
    expect(dirty(IOVA), 'a write through the cached entry does not set it again').toBe(false);
  });

  it('GET_DIRTY_BITMAP reports and clears, waiting for the device IOTLB flush; a second read is empty; the next write sets it again', () => {
    const { e, get, dirty } = hwpt();
    e.access(IOVA, true);
    const first = get();
    expect(first.pages).toEqual([5]);
    expect(first.n).toBe(1);
    expect(first.waits.map((w) => [w.code, w.arg]), 'waited for device 0 to acknowledge').toEqual([[WaitCode.IOTLB_ACK, 0]]);
    expect(dirty(IOVA)).toBe(false);
    expect(get(false, []), 'nothing dirty: no flush either').toEqual({ pages: [], n: 0, waits: [] });
    e.access(IOVA, true);
    expect(dirty(IOVA), 'the flushed IOTLB refetched the clean IOPTE').toBe(true);
    expect(get().pages).toEqual([5]);
  });

  it('NO_CLEAR reports the bit and leaves it set, without a flush', () => {
    const { e, get, dirty } = hwpt();
    e.access(IOVA + 1, true);
    expect(get(true, []).pages).toEqual([6]);
    expect(get(true, []).pages).toEqual([6]);
    expect(dirty(IOVA + 1)).toBe(true);
  });

  it('with tracking off writes set nothing', () => {
    const { e, get, dirty } = hwpt(false);
    e.access(IOVA, true);
    expect(dirty(IOVA)).toBe(false);
    expect(get(false, []).n).toBe(0);
  });
});

describe('type1 dirty tracking (VFIO_IOMMU_DIRTY_PAGES)', () => {
  function type1(o: { pinned: boolean; bugs?: KernelBugs }) {
    const { vm, iommu } = iommuVm({ bugs: o.bugs });
    Atomics.store(iommu.words, IommuWord.PINNED_SCOPE, o.pinned ? 1 : 0);
    for (let i = 0; i < 4; i++) map(iommu, IOVA + i, i);
    iommu.type1StartDirtyTracking();
    return { vm, iommu, get: () => query((m) => iommu.type1GetDirtyBitmap(m)).pages };
  }

  it('without pinned scope every mapped page is dirty on every query, with no DMA at all', () => {
    const { get } = type1({ pinned: false });
    expect(get()).toEqual([0, 1, 2, 3]);
    expect(get()).toEqual([0, 1, 2, 3]);
  });

  it('with pinned scope: write-pinned and dma_rw-written pages; a still-pinned page again (refill), an unpinned one not', () => {
    const { vm, iommu, get } = type1({ pinned: true });
    expect(iommu.pinPage(IOVA, true), 'the pin returns the gfn').toBe(BASE);
    expect(iommu.pinPage(IOVA + 1, true)).toBe(BASE + 1);
    iommu.unpinPage(IOVA + 1, true);
    drive(mdev(vm).dmaRw(IOVA + 2, true));
    drive(mdev(vm).dmaRw(IOVA + 3, false));
    expect(get()).toEqual([0, 1, 2]);
    expect(get(), 'refilled with the pinned page only').toEqual([0]);
    expect(get()).toEqual([0]);
  });

  it('pages pinned before tracking started are in the first bitmap', () => {
    const { iommu } = iommuVm();
    Atomics.store(iommu.words, IommuWord.PINNED_SCOPE, 1);
    map(iommu, IOVA, 7);
    iommu.pinPage(IOVA, true);
    iommu.type1StartDirtyTracking();
    expect(query((m) => iommu.type1GetDirtyBitmap(m)).pages).toEqual([7]);
  });

  it('a read pin does not dirty its page', () => {
    const { iommu, get } = type1({ pinned: true });
    expect(iommu.pinPage(IOVA, false)).toBe(BASE);
    expect(get()).toEqual([]);
  });

  it('readPinDirties: a read pin dirties its page, on every query while pinned', () => {
    const { iommu, get } = type1({ pinned: true, bugs: { readPinDirties: true } });
    iommu.pinPage(IOVA, false);
    expect(get()).toEqual([0]);
    expect(get()).toEqual([0]);
  });

  it('a write pin of a read-only mapping, or of nothing, is refused', () => {
    const { iommu } = iommuVm();
    map(iommu, IOVA, 0, 1, VFIO_DMA_MAP_FLAG_READ);
    expect(iommu.pinPage(IOVA, true)).toBe(-EINVAL);
    expect(iommu.pinPage(IOVA + 1, false)).toBe(-EINVAL);
  });
});

describe('device DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*)', () => {
  it('reports only the pages the device wrote while logging, and clears them', () => {
    const { vm, iommu } = iommuVm({ tracking: ['device'] });
    const { e } = activeEngine(vm, 'device');
    for (let i = 0; i < 4; i++) map(iommu, IOVA + i, i);
    const report = () => query((m) => iommu.dmaLoggingReport(0, m));
    e.access(IOVA, true); // before START
    iommu.dmaLoggingStart(0);
    e.access(IOVA + 1, true);
    e.access(IOVA + 2, false);
    expect(report()).toEqual({ pages: [1], n: 1, waits: [] });
    expect(word(iommu, 0, DeviceWord.LOG_REPORTED)).toBe(1);
    expect(report().pages, 'the report cleared it').toEqual([]);
    iommu.dmaLoggingStop(0);
    e.access(IOVA + 3, true);
    expect(report().pages, 'after STOP').toEqual([]);
  });
});

describe('unmap during dirty tracking', () => {
  // Each case maps IOVA -> page 3 and IOVA + 1 -> page 4, starts tracking, and dirties page 3 its way.
  const cases: [string, IommuBackendKind, DmaTracking, boolean, (vm: Vm, iommu: Iommu) => Role[], number[]][] = [
    ['type1, no pinned scope: every unmapped page, written or not', 'type1', 'iommu', false, (_vm, i) => { i.type1StartDirtyTracking(); return []; }, [3, 4]],
    ['type1, pinned scope: the dma_rw-written page', 'type1', 'iommu', true, (vm, i) => { i.type1StartDirtyTracking(); drive(mdev(vm).dmaRw(IOVA, true)); return []; }, [3]],
    ['type1, pinned scope: a write-pinned page (unpinned before the unmap)', 'type1', 'iommu', true, (_vm, i) => { i.type1StartDirtyTracking(); i.pinPage(IOVA, true); i.unpinPage(IOVA, true); return []; }, [3]],
    ['iommufd HWPT: the page the device wrote', 'iommufd', 'iommu', false, (vm, i) => { const d = activeEngine(vm); drive(i.hwptSetDirtyTracking(true), [d.role]); d.e.access(IOVA, true); return [d.role]; }, [3]],
    ['device DMA logging: the page the device wrote', 'type1', 'device', false, (vm, i) => { i.dmaLoggingStart(0); const d = activeEngine(vm, 'device'); d.e.access(IOVA, true); return [d.role]; }, [3]],
  ];
  it.each(cases)('%s ends up in takeUnmapDirty', (_name, backend, tracking, pinned, dirtyIt, expected) => {
    const { vm, iommu } = iommuVm({ backend, tracking: [tracking] });
    Atomics.store(iommu.words, IommuWord.PINNED_SCOPE, pinned ? 1 : 0);
    map(iommu, IOVA, 3);
    map(iommu, IOVA + 1, 4);
    const others = dirtyIt(vm, iommu);
    expect(unmap(iommu, IOVA, 2, others).value.ret).toBe(2 * P);
    const got: number[] = [];
    expect(iommu.takeUnmapDirty((p) => got.push(p))).toBe(expected.length);
    expect(got).toEqual(expected);
    expect(iommu.takeUnmapDirty(() => {}), 'taken once').toBe(0);
  });

  it('iommufd: a write through the cached entry while the unmap waits for the flush is collected', () => {
    const { vm, iommu } = iommuVm({ backend: 'iommufd' });
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 3);
    drive(iommu.hwptSetDirtyTracking(true), [role]);
    e.access(IOVA, false);
    const gen = iommu.unmapDma(IOVA * P, P);
    while (gen.next().value === undefined) { /* to the IOTLB_ACK wait */ }
    e.access(IOVA, true);
    expect(drive(gen, [role]).value.ret).toBe(P);
    const got: number[] = [];
    iommu.takeUnmapDirty((p) => got.push(p));
    expect(got).toEqual([3]);
  });

  it('nothing is collected with tracking off', () => {
    const { vm, iommu } = iommuVm({ backend: 'iommufd' });
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 3);
    e.access(IOVA, true);
    unmap(iommu, IOVA, 1, [role]);
    expect(iommu.takeUnmapDirty(() => {})).toBe(0);
  });
});

describe('IOMMU service (mailbox)', () => {
  function service(backend: IommuBackendKind) {
    const { vm, iommu } = iommuVm({ backend, devices: 2 });
    const events: IommuServiceEvent[] = [];
    const svc = new GeneratorRole('iommu-service', iommuService(vm, (ev) => events.push(ev)));
    expect(svc.step(), 'idle service blocks').toBe(Step.BLOCKED);
    expect(svc.wait.code).toBe(WaitCode.IOMMU_REQUEST);
    /** Posts a request in device `d`'s mailbox as DmaDevice.request does, runs the roles until the answer; returns RESULT. */
    const request = (d: number, op: MailboxOp, iovaPage: number, page: number, roles: Role[] = []): number => {
      const w = iommu.words;
      const b = deviceBase(d);
      w[b + MailboxWord.OP] = op;
      w[b + MailboxWord.IOVA] = iovaPage;
      w[b + MailboxWord.PAGES] = 1;
      w[b + MailboxWord.GFN] = BASE + page;
      w[b + MailboxWord.PROT] = RW;
      const seq = Atomics.add(w, b + MailboxWord.REQ_SEQ, 1) + 1;
      Atomics.add(w, IommuWord.DOORBELL, 1);
      new DeterministicDriver([svc, ...roles], new RandomScheduler(7)).run(() => Atomics.load(w, b + MailboxWord.RESP_SEQ) === seq, 10_000);
      expect(Atomics.load(w, b + MailboxWord.RESP_SEQ), 'the service answered').toBe(seq);
      return w[b + MailboxWord.RESULT]!;
    };
    return { vm, iommu, events, request };
  }

  it('serves MAP and UNMAP with the ioctl result; a failing MAP answers -EEXIST and reports an iommu-error', () => {
    const { iommu, events, request } = service('type1');
    expect(request(1, MailboxOp.MAP, IOVA, 7)).toBe(0);
    expect(iommu.table.gfn(IOVA)).toBe(BASE + 7);
    expect(events).toEqual([]);
    expect(request(1, MailboxOp.MAP, IOVA, 8)).toBe(-EEXIST);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ kind: 'iommu-error', device: 1 });
    expect(events[0]!.detail).toMatch(/^VFIO_IOMMU_MAP_DMA: EEXIST: .*overlaps/);
    expect(request(1, MailboxOp.UNMAP, IOVA, 0)).toBe(0);
    expect(iommu.table.gfn(IOVA)).toBe(-1);
    expect(events).toHaveLength(1);
  });

  it('iommufd: an UNMAP of nothing answers -ENOENT and reports it', () => {
    const { events, request } = service('iommufd');
    expect(request(0, MailboxOp.UNMAP, IOVA, 0)).toBe(-ENOENT);
    expect(events.map((e) => [e.kind, e.device])).toEqual([['iommu-error', 0]]);
  });

  it('an UNMAP finishes only once an active device acknowledged the invalidation (deterministic driver)', () => {
    const { vm, iommu, request } = service('type1');
    const { e, role } = activeEngine(vm);
    expect(request(1, MailboxOp.MAP, IOVA, 7)).toBe(0);
    e.access(IOVA, true);
    expect(request(1, MailboxOp.UNMAP, IOVA, 0, [role])).toBe(0);
    expect(word(iommu, 0, DeviceWord.INV_ACK), 'device 0 acknowledged the generation').toBe(Atomics.load(iommu.words, IommuWord.INV_GEN));
    expect(e.iotlb.lookup(IOVA)).toBe(-1);
  });
});

describe('attachDevices', () => {
  const setup = (backend: IommuBackendKind, buffers: number): DeviceSetup => ({
    backend, dmaEntryLimit: 4, stopOnFault: false, devices: [config('gvt'), config('dma-engine', { buffers })],
  });
  const vmFor = (s: DeviceSetup): Vm => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu: iommuConfigFor(s, SLOTS) }));
    vm.populate();
    return vm;
  };

  it('type1: more buffers than dma_entry_limit is a UserError naming the device and ENOSPC; the lock is released', () => {
    const s = setup('type1', 5);
    const vm = vmFor(s);
    let err: unknown;
    try { attachDevices(vm, s, 1); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(UserError);
    expect((err as Error).message).toMatch(/^device 1 \(dma-engine\), buffer 4: VFIO_IOMMU_MAP_DMA: ENOSPC: .*dma_entry_limit/);
    expect(Atomics.load(vm.iommu!.words, IommuWord.LOCK)).toBe(0);
  });

  it('as many buffers as the limit attach, and iommufd ignores the limit', () => {
    const t1 = setup('type1', 4);
    const a = vmFor(t1);
    attachDevices(a, t1, 1);
    expect(a.iommu!.stats().entries).toBe(4);
    const fd = setup('iommufd', 9);
    const b = vmFor(fd);
    attachDevices(b, fd, 1);
    expect(b.iommu!.stats().entries).toBe(9);
  });
});

describe('enabling HWPT dirty tracking', () => {
  it('flushes the device IOTLBs: an entry cached as already dirty before the enable does not hide the next write', () => {
    const { vm, iommu } = iommuVm({ backend: 'iommufd' });
    const { e, role } = activeEngine(vm);
    map(iommu, IOVA, 5);
    drive(iommu.hwptSetDirtyTracking(true), [role]);
    e.access(IOVA, true); // caches the entry as dirty
    drive(iommu.hwptSetDirtyTracking(false));
    const { waits } = drive(iommu.hwptSetDirtyTracking(true), [role]);
    expect(waits.some((w) => w.code === WaitCode.IOTLB_ACK), 'the enable waited for the device to drop its IOTLB').toBe(true);
    e.access(IOVA, true);
    expect(iommu.table.flags(IOVA) & IoPte.DIRTY, 'the write after the enable set the dirty bit').not.toBe(0);
  });
});
