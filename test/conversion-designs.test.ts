import { describe, expect, it } from 'vitest';
import { EAGAIN, EFAULT, EINVAL, ENOSPC, KVM_MEM_GUEST_MEMFD, PAGE_SIZE } from '../src/host/constants.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../src/host/iommu/constants.ts';
import type { IommuBackendKind } from '../src/host/iommu/iommu-layout.ts';
import { type MemslotConfig, createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { CONVERSION_DESIGNS, type ConversionDesign, type ConversionDesignName } from '../src/host/vmm/conversion-design.ts';
import { createConversionDesign } from '../src/host/vmm/conversion-designs.ts';
import { InPlaceConversion } from '../src/host/vmm/in-place-conversion.ts';
import { MANUAL, drive } from './helpers.ts';

/*
 * The designs the seed discussion weighed (src/host/vmm/conversion-design.ts), held to
 * one suite: the same conversions must leave the same attributes and the same device
 * reach (every shared page mapped, no private page ever), and fail as the real thing
 * fails. Slot 1 (gfns 0x200..0x5ff, 4 MiB) has a guest_memfd; slot 2 (0x800..0x80f) has
 * none; nothing at 0x900.
 */
const G = 0x200;
const PAGES = 1024;
const N = 0x800;
const P = PAGE_SIZE;
const SLOTS: MemslotConfig[] = [
  { id: 1, asId: 0, baseGfn: G, pages: PAGES, flags: KVM_MEM_GUEST_MEMFD },
  { id: 2, asId: 0, baseGfn: N, pages: 16, flags: 0 },
];

interface GuestOptions { backend?: IommuBackendKind; limit?: number; registrationCheck?: boolean; convertWhilePinned?: boolean }

function guest(name: ConversionDesignName, o: GuestOptions = {}) {
  const iommu = { backend: o.backend ?? 'type1', dmaEntryLimit: o.limit ?? VFIO_DEFAULT_DMA_ENTRY_LIMIT, iovaPages: 0x1000, devices: 1, tracking: ['iommu' as const] };
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: MANUAL, privateMem: true, iommu }));
  vm.populate();
  const design = createConversionDesign(name, vm, {
    ...(o.registrationCheck !== undefined ? { registrationCheck: o.registrationCheck } : {}),
    ...(o.convertWhilePinned !== undefined ? { convertWhilePinned: o.convertWhilePinned } : {}),
  });
  const setup = drive(design.setup()).value;
  const slot = vm.memory.slots[0]!;
  const convert = (page: number, pages: number, toPrivate: boolean) => drive(design.convert((G + page) * P, pages * P, toPrivate)).value;
  return { vm, design, slot, setup, convert };
}

/** Per page of slot 1: 'S' shared or 'p' private in KVM, and whether the device reaches it ('+'). */
function state(vm: Vm): string {
  const slot = vm.memory.slots[0]!;
  let s = '';
  for (let p = 0; p < PAGES; p++) s += (vm.attributes!.isPrivate(slot, p) ? 'p' : 'S') + (vm.iommu!.table.present(G + p) ? '+' : '.');
  return s;
}

/** What the device reaches must be exactly the shared pages, and the design's own record must agree with KVM. */
function expectConsistent(vm: Vm, design: ConversionDesign): void {
  const slot = vm.memory.slots[0]!;
  for (let p = 0; p < PAGES; p++) {
    const shared = !vm.attributes!.isPrivate(slot, p);
    expect(vm.iommu!.table.present(G + p), `page ${p}: the device reaches it exactly when it is shared`).toBe(shared);
    const own = design.sharedInBookkeeping(G + p);
    if (own !== undefined) expect(own, `page ${p}: the design's bookkeeping`).toBe(shared);
  }
}

// private_mem_conversions_test's ranges (offset, pages) inside the 2 MiB + 4 KiB area, then partly converted ranges.
const SCRIPT: [number, number, boolean][] = [
  [0, 1, false], [0, 512, false], [1, 1, true], [1, 512, true], [512, 1, false], [0, 1, true],
  [600, 64, false], [620, 8, true], [590, 40, false], [600, 100, true], [700, 300, false], [800, 10, true], [0, PAGES, false], [3, 5, true],
];

function model(): string {
  const shared = new Array<boolean>(PAGES).fill(false);
  for (const [page, pages, toPrivate] of SCRIPT) for (let p = page; p < Math.min(PAGES, page + pages); p++) shared[p] = !toPrivate;
  return shared.map((s) => (s ? 'S+' : 'p.')).join('');
}

describe.each(CONVERSION_DESIGNS)('conversion design %s', (name) => {
  it('starts with every guest_memfd page private and nothing mapped for the device', () => {
    const { vm, design, setup } = guest(name);
    expect(setup).toEqual({ ret: 0, error: '' });
    expect(vm.attributes!.privatePages()).toBe(PAGES);
    expect(design.stats().pagesMapped).toBe(0);
    expect(design.stats().iommuEntries).toBe(0);
    expectConsistent(vm, design);
  });

  it('the same conversions leave the same state as every other design: KVM\'s attributes, and the device reaching the shared pages only', () => {
    const { vm, design, convert } = guest(name);
    for (const [page, pages, toPrivate] of SCRIPT) {
      expect(convert(page, pages, toPrivate), `${page}+${pages} to ${toPrivate ? 'private' : 'shared'}`).toEqual({ ret: 0, error: '' });
      expectConsistent(vm, design);
    }
    expect(state(vm)).toBe(model());
    const shared = PAGES - vm.attributes!.privatePages();
    const s = design.stats();
    expect(s.pagesMapped).toBe(shared);
    // One container mapping per shared 4 KiB page, except where KVM writes the table itself.
    expect(s.iommuEntries).toBe(name === 'kvm-iommu' ? 0 : shared);
    expect(s.conversions).toBe(SCRIPT.length);
    expect(vm.mmuInvalidate.inProgress()).toBe(0);
  });

  it('issues the ioctls of its design for one 4 KiB conversion each way', () => {
    const { design, convert } = guest(name);
    const before = design.stats().ioctls;
    convert(8, 1, false);
    convert(8, 1, true);
    const after = design.stats().ioctls;
    const delta = Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - (before[k] ?? 0)]).filter(([, v]) => v !== 0));
    expect(delta).toEqual({
      rdm: { KVM_SET_MEMORY_ATTRIBUTES: 2, VFIO_IOMMU_MAP_DMA: 1, VFIO_IOMMU_UNMAP_DMA: 1, 'fallocate(PUNCH_HOLE)': 1, 'madvise(MADV_DONTNEED)': 1 },
      notifier: { KVM_SET_MEMORY_ATTRIBUTES: 2, VFIO_IOMMU_MAP_DMA: 1, VFIO_IOMMU_UNMAP_DMA: 1, 'fallocate(PUNCH_HOLE)': 1, 'madvise(MADV_DONTNEED)': 1 },
      'in-place': { 'KVM_SET_MEMORY_ATTRIBUTES2 (guest_memfd)': 2, VFIO_IOMMU_MAP_DMA: 1, VFIO_IOMMU_UNMAP_DMA: 1 },
      'kvm-iommu': { KVM_SET_MEMORY_ATTRIBUTES: 2, 'fallocate(PUNCH_HOLE)': 1, 'madvise(MADV_DONTNEED)': 1 },
    }[name]);
  });

  it('fails bad ranges as kvm_convert_memory does, changing nothing', () => {
    const { vm, design } = guest(name);
    const conv = (start: number, size: number, toPrivate: boolean) => drive(design.convert(start, size, toPrivate)).value;
    expect(conv(G * P + 8, P, false)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(G * P, 100, false)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(G * P, 0, false)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(0x900 * P, P, false)).toEqual({ ret: 0, error: '' });
    expect(conv(0x900 * P, P, true)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(N * P, 2 * P, true)).toEqual({ ret: -EINVAL, error: 'Convert non guest_memfd backed memory region (0x800000 ,+ 0x2000) to private' });
    expect(vm.attributes!.privatePages()).toBe(PAGES);
    expect(design.stats().pagesMapped).toBe(0);
  });

  it('under type1, a conversion that needs more 4 KiB mappings than dma_entry_limit allows fails with ENOSPC and rolls its section back (KVM writes its table with no limit)', () => {
    const { vm, design, convert } = guest(name, { limit: 64, registrationCheck: false });
    expect(convert(0, 32, false).ret).toBe(0);
    const r = convert(100, 64, false);
    if (name === 'kvm-iommu') {
      expect(r).toEqual({ ret: 0, error: '' });
      expect(design.stats().pagesMapped).toBe(96);
      return;
    }
    expect(r.ret).toBe(-ENOSPC);
    expect(r.error).toContain('ENOSPC: the container holds 64 mappings, its dma_entry_limit');
    // The rollback: none of the failed section stays mapped; the earlier conversion keeps its 32.
    expect(design.stats().iommuEntries).toBe(32);
    for (let p = 100; p < 164; p++) expect(vm.iommu!.table.present(G + p)).toBe(false);
    // KVM was told first, as kvm_convert_memory tells it: the attributes say shared (QEMU stops the VM).
    expect(vm.attributes!.isPrivate(vm.memory.slots[0]!, 100)).toBe(false);
    expect(vm.iommu!.stats().mapErrors).toBe(1);
  });

  it('registration refuses a guest whose 4 KiB mappings could pass the container\'s limit, naming it; under iommufd nothing is refused', () => {
    const t1 = guest(name, { limit: 33000 });
    if (name === 'kvm-iommu') expect(t1.setup).toEqual({ ret: 0, error: '' });
    else {
      expect(t1.setup.ret).toBe(-ENOSPC);
      expect(t1.setup.error).toContain('possibly running out of DMA mappings');
      expect(t1.setup.error).toContain('33000');
    }
    const fd = guest(name, { backend: 'iommufd', limit: 16 });
    expect(fd.setup).toEqual({ ret: 0, error: '' });
    expect(fd.convert(0, PAGES, false)).toEqual({ ret: 0, error: '' });
    expect(fd.design.stats().pagesMapped).toBe(PAGES);
    expectConsistent(fd.vm, fd.design);
  });
});

describe('in-place conversion: a pin holds the page shared', () => {
  const inPlace = (o: GuestOptions = {}) => {
    const g = guest('in-place', o);
    const design = g.design as InPlaceConversion;
    return { ...g, design, file: design.gmemOf(g.slot)! };
  };

  it('guest_memfd refuses shared -> private with EAGAIN while VFIO\'s map pins the page; the design unmaps first and succeeds', () => {
    const { vm, design, slot, file, convert } = inPlace();
    convert(4, 2, false);
    expect([file.pins(4), file.pins(5)]).toEqual([1, 1]);
    const direct = drive(file.convert(vm, 4, 1, true)).value;
    expect(direct.ret).toBe(-EAGAIN);
    expect(direct.errorPage).toBe(4);
    expect(vm.attributes!.isPrivate(slot, 4)).toBe(false);
    expect(convert(4, 1, true)).toEqual({ ret: 0, error: '' });
    expect([file.pins(4), vm.iommu!.table.present(G + 4), vm.attributes!.isPrivate(slot, 4)]).toEqual([0, false, true]);
    expect([file.pins(5), vm.iommu!.table.present(G + 5)]).toEqual([1, true]);
    expect(design.acted).toBe(0);
  });

  it('a pin VFIO does not own (another GUP user) makes the conversion fail with EAGAIN after the unmap, nothing converted; a private page cannot be pinned', () => {
    const { vm, slot, file, convert } = inPlace();
    convert(10, 4, false);
    expect(file.pin(12)).toBe(0);
    const r = convert(10, 4, true);
    expect(r.ret).toBe(-EAGAIN);
    expect(r.error).toContain('page 12 has 1 extra reference(s)');
    expect([10, 11, 12, 13].map((p) => vm.attributes!.isPrivate(slot, p))).toEqual([false, false, false, false]);
    expect(file.pin(20)).toBe(-EFAULT);
  });

  it('with inplace-convert-while-pinned, the page turns private while the device keeps its mapping and its pin; the control does not', () => {
    const bug = inPlace({ convertWhilePinned: true });
    bug.convert(7, 1, false);
    expect(bug.convert(7, 1, true)).toEqual({ ret: 0, error: '' });
    expect(bug.vm.attributes!.isPrivate(bug.slot, 7)).toBe(true);
    expect(bug.vm.iommu!.table.present(G + 7)).toBe(true);
    expect(bug.file.pins(7)).toBe(1);
    expect(bug.design.acted).toBe(1);
    const clean = inPlace();
    clean.convert(7, 1, false);
    clean.convert(7, 1, true);
    expect([clean.vm.iommu!.table.present(G + 7), clean.file.pins(7), clean.design.acted]).toEqual([false, 0, 0]);
  });
});
