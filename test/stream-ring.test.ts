import { describe, expect, it } from 'vitest';
import { DEST_WORDS, DestState, DestWord } from '../src/migration/channel.ts';
import { RING_BYTES, RING_MAX_FRAME, RingChannel, RingSource, createStreamRing } from '../src/migration/stream-ring.ts';

/** A frame as the stream writes it: u32 BE length of the rest, then `fill` bytes. */
function frameIn(into: Uint8Array, fill: number): Uint8Array {
  new DataView(into.buffer, into.byteOffset, into.length).setUint32(0, into.length - 4);
  into.fill(fill, 4);
  return into;
}

describe('the in-process stream ring', () => {
  it('delivers frames in order across the wrap, each in one piece, and gives space back only on release', () => {
    const ring = createStreamRing();
    const tx = new RingChannel(ring, new Int32Array(DEST_WORDS));
    const rx = new RingSource(ring);
    const size = (RING_MAX_FRAME / 2) + 3; // odd-sized: positions advance in 8-byte steps
    let sent = 0;
    let received = 0;
    for (let round = 0; round < 20; round++) {
      // Fill it until a frame no longer fits (the credit check, canSend, stops a sender earlier).
      for (let f = tx.alloc(size); f !== null; f = tx.alloc(size)) {
        expect(f.byteOffset % 8, 'frames start 8-byte aligned').toBe(0);
        tx.send(frameIn(f, sent++ & 0xff));
      }
      expect(tx.canSend()).toBe(false);
      for (let f = rx.next(); f !== undefined; f = rx.next()) {
        expect(f.length).toBe(size);
        expect([f[4], f[size - 1]]).toEqual([received & 0xff, received & 0xff]);
        received++;
        rx.release();
      }
    }
    expect(received).toBe(sent);
    expect(sent).toBeGreaterThan(2 * (RING_BYTES / size)); // it went round the ring
  });

  it('copies in frames built elsewhere, and refuses one larger than it takes', () => {
    const ring = createStreamRing();
    const tx = new RingChannel(ring, new Int32Array(DEST_WORDS));
    const rx = new RingSource(ring);
    tx.send(frameIn(new Uint8Array(13), 7));
    const f = rx.next()!;
    expect(Array.from(f.subarray(4))).toEqual(new Array(9).fill(7));
    rx.release();
    expect(rx.next()).toBeUndefined();
    expect(() => tx.alloc(RING_MAX_FRAME + 1)).toThrow(/larger than the stream ring takes/);
  });
});

describe('the stream ring at its edges', () => {
  it('four frames of the largest size fill it exactly, with no wrap; the sender may send while half is free', () => {
    const ring = createStreamRing();
    const tx = new RingChannel(ring, new Int32Array(DEST_WORDS));
    const rx = new RingSource(ring);
    for (let i = 0; i < 4; i++) {
      expect(tx.canSend(), `frame ${i}`).toBe(i <= 2); // free 32, 24, 16 (exactly half), 8 MiB
      const f = tx.alloc(RING_MAX_FRAME);
      expect(f, `frame ${i} fits`).not.toBeNull();
      expect(f!.byteOffset - ring.byteLength + RING_BYTES, 'in order, no wrap').toBe(i * RING_MAX_FRAME);
      tx.send(frameIn(f!, i + 1));
    }
    expect(tx.alloc(8), 'full').toBeNull();
    expect(tx.bytesSent).toBe(4 * RING_MAX_FRAME);
    for (let i = 0; i < 4; i++) {
      const f = rx.next()!;
      expect([f.length, f[4]]).toEqual([RING_MAX_FRAME, i + 1]);
      rx.release();
    }
    expect(rx.next()).toBeUndefined();
  });

  it('a full ring does not hold a sender whose destination failed or was cancelled: the frame is dropped, nothing counted', () => {
    for (const word of [DestWord.STATE, DestWord.CANCEL]) {
      const ring = createStreamRing();
      const dest = new Int32Array(DEST_WORDS);
      const tx = new RingChannel(ring, dest);
      for (let f = tx.alloc(RING_MAX_FRAME); f !== null; f = tx.alloc(RING_MAX_FRAME)) tx.send(frameIn(f, 1));
      const sent = tx.bytesSent;
      Atomics.store(dest, word, word === DestWord.STATE ? DestState.FAILED : 1);
      tx.send(frameIn(new Uint8Array(16), 2));
      expect(tx.bytesSent).toBe(sent);
    }
  });

  it('an empty ring tells the reader where to park: the write count it saw', () => {
    const ring = createStreamRing();
    const tx = new RingChannel(ring, new Int32Array(DEST_WORDS));
    const rx = new RingSource(ring);
    expect(rx.next()).toBeUndefined();
    expect(rx.parkWord.value).toBe(0);
    tx.send(frameIn(new Uint8Array(13), 7));
    rx.next();
    rx.release();
    expect(rx.next()).toBeUndefined();
    const park = rx.parkWord;
    expect(park.value).toBe(16); // 13 bytes take 16
    expect(Atomics.load(park.array, park.index)).toBe(park.value);
  });
});
