import { describe, expect, it } from 'vitest';
import { type Bitmap, NO_BITMAP, PageBitmap, SharedDirtyBitmap } from '../src/host/dirty-bitmap.ts';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { REGION_PAGES, createVmLayout } from '../src/host/layout.ts';
import { HOST_WRITER_BASE, MAX_STAMP_ITERATION, describeWriter } from '../src/host/memslot.ts';
import { LEGACY } from './helpers.ts';

describe('guest memory', () => {
  it('splits a 6 GiB slot into 2 GiB regions and addresses pages past 4 GiB', () => {
    const pages = (6 * 2 ** 30) / 4096;
    const layout = createVmLayout({ slots: [{ id: 0, asId: 0, baseGfn: 0, pages, flags: 0 }], vcpus: 1, tracking: LEGACY });
    expect(layout.slots[0]!.regions.map((r) => r.byteLength)).toEqual([2 ** 31, 2 ** 31, 2 ** 31]);
    const mem = new GuestMemory(layout);
    const slot = mem.slots[0]!;
    const high = pages - 1;
    slot.writeU64(high, 2 ** 40 + 7);
    slot.writeU64(REGION_PAGES, 11); // first page of the second region
    expect(slot.readU64(high)).toBe(2 ** 40 + 7);
    expect(slot.readU64(REGION_PAGES)).toBe(11);
    expect(slot.readU64(REGION_PAGES - 1)).toBe(0);
    expect(mem.findSlot(high)).toBe(slot);
  });

  it('finds slots by GFN across holes, and none in a hole', () => {
    const layout = createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 10, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x200, pages: 100, flags: 0 }, { id: 3, asId: 1, baseGfn: 0x20, pages: 16, flags: 0 }],
      vcpus: 1, tracking: LEGACY,
    });
    const mem = new GuestMemory(layout);
    expect(mem.findSlot(0x105)?.id).toBe(1);
    expect(mem.findSlot(0x263)?.id).toBe(2);
    expect(mem.findSlot(0x2f)?.id).toBe(3);
    expect(mem.findSlot(0x10a)).toBeUndefined();
    expect(mem.findSlot(0x1ff)).toBeUndefined();
    expect(mem.slotByField((1 << 16) | 3)?.id).toBe(3);
    // VM-wide page numbers start 64-aligned for each slot.
    expect(mem.slots.map((s) => s.firstPage)).toEqual([0, 64, 192]);
  });
});

/** One suite for every Bitmap implementation, as rust-vmm vm-memory tests its backends. */
function bitmapSuite(name: string, make: (pages: number) => Bitmap): void {
  describe(`Bitmap: ${name}`, () => {
    it('marks exactly the pages marked, across word boundaries', () => {
      const b = make(100);
      for (const p of [0, 31, 32, 63, 64, 99]) b.mark(p);
      for (let p = 0; p < 100; p++) expect(b.isDirty(p), `page ${p}`).toBe([0, 31, 32, 63, 64, 99].includes(p));
    });
    it('marking twice is the same as once', () => {
      const b = make(40);
      b.mark(33); b.mark(33);
      expect(b.isDirty(33)).toBe(true);
      expect(b.isDirty(32)).toBe(false);
    });
  });
}
bitmapSuite('SharedDirtyBitmap', (pages) => new SharedDirtyBitmap(new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)), pages));
bitmapSuite('PageBitmap', (pages) => new PageBitmap(pages));

describe('Bitmap: NO_BITMAP', () => {
  it('records nothing', () => {
    NO_BITMAP.mark(3);
    expect(NO_BITMAP.isDirty(3)).toBe(false);
  });
});

describe('SharedDirtyBitmap.setAll (INITIALLY_SET)', () => {
  it('sets every page and no bit past the end', () => {
    const words = new Int32Array(new SharedArrayBuffer(16));
    new SharedDirtyBitmap(words, 70).setAll();
    expect(Array.from(words, (w) => w >>> 0)).toEqual([0xffffffff, 0xffffffff, 0x3f, 0]);
  });
});

describe('the page stamp', () => {
  it('keeps writer, sequence and iteration apart in bytes 8-15, next to the workload\'s bytes 0-7', () => {
    const mem = new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 4, flags: 0 }], vcpus: 1, tracking: { kind: 'bitmap', manualProtect: false, initiallySet: false } }));
    const s = mem.slots[0]!;
    s.writeU64Stamped(1, 2 ** 40 + 5, HOST_WRITER_BASE + 7, 0xfffffffe, MAX_STAMP_ITERATION);
    expect(s.readU64(1)).toBe(2 ** 40 + 5);
    expect(s.stampOf(1)).toEqual({ writer: HOST_WRITER_BASE + 7, seq: 0xfffffffe, iteration: MAX_STAMP_ITERATION });
    expect(s.stampIteration(1)).toBe(MAX_STAMP_ITERATION);
    expect(describeWriter(s.stampOf(1).writer)).toBe('host writer 7');
    s.stamp(1, 3, 9, 2);
    expect([s.stampOf(1), s.readU64(1)]).toEqual([{ writer: 3, seq: 9, iteration: 2 }, 2 ** 40 + 5]);
    const b = s.bytes(1);
    expect(Array.from(b.subarray(s.byteOffset(1) + 16, s.byteOffset(1) + PAGE_SIZE)).every((x) => x === 0), 'nothing past byte 15').toBe(true);
  });
});
