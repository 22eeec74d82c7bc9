import type { MessagePort } from 'node:worker_threads';

/**
 * The migration thread's end of the stream. The sender checks `canSend()` before a page
 * batch, which applies back-pressure by credit: bytes sent but not yet consumed by the
 * destination may not exceed the window, published in a shared word so that credit
 * works across threads. Then sending a batch never blocks.
 */
export interface MigrationChannel {
  send(frame: Uint8Array): void;
  canSend(): boolean;
  /** Where to park while out of credit: the destination's applied-bytes word, or the stream ring's read count. */
  readonly creditWord: { array: Int32Array; index: number };
  readonly bytesSent: number;
  /** Space for an `n`-byte frame where it will be delivered from (null: none now), so it is built in place. */
  alloc?(n: number): Uint8Array | null;
}

/** Shared words of one migration: applied bytes (in KiB, so 2^31 KiB is the limit) and the destination's state. */
/** CANCEL is written by the VMM (migrate_cancel); the migration thread checks it between batches. */
export const DestWord = { APPLIED_KIB: 0, STATE: 16, ERROR: 17, CANCEL: 18 } as const;
export const enum DestState { RECEIVING = 0, COMPLETE = 1, FAILED = 2 }
export const DEST_WORDS = 32;

const WINDOW_BYTES = 32 << 20;

abstract class CreditChannel implements MigrationChannel {
  bytesSent = 0;
  readonly creditWord: { array: Int32Array; index: number };
  constructor(readonly words: Int32Array) {
    this.creditWord = { array: words, index: DestWord.APPLIED_KIB };
  }
  canSend(): boolean {
    const applied = Atomics.load(this.words, DestWord.APPLIED_KIB) * 1024;
    return this.bytesSent - applied < WINDOW_BYTES;
  }
  send(frame: Uint8Array): void {
    this.bytesSent += frame.length;
    this.deliver(frame);
  }
  protected abstract deliver(frame: Uint8Array): void;
}

/** Same-thread delivery (deterministic driver, tests): frames queue up for the destination role. */
export class QueueChannel extends CreditChannel {
  constructor(words: Int32Array, readonly queue: Uint8Array[] = []) { super(words); }
  protected deliver(frame: Uint8Array): void { this.queue.push(frame); }
}

/** To the main thread's TCP bridge (tcp.ts) through a MessagePort; the frame's buffer is transferred, not copied. */
export class PortChannel extends CreditChannel {
  constructor(words: Int32Array, private readonly port: MessagePort) { super(words); }
  protected deliver(frame: Uint8Array): void {
    const whole = frame.byteOffset === 0 && frame.byteLength === frame.buffer.byteLength;
    const f = whole ? frame : frame.slice();
    this.port.postMessage(f, [f.buffer as ArrayBuffer]);
  }
}
