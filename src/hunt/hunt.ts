import { appendFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Strategy } from '../drivers/strategy.ts';
import { watchWedged } from '../drivers/wedge-watch.ts';
import { type MigrationScenario, roleNames } from '../scenarios/migration.ts';
import type { FailureKind } from './failure.ts';
import type { HuntRun, HuntTask } from './hunt-run.ts';
import { HuntPool } from './pool.ts';
import { writeReplayFile } from './replay-file.ts';

export type HuntStrategy = Strategy | 'free';

/** `--shard i/n`: this shard runs seeds s with (s - 1) % n == i - 1, as test runners shard suites. */
export interface Shard { index: number; count: number }

export function shardSeeds(seeds: number, shard: Shard): number[] {
  const out: number[] = [];
  for (let s = shard.index; s <= seeds; s += shard.count) out.push(s);
  return out;
}

export interface HuntOptions {
  scenario: MigrationScenario;
  strategies: HuntStrategy[];
  /** Seeds 1..seeds (before sharding). */
  seeds: number;
  shard: Shard;
  /** Run every seed; otherwise each strategy stops at its first failure. */
  all: boolean;
  workers: number;
  /** A pool to run on (kept open: several hunts in a row share one); otherwise the hunt makes and closes its own. */
  pool?: HuntPool;
  /** Replay files and JSON lines go here (created on demand); none when undefined. */
  outDir?: string;
  watchdogMs: number;
  burst: number;
  /** Tests only: crash or wedge one role of every run after some steps. */
  fault?: HuntTask['fault'];
  /** After each run (null: cancelled), with the runs done and planned. */
  onRun?: (r: HuntRun | null, done: number, total: number) => void;
}

/** One line of a shard's JSON lines file. */
export type HuntLine =
  | { type: 'run'; strategy: HuntStrategy; seed: number; failure: FailureKind | null; summary: string | null; steps: number | null; seconds: number; replay: string | null; acted?: boolean | null }
  | { type: 'hunt'; scenario: MigrationScenario; strategies: HuntStrategy[]; seeds: number; shard: Shard; all: boolean };

export interface StrategyReport {
  strategy: HuntStrategy;
  /** Runs counted: every seed with --all, else the seeds up to the first failure. */
  runs: number;
  failures: number;
  /** Runs in which an injected bug acted (null: none injected): detection is failures / acted / runs. */
  acted: number | null;
  /** failures / runs. */
  detectionRate: number;
  kinds: Partial<Record<FailureKind, number>>;
  /** The lowest failing seed, and the runs, steps (deterministic) and run seconds up to and including it. */
  firstDetection: { seed: number; runs: number; steps: number | null; seconds: number; summary: string; replay: string | null } | null;
  /** Median steps of the failing runs (deterministic). */
  medianStepsToDetection: number | null;
}

export interface HuntReport {
  seeds: number;
  shards: Shard[];
  all: boolean;
  strategies: StrategyReport[];
  replayFiles: string[];
  /** One hunt (not merged shards): the process's peak resident memory seen after each run, and the most any worker held between runs. */
  memory?: { peakRssBytes: number; heldBytes: number; workers: number };
}

/**
 * The report from run lines: the same function for one hunt and for merged shards, so
 * totals agree. Without --all a strategy counts only its seeds up to its lowest failing
 * seed, which every shard has run (a shard stops only at its own first failure).
 */
export function summarize(lines: HuntLine[], strategies: HuntStrategy[], all: boolean): StrategyReport[] {
  return strategies.map((strategy): StrategyReport => {
    const runs = lines.filter((l): l is Extract<HuntLine, { type: 'run' }> => l.type === 'run' && l.strategy === strategy).sort((a, b) => a.seed - b.seed);
    const first = runs.find((r) => r.failure !== null) ?? null;
    const counted = all || first === null ? runs : runs.filter((r) => r.seed <= first.seed);
    const failing = counted.filter((r) => r.failure !== null);
    const kinds: Partial<Record<FailureKind, number>> = {};
    for (const r of failing) kinds[r.failure!] = (kinds[r.failure!] ?? 0) + 1;
    const upTo = first === null ? [] : runs.filter((r) => r.seed <= first.seed);
    const steps = failing.map((r) => r.steps).filter((s): s is number => s !== null).sort((a, b) => a - b);
    const acted = counted.some((r) => r.acted === true || r.acted === false) ? counted.filter((r) => r.acted === true).length : null;
    return {
      strategy, runs: counted.length, failures: failing.length, acted, detectionRate: counted.length ? failing.length / counted.length : 0, kinds,
      firstDetection: first === null ? null : {
        seed: first.seed, runs: upTo.length,
        steps: first.steps === null ? null : upTo.reduce((n, r) => n + (r.steps ?? 0), 0),
        seconds: upTo.reduce((n, r) => n + r.seconds, 0), summary: first.summary ?? '', replay: first.replay,
      },
      medianStepsToDetection: steps.length ? steps[Math.floor((steps.length - 1) / 2)]! : null,
    };
  });
}

export function shardName(shard: Shard): string {
  return `${shard.index}-of-${shard.count}`;
}

/**
 * `vmemlab hunt`: many seeds of one scenario under each strategy, in parallel across a
 * worker pool (one run per task). Tasks go out in seed order; without --all a strategy
 * stops at its first failure: later seeds are cancelled, earlier ones still finish (one of
 * them may fail too, and become the first).
 */
export async function hunt(o: HuntOptions): Promise<{ report: HuntReport; lines: HuntLine[] }> {
  const seeds = shardSeeds(o.seeds, o.shard);
  const lines: HuntLine[] = [];
  const header: HuntLine = { type: 'hunt', scenario: o.scenario, strategies: o.strategies, seeds: o.seeds, shard: o.shard, all: o.all };
  const jsonl = o.outDir ? join(o.outDir, `hunt-${shardName(o.shard)}.jsonl`) : null;
  if (o.outDir) mkdirSync(o.outDir, { recursive: true });
  const emit = (l: HuntLine): void => {
    lines.push(l);
    if (jsonl) appendFileSync(jsonl, `${JSON.stringify(l)}\n`);
  };
  emit(header);
  const replayFiles: string[] = [];
  const pool = o.pool ?? new HuntPool(o.workers);
  const total = seeds.length * o.strategies.length;
  let done = 0;
  const names = roleNames(o.scenario);
  const memory = { peakRssBytes: process.memoryUsage.rss(), heldBytes: 0, workers: pool.workers };
  try {
    for (const strategy of o.strategies) {
      let firstFailing = Infinity;
      const aborts = new Map<number, AbortController>();
      const runSeed = async (seed: number): Promise<void> => {
        const abort = new AbortController();
        aborts.set(seed, abort);
        let r: HuntRun;
        const watch = strategy === 'free' ? null : watchWedged(names, o.watchdogMs, () => abort.abort()); // piscina terminates the worker and starts another
        try {
          r = await pool.run({ scenario: o.scenario, strategy, seed, watchdogMs: o.watchdogMs, burst: o.burst, heartbeat: watch?.heartbeat, fault: o.fault }, abort.signal);
        } catch (e) {
          const wedged = watch?.stop();
          if (wedged) r = { seed, strategy, failure: { kind: 'stuck', summary: `wedged: ${wedged.summary}` }, steps: wedged.steps, seconds: wedged.seconds, fingerprint: '', schedule: null, acted: null };
          else {
            if (!abort.signal.aborted) throw e;
            o.onRun?.(null, ++done, total); // cancelled: it counts as done for the progress bar
            return;
          }
        }
        watch?.stop();
        aborts.delete(seed);
        done++;
        memory.peakRssBytes = Math.max(memory.peakRssBytes, process.memoryUsage.rss());
        memory.heldBytes = Math.max(memory.heldBytes, r.heldBytes ?? 0);
        let replay: string | null = null;
        if (r.failure !== null) {
          if (!o.all && seed < firstFailing) {
            firstFailing = seed;
            for (const [s, a] of aborts) if (s > seed) a.abort();
          }
          // A wedged deterministic run was terminated before it could hand back its schedule: nothing to replay.
          if (o.outDir && (strategy === 'free' || r.schedule !== null)) {
            replay = join(o.outDir, `replay-${strategy}-seed${seed}.vmreplay`);
            writeReplayFile(replay, {
              command: 'migrate', scenario: { ...o.scenario, seed }, driver: strategy === 'free' ? 'free' : 'deterministic', strategy, seed,
              schedule: r.schedule, failure: r.failure, fingerprint: r.fingerprint,
            });
            replayFiles.push(replay);
          }
        }
        emit({ type: 'run', strategy, seed, failure: r.failure?.kind ?? null, summary: r.failure?.summary ?? null, steps: r.steps, seconds: r.seconds, replay, acted: r.acted });
        o.onRun?.(r, done, total);
      };
      // As many runs in flight as the pool has workers (a million seeds are not a million
      // queued tasks and watchdogs); a seed past the first failure is not started.
      let next = 0;
      const lane = async (): Promise<void> => {
        while (next < seeds.length) {
          const seed = seeds[next++]!;
          if (!o.all && seed > firstFailing) { o.onRun?.(null, ++done, total); continue; }
          await runSeed(seed);
        }
      };
      await Promise.all(Array.from({ length: Math.min(pool.workers, seeds.length) }, lane));
    }
  } finally {
    if (!o.pool) await pool.close();
  }
  const report: HuntReport = { seeds: o.seeds, shards: [o.shard], all: o.all, strategies: summarize(lines, o.strategies, o.all), replayFiles: replayFiles.sort(), memory };
  return { report, lines };
}
