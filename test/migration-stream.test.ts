import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { REGION_PAGES_SHIFT, createVmLayout } from '../src/host/layout.ts';
import { Destination } from '../src/migration/destination.ts';
import { DestState, DestWord } from '../src/migration/channel.ts';
import { LEGACY, frameOf } from './helpers.ts';
import {
  MAX_FRAME, PAGE_ZERO, type PageBatch, STREAM_VERSION_DEVICE, StreamDecoder, StreamError, type StreamRecord, checksumUpdate, encodeComplete, encodeDevice, encodeHeader,
  type PageSource, encodePages, encodeSync,
} from '../src/migration/stream.ts';

const SLOTS = [{ id: 1, asId: 0, baseGfn: 0x100, pages: 64 }];
const page = (fill: number): Uint8Array => new Uint8Array(4096).fill(fill);

function copyFrom(pages: Map<number, Uint8Array>): PageSource {
  return {
    isZero: (page) => pages.get(page)!.every((b) => b === 0),
    copy: (page, count, into, at) => { for (let i = 0; i < count; i++) into.set(pages.get(page + i)!, at + i * 4096); },
  };
}

function concatAll(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}


function stream(): Uint8Array[] {
  const pages = new Map([[3, page(7)], [4, page(0)], [63, page(9)]]);
  const b = encodePages(1, [3, 4, 63], copyFrom(pages));
  expect([b.normal, b.zero]).toEqual([2, 1]);
  const frames = [encodeHeader(SLOTS), b.frame, encodeSync(1)];
  const crc = frames.reduce((c, f) => checksumUpdate(c, f), 0);
  return [...frames, encodeComplete(2, 1, crc)];
}

describe('migration stream v2', () => {
  it('round-trips header, a page batch with a zero page sent without payload, sync and completion', () => {
    const d = new StreamDecoder();
    const recs = stream().flatMap((f) => d.push(f));
    d.end();
    expect(recs.map((r) => ('t' in r ? r.t : 'batch'))).toEqual(['header', 'batch', 'sync', 'complete']);
    const batch = recs[1] as PageBatch;
    expect(Array.from(batch.offsets)).toEqual([3, 4, 63]);
    expect(Array.from(batch.kinds)).toEqual([0, PAGE_ZERO, 0]);
    expect(batch.payload.length).toBe(2 * 4096);
    expect(batch.payload[0]).toBe(7);
    expect(batch.payload[4096]).toBe(9);
  });

  it('decodes the same stream fed one byte at a time', () => {
    const d = new StreamDecoder();
    const all = stream();
    let n = 0;
    for (const f of all) for (let i = 0; i < f.length; i++) n += d.push(f.subarray(i, i + 1)).length;
    expect(n).toBe(4);
    expect(d.done).toBe(true);
  });

  for (const size of [3, 997, 5000]) {
    it(`decodes the stream cut into ${size}-byte chunks across frame boundaries, payload intact`, () => {
      const whole = concatAll(stream());
      const d = new StreamDecoder();
      const recs = [];
      for (let at = 0; at < whole.length; at += size) recs.push(...d.push(whole.slice(at, at + size)));
      d.end();
      expect(recs.map((r) => ('t' in r ? r.t : 'batch'))).toEqual(['header', 'batch', 'sync', 'complete']);
      const batch = recs[1] as PageBatch;
      expect([batch.payload[0], batch.payload[4095], batch.payload[4096], batch.payload[8191]]).toEqual([7, 7, 9, 9]);
    });
  }

  const header = encodeHeader(SLOTS);
  const reject = (frames: Uint8Array[], message: RegExp): void => {
    const d = new StreamDecoder();
    expect(() => { for (const f of frames) d.push(f); d.end(); }).toThrow(StreamError);
    const d2 = new StreamDecoder();
    expect(() => { for (const f of frames) d2.push(f); d2.end(); }).toThrow(message);
  };

  it('rejects a stream that does not start with a header', () => reject([encodeSync(1)], /frame 0: the stream must start with a header, got 'sync'/));
  it('rejects a bad magic', () => reject([frameOf({ t: 'header', magic: 'qemu', version: 2, pageSize: 4096, slots: [] })], /not a vmemlab migration stream/));
  it('rejects an unsupported version', () => reject([frameOf({ t: 'header', magic: 'vmemlab-migration', version: 9, pageSize: 4096, slots: [] })], /stream version 9 is not supported \(this vmemlab reads versions 2, 3, 4\)/));
  it('rejects another page size', () => reject([frameOf({ t: 'header', magic: 'vmemlab-migration', version: 2, pageSize: 65536, slots: [] })], /page size 65536/));
  it('rejects a truncated frame', () => reject([header, stream()[1]!.subarray(0, 100)], /stream truncated: 100 bytes of an incomplete frame 1/));
  it('rejects a stream without completion', () => reject([header], /without a completion record/));
  it('rejects a page outside every slot', () => {
    const bad = encodePages(1, [64], copyFrom(new Map([[64, page(1)]])));
    reject([header, bad.frame], /frame 1: page 64 is outside slot 1 \(64 pages\)/);
  });
  it('rejects pages for a slot the header does not have', () => {
    const bad = encodePages(2, [0], copyFrom(new Map([[0, page(1)]])));
    reject([header, bad.frame], /pages for slot 0:2, which the header does not have/);
  });
  it('rejects an oversize frame without allocating it', () => {
    const huge = new Uint8Array(8);
    new DataView(huge.buffer).setUint32(0, MAX_FRAME + 1);
    reject([header, huge], /frame 1: length 67108865 exceeds the limit/);
  });
  it('pads the record so that every page payload starts 8-byte aligned in its frame', () => {
    for (const n of [1, 3, 17, 200]) {
      const b = encodePages(1, Array.from({ length: n }, (_, i) => i), copyFrom(new Map(Array.from({ length: n }, (_, i) => [i, page(i + 1)]))));
      const r = new DataView(b.frame.buffer, b.frame.byteOffset).getUint32(4);
      const at = b.frame.length - n * 4096;
      expect(at % 8, `${n} pages`).toBe(0);
      expect(at - (8 + r)).toBeLessThan(8);
      expect(b.frame[at]).toBe(1);
    }
  });
  it('rejects a frame whose padding after the record runs past its end', () => {
    // A sync record whose end is not 8-aligned, in a frame cut right after the record.
    const f = [1, 300, 70000].map((pass) => frameOf({ t: 'sync', pass })).find((x) => (8 + new DataView(x.buffer).getUint32(4)) % 8 !== 0)!;
    expect(f, 'a record length that needs padding').toBeDefined();
    const cut = f.slice(0, 8 + new DataView(f.buffer).getUint32(4));
    new DataView(cut.buffer).setUint32(0, cut.length - 4);
    reject([header, cut], /the padding after the record runs past the frame/);
  });
  it('rejects a payload that does not match the normal pages', () => {
    const rec = { t: 'pages', slot: 1, offsets: new Uint8Array(new Uint32Array([1, 2]).buffer), kinds: new Uint8Array([0, 0]) };
    reject([header, frameOf(rec, new Uint8Array(4096))], /4096 payload bytes for 2 normal pages/);
  });
  it('rejects an unknown record type, garbage, and data after completion', () => {
    reject([header, frameOf({ t: 'teleport' })], /unknown record type 'teleport'/);
    const garbage = new Uint8Array([0, 0, 0, 6, 0, 0, 0, 2, 0xc1, 0xc1]);
    reject([header, garbage], /frame 1: the record is not valid msgpack/);
    reject([...stream(), encodeSync(2)], /data after the completion record/);
  });
  it('rejects a completion record whose checksum does not match the frames', () => {
    const frames = stream();
    reject([...frames.slice(0, -1), encodeComplete(2, 1, 12345)], /frame 3: checksum mismatch: the source sent 12345/);
  });

  it('the checksum the decoder computes equals the one the encoder sent', () => {
    const d = new StreamDecoder();
    const frames = stream();
    for (const f of frames.slice(0, -1)) d.push(f);
    const rec = d.push(frames.at(-1)!)[0] as { checksum: number };
    const before = frames.slice(0, -1).reduce((c, f) => checksumUpdate(c, f), 0);
    expect(rec.checksum).toBe(before);
  });
});

describe('page batches across a 2 GiB region boundary', () => {
  it('the source copies and the destination writes a run of pages that spans two regions', () => {
    const pages = (1 << REGION_PAGES_SHIFT) + 4;
    const layout = (): GuestMemory => new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages, flags: 0 }], vcpus: 1, tracking: LEGACY }));
    const src = layout();
    const dst = layout();
    const s = src.slots[0]!;
    const run = [pages - 7, pages - 6, pages - 5, pages - 4, pages - 3, pages - 2];
    for (const p of run) s.writeU64(p, p + 1);
    s.writeU64(pages - 4, 0); // the first page of region 1 is zero: a flag, not payload
    const b = encodePages(1, run, { isZero: (p) => s.isZeroPage(p), copy: (p, n, into, at) => s.copyPages(p, n, into, at) });
    expect([b.normal, b.zero]).toEqual([5, 1]);
    const d = new Destination(dst);
    expect(d.receive(encodeHeader([{ id: 1, asId: 0, baseGfn: 0, pages }]))).toBe(true);
    expect(d.receive(b.frame), d.error ?? '').toBe(true);
    for (const p of run) expect(dst.slots[0]!.readU64(p), `page ${p}`).toBe(p === pages - 4 ? 0 : p + 1);
  });
});

/** Every check the decoder makes refuses its case with its own line, and lets the edge that is still valid through. */
describe('what the decoder refuses, case by case', () => {
  const hdr = (slots: unknown[]): Uint8Array => frameOf({ t: 'header', magic: 'vmemlab-migration', version: 2, pageSize: 4096, slots });
  const refused = (frames: Uint8Array[]): string => {
    const d = new StreamDecoder();
    try { for (const f of frames) d.push(f); } catch (e) { expect(e).toBeInstanceOf(StreamError); return (e as Error).message; }
    return 'accepted';
  };
  const slot = { id: 1, asId: 0, baseGfn: 0, pages: 16 };

  it('a header with no slots or more than KVM has', () => {
    expect(refused([hdr([])])).toBe('frame 0: header: 0 slots; a guest has 1 to 32764');
    const many = Array.from({ length: 32765 }, (_, i) => ({ id: i & 0xffff, asId: i >> 16, baseGfn: i, pages: 1 }));
    expect(refused([hdr(many)])).toBe('frame 0: header: 32765 slots; a guest has 1 to 32764');
    expect(refused([hdr(many.slice(0, 32764))])).toBe('accepted');
  });

  it('a slot whose fields are not whole numbers in range', () => {
    const line = (i: number, s: unknown): string => `frame 0: header: slot ${i}: ${JSON.stringify(s)} is not a memslot (id, asId: 16 bits; baseGfn; pages: 1 to 16777216)`;
    for (const bad of [null, 7, { ...slot, id: -1 }, { ...slot, id: 0x10000 }, { ...slot, asId: 0x10000 }, { ...slot, asId: 1.5 }, { ...slot, id: '1' },
      { ...slot, baseGfn: 2 ** 52 + 1 }, { ...slot, pages: 0 }, { ...slot, pages: 2 ** 24 + 1 }, { ...slot, pages: 2 ** 53 }]) {
      expect(refused([hdr([{ id: 9, asId: 0, baseGfn: 1 << 30, pages: 1 }, bad])]), JSON.stringify(bad)).toBe(line(1, bad));
    }
    // The largest values each field may take.
    expect(refused([hdr([{ id: 0xffff, asId: 0xffff, baseGfn: 2 ** 52, pages: 2 ** 24 }])])).toBe('accepted');
  });

  it('slots that duplicate or overlap another, named in the order they came', () => {
    expect(refused([hdr([slot, { ...slot, baseGfn: 100 }])])).toBe('frame 0: header: slot 1 (0:1) duplicates or overlaps slot 0:1');
    expect(refused([hdr([slot, { ...slot, id: 2, baseGfn: 15 }])])).toBe('frame 0: header: slot 1 (0:2) duplicates or overlaps slot 0:1');
    expect(refused([hdr([{ ...slot, id: 2, baseGfn: 15 }, slot])])).toBe('frame 0: header: slot 1 (0:1) duplicates or overlaps slot 0:2');
    expect(refused([hdr([{ ...slot, id: 3, baseGfn: 100 }, { ...slot, id: 2, baseGfn: 20, pages: 90 }, slot])])).toBe('frame 0: header: slot 1 (0:2) duplicates or overlaps slot 0:3');
    // Touching is not overlapping; the same id in another address space is another slot.
    expect(refused([hdr([slot, { ...slot, id: 2, baseGfn: 16 }, { ...slot, asId: 1, baseGfn: 32 }])])).toBe('accepted');
  });

  it('more guest memory in all than the limit', () => {
    const half = 2 ** 23;
    expect(refused([hdr([{ ...slot, pages: half }, { ...slot, id: 2, baseGfn: half, pages: half }])])).toBe('accepted');
    expect(refused([hdr([{ ...slot, pages: half }, { ...slot, id: 2, baseGfn: half, pages: half + 1 }])])).toBe('frame 0: header: 16777217 pages of guest memory; at most 16777216 (64 GiB)');
  });

  it('a header without a slot list, a second header, a record that is not a map', () => {
    expect(refused([frameOf({ t: 'header', magic: 'vmemlab-migration', version: 2, pageSize: 4096 })])).toBe('frame 0: header has no slot list');
    expect(refused([hdr([slot]), hdr([slot])])).toBe('frame 1: a second header');
    expect(refused([hdr([slot]), frameOf(7 as unknown as object)])).toBe('frame 1: the record is not a map');
    expect(refused([frameOf(null as unknown as object)])).toBe('frame 0: the record is not a map');
  });

  it('frames too short for their record, and records longer than their frame', () => {
    const tiny = new Uint8Array([0, 0, 0, 3, 0, 0, 0]);
    expect(refused([hdr([slot]), tiny])).toBe('frame 1: length 3 is too short');
    const four = new Uint8Array([0, 0, 0, 4, 0, 0, 0, 0]);
    expect(refused([hdr([slot]), four])).toMatch(/^frame 1: the record is not valid msgpack/);
    const long = new Uint8Array([0, 0, 0, 8, 0, 0, 0, 5, 0x90, 0, 0, 0]);
    expect(refused([hdr([slot]), long])).toBe('frame 1: record length 5 runs past the frame');
    const exact = frameOf({ t: 'sync', pass: 1 });
    expect(refused([hdr([slot]), exact])).toBe('accepted');
    const big = new Uint8Array(8);
    new DataView(big.buffer).setUint32(0, MAX_FRAME);
    expect(refused([hdr([slot]), big]), 'a frame of exactly the limit is waited for').toBe('accepted');
  });

  it('page batches whose offsets and kinds do not match, or with an unknown kind', () => {
    const batch = (offsets: unknown, kinds: unknown): Uint8Array => frameOf({ t: 'pages', slot: 1, offsets, kinds });
    const line = 'frame 1: malformed page batch (offsets and kinds do not match)';
    const u8 = (...w: number[]): Uint8Array => new Uint8Array(new Uint32Array(w).buffer);
    expect(refused([hdr([slot]), batch([1, 2], new Uint8Array([1, 1]))])).toBe(line);
    expect(refused([hdr([slot]), batch(new Uint8Array(6), new Uint8Array([1, 1]))])).toBe(line);
    expect(refused([hdr([slot]), batch(u8(1, 2), [1, 1])])).toBe(line);
    expect(refused([hdr([slot]), batch(u8(1, 2), new Uint8Array([1]))])).toBe(line);
    expect(refused([hdr([slot]), batch(u8(1, 2), new Uint8Array([1, 2]))])).toBe('frame 1: unknown page kind 2');
    expect(refused([hdr([slot]), batch(u8(1, 2), new Uint8Array([1, 1]))])).toBe('accepted');
  });

  it('a stream cut inside the length word of a frame is truncated, not complete', () => {
    const frames = stream();
    const all = concatAll(frames);
    const d = new StreamDecoder();
    d.push(all.subarray(0, all.length - frames.at(-1)!.length + 2));
    expect(() => d.end()).toThrow(/^stream truncated: 2 bytes of an incomplete frame 3$/);
  });

  it('chunks that end inside a length word, then inside the frame, then past it: each record once, in order', () => {
    const frames = stream();
    const all = concatAll(frames);
    const starts = frames.reduce<number[]>((a, f) => [...a, a.at(-1)! + f.length], [0]);
    for (const cut of [1, 2, 3, 5, 9]) {
      const d = new StreamDecoder();
      const out: unknown[] = [];
      // Each frame in three chunks: its first `cut` bytes (part of the length word or beyond), then the rest in two.
      let at = 0;
      for (let i = 0; i < frames.length; i++) {
        const end = starts[i + 1]!;
        for (const to of [at + Math.min(cut, end - at), Math.floor((at + cut + end) / 2), end]) {
          if (to > at) { out.push(...d.push(all.slice(at, to))); at = to; }
        }
      }
      d.end();
      expect(out.map((r) => ('t' in (r as object) ? (r as { t: string }).t : 'pages')), `cut ${cut}`).toEqual(['header', 'pages', 'sync', 'complete']);
    }
  });

  it('the encoder copies each run of consecutive normal pages once, and skips zero pages and gaps', () => {
    const pages = new Map([[2, page(2)], [3, page(3)], [4, page(0)], [5, page(5)], [6, page(6)], [9, page(9)], [10, page(10)]]);
    const copies: [number, number][] = [];
    const src = copyFrom(pages);
    const b = encodePages(1, [2, 3, 4, 5, 6, 9, 10, 12], {
      isZero: (p) => (p === 12 ? false : src.isZero(p)),
      copy: (p, n, into, at) => { copies.push([p, n]); for (let i = 0; i < n; i++) into.set(p + i === 12 ? page(12) : pages.get(p + i)!, at + i * 4096); },
    });
    expect(copies).toEqual([[2, 2], [5, 2], [9, 2], [12, 1]]);
    const d = new StreamDecoder();
    d.push(encodeHeader(SLOTS));
    const got = d.push(b.frame)[0] as PageBatch;
    expect([...got.offsets]).toEqual([2, 3, 4, 5, 6, 9, 10, 12]);
    expect([...got.kinds]).toEqual([0, 0, PAGE_ZERO, 0, 0, 0, 0, 0]);
    expect([0, 1, 2, 3, 4, 5, 6].map((k) => got.payload[k * 4096 + 4095])).toEqual([2, 3, 5, 6, 9, 10, 12]);
  });

  it('a decoding error is a StreamError by name', () => {
    expect(new StreamError('x').name).toBe('StreamError');
  });
});

/** The destination's side of the stream: what it writes where, what it counts, what it refuses. */
describe('the destination applies the stream', () => {
  const SLOT = { id: 1, asId: 0, baseGfn: 0x100, pages: 16 };
  const memory = (slot = SLOT): GuestMemory => new GuestMemory(createVmLayout({ slots: [{ ...slot, flags: 0 }], vcpus: 1, tracking: LEGACY }));
  const contents = (fill: number): Uint8Array => { const p = page(fill); p[100] = fill + 1; return p; };

  it('refuses a header whose slots do not match its memory, and everything after that', () => {
    for (const other of [{ ...SLOT, id: 2 }, { ...SLOT, asId: 1 }, { ...SLOT, baseGfn: 0x101 }, { ...SLOT, pages: 15 }]) {
      const d = new Destination(memory());
      expect(d.receive(encodeHeader([other])), JSON.stringify(other)).toBe(false);
      expect(d.error).toBe(`the source's slot ${other.asId}:${other.id} (gfn 0x${other.baseGfn.toString(16)}, ${other.pages} pages) does not match this destination's memory`);
      expect(d.state).toBe(DestState.FAILED);
      expect(d.receive(encodeSync(1)), 'nothing after a failure').toBe(false);
    }
    expect(new Destination(memory()).receive(encodeHeader([SLOT]))).toBe(true);
  });

  it('writes each page of a batch where it belongs: runs, gaps and zero pages; counts frames, pages and syncs; credits what it received', () => {
    const mem = memory();
    const s = mem.slots[0]!;
    for (let p = 0; p < 16; p++) s.bytes(p).fill(0xee, s.byteOffset(p), s.byteOffset(p) + 4096); // old contents everywhere
    const sent = new Map([[2, contents(2)], [3, contents(3)], [4, page(0)], [5, contents(5)], [6, contents(6)], [7, contents(7)], [9, contents(9)], [11, page(0)]]);
    const b = encodePages(1, [...sent.keys()], copyFrom(sent));
    const frames = [encodeHeader([SLOT]), b.frame, encodeSync(1)];
    const crc = frames.reduce((c, f) => checksumUpdate(c, f), 0);
    frames.push(encodeComplete(6, 2, crc));
    const d = new Destination(mem);
    let bytes = 0;
    for (const f of frames) {
      expect(d.receive(f), d.error ?? '').toBe(true);
      bytes += f.length;
      expect(Atomics.load(d.words, DestWord.APPLIED_KIB)).toBe(Math.floor(bytes / 1024));
    }
    expect(d.stats).toEqual({ frames: 4, normal: 6, zero: 2, syncs: 1 });
    expect(d.state).toBe(DestState.COMPLETE);
    for (let p = 0; p < 16; p++) {
      const got = s.bytes(p).subarray(s.byteOffset(p), s.byteOffset(p) + 4096);
      const want = sent.get(p) ?? new Uint8Array(4096).fill(0xee);
      expect(Buffer.compare(got, want), `page ${p}`).toBe(0);
    }
  });

  it('refuses a completion whose page counts differ from what it received', () => {
    const d = new Destination(memory());
    const frames = [encodeHeader([SLOT]), encodePages(1, [1], copyFrom(new Map([[1, contents(1)]]))).frame];
    const crc = frames.reduce((c, f) => checksumUpdate(c, f), 0);
    for (const f of frames) d.receive(f);
    expect(d.receive(encodeComplete(1, 1, crc))).toBe(false);
    expect(d.error).toBe('completion record counts 1 normal and 1 zero pages, received 1 and 0');
  });

  it('builds its memory from the header when it was told nothing; fresh memory is neither read nor written for a zero page it never wrote', () => {
    let built: GuestMemory | null = null;
    const d = new Destination(null, undefined, (slots) => { built = memory(slots[0]! as typeof SLOT); return built; }, true);
    expect(d.receive(encodeHeader([SLOT]))).toBe(true);
    const s = built!.slots[0]!;
    let reads = 0;
    const isZero = s.isZeroPage.bind(s);
    s.isZeroPage = (p) => { reads++; return isZero(p); };
    expect(d.receive(encodePages(1, [3], copyFrom(new Map([[3, contents(3)]]))).frame)).toBe(true);
    expect(d.receive(encodePages(1, [3, 4], copyFrom(new Map([[3, page(0)], [4, page(0)]]))).frame)).toBe(true);
    expect(reads, 'only the page it wrote is looked at').toBe(1);
    expect(s.isZeroPage(3), 'the page it wrote is zero again').toBe(true);
  });

  it('memory that is not fresh gets every zero page checked and zeroed', () => {
    const mem = memory();
    const s = mem.slots[0]!;
    s.writeU64(4, 77);
    const d = new Destination(mem);
    d.receive(encodeHeader([SLOT]));
    expect(d.receive(encodePages(1, [4], copyFrom(new Map([[4, page(0)]]))).frame)).toBe(true);
    expect(s.isZeroPage(4)).toBe(true);
  });
});

describe('migration stream v4: a device\'s saved state', () => {
  const header4 = (): Uint8Array => encodeHeader(SLOTS, STREAM_VERSION_DEVICE);
  const bytes = (n: number, fill: number): Uint8Array<ArrayBuffer> => new Uint8Array(n * 4096).fill(fill);

  it('round-trips a device record: its parts and their pages, in order', () => {
    const d = new StreamDecoder();
    const out = d.push(concatAll([header4(), encodeDevice('vfio-mdev', [{ name: 'status', pages: 1 }, { name: 'vram', pages: 2 }], bytes(3, 5))]));
    const rec = out[1] as Extract<StreamRecord, { t: 'device' }>;
    expect(rec).toMatchObject({ t: 'device', name: 'vfio-mdev', parts: [{ name: 'status', pages: 1 }, { name: 'vram', pages: 2 }] });
    expect(rec.payload.length).toBe(3 * 4096);
    expect(rec.payload.every((b) => b === 5)).toBe(true);
  });

  it('refuses a device record in a version-3 stream, a payload that is not its pages, and a malformed part', () => {
    const bad = (frames: Uint8Array[], why: RegExp): void => {
      expect(() => new StreamDecoder().push(concatAll(frames))).toThrow(why);
    };
    bad([encodeHeader(SLOTS), encodeDevice('vfio-mdev', [{ name: 'vram', pages: 1 }], bytes(1, 1))], /^frame 1: a device record in a version 3 stream \(they came with version 4\)$/);
    bad([header4(), frameOf({ t: 'device', name: 'vfio-mdev', parts: [{ name: 'vram', pages: 2 }] }, bytes(1, 1))], /^frame 1: device vfio-mdev: 4096 payload bytes for 2 pages$/);
    bad([header4(), frameOf({ t: 'device', name: 'vfio-mdev', parts: [{ name: 'vram', pages: -1 }] })], /^frame 1: device vfio-mdev: part 0 must be \{name, pages\} with 0 to 4096 pages$/);
    bad([header4(), frameOf({ t: 'device', name: '', parts: [] })], /^frame 1: a device record's name must be 1 to 64 characters$/);
  });

  it('a destination without the device, or whose device cannot load the state, fails the migration with why', () => {
    const layout = createVmLayout({ slots: [{ ...SLOTS[0]!, flags: 0 }], vcpus: 1, tracking: LEGACY });
    const frames = [header4(), encodeDevice('vfio-mdev', [{ name: 'vram', pages: 1 }], bytes(1, 1))];
    const none = new Destination(new GuestMemory(layout));
    for (const f of frames) none.receive(f);
    expect(none.error).toBe('the source sent the state of device vfio-mdev, which this destination does not have');
    const full = new Destination(new GuestMemory(layout));
    full.devices.set('vfio-mdev', () => { throw new Error('no room for 1 pages of vram for vm0'); });
    for (const f of frames) full.receive(f);
    expect(full.error).toBe('device vfio-mdev could not load its state: no room for 1 pages of vram for vm0');
    expect(full.state).toBe(DestState.FAILED);
  });
});
