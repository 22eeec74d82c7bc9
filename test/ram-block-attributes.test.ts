import { describe, expect, it } from 'vitest';
import { EEXIST, EINVAL, ENOSPC, PAGE_SIZE } from '../src/host/constants.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import { IOPTE_HEAD } from '../src/host/iommu/io-page-table.ts';
import type { Iommu } from '../src/host/iommu/iommu.ts';
import type { IommuBackendKind } from '../src/host/iommu/iommu-layout.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import {
  RDM_OK, RamBlockAttributes, type RamDiscardListener, type RamDiscardResult, type RamSection, wholeSection,
} from '../src/host/vmm/ram-block-attributes.ts';
import {
  KVM_USER_MEM_SLOTS, type VfioContainer, vfioContainer, vfioRamDiscardRegisterListener, vfioRamDiscardUnregisterListener,
} from '../src/host/vmm/vfio-ram-discard-listener.ts';
import type { Steps } from '../src/roles/role.ts';
import { LEGACY, complete } from './helpers.ts';

const P = PAGE_SIZE;
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
/** The confidential guest's one slot: 1024 pages (4 MiB) from GPA 2 MiB, so its first 512 blocks are one 2 MiB-aligned range. */
const BASE = 0x200;
const PAGES = 1024;
const SLOTS = [{ id: 1, asId: 0, baseGfn: BASE, pages: PAGES, flags: 0 }];

/** A guest with the slot, an IOMMU (IOVA space up to 8 MiB), the slot's RamBlockAttributes and a VFIO container. */
function cvm(o: { backend?: IommuBackendKind; limit?: number; maxMemslots?: number; premapped?: number } = {}) {
  const iommu = { backend: o.backend ?? 'type1', dmaEntryLimit: o.limit ?? VFIO_DEFAULT_DMA_ENTRY_LIMIT, iovaPages: 0x800, devices: 1, tracking: ['iommu' as const] };
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: LEGACY, iommu }));
  vm.populate();
  const rdm = new RamBlockAttributes(vm.memory.slots[0]!);
  for (let i = 0; i < (o.premapped ?? 0); i++) expect(directMap(vm.iommu!, 900 + i).ret).toBe(0);
  const errors: string[] = [];
  const container = vfioContainer(vm.iommu!, { maxMemslots: o.maxMemslots ?? 1, report: (d) => errors.push(d) });
  return { vm, iommu: vm.iommu!, rdm, container, errors };
}

/** A mapping made directly with mapDma (not through the listener): `pages` pages of the slot from `block`, IOVA = GPA. */
const directMap = (iommu: Iommu, block: number, pages = 1) => iommu.mapDma((BASE + block) * P, pages * P, (BASE + block) * P, RW);

/** The section of blocks [first, first + n) of the slot, at its GPA. */
const blocks = (first: number, n: number): RamSection => ({ offsetWithinRegion: first * P, size: n * P, offsetWithinAddressSpace: (BASE + first) * P });

/** Converts blocks [first, first + n): `private` true to private, false to shared. */
const convert = (rdm: RamBlockAttributes, first: number, n: number, toPrivate: boolean): RamDiscardResult => complete(rdm.stateChange(first * P, n * P, toPrivate));

/** Which blocks are shared, as a string of 0 and 1 over [0, n). */
const bits = (rdm: RamBlockAttributes, n: number): string => Array.from({ length: n }, (_, b) => (rdm.isPopulated(b * P, P) ? '1' : '0')).join('');

/** The IOVA pages [first, first + n) of the slot's blocks that the IOMMU maps, as a string of 0 and 1. */
const mapped = (iommu: Iommu, first: number, n: number): string => Array.from({ length: n }, (_, b) => (iommu.table.present(BASE + first + b) ? '1' : '0')).join('');

/** A listener that writes down what it hears, in blocks, and can object to a populate that touches `failOn`. */
class Recorder implements RamDiscardListener {
  readonly heard: string[] = [];
  failOn = -1;
  constructor(readonly doubleDiscardSupported = false) {}
  private range(s: RamSection): string {
    expect(s.offsetWithinAddressSpace - s.offsetWithinRegion, 'the section keeps its GPA offset').toBe(BASE * P);
    return `${s.offsetWithinRegion / P}+${s.size / P}`;
  }
  *notifyPopulate(s: RamSection): Steps<RamDiscardResult> {
    this.heard.push(`populate ${this.range(s)}`);
    const first = s.offsetWithinRegion / P;
    if (this.failOn >= first && this.failOn < first + s.size / P) return { ret: -ENOSPC, detail: 'recorder: ENOSPC' };
    return RDM_OK;
  }
  *notifyDiscard(s: RamSection): Steps {
    this.heard.push(`discard ${this.range(s)}`);
  }
}

const register = (rdm: RamBlockAttributes, l: RamDiscardListener, s: RamSection = wholeSection(rdm.block)): RamDiscardResult => complete(rdm.registerListener(l, s));
const vfioRegister = (c: VfioContainer, rdm: RamBlockAttributes, s: RamSection = wholeSection(rdm.block)) => complete(vfioRamDiscardRegisterListener(c, rdm, s));

describe('RamBlockAttributes (QEMU system/ram-block-attributes.c)', () => {
  it('all private at start: no block populated, and the whole block is one discarded run', () => {
    const { rdm } = cvm();
    expect(rdm.blocks).toBe(PAGES);
    expect(rdm.minGranularity()).toBe(P);
    expect(rdm.populatedBlocks()).toBe(0);
    expect(rdm.isPopulated(0, P)).toBe(false);
    const runs: string[] = [];
    expect(complete(rdm.replayDiscarded(wholeSection(rdm.block), function* (s) { runs.push(`${s.offsetWithinRegion / P}+${s.size / P}`); return RDM_OK; })).ret).toBe(0);
    expect(runs).toEqual([`0+${PAGES}`]);
    const populated: string[] = [];
    complete(rdm.replayPopulated(wholeSection(rdm.block), function* (s) { populated.push(`${s.offsetWithinRegion}`); return RDM_OK; }));
    expect(populated).toEqual([]);
  });

  it('to shared populates exactly the blocks that were private: one notification for an all-private range, one per block of a mixture, in order', () => {
    const { rdm } = cvm();
    const l = new Recorder();
    register(rdm, l);
    expect(convert(rdm, 4, 4, false)).toEqual(RDM_OK);
    expect(l.heard).toEqual(['populate 4+4']);
    expect(bits(rdm, 12)).toBe('000011110000');
    l.heard.length = 0;
    expect(convert(rdm, 2, 8, false).ret).toBe(0);
    expect(l.heard, 'blocks 4-7 were shared already: skipped, the others one by one').toEqual(['populate 2+1', 'populate 3+1', 'populate 8+1', 'populate 9+1']);
    expect(bits(rdm, 12)).toBe('001111111100');
    expect(rdm.isPopulated(2 * P, 8 * P)).toBe(true);
    expect(rdm.isPopulated(P, 8 * P)).toBe(false);
    expect(rdm.isPopulated(2 * P, 9 * P)).toBe(false);
    expect(rdm.populatedBlocks()).toBe(8);
  });

  it('to private discards what was shared: one notification for an all-shared range, one per shared block of a mixture', () => {
    const { rdm } = cvm();
    const l = new Recorder();
    register(rdm, l);
    convert(rdm, 0, 16, false);
    l.heard.length = 0;
    expect(convert(rdm, 4, 4, true).ret).toBe(0);
    expect(l.heard).toEqual(['discard 4+4']);
    expect(bits(rdm, 16)).toBe('1111000011111111');
    l.heard.length = 0;
    expect(convert(rdm, 2, 8, true).ret).toBe(0);
    expect(l.heard).toEqual(['discard 2+1', 'discard 3+1', 'discard 8+1', 'discard 9+1']);
    expect(bits(rdm, 16)).toBe('1100000000111111');
  });

  it('a conversion to the state a block already has is a no-op for that block', () => {
    const { rdm } = cvm();
    const l = new Recorder();
    register(rdm, l);
    expect(convert(rdm, 0, 8, true).ret, 'private -> private').toBe(0);
    convert(rdm, 0, 8, false);
    l.heard.length = 0;
    expect(convert(rdm, 0, 8, false).ret, 'shared -> shared').toBe(0);
    expect(convert(rdm, 2, 3, false).ret).toBe(0);
    expect(l.heard).toEqual([]);
    expect(bits(rdm, 10)).toBe('1111111100');
  });

  it.each([
    ['offset not block-aligned', 1, P, /not aligned/],
    ['size not block-aligned', 0, P + 512, /not aligned/],
    ['size 0', P, 0, /empty/],
    ['running past the end of the block', (PAGES - 1) * P, 2 * P, /past the end/],
    ['starting at the end of the block', PAGES * P, P, /past the end/],
    ['wrapping: size 2^64 - 4 KiB', P, 2 ** 64 - P, /wraps/],
    ['wrapping: a negative size', 2 * P, -P, /wraps/],
  ])('%s: -EINVAL, no bit changed, no listener notified', (_what, offset, size, why) => {
    const { rdm } = cvm();
    const l = new Recorder();
    register(rdm, l);
    convert(rdm, 0, 2, false);
    l.heard.length = 0;
    for (const toPrivate of [false, true]) {
      const r = complete(rdm.stateChange(offset, size, toPrivate));
      expect(r.ret, r.detail).toBe(-EINVAL);
      expect(r.detail).toMatch(/^ram_block_attributes_state_change: EINVAL: invalid range/);
      expect(r.detail).toMatch(why);
    }
    expect(l.heard).toEqual([]);
    expect(rdm.populatedBlocks()).toBe(2);
    expect(bits(rdm, 3)).toBe('110');
  });

  it('listeners are notified newest first, each only for the part of the range inside its section', () => {
    const { rdm } = cvm();
    const order: string[] = [];
    const tag = (name: string, l: Recorder): Recorder => {
      const populate = l.notifyPopulate.bind(l);
      l.notifyPopulate = function* (s) { order.push(name); return yield* populate(s); };
      return l;
    };
    const a = tag('a', new Recorder());
    const b = tag('b', new Recorder());
    register(rdm, a, blocks(0, 8));
    register(rdm, b, blocks(6, 8));
    expect(rdm.listeners).toEqual([b, a]);
    convert(rdm, 4, 4, false);
    expect(order).toEqual(['b', 'a']);
    expect(a.heard).toEqual(['populate 4+4']);
    expect(b.heard).toEqual(['populate 6+2']);
    convert(rdm, 10, 2, false);
    expect(a.heard, 'outside its section: not told').toEqual(['populate 4+4']);
    expect(b.heard).toEqual(['populate 6+2', 'populate 10+2']);
  });

  it('a populate error stops the conversion and is returned; QEMU rolls back neither the bits nor the listeners already told', () => {
    const { rdm } = cvm();
    const first = new Recorder();
    const second = new Recorder();
    register(rdm, first);
    register(rdm, second); // notified first
    second.failOn = 5;
    const r = convert(rdm, 4, 4, false);
    expect(r.ret, r.detail).toBe(-ENOSPC);
    expect(second.heard).toEqual(['populate 4+4']);
    expect(first.heard, 'the listener after the failing one hears nothing').toEqual([]);
    expect(bits(rdm, 10), 'the whole range stays shared in the bitmap').toBe('0000111100');

    // A mixture goes block by block: it stops at the failing block, whose bit is set already.
    second.failOn = 11;
    second.heard.length = 0;
    const m = convert(rdm, 6, 8, false); // 6 and 7 are shared: a mixture
    expect(m.ret).toBe(-ENOSPC);
    expect(second.heard).toEqual(['populate 8+1', 'populate 9+1', 'populate 10+1', 'populate 11+1']);
    expect(first.heard).toEqual(['populate 8+1', 'populate 9+1', 'populate 10+1']);
    expect(bits(rdm, 16)).toBe('0000111111110000');
  });

  it('a listener registering late (a hot-plugged device) gets the populated runs replayed, lowest first, clipped to its section', () => {
    const { rdm } = cvm();
    convert(rdm, 2, 3, false);
    convert(rdm, 10, 1, false);
    convert(rdm, 20, 4, false);
    convert(rdm, 30, 6, false);
    const late = new Recorder();
    expect(register(rdm, late, blocks(3, 30)).ret).toBe(0);
    expect(late.heard).toEqual(['populate 3+2', 'populate 10+1', 'populate 20+4', 'populate 30+3']);
  });

  it('a failed replay at registration is returned (QEMU exits), the runs after it not replayed', () => {
    const { rdm } = cvm();
    convert(rdm, 2, 2, false);
    convert(rdm, 6, 2, false);
    convert(rdm, 10, 2, false);
    const late = new Recorder();
    late.failOn = 6;
    const r = register(rdm, late);
    expect(r.ret).toBe(-ENOSPC);
    expect(r.detail).toMatch(/Failed to register RAM discard listener: recorder: ENOSPC/);
    expect(late.heard).toEqual(['populate 2+2', 'populate 6+2']);
  });

  it('unregistering: a listener that accepts double discards gets one discard of its whole section; another one per populated run', () => {
    const { rdm } = cvm();
    const single = new Recorder(false);
    const double = new Recorder(true);
    register(rdm, single, blocks(0, 16));
    register(rdm, double, blocks(0, 16));
    convert(rdm, 1, 2, false);
    convert(rdm, 8, 3, false);
    single.heard.length = 0;
    double.heard.length = 0;
    complete(rdm.unregisterListener(single));
    complete(rdm.unregisterListener(double));
    expect(single.heard).toEqual(['discard 1+2', 'discard 8+3']);
    expect(double.heard).toEqual(['discard 0+16']);
    expect(rdm.listeners).toEqual([]);
    convert(rdm, 12, 1, false);
    expect([single.heard.length, double.heard.length], 'no longer told').toEqual([2, 1]);
    expect(() => complete(rdm.unregisterListener(single))).toThrow(/not registered/);
  });

  it('replayPopulated and replayDiscarded stop at the first error and return it', () => {
    const { rdm } = cvm();
    convert(rdm, 0, 2, false);
    convert(rdm, 4, 2, false);
    convert(rdm, 8, 2, false);
    const seen: number[] = [];
    const r = complete(rdm.replayPopulated(blocks(0, 16), function* (s) {
      seen.push(s.offsetWithinRegion / P);
      return seen.length === 2 ? { ret: -EEXIST, detail: 'second run refused' } : RDM_OK;
    }));
    expect(r).toEqual({ ret: -EEXIST, detail: 'second run refused' });
    expect(seen).toEqual([0, 4]);
    const holes: string[] = [];
    expect(complete(rdm.replayDiscarded(blocks(0, 12), function* (s) { holes.push(`${s.offsetWithinRegion / P}+${s.size / P}`); return RDM_OK; })).ret).toBe(0);
    expect(holes).toEqual(['2+2', '6+2', '10+2']);
  });
});

describe('VFIO RAM discard listener (QEMU hw/vfio/listener.c)', () => {
  it('populate maps one 4 KiB mapping per granule, IOVA = GPA; discard unmaps the range in one call', () => {
    const { iommu, rdm, container, errors } = cvm();
    expect(vfioRegister(container, rdm).ok).toBe(true);
    expect(iommu.stats().entries, 'all private: nothing mapped').toBe(0);
    expect(convert(rdm, 0, 512, false).ret).toBe(0);
    expect(iommu.stats()).toMatchObject({ maps: 512, entries: 512, pagesMapped: 512, mapErrors: 0 });
    for (let b = 0; b < 512; b++) {
      expect(iommu.table.gfn(BASE + b), `IOVA page ${BASE + b}`).toBe(BASE + b);
      expect(iommu.table.flags(BASE + b) & IOPTE_HEAD, `IOVA page ${BASE + b} heads its own mapping`).toBe(IOPTE_HEAD);
    }
    expect(mapped(iommu, 512, 1), 'nothing past the range').toBe('0');
    const unmapsBefore = iommu.stats().unmaps;
    expect(convert(rdm, 0, 512, true).ret).toBe(0);
    expect(iommu.stats().unmaps - unmapsBefore, 'one unmap for the whole range').toBe(1);
    expect(iommu.stats()).toMatchObject({ entries: 0, pagesMapped: 0 });
    expect(errors).toEqual([]);
  });

  it('one 4 KiB page inside a range mapped per granule unmaps alone; 4 KiB out of a single 2 MiB mapping made with mapDma fails with EINVAL (why QEMU maps per granule)', () => {
    const { iommu, rdm, container, errors } = cvm();
    vfioRegister(container, rdm, blocks(0, 512));
    convert(rdm, 0, 512, false);
    expect(convert(rdm, 7, 1, true).ret).toBe(0);
    expect(errors).toEqual([]);
    expect(mapped(iommu, 5, 4)).toBe('1101');
    expect(iommu.stats().entries).toBe(511);

    // The other way: the slot's second 2 MiB as one mapping.
    const huge = directMap(iommu, 512, 512);
    expect(huge.ret, huge.detail).toBe(0);
    const cut = complete(iommu.unmapDma((BASE + 512 + 7) * P, P));
    expect(cut.ret, cut.detail).toBe(-EINVAL);
    expect(cut.detail).toMatch(/split/);
    expect(iommu.table.present(BASE + 512 + 7), 'the page the guest made private stays mapped').toBe(true);
  });

  it('a VFIO listener registering late (a hot-plugged device) maps exactly the shared blocks, and unregistering unmaps its section in one call', () => {
    const { iommu, rdm, container } = cvm();
    convert(rdm, 1, 2, false);
    convert(rdm, 5, 1, false);
    expect(iommu.stats().entries, 'no listener yet: nothing mapped').toBe(0);
    const reg = vfioRegister(container, rdm, blocks(0, 8));
    expect(reg.ok).toBe(true);
    expect(mapped(iommu, 0, 8)).toBe('01100100');
    expect(iommu.stats().entries).toBe(3);
    expect(container.vrdlList.length).toBe(1);
    const unmapsBefore = iommu.stats().unmaps;
    complete(vfioRamDiscardUnregisterListener(container, rdm, blocks(0, 8)));
    expect(iommu.stats().unmaps - unmapsBefore).toBe(1);
    expect(iommu.stats().entries).toBe(0);
    expect(container.vrdlList).toEqual([]);
    expect(rdm.listeners).toEqual([]);
    expect(bits(rdm, 8), 'the memory stays shared').toBe('01100100');
    expect(() => complete(vfioRamDiscardUnregisterListener(container, rdm, blocks(0, 8)))).toThrow(/missing RAM discard listener/);
  });

  it('type1 runs out mid-range: ENOSPC, the mappings of that populate rolled back, the bitmap keeps every bit set', () => {
    // The check passed (8 + 1 - 1 <= 16), then other sections took 12 entries: 4 left for 8 blocks.
    const { iommu, rdm, container, errors } = cvm({ limit: 16, maxMemslots: 1 });
    expect(vfioRegister(container, rdm, blocks(0, 8)).ok).toBe(true);
    for (let i = 0; i < 12; i++) expect(directMap(iommu, 100 + i).ret).toBe(0);
    const r = convert(rdm, 0, 8, false);
    expect(r.ret, r.detail).toBe(-ENOSPC);
    expect(r.detail).toMatch(/^vfio_ram_discard_notify_populate: VFIO_IOMMU_MAP_DMA: ENOSPC/);
    expect(iommu.stats()).toMatchObject({ entries: 12, maps: 12 + 4, mapErrors: 1 });
    expect(mapped(iommu, 0, 8), 'rolled back').toBe('00000000');
    expect(mapped(iommu, 100, 12), 'the other sections keep theirs').toBe('1'.repeat(12));
    expect(bits(rdm, 8), 'QEMU keeps the bits: shared in the bitmap, mapped nowhere').toBe('11111111');
    expect(errors).toEqual([]);
  });

  it('type1 runs out in a mixture: each block is its own populate, only the failing one is rolled back, the bits up to it stay set', () => {
    const { iommu, rdm, container } = cvm({ limit: 16, maxMemslots: 1 });
    expect(vfioRegister(container, rdm, blocks(0, 8)).ok).toBe(true);
    convert(rdm, 1, 1, false);
    convert(rdm, 5, 1, false);
    for (let i = 0; i < 12; i++) directMap(iommu, 100 + i);
    expect(iommu.stats().entries).toBe(14);
    const r = convert(rdm, 0, 8, false);
    expect(r.ret).toBe(-ENOSPC);
    expect(mapped(iommu, 0, 8), 'blocks 0 and 2 mapped, 3 failed').toBe('11100100');
    expect(bits(rdm, 8), 'block 3 shared in the bitmap though unmapped; 4, 6 and 7 never reached').toBe('11110100');
    expect(iommu.stats().entries).toBe(16);
  });

  it('iommufd has no entry limit: the registration is not checked and every granule is mapped', () => {
    const { iommu, rdm, container } = cvm({ backend: 'iommufd', limit: 16, maxMemslots: KVM_USER_MEM_SLOTS });
    expect(container.dmaMaxMappings).toBe(0);
    expect(vfioRegister(container, rdm).ok).toBe(true);
    expect(convert(rdm, 0, PAGES, false).ret).toBe(0);
    expect(iommu.stats()).toMatchObject({ entries: PAGES, pagesMapped: PAGES, mapErrors: 0 });
    expect(mapped(iommu, 0, PAGES)).toBe('1'.repeat(PAGES));
  });

  it('iommufd: a map over an existing mapping fails with EEXIST and the rollback unmaps the section; a discard of nothing (ENOENT) counts as success', () => {
    const { iommu, rdm, container, errors } = cvm({ backend: 'iommufd' });
    vfioRegister(container, rdm, blocks(0, 8));
    expect(directMap(iommu, 3).ret).toBe(0);
    const r = convert(rdm, 0, 8, false);
    expect(r.ret, r.detail).toBe(-EEXIST);
    expect(mapped(iommu, 0, 8), "the rollback's one unmap takes the whole section, the other mapping inside it too").toBe('00000000');
    expect(iommu.stats().entries).toBe(0);
    expect(convert(rdm, 0, 8, true).ret).toBe(0);
    expect(iommu.stats().unmapErrors, 'IOMMU_IOAS_UNMAP said ENOENT').toBeGreaterThan(0);
    expect(errors, 'iommufd_backend_unmap_dma takes ENOENT as success').toEqual([]);
  });

  it('registration is refused when the section could exceed the container: mappings + max memslots - sections > DMA_AVAIL', () => {
    // 8 granules + 9 memslots - 1 section = 16: fits a limit of 16.
    const fits = cvm({ limit: 16, maxMemslots: 9 });
    expect(vfioRegister(fits.container, fits.rdm, blocks(0, 8)).ok).toBe(true);
    // One memslot more: 17.
    const over = cvm({ limit: 16, maxMemslots: 10 });
    convert(over.rdm, 0, 4, false);
    const r = vfioRegister(over.container, over.rdm, blocks(0, 8));
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.reason).toBe('dma-mappings');
    expect(r.error).toMatch(/^vfio_ram_discard_register_listener: possibly running out of DMA mappings/);
    expect(r.error).toMatch(/Maximum possible DMA mappings: 16, Maximum possible memslots: 10/);
    expect(r.error).toMatch(/8 mappings of 4096 bytes/);
    expect(over.container.vrdlList, 'nothing left registered').toEqual([]);
    expect(over.rdm.listeners).toEqual([]);
    expect(over.iommu.stats().entries, 'the shared blocks the replay mapped were unmapped again').toBe(0);
    expect(bits(over.rdm, 8)).toBe('11110000');
  });

  it('the check counts every RAM discard section of the container, and DMA_AVAIL is what type1 had free at setup', () => {
    const { rdm, container } = cvm({ limit: 16, maxMemslots: 4 });
    expect(vfioRegister(container, rdm, blocks(0, 8)).ok, '8 + 4 - 1 = 11').toBe(true);
    const second = vfioRegister(container, rdm, blocks(8, 8));
    expect(second.ok, '16 + 4 - 2 = 18 > 16').toBe(false);
    expect(container.vrdlList.length, 'the first stays').toBe(1);

    const used = cvm({ limit: 16, maxMemslots: 1, premapped: 6 });
    expect(used.container.dmaMaxMappings).toBe(10);
    expect(vfioRegister(used.container, used.rdm, blocks(0, 11)).ok, '11 > 10').toBe(false);
    expect(vfioRegister(used.container, used.rdm, blocks(0, 10)).ok).toBe(true);
  });

  it("with KVM's 32764 memslots and type1's default 65535 entries, 32772 granules (128 MiB) is the most a section may have", () => {
    const { iommu } = cvm();
    const container = vfioContainer(iommu);
    expect(container).toMatchObject({ maxMemslots: KVM_USER_MEM_SLOTS, dmaMaxMappings: VFIO_DEFAULT_DMA_ENTRY_LIMIT });
    // Only the bitmap is needed: the memory is all private, nothing is mapped at registration.
    const big = new RamBlockAttributes({ baseGfn: 0x100000, pages: 32772 });
    expect(vfioRegister(container, big).ok).toBe(true);
    const bigger = new RamBlockAttributes({ baseGfn: 0x200000, pages: 32773 });
    expect(vfioRegister(vfioContainer(iommu), bigger).ok).toBe(false);
  });

  it('a failed replay at registration (a late device, not enough entries left) leaves nothing registered or mapped', () => {
    const { iommu, rdm, container } = cvm({ limit: 16, maxMemslots: 1 });
    convert(rdm, 0, 8, false);
    for (let i = 0; i < 12; i++) directMap(iommu, 100 + i);
    const r = vfioRegister(container, rdm, blocks(0, 8));
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.reason).toBe('replay');
    expect(r.ret, 'the failed map\'s errno').toBe(-ENOSPC);
    expect(r.error).toMatch(/Failed to register RAM discard listener: vfio_ram_discard_notify_populate: VFIO_IOMMU_MAP_DMA: ENOSPC/);
    expect(mapped(iommu, 0, 8)).toBe('00000000');
    expect(iommu.stats().entries).toBe(12);
    expect(container.vrdlList).toEqual([]);
    expect(rdm.listeners).toEqual([]);
  });
});
