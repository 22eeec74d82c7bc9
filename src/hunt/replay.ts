import type { MigrationRunResult } from '../scenarios/migration.ts';
import { runMigrationWatched } from '../scenarios/off-thread.ts';
import { fingerprint } from './failure.ts';
import type { ReplayFile } from './replay-file.ts';

export interface ReplayOutcome {
  result: MigrationRunResult;
  /** Deterministic: the run matched the recorded fingerprint (steps, pages, stamps, DMA records). Free-run: it failed the same way. */
  reproduced: boolean;
  exact: boolean;
}

/**
 * Runs a replay file again: a deterministic run follows its recorded schedule and must
 * match its fingerprint exactly; a free-run failure is run again with its seed and
 * configuration (real threads interleave differently each time: it may or may not fail).
 */
export async function replayRun(f: ReplayFile, o: { watchdogMs?: number; burst?: number } = {}): Promise<ReplayOutcome> {
  const deterministic = f.schedule !== null;
  const result = await runMigrationWatched({ ...f.scenario, seed: f.seed }, {
    driver: deterministic ? 'deterministic' : 'free', replay: f.schedule ?? undefined,
    watchdogMs: o.watchdogMs ?? 10_000, burst: o.burst ?? 256, resumeOps: 0,
  });
  if (deterministic) {
    const same = fingerprint(result) === f.fingerprint;
    return { result, reproduced: same, exact: same };
  }
  return { result, reproduced: result.status !== 'passed', exact: false };
}
