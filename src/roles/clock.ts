/** Milliseconds, from the wall clock (free-run) or from steps taken (deterministic). */
export interface Clock {
  nowMs(): number;
  /** Time passes only as steps are taken: waiting for time means taking steps. */
  readonly virtual: boolean;
}

export const WALL_CLOCK: Clock = { nowMs: () => performance.now(), virtual: false };

/** Deterministic time: every step of any role advances the clock by `usPerStep`. */
export class StepClock implements Clock {
  readonly virtual = true;
  constructor(private readonly steps: () => number, private readonly usPerStep = 1) {}
  nowMs(): number {
    return (this.steps() * this.usPerStep) / 1000;
  }
}
