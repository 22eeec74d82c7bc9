import { DestState, DestWord, type MigrationChannel } from './channel.ts';
import type { FrameSource } from './destination-role.ts';

/**
 * The in-process stream between the migration thread and the destination worker: a
 * single-producer, single-consumer byte ring in one SharedArrayBuffer, the part a socket
 * buffer plays between two hosts. Frames are written where they will be read, so a page
 * batch is encoded straight into the ring (no allocation, no transfer, no copy), and
 * the destination decodes and applies it in place before it releases the space.
 *
 * Layout: two control lines, then the data area of RING_BYTES. WRITE and READ count
 * bytes (mod 2^32); a frame occupies its length rounded up to 8 bytes and never wraps:
 * when it does not fit before the end, a WRAP marker in the length word sends the reader
 * back to the start.
 */
export const RING_BYTES = 32 << 20;
/** The largest frame the ring takes: a quarter, so that free >= half always fits one with its wrap. */
export const RING_MAX_FRAME = RING_BYTES / 4;
const CONTROL_BYTES = 128;
const WRITE = 0;
const READ = 16;
const WRAP = 0xffffffff;
const MASK = RING_BYTES - 1;

export function createStreamRing(): SharedArrayBuffer {
  return new SharedArrayBuffer(CONTROL_BYTES + RING_BYTES);
}

const align8 = (n: number): number => (n + 7) & ~7;

/** The migration thread's end. */
export class RingChannel implements MigrationChannel {
  readonly creditWord: { array: Int32Array; index: number };
  bytesSent = 0;
  private readonly words: Int32Array;
  private readonly data: Uint8Array;
  private readonly view: DataView;
  /** Ring bytes the frame handed out by alloc() and not yet sent takes (with its wrap), or -1. */
  private reserved = -1;

  constructor(ring: SharedArrayBuffer, private readonly destWords: Int32Array) {
    this.words = new Int32Array(ring, 0, CONTROL_BYTES / 4);
    this.data = new Uint8Array(ring, CONTROL_BYTES, RING_BYTES);
    this.view = new DataView(ring, CONTROL_BYTES, RING_BYTES);
    this.creditWord = { array: this.words, index: READ };
  }

  private free(): number {
    return RING_BYTES - ((Atomics.load(this.words, WRITE) - Atomics.load(this.words, READ)) >>> 0);
  }

  canSend(): boolean {
    return this.free() >= RING_BYTES / 2;
  }

  /** Space for a frame of `n` bytes inside the ring, or null when there is none now. */
  alloc(n: number): Uint8Array | null {
    if (n > RING_MAX_FRAME) throw new Error(`a frame of ${n} bytes is larger than the stream ring takes (${RING_MAX_FRAME})`);
    const w = Atomics.load(this.words, WRITE) >>> 0;
    const pos = w & MASK;
    const need = align8(n);
    const skip = pos + need > RING_BYTES ? RING_BYTES - pos : 0;
    if (skip + need > this.free()) return null;
    if (skip > 0) this.view.setUint32(pos, WRAP);
    this.reserved = skip + need;
    const start = (w + skip) & MASK;
    return this.data.subarray(start, start + n);
  }

  /**
   * Publishes a frame. One built by alloc() is in place already; another (header, sync,
   * completion: small) is copied in, and if the ring is full this waits for the reader,
   * as a socket write blocks: bounded by the destination failing or a cancel.
   */
  send(frame: Uint8Array): void {
    if (this.reserved < 0 || frame.buffer !== this.data.buffer) {
      for (;;) {
        const read = Atomics.load(this.words, READ);
        const into = this.alloc(frame.length);
        if (into !== null) { into.set(frame); break; }
        if (Atomics.load(this.destWords, DestWord.STATE) === DestState.FAILED || Atomics.load(this.destWords, DestWord.CANCEL) !== 0) return;
        Atomics.wait(this.words, READ, read, 10);
      }
    }
    const taken = this.reserved;
    this.reserved = -1;
    this.bytesSent += frame.length;
    Atomics.store(this.words, WRITE, (Atomics.load(this.words, WRITE) + taken) | 0);
    Atomics.notify(this.words, WRITE);
  }
}

/** The destination's end: whole frames, as views into the ring, released once applied. */
export class RingSource implements FrameSource {
  private readonly words: Int32Array;
  private readonly data: Uint8Array;
  private readonly view: DataView;
  private taken = 0;
  /** The WRITE count next() last found the ring empty at: where to park (a later frame changes it). */
  private seenWrite = 0;

  constructor(ring: SharedArrayBuffer) {
    this.words = new Int32Array(ring, 0, CONTROL_BYTES / 4);
    this.data = new Uint8Array(ring, CONTROL_BYTES, RING_BYTES);
    this.view = new DataView(ring, CONTROL_BYTES, RING_BYTES);
  }

  /** Where to park while the ring is empty. */
  get parkWord(): { array: Int32Array; index: number; value: number } {
    return { array: this.words, index: WRITE, value: this.seenWrite };
  }

  next(): Uint8Array | undefined {
    for (;;) {
      const r = Atomics.load(this.words, READ) >>> 0;
      const w = Atomics.load(this.words, WRITE);
      if (r === w >>> 0) { this.seenWrite = w; return undefined; }
      const pos = r & MASK;
      const n = this.view.getUint32(pos);
      if (n === WRAP) {
        Atomics.store(this.words, READ, (r + RING_BYTES - pos) | 0);
        Atomics.notify(this.words, READ);
        continue;
      }
      this.taken = align8(4 + n);
      return this.data.subarray(pos, pos + 4 + n);
    }
  }

  /** The frame from next() has been applied: its space goes back to the writer. */
  release(): void {
    Atomics.store(this.words, READ, (Atomics.load(this.words, READ) + this.taken) | 0);
    Atomics.notify(this.words, READ);
    this.taken = 0;
  }
}
