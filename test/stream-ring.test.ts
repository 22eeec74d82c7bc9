import { describe, expect, it } from 'vitest';
import { DEST_WORDS } from '../src/migration/channel.ts';
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
