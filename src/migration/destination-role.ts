import { NOT_WAITING, type Role, Step, type Wait, WaitCode, waitFor } from '../roles/role.ts';
import { DestState } from './channel.ts';
import type { Destination } from './destination.ts';

/** Where the destination gets frames from, without blocking. */
export interface FrameSource {
  next(): Uint8Array | undefined;
  /** The frame from next() has been applied (its memory may be reused). */
  release?(): void;
  /** A word to park on while there is no frame. */
  readonly parkWord?: { array: Int32Array; index: number; value: number };
}

export class QueueSource implements FrameSource {
  constructor(private readonly queue: Uint8Array[]) {}
  next(): Uint8Array | undefined { return this.queue.shift(); }
}

/** The in-process destination as a role: each step applies one frame. */
export class DestinationRole implements Role {
  readonly name = 'destination';
  wait: Wait = NOT_WAITING;
  progress = 0;

  constructor(readonly dest: Destination, private readonly source: FrameSource) {}

  step(): Step {
    const s = this.dest.state;
    if (s !== DestState.RECEIVING) return Step.DONE;
    const frame = this.source.next();
    if (frame === undefined) {
      this.wait = waitFor(WaitCode.SOURCE, 0, 0, this.source.parkWord);
      return Step.BLOCKED;
    }
    this.dest.receive(frame);
    this.source.release?.();
    this.progress++;
    return Step.PROGRESS;
  }
}
