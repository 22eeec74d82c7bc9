import { Prng } from '../util/prng.ts';
import { type Role, Step } from '../roles/role.ts';
import { describeWait } from './describe-wait.ts';

/** Picks which role steps next. */
export interface Scheduler {
  /** Index into `runnable` (the roles not known to be blocked), or -1 to stop. */
  pick(runnable: readonly number[], stepNo: number): number;
}

/** Uniform random choice among runnable roles, from a seed. */
export class RandomScheduler implements Scheduler {
  private readonly prng: Prng;
  constructor(seed: number) { this.prng = new Prng(seed); }
  pick(runnable: readonly number[]): number {
    return runnable[this.prng.below(runnable.length)]!;
  }
}

/**
 * Follows a recorded schedule exactly (role indices, one per step). Past its end it
 * stops the run, or hands over to `then` (shrinking replays shortened schedules and lets
 * a seeded scheduler finish the run).
 */
export class ReplayScheduler implements Scheduler {
  constructor(private readonly schedule: ArrayLike<number>, private readonly then?: Scheduler) {}
  pick(runnable: readonly number[], stepNo: number): number {
    if (stepNo < this.schedule.length) return this.schedule[stepNo]!;
    return this.then ? this.then.pick(runnable, stepNo) : -1;
  }
}

export class DeadlockError extends Error {
  override readonly name = 'DeadlockError';
}

export interface DeterministicResult {
  steps: number;
  /** The role index of every step taken: replaying it reproduces the run exactly. */
  schedule: Uint8Array;
}

/**
 * The deterministic driver: every role on this one thread; a scheduler picks who steps.
 * A role that reports BLOCKED is left out of the choice until some other role makes
 * progress (a blocked step changes nothing, so picking it again would be wasted). When
 * every unfinished role is blocked, the run is deadlocked, which the driver reports as
 * the watchdog does under free-run.
 */
export class DeterministicDriver {
  private schedule = new Uint8Array(1 << 16);
  private steps = 0;

  /** Called after every step with its number and the role that took it (tracers, explanations). */
  onStep: ((stepNo: number, role: number) => void) | null = null;
  /**
   * A watchdog's view from another thread: [0] the steps taken, [1] the role stepping now.
   * A step that never returns leaves [0] still and [1] naming the wedged role.
   */
  heartbeat: Int32Array | null = null;

  constructor(readonly roles: Role[], private readonly scheduler: Scheduler) {
    if (roles.length > 255) throw new Error('at most 255 roles');
  }

  /** Runs until `until()` is true, every role is done, or `maxSteps` is reached. */
  run(until: () => boolean, maxSteps = Number.MAX_SAFE_INTEGER): DeterministicResult {
    const n = this.roles.length;
    const blocked = new Uint8Array(n);
    const done = new Uint8Array(n);
    const runnable: number[] = [];
    let live = n;
    let rechecked = false;
    while (!until() && live > 0 && this.steps < maxSteps) {
      runnable.length = 0;
      for (let i = 0; i < n; i++) if (!blocked[i] && !done[i]) runnable.push(i);
      if (runnable.length === 0) {
        // Before calling it a deadlock, let every role look once more: a role that
        // changed shared state in a step it reported as blocked would otherwise hide
        // that change from the others.
        if (rechecked) throw new DeadlockError(this.deadlockReport());
        rechecked = true;
        blocked.fill(0);
        continue;
      }
      const r = this.scheduler.pick(runnable, this.steps);
      if (r < 0) break;
      this.record(r);
      const hb = this.heartbeat;
      if (hb !== null) Atomics.store(hb, 1, r);
      const s = this.roles[r]!.step();
      if (hb !== null) Atomics.store(hb, 0, this.steps);
      this.onStep?.(this.steps - 1, r);
      if (s === Step.PROGRESS) { blocked.fill(0); rechecked = false; }
      else if (s === Step.BLOCKED) blocked[r] = 1;
      else if (!done[r]) { done[r] = 1; live--; blocked.fill(0); }
    }
    return { steps: this.steps, schedule: this.schedule.slice(0, this.steps) };
  }

  /** Steps one named role once (litmus interleavings). */
  stepRole(index: number): Step {
    this.record(index);
    return this.roles[index]!.step();
  }

  get stepCount(): number { return this.steps; }
  get recorded(): Uint8Array { return this.schedule.slice(0, this.steps); }

  private record(r: number): void {
    if (this.steps === this.schedule.length) {
      const bigger = new Uint8Array(this.schedule.length * 2);
      bigger.set(this.schedule);
      this.schedule = bigger;
    }
    this.schedule[this.steps++] = r;
  }

  deadlockReport(): string {
    const names = this.roles.map((r) => r.name);
    return `deadlock at step ${this.steps}: no role can make progress\n` + this.roles
      .map((r) => `  ${r.name} ${describeWait(r.wait.code, r.wait.arg, r.wait.arg2, names)}`)
      .join('\n');
  }
}
