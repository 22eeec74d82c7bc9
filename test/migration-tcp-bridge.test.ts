import { type ChildProcess, spawn } from 'node:child_process';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { crc32 } from 'node:zlib';
import { Packr } from 'msgpackr';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { createVmLayout } from '../src/host/layout.ts';
import type { Memslot } from '../src/host/memslot.ts';
import { DEST_WORDS, DestState, DestWord } from '../src/migration/channel.ts';
import { checksumUpdate, encodeComplete, encodeHeader, encodePages, encodeSync } from '../src/migration/stream.ts';
import { type SourceBridge, DIGEST_BYTES, compareDigests, connectDestination, pageDigests, serveDestination } from '../src/migration/tcp.ts';
import { LEGACY, frameOf } from './helpers.ts';

/**
 * tcp.ts on the test's own thread: real loopback sockets and MessagePorts, no worker
 * threads and no migration scenario. The source bridge gets stream frames posted on its
 * workerPort (as the migration worker would); the destination gets them from the bridge
 * or from a raw socket; hostile peers are plain net servers and sockets writing crafted
 * bytes. The stall deadlines run on fake setInterval/Date (real sockets, real I/O), so
 * that which check fires, and what it says, is exact.
 */

const HOST = '127.0.0.1';
const KIB = 1024;
const MIB = 1024 * 1024;
const packr = new Packr({ useRecords: false });
/** Generous: only a mutant (or a broken build) ever waits this long. */
const GUARD_MS = 8000;
const T = 20_000;

// ---------------------------------------------------------------------------------------
// Clean-up: every server, socket, bridge, destination and child process a test makes.

const cleanups: (() => void)[] = [];
const track = (f: () => void): void => { cleanups.push(f); };
afterEach(() => {
  vi.useRealTimers();
  for (const f of cleanups.splice(0).reverse()) {
    try { f(); } catch { /* already gone */ }
  }
});

// ---------------------------------------------------------------------------------------
// Real-time helpers (setTimeout is never faked here; Date is, in the deadline tests).

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function within<T>(p: Promise<T>, what: string, ms = GUARD_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms); });
  return Promise.race([p, guard]).finally(() => clearTimeout(timer));
}

async function until(cond: () => boolean, what: string, ms = GUARD_MS): Promise<void> {
  for (let waited = 0; !cond(); waited += 5) {
    if (waited >= ms) throw new Error(`${what}: not after ${ms} ms`);
    await sleep(5);
  }
}

/** A promise's outcome, readable synchronously once it settled. */
function watch<T>(p: Promise<T>): { readonly settled: boolean; readonly value: T | undefined } {
  const w = { settled: false, value: undefined as T | undefined };
  void p.then((v) => { w.settled = true; w.value = v; });
  return w;
}

/** Lets pending I/O callbacks, port messages and promise reactions run. */
const settle = async (): Promise<void> => { await sleep(20); await sleep(20); };

// ---------------------------------------------------------------------------------------
// Guest memory and streams built with the project's own encoder.

type SlotSpec = { id: number; asId?: number; baseGfn: number; pages: number };

function memoryOf(slots: SlotSpec[], vcpus = 1): GuestMemory {
  return new GuestMemory(createVmLayout({ slots: slots.map((s) => ({ asId: 0, ...s, flags: 0 })), vcpus, tracking: LEGACY }));
}

/** Every page but each eighth (left zero) gets a value, a stamp and a pattern over the rest of the page. */
function fill(memory: GuestMemory): GuestMemory {
  memory.slots.forEach((s, si) => {
    for (let p = 0; p < s.pages; p++) {
      if (p % 8 === 7) continue;
      s.writeU64Stamped(p, p * 1000 + si, 1 + (p % 3), p + 1, si + 1);
      const off = s.byteOffset(p);
      s.bytes(p).fill(((p + si * 31) % 251) + 1, off + 16, off + 4096);
    }
  });
  return memory;
}

/** A stream of one memory, frame by frame, with the counts and checksum its completion record needs. */
class StreamOf {
  readonly frames: Uint8Array[] = [];
  normal = 0;
  zero = 0;
  bytes = 0;
  private taken = 0;
  constructor(readonly memory: GuestMemory) {}
  private add(f: Uint8Array): this { this.frames.push(f); this.bytes += f.length; return this; }
  header(): this {
    return this.add(encodeHeader(this.memory.slots.map((s) => ({ id: s.id, asId: s.asId, baseGfn: s.baseGfn, pages: s.pages }))));
  }
  pages(slot: Memslot, offsets: number[]): this {
    const b = encodePages(slot.slotField, offsets, { isZero: (p) => slot.isZeroPage(p), copy: (p, n, into, at) => slot.copyPages(p, n, into, at) });
    this.normal += b.normal;
    this.zero += b.zero;
    return this.add(b.frame);
  }
  /** The slot's pages from `from` on, 64 to a batch. */
  rest(slot: Memslot, from = 0): this {
    for (let p = from; p < slot.pages; p += 64) this.pages(slot, range(p, Math.min(slot.pages, p + 64)));
    return this;
  }
  sync(pass: number): this { return this.add(encodeSync(pass)); }
  /** Sync frames (24 or 32 bytes) until the stream is exactly `total` bytes long. */
  padTo(total: number): this {
    const words = (total - this.bytes) / 8;
    const big = [0, 1, 2].find((b) => (words - 4 * b) % 3 === 0)!; // 24a + 32b bytes
    for (let i = 0; i < (words - 4 * big) / 3; i++) this.sync(1);
    for (let i = 0; i < big; i++) this.sync(70_000);
    expect(this.bytes).toBe(total);
    return this;
  }
  complete(): this {
    const crc = this.frames.reduce((c, f) => checksumUpdate(c, f), 0);
    return this.add(encodeComplete(this.normal, this.zero, crc));
  }
  /** The whole stream: header, every page, a sync, completion. */
  all(): this {
    this.header();
    for (const s of this.memory.slots) this.rest(s);
    return this.sync(1).complete();
  }
  /** The frames added since the last take, as one buffer. */
  take(): Buffer {
    const out = Buffer.concat(this.frames.slice(this.taken));
    this.taken = this.frames.length;
    return out;
  }
}

const range = (a: number, b: number): number[] => Array.from({ length: b - a }, (_, i) => a + i);

/** Source memory of 3 MiB in two slots, and its stream up to exactly 256 KiB: header, pages 0-71, syncs. */
function twoSlots(): { memory: GuestMemory; stream: StreamOf } {
  const memory = fill(memoryOf([{ id: 1, baseGfn: 0x100, pages: 512 }, { id: 2, baseGfn: 0x1000, pages: 256 }]));
  const s0 = memory.slots[0]!;
  const stream = new StreamOf(memory).header().pages(s0, range(0, 72)).padTo(256 * KIB); // 63 normal pages, 9 zero
  expect([stream.normal, stream.zero]).toEqual([63, 9]);
  return { memory, stream };
}

/** The rest of twoSlots' stream: slot 0 from page 72 on, all of slot 1, completion. */
function finish(stream: StreamOf): StreamOf {
  const [s0, s1] = stream.memory.slots;
  return stream.rest(s0!, 72).rest(s1!).sync(1).complete();
}

// ---------------------------------------------------------------------------------------
// Peers.

const reply = (x: unknown): Buffer => {
  const body = packr.pack(x);
  const out = Buffer.alloc(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  body.copy(out, 4);
  return out;
};

interface Peer { socket: Socket; replies: Record<string, unknown>[]; bytes: number; closed: Promise<void>; isClosed: boolean }

/** A raw client of a destination: collects its reply frames. */
async function dial(port: number, o: { allowHalfOpen?: boolean } = {}): Promise<Peer> {
  const socket = connect({ port, host: HOST, allowHalfOpen: o.allowHalfOpen ?? false });
  track(() => socket.destroy());
  socket.on('error', () => {});
  const peer: Peer = { socket, replies: [], bytes: 0, closed: new Promise((resolve) => socket.once('close', () => { peer.isClosed = true; resolve(); })), isClosed: false };
  let buf = Buffer.alloc(0);
  socket.on('data', (c: Buffer) => {
    peer.bytes += c.length;
    buf = Buffer.concat([buf, c]);
    while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
      const n = buf.readUInt32BE(0);
      peer.replies.push(packr.unpack(buf.subarray(4, 4 + n)) as Record<string, unknown>);
      buf = buf.subarray(4 + n);
    }
  });
  await within(new Promise((resolve) => socket.once('connect', resolve)), 'connect');
  return peer;
}

interface Hostile { server: Server; port: number; sockets: Socket[]; bytes: number; connections: number; closed: number }

/** A destination that is not one: counts connections and bytes, and does what `onData` says. */
async function hostile(onData?: (socket: Socket, h: Hostile, chunk: Buffer) => void): Promise<Hostile> {
  const h: Hostile = { server: createServer(), port: 0, sockets: [], bytes: 0, connections: 0, closed: 0 };
  h.server.on('connection', (socket) => {
    h.connections++;
    h.sockets.push(socket);
    socket.on('error', () => {});
    socket.on('close', () => { h.closed++; });
    socket.on('data', (c: Buffer) => { h.bytes += c.length; onData?.(socket, h, c); });
  });
  await new Promise<void>((resolve) => h.server.listen(0, HOST, resolve));
  h.port = (h.server.address() as { port: number }).port;
  track(() => { h.server.close(); for (const s of h.sockets) s.destroy(); });
  return h;
}

/** A port nobody listens on. */
async function deadPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, HOST, resolve));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

type Bridge = SourceBridge & { words: Int32Array; out: ReturnType<typeof watch<{ digests: Uint8Array | null; error: string | null }>>; post: (f: Uint8Array) => void };

function bridgeTo(port: number, stallMs?: number): Bridge {
  const words = new Int32Array(new SharedArrayBuffer(DEST_WORDS * 4));
  const b = stallMs === undefined ? connectDestination(HOST, port, words) : connectDestination(HOST, port, words, stallMs);
  track(() => b.close());
  return { ...b, words, out: watch(b.finished), post: (f) => b.workerPort.postMessage(f) };
}

const state = (b: Bridge): number => Atomics.load(b.words, DestWord.STATE);
const appliedKib = (b: Bridge): number => Atomics.load(b.words, DestWord.APPLIED_KIB);

async function serve(o?: { idleMs?: number; vcpus?: number }): Promise<Awaited<ReturnType<typeof serveDestination>>> {
  const d = o === undefined ? await serveDestination(HOST, 0) : await serveDestination(HOST, 0, o);
  track(() => d.close());
  return d;
}

const refusedAt = (port: number): Promise<string> => new Promise((resolve) => {
  const s = connect(port, HOST);
  s.once('connect', () => { s.destroy(); resolve('connected'); });
  s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
});

/** Atomics.waitAsync (not in this project's TS lib): resolves 'ok' when the word is notified while it holds `v`. */
const waitAsync = (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number, t: number): { async: boolean; value: Promise<string> | string } }).waitAsync;
function notified(words: Int32Array, index: number, v: number, t: number): { value: Promise<string> } {
  const w = waitAsync(words, index, v, t);
  return { value: Promise.resolve(w.value) };
}

const DEADLINE_TIMERS = { toFake: ['setInterval', 'clearInterval', 'Date'] as ('setInterval' | 'clearInterval' | 'Date')[] };

// =======================================================================================

describe('pageDigests and compareDigests', () => {
  const SLOTS = [{ id: 3, baseGfn: 0x200, pages: 2 }, { id: 1, baseGfn: 0x100, pages: 3 }]; // layout order is not gfn order

  it('pageDigests: 16 bytes a page, slots in layout order: CRC-32 of the page, then the stamp\'s writer, seq and iteration, big-endian', () => {
    const m = memoryOf(SLOTS);
    const [a, b] = m.slots;
    a!.writeU64Stamped(1, 0x1234, 5, 0x01020304, 7);
    a!.bytes(1).fill(0x33, a!.byteOffset(1) + 16, a!.byteOffset(1) + 4096);
    b!.writeU64Stamped(2, 0xabcdef, 0x8001, 0xfffffffe, 0xffff);
    const d = pageDigests(m);
    expect(DIGEST_BYTES).toBe(16);
    expect(d).toBeInstanceOf(Uint8Array);
    expect(d.length).toBe(5 * 16);
    // Slot 3's page 1 (index 1), built here byte by byte.
    const page = new Uint8Array(4096);
    const le = new DataView(page.buffer);
    le.setUint32(0, 0x1234, true);
    le.setUint32(8, 5 | (7 << 16), true);
    le.setUint32(12, 0x01020304, true);
    page.fill(0x33, 16);
    const zero = crc32(new Uint8Array(4096));
    const page2 = new Uint8Array(4096);
    new DataView(page2.buffer).setUint32(0, 0xabcdef, true);
    new DataView(page2.buffer).setUint32(8, (0x8001 | (0xffff << 16)) >>> 0, true);
    new DataView(page2.buffer).setUint32(12, 0xfffffffe, true);
    const expected = Buffer.alloc(5 * 16);
    const put = (i: number, crc: number, writer: number, seq: number, iteration: number): void => {
      expected.writeUInt32BE(crc, i * 16);
      expected.writeUInt32BE(writer, i * 16 + 4);
      expected.writeUInt32BE(seq, i * 16 + 8);
      expected.writeUInt32BE(iteration, i * 16 + 12);
    };
    put(0, zero, 0, 0, 0);
    put(1, crc32(page), 5, 0x01020304, 7);
    put(2, zero, 0, 0, 0);
    put(3, zero, 0, 0, 0);
    put(4, crc32(page2), 0x8001, 0xfffffffe, 0xffff);
    expect(Buffer.from(d).toString('hex')).toBe(expected.toString('hex'));
  });

  it('compareDigests: equal memories give no mismatch; a changed page gives its slot, gfn and both stamps; the remote digests may sit anywhere in their buffer', () => {
    const src = fill(memoryOf(SLOTS));
    const dst = fill(memoryOf(SLOTS));
    const at = (d: Uint8Array): Uint8Array => { const big = new Uint8Array(d.length + 24); big.set(d, 8); return big.subarray(8, 8 + d.length); };
    expect(compareDigests(src, at(pageDigests(dst)))).toEqual({ pages: 5, count: 0, mismatches: [] });
    dst.slots[1]!.stamp(2, 9, 10, 11); // slot 1, gfn 0x102: another writer
    dst.slots[0]!.bytes(0)[100] ^= 1; // slot 3, gfn 0x200: the bytes differ, the stamp does not
    const r = compareDigests(src, at(pageDigests(dst)));
    expect(r).toEqual({
      pages: 5, count: 2, mismatches: [
        { slot: 3, gfn: 0x200, source: src.slots[0]!.stampOf(0), destination: src.slots[0]!.stampOf(0) },
        { slot: 1, gfn: 0x102, source: { writer: 3, seq: 3, iteration: 2 }, destination: { writer: 9, seq: 10, iteration: 11 } },
      ],
    });
    expect(src.slots[0]!.stampOf(0)).toEqual({ writer: 1, seq: 1, iteration: 1 });
  });

  it('compareDigests counts every mismatch but lists at most `max` (16 by default), in slot order', () => {
    const SL = [{ id: 1, baseGfn: 0, pages: 24 }];
    const src = memoryOf(SL);
    const dst = memoryOf(SL);
    for (let p = 0; p < 20; p++) dst.slots[0]!.stamp(p, 1, p + 1, 1);
    const all = compareDigests(src, pageDigests(dst));
    expect(all.count).toBe(20);
    expect(all.pages).toBe(24);
    expect(all.mismatches.map((m) => m.gfn)).toEqual(range(0, 16));
    const two = compareDigests(src, pageDigests(dst), 2);
    expect(two.count).toBe(20);
    expect(two.mismatches).toEqual([
      { slot: 1, gfn: 0, source: { writer: 0, seq: 0, iteration: 0 }, destination: { writer: 1, seq: 1, iteration: 1 } },
      { slot: 1, gfn: 1, source: { writer: 0, seq: 0, iteration: 0 }, destination: { writer: 1, seq: 2, iteration: 1 } },
    ]);
    expect(compareDigests(src, pageDigests(dst), 0)).toEqual({ pages: 24, count: 20, mismatches: [] });
  });

  it('compareDigests refuses digests of another number of pages', () => {
    const m = memoryOf(SLOTS);
    expect(() => compareDigests(m, new Uint8Array(4 * 16))).toThrow(new Error('the destination reported 4 pages, the source has 5'));
    expect(() => compareDigests(m, new Uint8Array(6 * 16))).toThrow(new Error('the destination reported 6 pages, the source has 5'));
  });
});

// =======================================================================================

describe('serveDestination', () => {
  it('a whole migration from a raw source: an ack at exactly 256 KiB applied, acks 256 KiB apart, complete, the digests, then the end', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 5000 });
    const { memory, stream } = twoSlots();
    const src = await dial(dest.address.port);
    src.socket.write(stream.take()); // exactly 256 KiB
    await until(() => src.replies.length > 0, 'the first ack');
    expect(src.replies).toEqual([{ t: 'ack', kib: 256 }]);
    src.socket.write(finish(stream).take());
    await within(src.closed, 'the destination ends the connection');
    const replies = src.replies;
    const acks = replies.slice(0, -2);
    expect(acks.length).toBeGreaterThanOrEqual(2); // 3 MiB: more after the first
    acks.forEach((a, i) => {
      expect(Object.keys(a)).toEqual(['t', 'kib']);
      expect(a['t']).toBe('ack');
      expect(Number.isInteger(a['kib'])).toBe(true);
      expect(a['kib']).toBeLessThanOrEqual(stream.bytes / KIB);
      if (i > 0) expect((a['kib'] as number) - (acks[i - 1]!['kib'] as number)).toBeGreaterThanOrEqual(256);
    });
    expect(replies.at(-2)).toEqual({ t: 'complete', normal: stream.normal, zero: stream.zero });
    const served = await within(dest.result, 'the result');
    expect(served).toEqual({ status: 'completed', layout: served.layout, error: null, pages: stream.normal + stream.zero, normal: stream.normal, zero: stream.zero, frames: stream.frames.length });
    expect(stream.normal + stream.zero).toBe(768);
    const layout = served.layout!;
    expect(layout.totalPages).toBe(768);
    expect(layout.config.vcpus).toBe(1); // the default
    expect(layout.config.tracking).toEqual({ kind: 'bitmap', manualProtect: false, initiallySet: false });
    expect(layout.slots.map(({ id, asId, baseGfn, pages, flags }) => ({ id, asId, baseGfn, pages, flags }))).toEqual([
      { id: 1, asId: 0, baseGfn: 0x100, pages: 512, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x1000, pages: 256, flags: 0 },
    ]);
    const last = replies.at(-1)!;
    expect(Object.keys(last)).toEqual(['t', 'digests']);
    expect(last['t']).toBe('digests');
    const digests = last['digests'] as Uint8Array;
    expect(Buffer.from(digests).equals(Buffer.from(pageDigests(new GuestMemory(layout))))).toBe(true);
    expect(compareDigests(memory, digests)).toEqual({ pages: 768, count: 0, mismatches: [] });
    // One migration per destination: it no longer listens.
    expect(await refusedAt(dest.address.port)).toBe('ECONNREFUSED');
  });

  it('builds the memory with the vCPUs it was given', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 5000, vcpus: 3 });
    const stream = new StreamOf(fill(memoryOf([{ id: 0, baseGfn: 0, pages: 8 }]))).all();
    const src = await dial(dest.address.port);
    src.socket.write(stream.take());
    const served = await within(dest.result, 'the result');
    expect(served.status).toBe('completed');
    expect(served.layout!.config.vcpus).toBe(3);
    expect(served.frames).toBe(4);
  });

  it('with the default idle time, a source that takes its time to begin is served', { timeout: T }, async () => {
    const dest = await serve();
    const { stream } = twoSlots();
    const src = await dial(dest.address.port);
    await sleep(150);
    src.socket.write(stream.take());
    await until(() => src.replies.length > 0 || src.isClosed, 'an ack');
    expect(src.replies).toEqual([{ t: 'ack', kib: 256 }]);
    src.socket.write(finish(stream).take());
    expect((await within(dest.result, 'the result')).status).toBe('completed');
  });

  it('while a migration is under way another connection gets the error reply, at once or when it sends; after it, one is dropped without a word', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 10_000 });
    const early = await dial(dest.address.port); // accepted before the stream began
    const lingering = await dial(dest.address.port);
    const { memory, stream } = twoSlots();
    const src = await dial(dest.address.port);
    src.socket.write(stream.take());
    await until(() => src.replies.length > 0, 'the first ack'); // the stream began: src is the migration
    const late = await dial(dest.address.port);
    await within(late.closed, 'the late connection is closed');
    const busy = { t: 'error', message: 'this destination is already receiving a migration' };
    expect(late.replies).toEqual([busy]);
    early.socket.write(stream.frames[0]!);
    await within(early.closed, 'the early connection is closed');
    expect(early.replies).toEqual([busy]);
    // One that resets its connection at once is no failure of the destination's.
    const rude = await dial(dest.address.port);
    rude.socket.resetAndDestroy();
    await settle();
    src.socket.write(finish(stream).take());
    const served = await within(dest.result, 'the result');
    expect(served.status).toBe('completed');
    expect(served.error).toBeNull();
    await within(src.closed, 'the source connection ends');
    expect(compareDigests(memory, src.replies.at(-1)!['digests'] as Uint8Array).count).toBe(0);
    // A connection from before that speaks only now is dropped without a reply.
    lingering.socket.write(stream.frames[0]!);
    await within(lingering.closed, 'the lingering connection is closed');
    expect(lingering.bytes).toBe(0);
  });

  it('drops connections that send nothing (or no whole frame) after idleMs, refuses one whose first frame is no header, and then serves the real source', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 300 });
    const silent = await dial(dest.address.port);
    await within(silent.closed, 'the silent connection is dropped');
    expect(silent.bytes).toBe(0);
    const partial = await dial(dest.address.port);
    partial.socket.write(Buffer.from([0, 0]));
    await within(partial.closed, 'the partial connection is dropped');
    expect(partial.bytes).toBe(0);
    const wrong = await dial(dest.address.port);
    wrong.socket.write(frameOf({ t: 'sync', pass: 1 }));
    await within(wrong.closed, 'the wrong connection is closed');
    expect(wrong.replies).toEqual([{ t: 'error', message: "frame 0: the stream must start with a header, got 'sync'" }]);
    const rude = await dial(dest.address.port);
    rude.socket.resetAndDestroy();
    await settle();
    // None of them was the migration: the destination still listens, and serves the real source.
    const memory = fill(memoryOf([{ id: 0, baseGfn: 0, pages: 64 }]));
    const stream = new StreamOf(memory).all();
    const b = bridgeTo(dest.address.port);
    for (const f of stream.frames) b.post(f);
    const got = await within(b.finished, 'the digests');
    expect(got.error).toBeNull();
    const served = await within(dest.result, 'the result');
    expect(served).toMatchObject({ status: 'completed', error: null, pages: 64, normal: 56, zero: 8, frames: stream.frames.length });
    expect(compareDigests(memory, got.digests!)).toEqual({ pages: 64, count: 0, mismatches: [] });
  });

  it('a source that goes silent mid-stream fails the migration after idleMs, and its connection is closed', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 300 });
    const memory = fill(memoryOf([{ id: 0, baseGfn: 0, pages: 64 }]));
    const stream = new StreamOf(memory).header().pages(memory.slots[0]!, range(0, 16));
    const src = await dial(dest.address.port);
    src.socket.write(stream.take());
    const served = await within(dest.result, 'the result');
    expect(served).toEqual({ status: 'failed', layout: served.layout, error: 'the source sent nothing for 0.3 s: it stalled or is gone', pages: 16, normal: 14, zero: 2, frames: 2 });
    expect(served.layout!.totalPages).toBe(64);
    await within(src.closed, 'the connection is closed');
    expect(src.bytes).toBe(0);
  });

  it('a malformed stream gets an error reply with the decoder\'s message, and the migration fails with it', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 5000 });
    const { stream } = twoSlots();
    const src = await dial(dest.address.port);
    src.socket.write(stream.take());
    await until(() => src.replies.length > 0, 'the first ack'); // the stream began
    src.socket.write(frameOf({ t: 'bogus' }));
    await within(src.closed, 'the connection is closed');
    const message = `frame ${stream.frames.length}: unknown record type 'bogus'`;
    expect(src.replies).toEqual([{ t: 'ack', kib: 256 }, { t: 'error', message }]);
    const served = await within(dest.result, 'the result');
    expect(served).toEqual({ status: 'failed', layout: served.layout, error: message, pages: 72, normal: 63, zero: 9, frames: stream.frames.length });
    expect(served.layout!.totalPages).toBe(768);
    expect(await refusedAt(dest.address.port)).toBe('ECONNREFUSED');
  });

  it('a malformed stream fails the migration at once, even if the source keeps its end of the connection open', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 3000 });
    const { stream } = twoSlots();
    const src = await dial(dest.address.port, { allowHalfOpen: true });
    src.socket.write(stream.take());
    await until(() => src.replies.length > 0, 'the first ack');
    src.socket.write(frameOf({ t: 'complete', normal: 63, zero: 9, checksum: 1 }));
    const served = await within(dest.result, 'the result');
    const message = `frame ${stream.frames.length}: checksum mismatch: the source sent 1, the frames received give ${stream.frames.reduce((c, f) => checksumUpdate(c, f), 0) >>> 0}`;
    expect(served).toMatchObject({ status: 'failed', error: message, normal: 63, zero: 9, frames: stream.frames.length });
    expect(src.isClosed).toBe(false); // still open: the destination did not wait for the source to close
    await until(() => src.replies.length === 2, 'the error reply');
    expect(src.replies).toEqual([{ t: 'ack', kib: 256 }, { t: 'error', message }]);
  });

  it('a source that closes mid-stream fails the migration: no completion record, or a truncated frame', { timeout: T }, async () => {
    const memory = fill(memoryOf([{ id: 0, baseGfn: 0, pages: 16 }]));
    const dest = await serve({ idleMs: 5000 });
    const src = await dial(dest.address.port);
    src.socket.end(new StreamOf(memory).header().pages(memory.slots[0]!, [0, 1, 2]).take());
    expect(await within(dest.result, 'the result')).toMatchObject({ status: 'failed', error: 'stream ended after 2 frames without a completion record', pages: 3, frames: 2 });

    const dest2 = await serve({ idleMs: 5000 });
    const src2 = await dial(dest2.address.port);
    const head = new StreamOf(memory).header().take();
    src2.socket.end(Buffer.concat([head, new StreamOf(memory).pages(memory.slots[0]!, [0]).take().subarray(0, 100)]));
    expect(await within(dest2.result, 'the result')).toMatchObject({ status: 'failed', error: 'stream truncated: 100 bytes of an incomplete frame 1', pages: 0, frames: 1 });
  });

  it('a source whose connection resets mid-stream fails the migration with the connection\'s error', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 5000 });
    const { stream } = twoSlots();
    const src = await dial(dest.address.port);
    src.socket.write(stream.take());
    await until(() => src.replies.length > 0, 'the first ack'); // read by the destination: the migration began
    src.socket.resetAndDestroy();
    expect(await within(dest.result, 'the result')).toMatchObject({ status: 'failed', error: 'connection: read ECONNRESET', normal: 63 });
  });

  it('a port already in use is refused with the listen error', { timeout: T }, async () => {
    const h = await hostile();
    await expect(serveDestination(HOST, h.port)).rejects.toThrow(`listen EADDRINUSE: address already in use ${HOST}:${h.port}`);
  });

  it('close() stops listening', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 5000 });
    expect(dest.address.address).toBe(HOST);
    expect(dest.address.port).toBeGreaterThan(0);
    dest.close();
    expect(await refusedAt(dest.address.port)).toBe('ECONNREFUSED');
  });
});

// =======================================================================================

describe('connectDestination', () => {
  it('a whole migration through the bridge: acks become credit, complete the state, and the digests are the destination memory\'s', { timeout: T }, async () => {
    const dest = await serve({ idleMs: 5000, vcpus: 2 });
    const { memory, stream } = twoSlots();
    finish(stream);
    const b = bridgeTo(dest.address.port);
    const credit = notified(b.words, DestWord.APPLIED_KIB, 0, 10_000);
    const complete = notified(b.words, DestWord.STATE, DestState.RECEIVING, 10_000);
    for (const f of stream.frames) b.post(f);
    const got = await within(b.finished, 'the digests');
    expect(got.error).toBeNull();
    const served = await within(dest.result, 'the result');
    expect(served).toMatchObject({ status: 'completed', error: null, pages: 768, normal: stream.normal, zero: stream.zero, frames: stream.frames.length });
    expect(served.layout!.config.vcpus).toBe(2);
    expect(state(b)).toBe(DestState.COMPLETE);
    expect(appliedKib(b)).toBeGreaterThanOrEqual(256);
    expect(appliedKib(b)).toBeLessThanOrEqual(stream.bytes / KIB);
    expect(await credit.value).toBe('ok');
    expect(await complete.value).toBe('ok');
    expect(Buffer.from(got.digests!).equals(Buffer.from(pageDigests(new GuestMemory(served.layout!))))).toBe(true);
    expect(compareDigests(memory, got.digests!)).toEqual({ pages: 768, count: 0, mismatches: [] });
    // The stamp oracle sees a page the destination does not have.
    memory.slots[1]!.stamp(5, 2, 99, 4);
    expect(compareDigests(memory, got.digests!)).toEqual({
      pages: 768, count: 1, mismatches: [{ slot: 2, gfn: 0x1005, source: { writer: 2, seq: 99, iteration: 4 }, destination: { writer: 3, seq: 6, iteration: 2 } }],
    });
  });

  it('a refused connection fails the migration with the connection\'s error', { timeout: T }, async () => {
    const port = await deadPort();
    const b = bridgeTo(port, 5000);
    const failed = notified(b.words, DestWord.STATE, DestState.RECEIVING, 10_000);
    b.post(new Uint8Array(64));
    expect(await within(b.finished, 'the failure')).toEqual({ digests: null, error: `the connection to the destination at ${HOST}:${port} failed: connect ECONNREFUSED ${HOST}:${port}` });
    expect(state(b)).toBe(DestState.FAILED);
    expect(await failed.value).toBe('ok');
  });

  it('its deadline timer does not keep the process alive', () => {
    const timeouts = (): number => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    const before = timeouts();
    const b = bridgeTo(1, 5000);
    expect(timeouts()).toBe(before);
    b.close();
  });

  it('connects only with the first frame, however long that takes', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile();
    const b = bridgeTo(h.port, 1000);
    vi.advanceTimersByTime(10_000);
    await settle();
    expect(h.connections).toBe(0);
    expect(b.out.settled).toBe(false);
    b.post(new Uint8Array(100).fill(7));
    await until(() => h.bytes === 100, 'the frame');
    expect(h.connections).toBe(1);
    vi.advanceTimersByTime(10_000); // less than an ack's worth sent: nothing owed, no deadline
    await settle();
    expect(b.out.settled).toBe(false);
    expect(state(b)).toBe(DestState.RECEIVING);
  });

  it('a destination that does not accept the connection fails the migration at stallMs', { timeout: T }, async () => {
    // A listener whose accept queue is full: a further connection is never answered.
    const child: ChildProcess = spawn(process.execPath, ['-e', `
      const s = require('node:net').createServer();
      s.listen({ port: 0, host: '${HOST}', backlog: 1 }, () => {
        process.stdout.write(s.address().port + '\\n');
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0); // never accepts
      });`], { stdio: ['ignore', 'pipe', 'inherit'] });
    track(() => child.kill('SIGKILL'));
    const port = await within(new Promise<number>((resolve) => child.stdout!.once('data', (d) => resolve(Number(String(d).trim())))), 'the listener');
    for (let i = 0; i < 2; i++) await dial(port); // fills the queue
    vi.useFakeTimers(DEADLINE_TIMERS);
    const b = bridgeTo(port, 1000);
    b.post(new Uint8Array(64));
    await settle();
    vi.advanceTimersByTime(999);
    await settle();
    expect(b.out.settled).toBe(false);
    vi.advanceTimersByTime(1);
    await settle();
    expect(b.out.value).toEqual({ digests: null, error: `could not connect to the destination at ${HOST}:${port} within 1 s` });
    expect(state(b)).toBe(DestState.FAILED);
    expect(vi.getTimerCount()).toBe(0);
  });

  it('a destination that stops answering with more than 256 KiB owed fails the migration, with what is owed and since when', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile(); // reads, never answers
    const b = bridgeTo(h.port, 1000); // checks every 250 ms
    vi.advanceTimersByTime(50);
    b.post(new Uint8Array(512 * KIB)); // owed from now (+50)
    await until(() => h.bytes === 512 * KIB, 'the first half');
    vi.advanceTimersByTime(250); // +300
    b.post(new Uint8Array(512 * KIB)); // still owed since +50
    await until(() => h.bytes === MIB, 'the second half');
    vi.advanceTimersByTime(950); // +1250: the first check 1 s after +50
    await settle();
    expect(b.out.value).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} has not answered for 1.2 s with 1.0 MiB unacknowledged: it stalled or is gone` });
    expect(state(b)).toBe(DestState.FAILED);
    expect(vi.getTimerCount()).toBe(0);
    await until(() => h.closed === 1, 'the connection is closed');
  });

  it('each answer restarts the deadline while some is owed, and an answer that leaves less than 256 KiB owed stops it', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile();
    const b = bridgeTo(h.port, 1000);
    b.post(new Uint8Array(100 * KIB)); // not owed yet
    await until(() => h.bytes === 100 * KIB, 'the first frame');
    vi.advanceTimersByTime(5000);
    await settle();
    expect(b.out.settled).toBe(false);
    b.post(new Uint8Array(200 * KIB)); // 300 KiB: owed from +5000
    await until(() => h.bytes === 300 * KIB, 'the second frame');
    vi.advanceTimersByTime(500); // +5500
    h.sockets[0]!.write(reply({ t: 'ack', kib: 299 })); // leaves 1 KiB owed: no deadline
    await until(() => appliedKib(b) === 299, 'the ack');
    vi.advanceTimersByTime(5000); // +10500
    await settle();
    expect(b.out.settled).toBe(false);
    b.post(new Uint8Array(MIB)); // owed from +10500
    await until(() => h.bytes === 300 * KIB + MIB, 'the third frame');
    vi.advanceTimersByTime(500); // +11000
    h.sockets[0]!.write(reply({ t: 'ack', kib: 555 })); // still 768 KiB owed: the deadline restarts at +11000
    await until(() => appliedKib(b) === 555, 'the second ack');
    vi.advanceTimersByTime(750); // +11750: 1.25 s after the debt began, 0.75 s after the answer
    await settle();
    expect(b.out.settled).toBe(false);
    vi.advanceTimersByTime(250); // +12000
    await settle();
    expect(b.out.value).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} has not answered for 1.0 s with 0.8 MiB unacknowledged: it stalled or is gone` });
    expect(state(b)).toBe(DestState.FAILED);
  });

  it('exactly 256 KiB unacknowledged is owed', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile();
    const b = bridgeTo(h.port, 1000);
    b.post(new Uint8Array(256 * KIB));
    await until(() => h.bytes === 256 * KIB, 'the frame');
    vi.advanceTimersByTime(1000);
    await settle();
    expect(b.out.value).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} has not answered for 1.0 s with 0.3 MiB unacknowledged: it stalled or is gone` });
  });

  it('an error reply fails the migration with the destination\'s message, and the connection is closed', { timeout: T }, async () => {
    const h = await hostile((s) => s.write(reply({ t: 'error', message: 'disk full' })));
    const b = bridgeTo(h.port, 5000);
    const failed = notified(b.words, DestWord.STATE, DestState.RECEIVING, 10_000);
    b.post(new Uint8Array(64));
    expect(await within(b.finished, 'the failure')).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} failed: disk full` });
    expect(state(b)).toBe(DestState.FAILED);
    expect(await failed.value).toBe('ok');
    await until(() => h.closed === 1, 'the connection is closed');
  });

  describe('malformed replies fail the migration with what was wrong', () => {
    const bad = new Uint8Array([0xc1, 0xc1, 0xc1]);
    let msgpackError = '';
    try { packr.unpack(bad); } catch (e) { msgpackError = (e as Error).message; }
    const frame = (body: Uint8Array): Buffer => { const b = Buffer.alloc(4 + body.length); b.writeUInt32BE(body.length, 0); b.set(body, 4); return b; };
    const long = 'x'.repeat(200);
    const cases: [string, Buffer, string][] = [
      ['bad msgpack', frame(bad), msgpackError],
      ['a length over 2^30, alone', Buffer.from([0x40, 0, 0, 1]), 'reply frame of 1073741825 bytes'],
      ['a length of 2^32 - 1 after a good reply', Buffer.concat([reply({ t: 'ack', kib: 0 }), Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2])]), 'reply frame of 4294967295 bytes'],
      ['null', reply(null), 'not a reply: null'],
      ['undefined', reply(undefined), 'not a reply: undefined'],
      ['a number', reply(5), 'not a reply: 5'],
      ['a string', reply('ack'), 'not a reply: "ack"'],
      ['no type', reply({ kib: 5 }), 'not a reply: {"kib":5}'],
      ['an unknown type', reply({ t: 'bogus' }), 'not a reply: {"t":"bogus"}'],
      ['an unknown type with an ack\'s field', reply({ t: 'bogus', kib: 5 }), 'not a reply: {"t":"bogus","kib":5}'],
      ['an unknown type with complete\'s fields', reply({ t: 'bogus', normal: 1, zero: 2 }), 'not a reply: {"t":"bogus","normal":1,"zero":2}'],
      ['an unknown type with digests', reply({ t: 'bogus', digests: new Uint8Array(2) }), 'not a reply: {"t":"bogus","digests":{"0":0,"1":0}}'],
      ['an unknown type with a message', reply({ t: 'bogus', message: 'm' }), 'not a reply: {"t":"bogus","message":"m"}'],
      ['an ack without kib', reply({ t: 'ack' }), 'not a reply: {"t":"ack"}'],
      ['an ack of a string', reply({ t: 'ack', kib: '5' }), 'not a reply: {"t":"ack","kib":"5"}'],
      ['an ack of a negative number', reply({ t: 'ack', kib: -1 }), 'not a reply: {"t":"ack","kib":-1}'],
      ['an ack of infinity', reply({ t: 'ack', kib: Infinity }), 'not a reply: {"t":"ack","kib":null}'],
      ['an ack of NaN', reply({ t: 'ack', kib: NaN }), 'not a reply: {"t":"ack","kib":null}'],
      ['complete without zero', reply({ t: 'complete', normal: 1 }), 'not a reply: {"t":"complete","normal":1}'],
      ['complete without normal', reply({ t: 'complete', zero: 1 }), 'not a reply: {"t":"complete","zero":1}'],
      ['complete with an ack\'s field', reply({ t: 'complete', kib: 1 }), 'not a reply: {"t":"complete","kib":1}'],
      ['complete of a negative count', reply({ t: 'complete', normal: 1, zero: -2 }), 'not a reply: {"t":"complete","normal":1,"zero":-2}'],
      ['digests of a string', reply({ t: 'digests', digests: 'abc' }), 'not a reply: {"t":"digests","digests":"abc"}'],
      ['an error of a number', reply({ t: 'error', message: 5 }), 'not a reply: {"t":"error","message":5}'],
      ['a long one, cut at 80 characters', reply({ t: 'error', message: 5, more: long }), `not a reply: ${JSON.stringify({ t: 'error', message: 5, more: long }).slice(0, 80)}`],
    ];
    for (const [name, bytes, what] of cases) {
      it(name, { timeout: T }, async () => {
        const h = await hostile((s) => s.write(bytes)); // and keeps the connection open
        const b = bridgeTo(h.port, 5000);
        b.post(new Uint8Array(64));
        expect(await within(b.finished, 'the failure')).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} sent a malformed reply: ${what}` });
        expect(state(b)).toBe(DestState.FAILED);
        await until(() => h.closed === 1, 'the connection is closed');
      });
    }

    it('a length of exactly 2^30 is no error by itself: the reply is awaited', { timeout: T }, async () => {
      const h = await hostile((s) => s.write(Buffer.from([0x40, 0, 0, 0, 1, 2, 3])));
      const b = bridgeTo(h.port, 5000);
      b.post(new Uint8Array(64));
      await until(() => h.bytes === 64, 'the frame');
      await settle();
      expect(b.out.settled).toBe(false);
      h.sockets[0]!.end();
      expect(await within(b.finished, 'the failure')).toEqual({ digests: null, error: `the connection to ${HOST}:${h.port} closed before the migration completed` });
    });

    it('zero is a valid ack and valid counts', { timeout: T }, async () => {
      const h = await hostile((s) => s.write(Buffer.concat([reply({ t: 'ack', kib: 0 }), reply({ t: 'complete', normal: 0, zero: 0 }), reply({ t: 'digests', digests: new Uint8Array(0) })])));
      const b = bridgeTo(h.port, 5000);
      b.post(new Uint8Array(64));
      const got = await within(b.finished, 'the digests');
      expect(got.error).toBeNull();
      expect(got.digests!.length).toBe(0);
      expect(state(b)).toBe(DestState.COMPLETE);
    });
  });

  it('several replies in one chunk', { timeout: T }, async () => {
    const digests = Uint8Array.from(range(1, 33));
    const h = await hostile((s) => s.write(Buffer.concat([reply({ t: 'ack', kib: 7 }), reply({ t: 'complete', normal: 1, zero: 1 }), reply({ t: 'digests', digests })])));
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    const got = await within(b.finished, 'the digests');
    expect(got.error).toBeNull();
    expect(Array.from(got.digests!)).toEqual(Array.from(digests));
    expect(appliedKib(b)).toBe(7);
    expect(state(b)).toBe(DestState.COMPLETE);
  });

  it('replies split across chunks anywhere, the length word too', { timeout: T }, async () => {
    const digests = Uint8Array.from(range(100, 164));
    const all = Buffer.concat([reply({ t: 'ack', kib: 3 }), reply({ t: 'ack', kib: 300 }), reply({ t: 'complete', normal: 2, zero: 0 }), reply({ t: 'digests', digests })]);
    const h = await hostile((s) => {
      s.setNoDelay(true);
      void (async () => { for (let at = 0; at < all.length; at += 3) { s.write(all.subarray(at, at + 3)); await sleep(2); } })();
    });
    const b = bridgeTo(h.port, 5000);
    const credit = notified(b.words, DestWord.APPLIED_KIB, 0, 10_000);
    b.post(new Uint8Array(64));
    const got = await within(b.finished, 'the digests');
    expect(got.error).toBeNull();
    expect(Array.from(got.digests!)).toEqual(Array.from(digests));
    expect(appliedKib(b)).toBe(300);
    expect(state(b)).toBe(DestState.COMPLETE);
    expect(await credit.value).toBe('ok');
  });

  it('a chunk that ends inside the next reply, its length word whole: the reply waits for its rest', { timeout: T }, async () => {
    const digests = Uint8Array.from(range(0, 48));
    const [ack, complete, dg] = [reply({ t: 'ack', kib: 3 }), reply({ t: 'complete', normal: 2, zero: 0 }), reply({ t: 'digests', digests })];
    const pieces = [Buffer.concat([ack, complete.subarray(0, 6)]), Buffer.concat([complete.subarray(6), dg.subarray(0, 9)]), dg.subarray(9)];
    const h = await hostile((s) => {
      s.setNoDelay(true);
      void (async () => { for (const p of pieces) { s.write(p); await sleep(20); } })();
    });
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    const got = await within(b.finished, 'the digests');
    expect(got.error).toBeNull();
    expect(Array.from(got.digests!)).toEqual(Array.from(digests));
    expect(appliedKib(b)).toBe(3);
    expect(state(b)).toBe(DestState.COMPLETE);
  });

  it('a connection closed after complete but before the digests: the migration completed, the digests are missing', { timeout: T }, async () => {
    const h = await hostile((s) => s.end(reply({ t: 'complete', normal: 1, zero: 0 })));
    const b = bridgeTo(h.port, 5000);
    const complete = notified(b.words, DestWord.STATE, DestState.RECEIVING, 10_000);
    b.post(new Uint8Array(64));
    expect(await within(b.finished, 'the end')).toEqual({ digests: null, error: `the connection to ${HOST}:${h.port} closed before the destination sent its page digests` });
    expect(state(b)).toBe(DestState.COMPLETE);
    expect(await complete.value).toBe('ok');
  });

  it('a connection closed before complete fails the migration', { timeout: T }, async () => {
    const h = await hostile((s) => s.end(reply({ t: 'ack', kib: 0 })));
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    expect(await within(b.finished, 'the end')).toEqual({ digests: null, error: `the connection to ${HOST}:${h.port} closed before the migration completed` });
    expect(state(b)).toBe(DestState.FAILED);
  });

  it('after the digests, frames are ignored and the deadline is gone', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile((s, hh) => { if (hh.bytes === 300 * KIB) s.write(Buffer.concat([reply({ t: 'complete', normal: 0, zero: 0 }), reply({ t: 'digests', digests: new Uint8Array(16) })])); });
    const b = bridgeTo(h.port, 1000);
    b.post(new Uint8Array(300 * KIB)); // owed, and never acknowledged
    const got = await within(b.finished, 'the digests');
    expect(got).toEqual({ digests: got.digests, error: null });
    expect(Array.from(got.digests!)).toEqual(Array.from(new Uint8Array(16)));
    expect(vi.getTimerCount()).toBe(0);
    vi.advanceTimersByTime(5000);
    b.post(new Uint8Array(10));
    await settle();
    await settle();
    expect(h.bytes).toBe(300 * KIB);
    expect(h.connections).toBe(1);
    expect(state(b)).toBe(DestState.COMPLETE);
  });

  it('nothing after the digests counts: an error reply in the same chunk neither fails the migration nor closes the connection', { timeout: T }, async () => {
    const h = await hostile((s) => s.write(Buffer.concat([reply({ t: 'complete', normal: 1, zero: 0 }), reply({ t: 'digests', digests: new Uint8Array(16) }), reply({ t: 'error', message: 'late' })])));
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    const got = await within(b.finished, 'the digests');
    expect(got.error).toBeNull();
    expect(got.digests!.length).toBe(16);
    await settle();
    expect(h.closed).toBe(0); // the destination ends the connection, not the source
    expect(state(b)).toBe(DestState.COMPLETE);
    h.sockets[0]!.end();
    await until(() => h.closed === 1, 'the connection is closed');
    await settle();
    expect(state(b)).toBe(DestState.COMPLETE);
    expect(b.out.value).toBe(got);
  });

  it('after a failure, frames are ignored', { timeout: T }, async () => {
    const h = await hostile((s) => s.write(reply({ t: 'error', message: 'no' })));
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    await within(b.finished, 'the failure');
    await until(() => h.closed === 1, 'the connection is closed');
    b.post(new Uint8Array(10));
    await settle();
    await settle();
    expect(h.connections).toBe(1);
    expect(h.bytes).toBe(64);
  });

  it('close() stops everything: the deadline, the port, the connection', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile();
    const b = bridgeTo(h.port, 1000);
    b.post(new Uint8Array(300 * KIB));
    await until(() => h.bytes === 300 * KIB, 'the frame');
    expect(vi.getTimerCount()).toBe(1);
    const portClosed = new Promise<void>((resolve) => b.workerPort.once('close', () => resolve()));
    b.close();
    expect(vi.getTimerCount()).toBe(0);
    await within(portClosed, 'the port closes');
    await until(() => h.closed === 1, 'the connection is closed');
    expect(await within(b.finished, 'the end')).toEqual({ digests: null, error: `the connection to ${HOST}:${h.port} closed before the migration completed` });
    expect(state(b)).toBe(DestState.FAILED);
    b.post(new Uint8Array(10));
    await settle();
    expect(h.connections).toBe(1);
    expect(h.bytes).toBe(300 * KIB);
  });
});

describe('connectDestination after complete, and replies after the end', () => {
  it('once the destination said complete, nothing is owed: a slow digest is the watchdog\'s business, not a stall', { timeout: T }, async () => {
    vi.useFakeTimers(DEADLINE_TIMERS);
    const h = await hostile((s, hh) => { if (hh.bytes >= 300 * KIB) s.write(reply({ t: 'complete', normal: 75, zero: 0 })); });
    const b = bridgeTo(h.port, 1000);
    b.post(new Uint8Array(300 * KIB)); // more than an ack's worth, never acked
    await until(() => state(b) === DestState.COMPLETE, 'complete');
    vi.advanceTimersByTime(5000);
    await settle();
    expect(b.out.settled).toBe(false);
    expect(state(b)).toBe(DestState.COMPLETE);
  });

  it('a failure ends the reply loop: a complete behind an error in the same chunk changes nothing', { timeout: T }, async () => {
    const h = await hostile((s) => s.write(Buffer.concat([reply({ t: 'error', message: 'disk full' }), reply({ t: 'complete', normal: 1, zero: 0 })])));
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    expect(await within(b.finished, 'the failure')).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} failed: disk full` });
    expect(state(b)).toBe(DestState.FAILED);
  });

  it('digests before complete are a protocol error that fails the migration', { timeout: T }, async () => {
    const h = await hostile((s) => s.write(reply({ t: 'digests', digests: new Uint8Array(16) })));
    const b = bridgeTo(h.port, 5000);
    b.post(new Uint8Array(64));
    expect(await within(b.finished, 'the failure')).toEqual({ digests: null, error: `the destination at ${HOST}:${h.port} sent its page digests before it completed the migration` });
    expect(state(b)).toBe(DestState.FAILED);
  });
});
