import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { HOST_WRITER_BASE } from '../src/host/memslot.ts';
import { DEST_WORDS, DestState, PortChannel, QueueChannel } from '../src/migration/channel.ts';
import { Destination } from '../src/migration/destination.ts';
import { DestinationRole, QueueSource } from '../src/migration/destination-role.ts';
import { MAX_FRAME, type PageSource, StreamDecoder, StreamError, checksumUpdate, encodeComplete, encodeHeader, encodePages, encodeSync } from '../src/migration/stream.ts';
import { RingChannel, RingSource, createStreamRing } from '../src/migration/stream-ring.ts';
import { checkSweepPattern, describeSweepCheck, hasHostWrites } from '../src/oracles/sweep-pattern.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { VcpuRequest, VcpuRunState, VcpuWord } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { runResumedGuest } from '../src/migration/incoming.ts';
import { type VerifyExceptions, verifyDirtyLog } from '../src/oracles/dirty-log-verify.ts';
import { WaitCode, waitFor } from '../src/roles/role.ts';
import { LEGACY, frameOf } from './helpers.ts';

const SLOT = { id: 1, asId: 0, baseGfn: 0x100, pages: 16 };
const page = (fill: number): Uint8Array => new Uint8Array(4096).fill(fill);
const memory = (pages = 16): GuestMemory => new GuestMemory(createVmLayout({ slots: [{ ...SLOT, pages, flags: 0 }], vcpus: 1, tracking: LEGACY }));

function copyFrom(pages: Map<number, Uint8Array>): PageSource {
  return {
    isZero: (p) => pages.get(p)!.every((b) => b === 0),
    copy: (p, count, into, at) => { for (let i = 0; i < count; i++) into.set(pages.get(p + i)!, at + i * 4096); },
  };
}


const refused = (frames: Uint8Array[], end = false): string => {
  const d = new StreamDecoder();
  try { for (const f of frames) d.push(f); if (end) d.end(); } catch (e) { expect(e).toBeInstanceOf(StreamError); return (e as Error).message; }
  return 'accepted';
};
const hdr = (slots: unknown[]): Uint8Array => frameOf({ t: 'header', magic: 'vmemlab-migration', version: 2, pageSize: 4096, slots });

describe('stream edges: the encoder and the decoder', () => {
  it('the encoder refuses a batch whose frame would exceed MAX_FRAME, before building it', () => {
    const n = MAX_FRAME / 4096 + 1;
    let allocated = false;
    const src: PageSource = { isZero: () => false, copy: () => undefined };
    expect(() => encodePages(1, Array.from({ length: n }, (_, i) => i), src, (k) => { allocated = true; return new Uint8Array(k); }))
      .toThrow(/^frame of \d+ bytes exceeds 67108864$/);
    expect(allocated).toBe(false);
  });

  it('a frame split inside its body comes out on the chunk that completes it, built from both chunks', () => {
    const h = encodeHeader([SLOT]);
    const d = new StreamDecoder();
    expect(d.push(h.slice(0, 6))).toEqual([]);
    expect(d.push(h.slice(6, 10))).toEqual([]);
    const out = d.push(h.slice(10));
    expect(out).toHaveLength(1);
    expect(out[0]).toMatchObject({ t: 'header', slots: [SLOT] });
    expect(d.slots).toEqual([SLOT]);
  });

  it('slots is null before the header', () => {
    expect(new StreamDecoder().slots).toBeNull();
  });

  it('a sync record decodes to exactly its type and pass', () => {
    const d = new StreamDecoder();
    d.push(encodeHeader([SLOT]));
    expect(d.push(encodeSync(7))).toEqual([{ t: 'sync', pass: 7 }]);
  });

  it('a length word alone (exactly 4 bytes) is already judged: too short, or over the limit', () => {
    expect(refused([hdr([SLOT]), new Uint8Array([0, 0, 0, 3])])).toBe('frame 1: length 3 is too short');
    const big = new Uint8Array(4);
    new DataView(big.buffer).setUint32(0, MAX_FRAME + 1);
    expect(refused([hdr([SLOT]), big])).toBe('frame 1: length 67108865 exceeds the limit of 67108864 bytes');
  });

  it('end() counts the bytes of every chunk of the incomplete frame, not only the first', () => {
    const f = encodeSync(1);
    const d = new StreamDecoder();
    d.push(encodeHeader([SLOT]));
    d.push(f.slice(0, 6));
    d.push(f.slice(6, 7));
    expect(() => d.end()).toThrow(/^stream truncated: 7 bytes of an incomplete frame 1$/);
  });

  it('names the magic it found', () => {
    expect(refused([frameOf({ t: 'header', magic: 'qemu', version: 2, pageSize: 4096, slots: [] })])).toBe('frame 0: not a vmemlab migration stream (magic "qemu")');
  });

  it('offsets that are a list, not bytes, are malformed even when their count fits the kinds', () => {
    expect(refused([hdr([SLOT]), frameOf({ t: 'pages', slot: 1, offsets: [1, 0, 0, 0], kinds: new Uint8Array([1]) })]))
      .toBe('frame 1: malformed page batch (offsets and kinds do not match)');
  });

  it('a slot that is not a memslot is quoted up to 80 characters', () => {
    const bad = { ...SLOT, id: 'x'.repeat(200) };
    expect(refused([hdr([bad])])).toBe(`frame 0: header: slot 0: ${JSON.stringify(bad).slice(0, 80)} is not a memslot (id, asId: 16 bits; baseGfn; pages: 1 to 16777216)`);
  });

  it('slots listed out of gfn order that do not overlap are accepted; an overlap hidden behind a neighbour is found', () => {
    expect(refused([hdr([{ ...SLOT, baseGfn: 100, pages: 1 }, { ...SLOT, id: 2, baseGfn: 0, pages: 16 }])])).toBe('accepted');
    expect(refused([hdr([{ ...SLOT, baseGfn: 200, pages: 1 }, { ...SLOT, id: 2, baseGfn: 0, pages: 16 }, { ...SLOT, id: 3, baseGfn: 100, pages: 8 }])])).toBe('accepted');
    expect(refused([hdr([{ ...SLOT, baseGfn: 0, pages: 16 }, { ...SLOT, id: 2, baseGfn: 100, pages: 1 }, { ...SLOT, id: 3, baseGfn: 10, pages: 2 }])]))
      .toBe('frame 0: header: slot 2 (0:3) duplicates or overlaps slot 0:1');
  });
});

describe('stream edges: the destination', () => {
  it('end() of a stream without completion fails with the decoder\'s message; after completion or a failure it changes nothing', () => {
    const d = new Destination(memory());
    d.receive(encodeHeader([SLOT]));
    d.end();
    expect(d.error).toBe('stream ended after 1 frames without a completion record');
    expect(d.state).toBe(DestState.FAILED);

    const done = new Destination(memory());
    const frames = [encodeHeader([SLOT])];
    frames.push(encodeComplete(0, 0, frames.reduce((c, f) => checksumUpdate(c, f), 0)));
    for (const f of frames) expect(done.receive(f)).toBe(true);
    done.end();
    expect([done.error, done.state]).toEqual([null, DestState.COMPLETE]);

    const tail = new Destination(memory());
    for (const f of frames) tail.receive(f);
    expect(tail.receive(new Uint8Array([0, 0, 0])), 'a partial length word after completion').toBe(true);
    tail.end();
    expect([tail.error, tail.state], 'a completed migration is not failed by what the connection held after it').toEqual([null, DestState.COMPLETE]);

    const failed = new Destination(memory());
    failed.receive(encodeHeader([{ ...SLOT, id: 9 }]));
    const first = failed.error;
    failed.end();
    expect(failed.error).toBe(first);
  });

  it('an error that is not a StreamError is reported with a destination: prefix', () => {
    const d = new Destination(null, undefined, () => { throw new Error('no memory for you'); });
    expect(d.receive(encodeHeader([SLOT]))).toBe(false);
    expect(d.error).toBe('destination: no memory for you');
  });

  it('fresh memory: a run after a zero page marks only its own pages written', () => {
    let built: GuestMemory | null = null;
    const d = new Destination(null, undefined, () => { built = memory(); return built; }, true);
    d.receive(encodeHeader([SLOT]));
    const s = built!.slots[0]!;
    expect(d.receive(encodePages(1, [1, 5, 6], copyFrom(new Map([[1, page(0)], [5, page(5)], [6, page(6)]]))).frame)).toBe(true);
    let reads = 0;
    const isZero = s.isZeroPage.bind(s);
    s.isZeroPage = (p) => { reads++; return isZero(p); };
    expect(d.receive(encodePages(1, [7, 8, 9], copyFrom(new Map([[7, page(0)], [8, page(0)], [9, page(0)]]))).frame)).toBe(true);
    expect(reads, 'pages 7-9 were never written: not looked at').toBe(0);
    expect(d.receive(encodePages(1, [6], copyFrom(new Map([[6, page(0)]]))).frame)).toBe(true);
    expect(reads).toBe(1);
    expect(s.isZeroPage(6)).toBe(true);
  });

  it('the destination role is named, counts each frame it applies, and stops once the destination is no longer receiving', () => {
    const d = new Destination(memory());
    const queue = [encodeHeader([SLOT]), encodeSync(1)];
    const role = new DestinationRole(d, new QueueSource(queue));
    expect(role.name).toBe('destination');
    role.step();
    expect(role.progress).toBe(1);
    d.fail('stop');
    role.step();
    expect(queue).toHaveLength(1);
    expect(role.progress).toBe(1);
  });
});

describe('stream edges: channels and the ring', () => {
  it('a queue channel starts with an empty queue', () => {
    expect(new QueueChannel(new Int32Array(DEST_WORDS)).queue).toEqual([]);
  });

  it('a port channel copies a frame that is a view into a larger buffer, leaving that buffer usable', () => {
    const { port1, port2 } = new MessageChannel();
    try {
      const big = new Uint8Array(64).fill(3);
      new PortChannel(new Int32Array(DEST_WORDS), port1).send(big.subarray(8, 16));
      expect(big.byteLength).toBe(64);
      const whole = new Uint8Array(16);
      new PortChannel(new Int32Array(DEST_WORDS), port1).send(whole);
      expect(whole.byteLength, 'a whole buffer is transferred').toBe(0);
    } finally { port1.close(); port2.close(); }
  });

  it('a frame not built by alloc() is copied in even when an alloc() is outstanding', () => {
    const ring = createStreamRing();
    const tx = new RingChannel(ring, new Int32Array(DEST_WORDS));
    const rx = new RingSource(ring);
    tx.alloc(100);
    const f = encodeSync(3);
    tx.send(f);
    const got = rx.next()!;
    expect(Buffer.compare(got, f)).toBe(0);
  });
});

describe('stream edges: the sweep-pattern oracle', () => {
  it('describes each broken slice, skips the good ones, and counts the pages beyond max', () => {
    // vcpu0: 4 4 3 3 (good, hit the edge); vcpu1: 9 7 9 7 (broken)
    const layout = createVmLayout({ slots: [{ ...SLOT, pages: 8, flags: 0 }], vcpus: 2, tracking: LEGACY });
    const mem = new GuestMemory(layout);
    const s = mem.slots[0]!;
    [4, 4, 3, 3, 9, 7, 9, 7].forEach((v, p) => { s.bytes(p)[s.byteOffset(p)] = v; });
    const c = checkSweepPattern(mem, 2, 1);
    expect(c.ok).toBe(false);
    expect(c.offending).toHaveLength(1);
    expect(c.outOfLine).toBeGreaterThan(1);
    const lines = describeSweepCheck(c, 'x');
    expect(lines[0]).toBe(`sweep pattern x: BROKEN: ${c.outOfLine} page(s) out of line`);
    expect(lines.filter((l) => l.includes("'s slice"))).toEqual([
      `  vcpu1's slice gfn 0x104-0x107: first_byte = 0x9 last_byte = 0x7 hit_edge = ${c.slices[1]!.edgeGfn === null ? 0 : 1}, ${c.slices[1]!.bad} inconsistent step(s) (check_guests_ram)`,
    ]);
    expect(lines.at(-1)).toBe(`  ... and ${c.outOfLine - 1} more`);
  });

  it('hit_edge is 1 for a broken slice that has an edge', () => {
    const mem = memory(7);
    const s = mem.slots[0]!;
    [5, 5, 4, 5, 5, 4, 4].forEach((v, p) => { s.bytes(p)[s.byteOffset(p)] = v; });
    const c = checkSweepPattern(mem, 1);
    expect(c.slices[0]!.edgeGfn).not.toBeNull();
    expect(describeSweepCheck(c, 'x')[1]).toBe(`  vcpu0's slice gfn 0x100-0x106: first_byte = 0x5 last_byte = 0x4 hit_edge = 1, ${c.slices[0]!.bad} inconsistent step(s) (check_guests_ram)`);
  });

  it('hit_edge is 0 for a broken slice with no edge', () => {
    const mem = memory(4);
    const s = mem.slots[0]!;
    [8, 8, 9, 9].forEach((v, p) => { s.bytes(p)[s.byteOffset(p)] = v; });
    const c = checkSweepPattern(mem, 1);
    expect(c.ok).toBe(false);
    const line = describeSweepCheck(c, 'x').find((l) => l.includes("'s slice"))!;
    expect(line).toMatch(new RegExp(`hit_edge = ${c.slices[0]!.edgeGfn === null ? 0 : 1}, `));
  });

  it('an OK verdict names a slice that stopped at its start', () => {
    const c = checkSweepPattern(memory(4), 1);
    expect(describeSweepCheck(c, 'x')).toEqual(['sweep pattern x: OK (4 pages in 1 slice(s); the sweep stopped: vcpu0 at its slice start)']);
  });

  it('hasHostWrites sees a host writer\'s stamp on any page, including the last, and nothing else', () => {
    const mem = memory(4);
    expect(hasHostWrites(mem)).toBe(false);
    mem.slots[0]!.stamp(3, HOST_WRITER_BASE - 1, 1, 1);
    expect(hasHostWrites(mem)).toBe(false);
    mem.slots[0]!.stamp(3, HOST_WRITER_BASE, 1, 1);
    expect(hasHostWrites(mem)).toBe(true);
  });
});

describe('stream edges: the resumed guest and the dirty-log check', () => {
  it('the resumed guest stops once every vCPU retired exactly its ops, then waits for each vCPU still running', () => {
    const vm = new Vm(createVmLayout({ slots: [{ ...SLOT, flags: 0 }], vcpus: 2, tracking: LEGACY }));
    const set = (v: number, w: number, x: number): void => { Atomics.store(vm.vcpuWords, vm.vcpuBase(v) + w, x); };
    for (const v of [0, 1]) set(v, VcpuWord.OPS, 3);
    set(0, VcpuWord.RUN_STATE, VcpuRunState.STOPPED);
    set(1, VcpuWord.RUN_STATE, VcpuRunState.RUNNING);
    const steps = runResumedGuest(vm, 3);
    expect(steps.next()).toEqual({ done: false, value: undefined });
    expect(Atomics.load(vm.vcpuWords, vm.vcpuBase(1) + VcpuRequest.STOP)).toBe(1);
    expect(steps.next()).toEqual({ done: false, value: waitFor(WaitCode.VCPU_STOPPED, 1) });
    set(1, VcpuWord.RUN_STATE, VcpuRunState.STOPPED);
    expect(steps.next().done).toBe(true);
  });

  it('an unretired write does not excuse a reported page that holds a later iteration', () => {
    const mem = memory(4);
    mem.slots[0]!.writeU64Stamped(0, 60, 1, 0, 6);
    const reported = new PageBitmap(mem.totalPages);
    const g = mem.slots[0]!.firstPage;
    reported.mark(g);
    const ex: VerifyExceptions = { unretired: new Set([g]), previousUnretired: new Set(), initiallySet: false, firstCollection: null };
    expect(verifyDirtyLog(mem, reported, 5, ex).violations.map((v) => [v.kind, v.stampIteration])).toEqual([['stale', 6]]);
  });

  it('verifyDirtyLog runs every step of a guest bigger than one chunk', () => {
    const pages = 65536 + 3;
    const mem = new GuestMemory(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages, flags: 0 }], vcpus: 1, tracking: LEGACY }));
    const none: VerifyExceptions = { unretired: new Set(), previousUnretired: new Set(), initiallySet: false, firstCollection: null };
    expect(verifyDirtyLog(mem, new PageBitmap(pages), 1, none)).toEqual({ dirty: 0, clean: pages, violations: [] });
  });
});
