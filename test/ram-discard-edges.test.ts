import { describe, expect, it } from 'vitest';
import { EEXIST, EINVAL, ENOSPC, PAGE_SIZE } from '../src/host/constants.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import type { IommuBackendKind } from '../src/host/iommu/iommu-layout.ts';
import { IoPte } from '../src/host/iommu/iommu-layout.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import {
  RDM_OK, RamBlockAttributes, type RamDiscardListener, type RamDiscardResult, type RamSection, wholeSection,
} from '../src/host/vmm/ram-block-attributes.ts';
import { vfioContainer, vfioRamDiscardRegisterListener, vfioRamDiscardUnregisterListener } from '../src/host/vmm/vfio-ram-discard-listener.ts';
import type { Steps } from '../src/roles/role.ts';
import { LEGACY, complete } from './helpers.ts';

const P = PAGE_SIZE;
/** One guest_memfd slot of 1024 blocks at GPA 2 MiB. */
const BASE = 0x200;
const PAGES = 1024;

/** A RamBlockAttributes alone: the manager needs only the block's frames. */
const attrs = (): RamBlockAttributes => new RamBlockAttributes({ baseGfn: BASE, pages: PAGES });

/** The section of blocks [first, first + n), at their GPA. */
const blocks = (first: number, n: number): RamSection => ({ offsetWithinRegion: first * P, size: n * P, offsetWithinAddressSpace: (BASE + first) * P });

const convert = (rdm: RamBlockAttributes, first: number, n: number, toPrivate: boolean): RamDiscardResult => complete(rdm.stateChange(first * P, n * P, toPrivate));

/** Every run a replay hands out, as "first+blocks". */
function runs(replay: (s: RamSection, fn: (s: RamSection) => Steps<RamDiscardResult>) => Steps<RamDiscardResult>, section: RamSection): string[] {
  const seen: string[] = [];
  const r = complete(replay(section, function* (s) { seen.push(`${s.offsetWithinRegion / P}+${s.size / P}`); return RDM_OK; }));
  expect(r).toEqual(RDM_OK);
  return seen;
}

/** A listener that writes down what it hears, in blocks. */
class Recorder implements RamDiscardListener {
  readonly heard: string[] = [];
  constructor(readonly doubleDiscardSupported = false) {}
  *notifyPopulate(s: RamSection): Steps<RamDiscardResult> {
    this.heard.push(`populate ${s.offsetWithinRegion / P}+${s.size / P}`);
    return RDM_OK;
  }
  *notifyDiscard(s: RamSection): Steps {
    this.heard.push(`discard ${s.offsetWithinRegion / P}+${s.size / P}`);
  }
}

/** What `fn` threw (it must throw). */
function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (e) {
    return e as Error;
  }
  throw new Error('did not throw');
}

/** A guest with the slot and an IOMMU, the slot's RamBlockAttributes, and a VFIO container that collects what QEMU would error_report. */
function vfioVm(backend: IommuBackendKind = 'type1', o: { limit?: number; maxMemslots?: number } = {}) {
  const iommu = { backend, dmaEntryLimit: o.limit ?? 65535, iovaPages: 0x800, devices: 1, tracking: ['iommu' as const] };
  const vm = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: BASE, pages: PAGES, flags: 0 }], vcpus: 1, tracking: LEGACY, iommu }));
  vm.populate();
  const rdm = new RamBlockAttributes(vm.memory.slots[0]!);
  const errors: string[] = [];
  const container = vfioContainer(vm.iommu!, { maxMemslots: o.maxMemslots ?? 1, report: (d) => errors.push(d) });
  return { iommu: vm.iommu!, rdm, container, errors };
}

describe('RamBlockAttributes edges (QEMU system/ram-block-attributes.c)', () => {
  it('a listener whose section ends where a conversion begins, or begins where it ends, is not notified; one outside a discard is not either', () => {
    const rdm = attrs();
    const low = new Recorder();
    const high = new Recorder();
    complete(rdm.registerListener(low, blocks(0, 8)));
    complete(rdm.registerListener(high, blocks(12, 4)));
    // memory_region_section_intersect_range: an empty intersection (end <= start) is no intersection.
    expect(convert(rdm, 8, 4, false)).toEqual(RDM_OK);
    expect(convert(rdm, 8, 4, true)).toEqual(RDM_OK);
    expect(low.heard).toEqual([]);
    expect(high.heard).toEqual([]);
    expect(convert(rdm, 0, 4, false)).toEqual(RDM_OK);
    expect(convert(rdm, 0, 4, true)).toEqual(RDM_OK);
    expect(low.heard).toEqual(['populate 0+4', 'discard 0+4']);
    expect(high.heard, 'ram_block_attributes_notify_discard skips the listeners the range misses').toEqual([]);
  });

  it('a replay ends at the first run that starts at or past the end of its section', () => {
    const rdm = attrs();
    convert(rdm, 1, 1, false);
    convert(rdm, 4, 2, false);
    convert(rdm, 10, 1, false);
    expect(runs((s, fn) => rdm.replayPopulated(s, fn), blocks(0, 4))).toEqual(['1+1']);
    expect(runs((s, fn) => rdm.replayDiscarded(s, fn), blocks(0, 4))).toEqual(['0+1', '2+2']);
    expect(runs((s, fn) => rdm.replayDiscarded(s, fn), blocks(6, 4))).toEqual(['6+4']);
    const late = new Recorder();
    expect(complete(rdm.registerListener(late, blocks(0, 4)))).toEqual(RDM_OK);
    expect(late.heard).toEqual(['populate 1+1']);
  });

  it('runs are found across the bitmap\'s 32-block words: a first populated block past the first word, and the runs between', () => {
    const rdm = attrs();
    convert(rdm, 40, 1, false);
    convert(rdm, 70, 2, false);
    expect(runs((s, fn) => rdm.replayPopulated(s, fn), wholeSection(rdm.block))).toEqual(['40+1', '70+2']);
    expect(runs((s, fn) => rdm.replayDiscarded(s, fn), wholeSection(rdm.block))).toEqual(['0+40', '41+29', `72+${PAGES - 72}`]);
    expect(runs((s, fn) => rdm.replayPopulated(s, fn), blocks(33, 60))).toEqual(['40+1', '70+2']);
    expect(rdm.isPopulated(40 * P, P)).toBe(true);
    expect(rdm.isPopulated(70 * P, 2 * P)).toBe(true);
    expect(rdm.isPopulated(39 * P, 2 * P)).toBe(false);
  });

  it('a replay callback that fails without a reason gets QEMU\'s "Failed to notify RAM discard listener" with the errno\'s name', () => {
    const rdm = attrs();
    convert(rdm, 3, 1, false);
    const r = complete(rdm.replayPopulated(wholeSection(rdm.block), function* () { return { ret: -EEXIST, detail: '' }; }));
    expect(r).toEqual({ ret: -EEXIST, detail: 'Failed to notify RAM discard listener: EEXIST' });
  });

  it('a registration whose replay succeeds returns 0 with no error text', () => {
    const rdm = attrs();
    expect(complete(rdm.registerListener(new Recorder(), blocks(0, 4)))).toEqual(RDM_OK);
    convert(rdm, 0, 2, false);
    const late = new Recorder();
    expect(complete(rdm.registerListener(late, blocks(0, 4)))).toEqual(RDM_OK);
    expect(late.heard).toEqual(['populate 0+2']);
  });

  it('registering a listener that is registered already throws and leaves the list as it was', () => {
    const rdm = attrs();
    const a = new Recorder();
    const b = new Recorder();
    complete(rdm.registerListener(a, blocks(0, 4)));
    complete(rdm.registerListener(b, blocks(4, 4)));
    const e = thrown(() => complete(rdm.registerListener(a, blocks(8, 4))));
    expect(e.message).toBe('RamBlockAttributes.registerListener: the listener is registered already');
    expect(rdm.listeners).toEqual([b, a]);
  });

  it('unregistering a listener that is not the newest discards its own section and removes it alone', () => {
    const rdm = attrs();
    const oldest = new Recorder(true);
    const middle = new Recorder(true);
    const newest = new Recorder(true);
    complete(rdm.registerListener(oldest, blocks(0, 8)));
    complete(rdm.registerListener(middle, blocks(8, 8)));
    complete(rdm.registerListener(newest, blocks(16, 8)));
    complete(rdm.unregisterListener(oldest));
    expect(oldest.heard, 'its own rdl->section, in one discard').toEqual(['discard 0+8']);
    expect(rdm.listeners).toEqual([newest, middle]);
    complete(rdm.unregisterListener(newest));
    expect(newest.heard).toEqual(['discard 16+8']);
    expect(rdm.listeners).toEqual([middle]);
    expect(thrown(() => complete(rdm.unregisterListener(oldest))).message).toBe('RamBlockAttributes.unregisterListener: the listener is not registered');
    expect(middle.heard).toEqual([]);
  });

  it('an empty section at the end of the block is inside it: replaying it reports nothing', () => {
    const rdm = attrs();
    convert(rdm, PAGES - 1, 1, false);
    const end: RamSection = { offsetWithinRegion: PAGES * P, size: 0, offsetWithinAddressSpace: (BASE + PAGES) * P };
    expect(runs((s, fn) => rdm.replayPopulated(s, fn), end)).toEqual([]);
    expect(runs((s, fn) => rdm.replayDiscarded(s, fn), end)).toEqual([]);
  });

  // QEMU asserts section->mr == attr->ram_block->mr; here a range outside the block is a RangeError naming the method.
  it.each([
    ['that runs past the end', (PAGES - 1) * P, 2 * P, 'offset 0x3ff000 size 0x2000'],
    ['with a negative offset', -P, 2 * P, 'offset -4096 size 0x2000'],
    ['with a negative size', 2 * P, -P, 'offset 0x2000 size -4096'],
    ['with a NaN offset', NaN, P, 'offset NaN size 0x1000'],
    ['with a NaN size', 0, NaN, 'offset 0x0 size NaN'],
    ['with an infinite size', 0, Infinity, 'offset 0x0 size Infinity'],
  ])('a range %s is refused by every method with a RangeError giving the range', (_what, offset, size, text) => {
    const rdm = attrs();
    const section: RamSection = { offsetWithinRegion: offset, size, offsetWithinAddressSpace: BASE * P };
    const tail = `${text} is not inside the 0x400000-byte RAM block`;
    const cases: [string, () => unknown][] = [
      ['isPopulated', () => rdm.isPopulated(offset, size)],
      ['registerListener', () => complete(rdm.registerListener(new Recorder(), section))],
      ['replayPopulated', () => complete(rdm.replayPopulated(section, function* () { return RDM_OK; }))],
      ['replayDiscarded', () => complete(rdm.replayDiscarded(section, function* () { return RDM_OK; }))],
    ];
    for (const [what, fn] of cases) {
      const e = thrown(fn);
      expect(e, what).toBeInstanceOf(RangeError);
      expect(e.message).toBe(`RamBlockAttributes.${what}: ${tail}`);
    }
    expect(rdm.listeners).toEqual([]);
  });

  // ram_block_attributes_is_valid_range takes uint64_t: a negative offset or size is a huge one, and wraps or passes the end.
  it.each([
    [-P, 2 * P, 'offset -4096, size 0x2000 (wraps around)'],
    [0, Infinity, 'offset 0x0, size Infinity (wraps around)'],
    [P, 2 ** 64 - P, 'offset 0x1000, size 0xfffffffffffff000 (wraps around)'],
    [0, 2 * PAGES * P, 'offset 0x0, size 0x800000 (past the end of the 0x400000-byte RAM block)'],
  ])('state change of offset %d size %d: -EINVAL giving the range, nothing changed', (offset, size, text) => {
    const rdm = attrs();
    const l = new Recorder();
    complete(rdm.registerListener(l, wholeSection(rdm.block)));
    for (const toPrivate of [false, true]) {
      expect(complete(rdm.stateChange(offset, size, toPrivate))).toEqual({ ret: -EINVAL, detail: `ram_block_attributes_state_change: EINVAL: invalid range: ${text}` });
    }
    expect(rdm.populatedBlocks()).toBe(0);
    expect(l.heard).toEqual([]);
  });
});

describe('VFIO RAM discard listener edges (QEMU hw/vfio/listener.c)', () => {
  it('a read-only section (a ROM) is mapped READ only, a RAM section READ and WRITE (vfio_container_dma_map(..., section->readonly))', () => {
    const { iommu, rdm, container } = vfioVm();
    expect(complete(vfioRamDiscardRegisterListener(container, rdm, { ...blocks(0, 4), readonly: true })).ok).toBe(true);
    expect(complete(vfioRamDiscardRegisterListener(container, rdm, blocks(4, 4))).ok).toBe(true);
    expect(convert(rdm, 0, 8, false)).toEqual(RDM_OK);
    const perms = Array.from({ length: 8 }, (_, b) => iommu.table.flags(BASE + b) & (IoPte.READ | IoPte.WRITE));
    const R = IoPte.READ;
    const RW = IoPte.READ | IoPte.WRITE;
    expect(perms).toEqual([R, R, R, R, RW, RW, RW, RW]);
  });

  it('type1: a discard whose one unmap would split a mapping fails with EINVAL, which is only reported; the mappings stay', () => {
    const { iommu, rdm, container, errors } = vfioVm('type1');
    expect(complete(vfioRamDiscardRegisterListener(container, rdm, blocks(0, 8))).ok).toBe(true);
    // A mapping of blocks 7-8 made outside the listener: populating block 7 fails with EEXIST,
    // and the rollback's unmap of blocks 0-7 would cut it.
    expect(iommu.mapDma((BASE + 7) * P, 2 * P, (BASE + 7) * P, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE).ret).toBe(0);
    const r = convert(rdm, 0, 8, false);
    expect(r.ret, r.detail).toBe(-EEXIST);
    expect(errors).toEqual([
      'vfio_ram_discard_notify_discard: vfio_container_dma_unmap() failed: VFIO_IOMMU_UNMAP_DMA: EINVAL: iova 0x200000 size 0x8000 would split a mapping',
    ]);
    expect(iommu.stats().entries, 'blocks 0-6 one each, and the 2-block mapping').toBe(8);
  });

  it('iommufd: only ENOENT counts as success; an unmap refused with EINVAL is reported', () => {
    const { rdm, container, errors } = vfioVm('iommufd');
    const reg = complete(vfioRamDiscardRegisterListener(container, rdm, blocks(0, 8)));
    if (!reg.ok) throw new Error(reg.error);
    complete(reg.listener.notifyDiscard({ offsetWithinRegion: 0, size: 0, offsetWithinAddressSpace: BASE * P }));
    expect(errors).toEqual([
      'vfio_ram_discard_notify_discard: vfio_container_dma_unmap() failed: IOMMU_IOAS_UNMAP: EINVAL: iova 0x200000 size 0x0: not 4096-byte aligned, or empty',
    ]);
  });

  it.each([
    ['offset_within_region', { offsetWithinRegion: 0x800, size: P, offsetWithinAddressSpace: BASE * P }, '0x800'],
    ['offset_within_address_space', { offsetWithinRegion: 0, size: P, offsetWithinAddressSpace: BASE * P + 0x800 }, '0x200800'],
    ['size', { offsetWithinRegion: 0, size: 0x1800, offsetWithinAddressSpace: BASE * P }, '0x1800'],
    ['offset_within_address_space', { offsetWithinRegion: 0, size: P, offsetWithinAddressSpace: -P }, '-4096'],
  ])('a section whose %s is not page-aligned (or negative) is refused before anything registers', (what, section, v) => {
    const { rdm, container } = vfioVm();
    const e = thrown(() => complete(vfioRamDiscardRegisterListener(container, rdm, section)));
    expect(e.message).toBe(`vfio_ram_discard_register_listener: section ${what} ${v} is not 4096-byte aligned`);
    expect(container.vrdlList).toEqual([]);
    expect(rdm.listeners).toEqual([]);
  });

  it('a registration refused for DMA mappings says how the sum was made', () => {
    const { rdm, container } = vfioVm('type1', { limit: 16, maxMemslots: 10 });
    const r = complete(vfioRamDiscardRegisterListener(container, rdm, blocks(0, 8)));
    expect(r).toEqual({
      ok: false,
      reason: 'dma-mappings',
      ret: -ENOSPC,
      error: 'vfio_ram_discard_register_listener: possibly running out of DMA mappings: 8 mappings of 4096 bytes for 1 RAM discard section(s)'
        + ' + 9 other memslots > 16. Maximum possible DMA mappings: 16, Maximum possible memslots: 10 (raise type1\'s dma_entry_limit, or use iommufd)',
    });
  });

  it('unregistering finds the listener by its memory region and GPA: an older one of the same region, never another region\'s at that GPA', () => {
    const { iommu, rdm, container } = vfioVm();
    const older = complete(vfioRamDiscardRegisterListener(container, rdm, blocks(0, 4)));
    const newer = complete(vfioRamDiscardRegisterListener(container, rdm, blocks(4, 4)));
    if (!older.ok || !newer.ok) throw new Error('registration refused');
    convert(rdm, 0, 8, false);
    expect(iommu.stats().entries).toBe(8);

    // Another RamBlockAttributes (another memory region) with nothing registered at GPA of blocks(0, 4).
    const other = new RamBlockAttributes(rdm.block);
    expect(thrown(() => complete(vfioRamDiscardUnregisterListener(container, other, blocks(0, 4)))).message).toBe('vfio: Trying to unregister missing RAM discard listener');
    expect(container.vrdlList).toEqual([newer.listener, older.listener]);

    complete(vfioRamDiscardUnregisterListener(container, rdm, blocks(0, 4)));
    expect(container.vrdlList).toEqual([newer.listener]);
    expect(rdm.listeners).toEqual([newer.listener]);
    const present = Array.from({ length: 8 }, (_, b) => (iommu.table.present(BASE + b) ? '1' : '0')).join('');
    expect(present, 'the older section unmapped, the newer one kept').toBe('00001111');
  });
});
