import { Prng } from '../util/prng.ts';
import { UserError } from '../util/errors.ts';
import { type Scheduler, RandomScheduler, ReplayScheduler } from './deterministic.ts';
import { PctScheduler } from './pct-scheduler.ts';

/** How the deterministic driver picks who steps next (hunt's --strategy). */
export type Strategy = 'random' | 'pct';
export const STRATEGIES: readonly Strategy[] = ['random', 'pct'];

/**
 * The scheduler for a run: a recorded schedule if one is given (past its end the run
 * stops, or with `continueWith` the strategy finishes it), else the strategy drawn from
 * the run's seed.
 */
export function schedulerFor(strategy: Strategy, seed: number, roles: number, replay?: Uint8Array, continueWith = false): Scheduler {
  const s = Prng.derive(seed, 3000);
  const drawn = strategy === 'pct' ? new PctScheduler(s, roles) : new RandomScheduler(s);
  if (replay) {
    // A schedule from a file names roles by index: one this run does not have is the file's mistake.
    for (let i = 0; i < replay.length; i++) {
      if (replay[i]! >= roles) throw new UserError(`schedule: step ${i} names role ${replay[i]}, but this scenario runs ${roles} roles`);
    }
    return new ReplayScheduler(replay, continueWith ? drawn : undefined);
  }
  return drawn;
}
