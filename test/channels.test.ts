import { MessageChannel } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { DEST_WORDS, DestWord, type MigrationChannel, PortChannel, QueueChannel } from '../src/migration/channel.ts';
import { RingChannel, RingSource, createStreamRing } from '../src/migration/stream-ring.ts';
import { encodePages, encodeSync } from '../src/migration/stream.ts';
import { QueueSource } from '../src/migration/destination-role.ts';

/**
 * One suite, run against every migration channel (the same thread's queue, the stream
 * ring to a destination thread, the port to the TCP bridge): frames arrive whole and in
 * order, and the sender is held back by credit until the receiver has applied them.
 */
interface Rig {
  ch: MigrationChannel;
  /** What has arrived so far, each frame once, releasing its space (the destination applied it). */
  receive(): Promise<Uint8Array[]>;
  /** The receiver says how much it applied (the destination's APPLIED_KIB, or ring space released). */
  credit(): void;
}

function words(): Int32Array {
  return new Int32Array(new SharedArrayBuffer(DEST_WORDS * 4));
}

const RIGS: { name: string; make(): Rig }[] = [
  {
    name: 'queue (same thread)',
    make() {
      const w = words();
      const queue: Uint8Array[] = [];
      const ch = new QueueChannel(w, queue);
      const src = new QueueSource(queue);
      let applied = 0;
      return {
        ch,
        async receive() { const out: Uint8Array[] = []; for (let f = src.next(); f; f = src.next()) { out.push(f); applied += f.length; } return out; },
        credit() { Atomics.store(w, DestWord.APPLIED_KIB, Math.floor(applied / 1024)); },
      };
    },
  },
  {
    name: 'stream ring (to a destination thread)',
    make() {
      const ring = createStreamRing();
      const ch = new RingChannel(ring, words());
      const src = new RingSource(ring);
      return {
        ch,
        async receive() { const out: Uint8Array[] = []; for (let f = src.next(); f; f = src.next()) { out.push(f.slice()); src.release(); } return out; },
        credit() { /* released as received */ },
      };
    },
  },
  {
    name: 'message port (to the TCP bridge)',
    make() {
      const w = words();
      const { port1, port2 } = new MessageChannel();
      const ch = new PortChannel(w, port1);
      const got: Uint8Array[] = [];
      let arrived = 0;
      port2.on('message', (m: Uint8Array) => { got.push(new Uint8Array(m)); arrived += m.length; });
      let applied = 0;
      return {
        ch,
        async receive() {
          // Messages arrive on this thread's event loop: wait until everything sent is here.
          while (arrived < ch.bytesSent) await new Promise((r) => setTimeout(r, 1));
          const out = got.splice(0);
          for (const f of out) applied += f.length;
          return out;
        },
        credit() { Atomics.store(w, DestWord.APPLIED_KIB, Math.floor(applied / 1024)); },
      };
    },
  },
];

/** A page frame of `pages` pages filled with `fill`. */
function frame(pages: number, fill: number): Uint8Array {
  return encodePages(1, Array.from({ length: pages }, (_, i) => i), { isZero: () => false, copy: (_p, n, into, at) => { into.fill(fill, at, at + n * 4096); } }).frame;
}

describe.each(RIGS)('the MigrationChannel contract: $name', ({ make }) => {
  it('delivers every frame whole and in order, and counts the bytes sent', async () => {
    const r = make();
    const sent = [encodeSync(1), frame(3, 7), encodeSync(2), frame(1, 9), frame(64, 1)];
    const copies = sent.map((f) => f.slice());
    for (const f of sent) { expect(r.ch.canSend()).toBe(true); r.ch.send(f); }
    expect(r.ch.bytesSent).toBe(copies.reduce((n, f) => n + f.length, 0));
    const got = await r.receive();
    expect(got.map((f) => Buffer.from(f).toString('hex'))).toEqual(copies.map((f) => Buffer.from(f).toString('hex')));
  });

  it('holds the sender back by credit: out of credit until the receiver has applied what it got', async () => {
    const r = make();
    const big = frame(1024, 3); // 4 MiB
    let frames = 0;
    while (r.ch.canSend() && frames < 100) { r.ch.send(big.slice()); frames++; }
    expect(frames, 'the window is bounded').toBeLessThan(100);
    expect(r.ch.canSend()).toBe(false);
    const w = r.ch.creditWord;
    const before = Atomics.load(w.array, w.index);
    const got = await r.receive();
    r.credit();
    expect(got).toHaveLength(frames);
    expect(r.ch.canSend(), 'credit came back').toBe(true);
    expect(Atomics.load(w.array, w.index), 'on the word a sender parks on').not.toBe(before);
  });
});

describe('the credit window and the port\'s transfers', () => {
  it('a sender may send until exactly 32 MiB are unapplied, and again once 1 KiB of them was applied', () => {
    const w = words();
    const ch = new QueueChannel(w);
    ch.send(new Uint8Array((32 << 20) - 1));
    expect(ch.canSend()).toBe(true);
    ch.send(new Uint8Array(1));
    expect(ch.canSend()).toBe(false);
    Atomics.store(w, DestWord.APPLIED_KIB, 1);
    expect(ch.canSend()).toBe(true);
  });

  it('a frame that owns its buffer is transferred (gone from the sender); a frame inside a larger buffer is copied, the buffer kept', async () => {
    const { port1, port2 } = new MessageChannel();
    const ch = new PortChannel(words(), port1);
    const got: Uint8Array[] = [];
    port2.on('message', (m: Uint8Array) => got.push(m));
    const whole = new Uint8Array([1, 2, 3, 4]);
    ch.send(whole);
    expect(whole.buffer.byteLength, 'transferred').toBe(0);
    const big = new Uint8Array([9, 9, 5, 6, 7, 9]);
    ch.send(big.subarray(2, 5));
    ch.send(big.subarray(0, 3));
    expect(big.buffer.byteLength, 'kept').toBe(6);
    while (got.length < 3) await new Promise((r) => setTimeout(r, 1));
    expect(got.map((f) => [...f])).toEqual([[1, 2, 3, 4], [5, 6, 7], [9, 9, 5]]);
    port1.close();
  });
});
