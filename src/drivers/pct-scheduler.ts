import { Prng } from '../util/prng.ts';
import type { Scheduler } from './deterministic.ts';

/**
 * A PCT-style priority scheduler (Burckhardt et al., "A randomized scheduler with
 * probabilistic guarantees of finding bugs", ASPLOS 2010): every role has a random
 * priority; the runnable role with the highest priority runs; at d - 1 random change
 * points the running role drops below every other. Runs with few, deep preemptions
 * (one role running on for many steps while another sits between two steps of a
 * protocol) come out far more often than under uniform random choice.
 *
 * PCT assumes threads that end; vCPUs loop until stopped, so a vCPU with the top
 * priority would starve everyone for good. vmemlab applies PCT per window: every
 * `window` steps the priorities are drawn again and d - 1 new change points are placed
 * in the window. The number of priority changes stays bounded (d - 1 per window), and
 * every role gets windows in which it leads.
 */
export class PctScheduler implements Scheduler {
  private readonly prng: Prng;
  private priority: number[] = [];
  private changes: number[] = [];
  private windowStart = -1;
  private low = 0;

  constructor(seed: number, private readonly roles: number, readonly depth = 3, readonly window = 256) {
    if (depth < 1) throw new Error('PCT depth must be at least 1');
    this.prng = new Prng(seed);
  }

  private newWindow(at: number): void {
    this.windowStart = at;
    // Distinct priorities depth .. depth + roles - 1, in random order (Fisher-Yates).
    const p = Array.from({ length: this.roles }, (_, i) => this.depth + i);
    for (let i = p.length - 1; i > 0; i--) {
      const j = this.prng.below(i + 1);
      [p[i], p[j]] = [p[j]!, p[i]!];
    }
    this.priority = p;
    this.changes = Array.from({ length: this.depth - 1 }, () => at + this.prng.below(this.window)).sort((a, b) => a - b);
    this.low = this.depth - 1;
  }

  pick(runnable: readonly number[], stepNo: number): number {
    if (stepNo >= this.windowStart + this.window || this.windowStart < 0) this.newWindow(stepNo);
    let best = runnable[0]!;
    for (const r of runnable) if (this.priority[r]! > this.priority[best]!) best = r;
    // A change point: the role about to run drops below every other (priorities d-1, d-2, ...).
    while (this.changes.length > 0 && this.changes[0]! <= stepNo) {
      this.changes.shift();
      this.priority[best] = this.low--;
      best = runnable[0]!;
      for (const r of runnable) if (this.priority[r]! > this.priority[best]!) best = r;
    }
    return best;
  }
}
