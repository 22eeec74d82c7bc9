import { describe, expect, it } from 'vitest';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import { type DmaTracking, type IommuBackendKind, IommuWord, IoPte } from '../src/host/iommu/iommu-layout.ts';
import { type DirtyTracking, VcpuRunState, createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { DirtyLog } from '../src/host/vmm/dirty-log.ts';
import type { DirtySource } from '../src/host/vmm/dirty-source.ts';
import { DmaLoggingSource, IommufdDirtySource, Type1DirtySource, UnmappedRangesSource } from '../src/host/vmm/dma-dirty-sources.ts';
import { KvmBitmapSource, KvmClearLogSource } from '../src/host/vmm/kvm-bitmap-source.ts';
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
