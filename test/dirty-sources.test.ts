import { describe, expect, it } from 'vitest';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { NO_BITMAP, PageBitmap, SharedDirtyBitmap } from '../src/host/dirty-bitmap.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import { type DmaTracking, type IommuBackendKind, IommuWord, IoPte } from '../src/host/iommu/iommu-layout.ts';
import { type DirtyTracking, VcpuRunState, createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { DirtyLog, trackingFor } from '../src/host/vmm/dirty-log.ts';
import type { Memslot } from '../src/host/memslot.ts';
import type { DirtySource } from '../src/host/vmm/dirty-source.ts';
import { DmaLoggingSource, IommufdDirtySource, Type1DirtySource, UnmappedRangesSource } from '../src/host/vmm/dma-dirty-sources.ts';
import { KvmBitmapSource, KvmClearLogSource, chunkOf } from '../src/host/vmm/kvm-bitmap-source.ts';
import { KvmRingSource } from '../src/host/vmm/kvm-ring-source.ts';
import { LEGACY, MANUAL, RING, VmmControl, complete, retire, vcpuWith } from './helpers.ts';

/**
 * One suite, run against every DirtySource (as rust-vmm's vm-memory runs one bitmap suite
 * against every backend): the contract every dirty log keeps, whatever writes the pages.
 */
const BASE = 0x100;
const PAGES = 64;
const SLOTS = [{ id: 1, asId: 0, baseGfn: BASE, pages: PAGES, flags: 0 }];

interface Backend {
  name: string;
  /** A VM with the source; `write(page)` is what dirties a page for this source (a vCPU's write, a DMA). */
  make(): { vm: Vm; source: DirtySource; write(page: number): void };
}

/** A KVM source: pages are dirtied by a real vCPU write (write path, fault, log), then the vCPU stops (no flush waits on it). */
function kvm(tracking: DirtyTracking, make: (vm: Vm) => DirtySource): Backend['make'] {
  return () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking }));
    vm.populate();
    const vmm = new VmmControl(vm);
    const write = (page: number): void => {
      vmm.release(0);
      const v = vcpuWith(vm, 0, [{ gfn: BASE + page, value: 7 }]);
      retire(v, 1);
      vmm.requestStop(0);
      for (let i = 0; i < 100 && vmm.runState(0) !== VcpuRunState.STOPPED; i++) v.step();
    };
    return { vm, source: make(vm), write };
  };
}

/** A DMA source: the VM's IOMMU maps every guest page at IOVA = its page index; `mark` is the hardware's (or the device's) act of a DMA write. */
function dma(backend: IommuBackendKind, tracking: DmaTracking, pinnedScope: boolean, make: (vm: Vm) => DirtySource, mark: (vm: Vm, page: number) => void): Backend['make'] {
  return () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu: { backend, dmaEntryLimit: 65535, iovaPages: 1024, devices: 1, tracking: [tracking] } }));
    vm.populate();
    const iommu = vm.iommu!;
    Atomics.store(iommu.words, IommuWord.PINNED_SCOPE, pinnedScope ? 1 : 0);
    for (let p = 0; p < PAGES; p++) iommu.mapDma(p * PAGE_SIZE, PAGE_SIZE, (BASE + p) * PAGE_SIZE, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
    return { vm, source: make(vm), write: (page) => mark(vm, page) };
  };
}

const BACKENDS: Backend[] = [
  { name: 'KVM dirty ring', make: kvm(RING(256), (vm) => new KvmRingSource(vm)) },
  { name: 'KVM legacy dirty bitmap', make: kvm(LEGACY, (vm) => new KvmBitmapSource(vm)) },
  { name: 'KVM clear-log (CLEAR per slot)', make: kvm(MANUAL, (vm) => new KvmClearLogSource(vm, { perChunk: false })) },
  {
    name: 'VFIO type1 dirty pages (pinned scope, dma_rw writes)',
    make: dma('type1', 'iommu', true, (vm) => new Type1DirtySource(vm.iommu!), (vm, p) => vm.iommu!.markType1(p)),
  },
  {
    name: 'iommufd HWPT dirty bits',
    make: dma('iommufd', 'iommu', false, (vm) => new IommufdDirtySource(vm.iommu!), (vm, p) => { if (vm.iommu!.hwptTracking) vm.iommu!.table.or(p, IoPte.DIRTY); }),
  },
  {
    name: 'device DMA logging',
    make: dma('type1', 'device', false, (vm) => new DmaLoggingSource(vm.iommu!, 0), (vm, p) => { vm.iommu!.logDma(0, p); }),
  },
];

/** The pages (slot-relative) a sync reports. */
function syncPages(vm: Vm, s: DirtySource, final = false): { pages: number[]; n: number } {
  const into = new PageBitmap(vm.memory.totalPages);
  const n = complete(s.sync(into, final));
  const pages: number[] = [];
  for (let p = 0; p < PAGES; p++) if (into.isDirty(vm.memory.slots[0]!.firstPage + p)) pages.push(p);
  return { pages, n };
}

describe.each(BACKENDS)('the DirtySource contract: $name', (b) => {
  it('has a name and says whether it reports DMA', () => {
    const { source } = b.make();
    expect(source.name.length).toBeGreaterThan(3);
    expect(typeof source.dma).toBe('boolean');
  });

  it('reports nothing before it starts, and nothing written before the start', () => {
    const { vm, source, write } = b.make();
    write(3);
    expect(syncPages(vm, source).pages).toEqual([]);
    complete(source.start());
    expect(syncPages(vm, source).pages).toEqual([]);
  });

  it('a page written after the start is reported by the next sync, and only that sync', () => {
    const { vm, source, write } = b.make();
    complete(source.start());
    write(5);
    write(9);
    const first = syncPages(vm, source);
    expect(first.pages).toEqual([5, 9]);
    expect(first.n).toBeGreaterThanOrEqual(2);
    expect(syncPages(vm, source).pages, 'not again unless written again').toEqual([]);
  });

  it('is re-armed by its sync: a page written again is reported again', () => {
    const { vm, source, write } = b.make();
    complete(source.start());
    write(7);
    expect(syncPages(vm, source).pages).toEqual([7]);
    write(7);
    write(8);
    expect(syncPages(vm, source).pages).toEqual([7, 8]);
  });

  it('after stop, writes are no longer reported', () => {
    const { vm, source, write } = b.make();
    complete(source.start());
    write(2);
    expect(syncPages(vm, source).pages).toEqual([2]);
    source.stop();
    write(4);
    expect(syncPages(vm, source).pages).toEqual([]);
  });
});

describe('sources with more to them', () => {
  it('KVM dirty ring: the final sync reads the backup bitmap last (host writes with no running vCPU), and tallies each part', () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: RING(256, true) }));
    vm.populate();
    const ring = new KvmRingSource(vm);
    complete(ring.start());
    vm.writeGuest(vm.memory.slots[0]!, 11, 1, { writer: 0x1000, seq: 1, iteration: 1 }, -1);
    expect(syncPages(vm, ring).pages, 'not before the final sync').toEqual([]);
    const tally: [string, number][] = [];
    const into = new PageBitmap(vm.memory.totalPages);
    complete(ring.sync(into, true, (s, n) => tally.push([s, n])));
    expect(into.isDirty(vm.memory.slots[0]!.firstPage + 11)).toBe(true);
    expect(tally).toEqual([["the vCPUs' dirty rings", 0], ["the ring's backup bitmap", 1]]);
  });

  it('KVM clear-log per chunk: GET reports without re-protecting; beforeCopy CLEARs the chunk (a write after that is reported again)', () => {
    const b = kvm(MANUAL, (vm) => new KvmClearLogSource(vm, { perChunk: true }));
    const { vm, source, write } = b();
    complete(source.start());
    write(3);
    const into = new PageBitmap(vm.memory.totalPages);
    complete(source.sync(into, false));
    write(3); // still writable: no fault, nothing logged until the CLEAR
    expect(syncPages(vm, source).pages, 'GET returns the bit again: nothing cleared yet').toEqual([3]);
    complete(source.beforeCopy!(vm.memory.slots[0]!, 3, into));
    expect(syncPages(vm, source).pages, 'the CLEAR took the bit').toEqual([]);
    write(3);
    expect(syncPages(vm, source).pages, 're-protected by the CLEAR: the write faulted and was logged').toEqual([3]);
  });

  it('type1 without a pinned scope reports every mapped page on every query', () => {
    const { vm, source } = dma('type1', 'iommu', false, (v) => new Type1DirtySource(v.iommu!), () => {})();
    complete(source.start());
    expect(syncPages(vm, source).pages).toHaveLength(PAGES);
    expect(syncPages(vm, source).pages).toHaveLength(PAGES);
  });

  it('the dirty bits of unmapped ranges: an unmap collects the range\'s dirtiness before it frees the entries', () => {
    const { vm, source } = dma('type1', 'iommu', true, (v) => new UnmappedRangesSource(v.iommu!), () => {})();
    const iommu = vm.iommu!;
    iommu.type1StartDirtyTracking();
    iommu.markType1(6);
    complete(iommu.unmapDma(6 * PAGE_SIZE, PAGE_SIZE));
    expect(syncPages(vm, source).pages).toEqual([6]);
    expect(syncPages(vm, source).pages).toEqual([]);
  });

  it('the union ORs every source of a VM and counts each', () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu: { backend: 'iommufd', dmaEntryLimit: 65535, iovaPages: 1024, devices: 1, tracking: ['iommu'] } }));
    vm.populate();
    const log = new DirtyLog(vm, { clearPerChunk: false });
    expect(log.sources.map((s) => s.name)).toEqual(['KVM_GET_DIRTY_LOG', 'IOMMU_HWPT_GET_DIRTY_BITMAP (iommufd)', 'dirty bits of unmapped ranges']);
    complete(log.start());
    const into = new PageBitmap(vm.memory.totalPages);
    complete(log.sync(into, false));
    expect(log.stats().map((s) => s.syncs)).toEqual([1, 1, 1]);
    expect(log.dmaStats().map((s) => s.source)).toEqual(['IOMMU_HWPT_GET_DIRTY_BITMAP (iommufd)', 'dirty bits of unmapped ranges']);
  });
});

describe('the VMM\'s KVM sources, case by case', () => {
  it('trackingFor: the capabilities each mode asks for', () => {
    const o = { ringEntries: 512, hostWrites: true };
    expect(trackingFor('dirty-ring', o)).toEqual({ kind: 'ring', entries: 512, withBitmap: true });
    expect(trackingFor('dirty-ring', { ...o, hostWrites: false })).toEqual({ kind: 'ring', entries: 512, withBitmap: false });
    expect(trackingFor('dirty-ring', { ...o, noBackupBitmap: true })).toEqual({ kind: 'ring', entries: 512, withBitmap: false });
    expect(trackingFor('clear-log', o)).toEqual({ kind: 'bitmap', manualProtect: true, initiallySet: false });
    expect(trackingFor('clear-log', { ...o, initiallySet: true })).toEqual({ kind: 'bitmap', manualProtect: true, initiallySet: true });
    expect(trackingFor('dirty-log', { ...o, initiallySet: true })).toEqual({ kind: 'bitmap', manualProtect: false, initiallySet: false });
  });

  it('DirtyLog picks KVM\'s source by the VM\'s tracking and counts syncs and pages per source', () => {
    for (const [tracking, kind, name] of [[RING(256), KvmRingSource, "the vCPUs' dirty rings"], [MANUAL, KvmClearLogSource, 'KVM_GET_DIRTY_LOG'], [LEGACY, KvmBitmapSource, 'KVM_GET_DIRTY_LOG']] as const) {
      const { vm, write } = kvm(tracking, (v) => new KvmBitmapSource(v))();
      const log = new DirtyLog(vm, { clearPerChunk: false });
      expect(log.sources).toHaveLength(1);
      expect(log.sources[0]!.constructor).toBe(kind);
      expect(log.ring !== null).toBe(tracking.kind === 'ring');
      complete(log.start());
      write(1);
      write(2);
      const into = new PageBitmap(vm.memory.totalPages);
      expect(complete(log.sync(into, false)), name).toBe(2);
      write(2);
      expect(complete(log.sync(into, false)), name).toBe(tracking.kind === 'ring' ? 1 : 0); // the bitmap sources count pages new to `into`
      expect(log.syncs).toBe(2);
      expect(log.stats()).toEqual([{ source: name, syncs: 2, pagesReported: tracking.kind === 'ring' ? 3 : 2 }]);
      log.stop();
      expect(vm.flags(vm.memory.slots[0]!) & 1, 'logging off').toBe(0);
    }
  });

  it('a bitmap source reports the pages new to what it ORs into, and tallies them', () => {
    const { vm, write } = kvm(LEGACY, (v) => new KvmBitmapSource(v))();
    const source = new KvmBitmapSource(vm);
    complete(source.start());
    const into = new PageBitmap(vm.memory.totalPages);
    into.mark(vm.memory.slots[0]!.firstPage + 4);
    write(4);
    write(6);
    const tally: [string, number][] = [];
    expect(complete(source.sync(into, false, (s, n) => tally.push([s, n])))).toBe(1);
    expect(tally).toEqual([['KVM_GET_DIRTY_LOG', 1]]);
  });

  it('copy-before-reset at the ring source: harvested without a reset, the pages copied meanwhile counted, the reset done at settle', () => {
    const { vm, write } = kvm(RING(256), (v) => new KvmBitmapSource(v))();
    const log = new DirtyLog(vm, { clearPerChunk: false, deferRingReset: true });
    complete(log.start());
    write(3);
    const tally: [string, number][] = [];
    const into = new PageBitmap(vm.memory.totalPages);
    expect(complete(log.sync(into, false, (s, n) => tally.push([s, n])))).toBe(1);
    expect(tally).toEqual([["the vCPUs' dirty rings", 1]]);
    expect(vm.rings![0]!.used(), 'harvested, not reset').toBe(1);
    complete(log.afterCopy(5));
    expect(vm.acts.count('copy-before-reset')).toBe(0);
    complete(log.settle());
    expect(vm.acts.count('copy-before-reset'), 'acted: pages were copied before the reset').toBe(1);
    expect(vm.rings![0]!.used(), 'reset at settle').toBe(0);
    complete(log.settle());
    expect(vm.acts.count('copy-before-reset'), 'once per pending reset').toBe(1);
    // With nothing copied in between, the deferred reset did not act; a final sync never defers.
    write(4);
    complete(log.sync(into, false));
    complete(log.settle());
    expect(vm.acts.count('copy-before-reset')).toBe(1);
    write(5);
    complete(log.sync(into, true));
    expect(vm.rings![0]!.used(), 'the final sync resets at once').toBe(0);
  });

  it('the ring source drops entries for a slot it does not have or an offset past the slot (forged by a buggy or hostile guest)', () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: RING(256) }));
    vm.populate();
    const source = new KvmRingSource(vm);
    complete(source.start());
    const ring = vm.rings![0]!;
    ring.push(1, PAGES - 1);
    ring.push(1, PAGES);
    ring.push(2, 0);
    const into = new PageBitmap(vm.memory.totalPages + 64);
    complete(source.sync(into, false));
    expect([...into.pagesSet()]).toEqual([vm.memory.slots[0]!.firstPage + PAGES - 1]);
    expect(source.lastHarvested).toBe(3);
  });

  it('the ring source tallies the rings and the backup bitmap apart on a final sync', () => {
    const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: RING(256, true) }));
    vm.populate();
    const source = new KvmRingSource(vm);
    complete(source.start());
    vm.rings![0]!.push(1, 1);
    vm.rings![0]!.push(1, 2);
    vm.writeGuest(vm.memory.slots[0]!, 11, 1, { writer: 0x1000, seq: 1, iteration: 1 }, -1);
    const tally: [string, number][] = [];
    complete(source.sync(new PageBitmap(vm.memory.totalPages), true, (s, n) => tally.push([s, n])));
    expect(tally).toEqual([["the vCPUs' dirty rings", 2], ["the ring's backup bitmap", 1]]);
  });

  it('copy-before-clear at the clear-log source: the chunk is CLEARed only after its pages were copied, and the CLEAR of the last chunk comes after the slot', () => {
    const slots = [{ id: 1, asId: 0, baseGfn: BASE, pages: 100, flags: 0 }];
    const vm = new Vm(createVmLayout({ slots, vcpus: 1, tracking: MANUAL }));
    vm.populate();
    const slot = vm.memory.slots[0]!;
    const log = new DirtyLog(vm, { clearPerChunk: true, clearAfterCopy: true });
    complete(log.start());
    for (const p of [70, 99]) slot.dirtyBitmap[p >>> 5]! |= 1 << (p & 31); // logged by faults
    const into = new PageBitmap(vm.memory.totalPages);
    complete(log.sync(into, false));
    complete(log.beforeCopy(slot, 70, into));
    expect(vm.bitmaps[0]!.isDirty(70), 'not cleared before the copy').toBe(true);
    complete(log.afterSlot(slot));
    expect([70, 99].map((p) => vm.bitmaps[0]!.isDirty(p)), 'the chunk 64..99 (36 pages) cleared after the slot').toEqual([false, false]);
    expect(vm.acts.count('copy-before-clear')).toBe(1);
    complete(log.afterSlot(slot));
    expect(vm.acts.count('copy-before-clear'), 'nothing left to clear').toBe(1);
  });

  it('chunkOf: the 64-page chunk of a page, cut at the slot\'s end, with the bits the bitmap has there', () => {
    const vm = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: BASE, pages: 100, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x1000, pages: 200, flags: 0 }], vcpus: 1, tracking: MANUAL }));
    const [a, b] = vm.memory.slots as [Memslot, Memslot];
    const dirty = new PageBitmap(vm.memory.totalPages);
    for (const p of [64, 95, 96, 99]) dirty.mark(a.firstPage + p);
    for (const p of [0, 63, 64, 130, 191]) dirty.mark(b.firstPage + p);
    const c = chunkOf(a, 70, dirty);
    expect([c.first, c.num, c.bits[0], c.bits[1]]).toEqual([64, 36, (1 << 0 | 1 << 31) >>> 0, 1 << 0 | 1 << 3]);
    const d = chunkOf(b, 150, dirty);
    expect([d.first, d.num, d.bits[0], d.bits[1]]).toEqual([128, 64, 1 << 2, (1 << 31) >>> 0]);
  });
});

describe('the bitmaps', () => {
  it('KVM_DIRTY_LOG_INITIALLY_SET sets every page\'s bit and none past the end', () => {
    for (const pages of [32, 64, 70, 95]) {
      const words = new Int32Array(4);
      new SharedDirtyBitmap(words, pages).setAll();
      const set = Array.from({ length: 128 }, (_, p) => (words[p >>> 5]! >>> (p & 31)) & 1).reduce((n, b) => n + b, 0);
      expect(set, `${pages} pages`).toBe(pages);
      expect(new SharedDirtyBitmap(words, pages).isDirty(pages - 1)).toBe(true);
      expect(new SharedDirtyBitmap(words, pages).isDirty(pages)).toBe(false);
    }
  });

  it('a page bitmap: marks, ORs words in at an offset, lists the pages set in order, counts and clears', () => {
    const b = new PageBitmap(100);
    expect(b.words.length).toBe(4);
    b.mark(3);
    b.orWords([1 << 1, (1 << 31) >>> 0], 32);
    expect([...b.pagesSet()]).toEqual([3, 33, 95]);
    expect(b.count()).toBe(3);
    expect(NO_BITMAP.isDirty(3)).toBe(false);
    b.clear();
    expect([...b.pagesSet()]).toEqual([]);
    expect(b.isDirty(3)).toBe(false);
  });
});
