import { CATALOG } from '../bugs/catalog.ts';
import type { Strategy } from '../drivers/strategy.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { type MigrationRunResult, type MigrationScenario, roleNames, runMigration } from '../scenarios/migration.ts';
import { UserError } from '../util/errors.ts';
import { LIMITS } from '../util/limits.ts';
import { VMEMLAB_VERSION } from '../version.ts';
import { type FailureKind, failureOf, fingerprint } from './failure.ts';
import type { ReplayFile } from './replay-file.ts';
import { replayRun } from './replay.ts';

/** How big a failing run is. */
export interface ShrinkSizes {
  /** Steps of the deterministic driver (the schedule's length). */
  steps: number;
  /** Roles (actors): vCPUs, host writer, devices, IOMMU service, migration thread, destination. */
  actors: number;
  vcpus: number;
  /** Guest pages (memoryBytes / 4 KiB). */
  pages: number;
  memoryBytes: number;
  slots: number;
  devices: number;
}

export interface ShrinkResult {
  /** The minimal replay file (same format; `shrunk` filled): it replays exactly with replayRun. */
  file: ReplayFile;
  before: ShrinkSizes;
  after: ShrinkSizes;
  /** Runs tried, the reproduction and the final check included. */
  runs: number;
  seconds: number;
  /** The reductions accepted, in order, one line each (e.g. "vCPUs 4 -> 1 (seed 1)"). */
  changes: string[];
}

export interface ShrinkOptions {
  /** Bound on the candidate runs (default 400; half at most for the scenario); the reproduction and the final check come on top. */
  maxRuns?: number;
  /** Stop trying candidates after this long (default: no bound; the result then depends on the machine's speed). */
  maxSeconds?: number;
  /** Seeds a smaller scenario is tried with before it is given up (default 3: the current seed first). */
  seeds?: number;
  onProgress?: (text: string) => void;
}

/** The smallest guest memory shrinking tries: 64 pages (256 KiB) a slot, one 64-page CLEAR chunk. */
export const SHRINK_MIN_PAGES_PER_SLOT = 64;

const WATCHDOG_MS = 10_000;
const BURST = 256;

/** A failing run: the scenario, its seed, and the run (its full schedule in result.schedule). */
interface Best {
  scenario: MigrationScenario;
  seed: number;
  result: MigrationRunResult;
  schedule: Uint8Array;
}

/** The schedule without steps start..end-1 (role < 0), or without that role's steps among them. */
function without(s: Uint8Array, start: number, end: number, role: number): Uint8Array {
  const out = new Uint8Array(s.length);
  out.set(s.subarray(0, start));
  let n = start;
  if (role >= 0) for (let i = start; i < end; i++) if (s[i] !== role) out[n++] = s[i]!;
  out.set(s.subarray(end), n);
  return out.slice(0, n + s.length - end);
}

/** One smaller scenario to try, and what changed in words. */
interface Candidate {
  what: string;
  scenario: MigrationScenario;
  /** Accept only if the run takes fewer steps than the current one (changes that do not remove work by themselves). */
  fewerSteps?: boolean;
  /** Try it with this many times the usual seeds (the smallest scenario: cheap to run, and the biggest win). */
  moreSeeds?: number;
}

/** How many roles a migration run has (the schedule's role indices are below it). */
export function actorsOf(s: MigrationScenario): number {
  return roleNames(s).length;
}

export function sizesOf(s: MigrationScenario, steps: number): ShrinkSizes {
  return {
    steps, actors: actorsOf(s), vcpus: s.vcpus, pages: Math.floor(s.memoryBytes / PAGE_SIZE), memoryBytes: s.memoryBytes,
    slots: s.slots, devices: s.devices?.devices.length ?? 0,
  };
}

/** One line per size, before -> after. */
export function describeShrink(r: ShrinkResult): string[] {
  const b = r.before;
  const a = r.after;
  const mib = (n: number): string => `${+(n / 2 ** 20).toFixed(2)} MiB`;
  return [
    `steps: ${b.steps} -> ${a.steps}`,
    `actors: ${b.actors} -> ${a.actors} (vCPUs ${b.vcpus} -> ${a.vcpus}${b.devices || a.devices ? `, devices ${b.devices} -> ${a.devices}` : ''})`,
    `guest memory: ${mib(b.memoryBytes)} -> ${mib(a.memoryBytes)} (${b.pages} -> ${a.pages} pages, ${b.slots} -> ${a.slots} slots)`,
    `${r.runs} runs in ${r.seconds.toFixed(1)} s`,
  ];
}

const halves = (n: number, min: number): number[] => {
  const out: number[] = [];
  for (const v of [min, Math.floor(n / 2), n - 1]) if (v >= min && v < n && !out.includes(v)) out.push(v);
  return out;
};

/**
 * The smaller scenarios to try next, one kind of reduction per group, each group's most
 * aggressive candidate first. The order puts the reductions that make every later run
 * cheaper (memory, actors) first.
 */
function reducers(f: ReplayFile): ((s: MigrationScenario) => Candidate[])[] {
  const bugs = f.scenario.bugs.map((n) => CATALOG.find((b) => b.name === n));
  const needsHostWrites = bugs.some((b) => b?.needsHostWrites === true);
  const needsDevices = bugs.some((b) => (b?.devices?.length ?? 0) > 0);
  const withParams = (s: MigrationScenario, p: Partial<MigrationScenario['params']>): MigrationScenario => ({ ...s, params: { ...s.params, ...p } });
  /** Everything at once: the floor of each reduction, or half of each (one at a time, greedy shrinking misses what only works together). */
  const all = (s: MigrationScenario, half: boolean): MigrationScenario => {
    const cut = (n: number, min: number): number => Math.max(min, half ? Math.floor(n / 2) : min);
    const slots = half ? s.slots : 1;
    const unit = SHRINK_MIN_PAGES_PER_SLOT * slots;
    const pages = Math.floor(s.memoryBytes / PAGE_SIZE);
    const d = s.devices;
    return {
      ...s, vcpus: cut(s.vcpus, 1), slots, memoryBytes: Math.max(unit, half ? Math.floor(pages / 2 / unit) * unit : unit) * PAGE_SIZE,
      // A bug that needs host writes shows in fewer guest operations when they come often.
      hostWriteEvery: s.hostWriteEvery <= 0 || half ? s.hostWriteEvery : needsHostWrites ? Math.min(s.hostWriteEvery, 4) : 0,
      devices: d && !needsDevices && !half ? { ...d, devices: [] } : d,
      params: { ...s.params, warmupOps: cut(s.params.warmupOps, 0), maxIterations: cut(s.params.maxIterations, 1) },
    };
  };
  return [
    (s) => [{ what: 'everything at its smallest', scenario: all(s, false), moreSeeds: 4 }, { what: 'everything halved', scenario: all(s, true) }]
      .filter((c) => JSON.stringify(c.scenario) !== JSON.stringify(s)),
    // Guest memory: straight to the floor, else halved (pages stay a multiple of 64 per slot).
    (s) => {
      const pages = Math.floor(s.memoryBytes / PAGE_SIZE);
      const unit = SHRINK_MIN_PAGES_PER_SLOT * s.slots;
      const floor = unit;
      const sizes = [floor, Math.floor(pages / 2 / unit) * unit].filter((p, i, a) => p >= floor && p < pages && a.indexOf(p) === i);
      // Each size also with frames shrunk in proportion: a pass then takes as many frames
      // (and steps, in which the guest writes between syncs) as before; bugs that need many
      // dirty pages between two syncs (a ring wrapping) shrink only that way.
      return sizes.flatMap((p) => {
        const batch = Math.max(1, Math.floor((s.params.batchPages * p) / pages));
        const smaller = { ...s, memoryBytes: p * PAGE_SIZE };
        const out: Candidate[] = [{ what: `guest memory ${pages} -> ${p} pages`, scenario: smaller }];
        if (batch !== s.params.batchPages) out.push({ what: `guest memory ${pages} -> ${p} pages, ${s.params.batchPages} -> ${batch} pages per frame`, scenario: withParams(smaller, { batchPages: batch }) });
        // And with the bandwidth in proportion: a pass then lasts as long (in the step
        // clock's time) as before, with as many guest writes in it.
        const bw = Math.floor((s.params.bandwidth * p) / pages);
        if (s.params.bandwidth > 0 && bw >= LIMITS.bandwidth.min) out.push({ what: `guest memory ${pages} -> ${p} pages, bandwidth ${s.params.bandwidth} -> ${bw} bytes/s`, scenario: withParams(smaller, { batchPages: batch, bandwidth: bw }) });
        return out;
      });
    },
    // Host writes: none when no injected bug needs them, else fewer; for a bug that needs
    // them, fewer or more often only when the run gets shorter for it (more often, the bug
    // needs fewer guest operations to show).
    (s) => {
      if (s.hostWriteEvery <= 0) return [];
      const out: Candidate[] = [];
      if (!needsHostWrites) out.push({ what: 'no host writer', scenario: { ...s, hostWriteEvery: 0 } });
      for (const k of [4, 2]) {
        if (s.hostWriteEvery * k > 1 << 16) continue;
        out.push({ what: `host writes every ${s.hostWriteEvery} -> ${s.hostWriteEvery * k} operations`, scenario: { ...s, hostWriteEvery: s.hostWriteEvery * k }, fewerSteps: needsHostWrites });
      }
      if (needsHostWrites && s.hostWriteEvery > 1) {
        const e = Math.max(1, Math.floor(s.hostWriteEvery / 4));
        out.push({ what: `host writes every ${s.hostWriteEvery} -> ${e} operations`, scenario: { ...s, hostWriteEvery: e }, fewerSteps: true });
      }
      return out;
    },
    // Devices: all of them when no injected bug lives in one, else one at a time.
    (s) => {
      const d = s.devices;
      if (!d || d.devices.length === 0) return [];
      const out: Candidate[] = [];
      if (!needsDevices) out.push({ what: 'no devices', scenario: { ...s, devices: { ...d, devices: [] } } });
      if (d.devices.length > 1) {
        d.devices.forEach((dev, i) => out.push({
          what: `without device ${i} (${dev.kind})`, scenario: { ...s, devices: { ...d, devices: d.devices.filter((_, j) => j !== i) } },
        }));
      }
      return out;
    },
    // vCPUs, down to 1.
    (s) => halves(s.vcpus, 1).map((v) => ({ what: `vCPUs ${s.vcpus} -> ${v}`, scenario: { ...s, vcpus: v } })),
    // Memory slots, down to 1.
    (s) => halves(s.slots, 1).map((n) => ({ what: `slots ${s.slots} -> ${n}`, scenario: { ...s, slots: n } })),
    // Warm-up operations before the migration starts.
    (s) => [0, Math.floor(s.params.warmupOps / 4), Math.floor(s.params.warmupOps / 2), Math.floor(s.params.warmupOps * 3 / 4)]
      .filter((w, i, a) => w < s.params.warmupOps && a.indexOf(w) === i)
      .map((w) => ({ what: `warm-up ${s.params.warmupOps} -> ${w} operations`, scenario: withParams(s, { warmupOps: w }) })),
    // The bandwidth limit: unlimited, or doubled, when that makes the run shorter (under
    // the step clock a pass that used up its 100 ms window idles until the next one).
    (s) => s.params.bandwidth <= 0 ? [] : [0, s.params.bandwidth * 4].filter((bw) => bw <= LIMITS.bandwidth.max).map((bw) => ({
      what: `bandwidth ${s.params.bandwidth} -> ${bw === 0 ? 'unlimited' : `${bw} bytes/s`}`, scenario: withParams(s, { bandwidth: bw }), fewerSteps: true,
    })),
    // Pre-copy passes.
    (s) => halves(s.params.maxIterations, 1).map((n) => ({ what: `passes at most ${s.params.maxIterations} -> ${n}`, scenario: withParams(s, { maxIterations: n }) })),
    // Device buffers and what the devices do besides DMA to them.
    (s) => {
      const d = s.devices;
      if (!d) return [];
      const out: Candidate[] = [];
      d.devices.forEach((dev, i) => {
        const set = (what: string, change: Partial<typeof dev>): void => {
          out.push({ what: `device ${i}: ${what}`, scenario: { ...s, devices: { ...d, devices: d.devices.map((x, j) => (j === i ? { ...x, ...change } : x)) } } });
        };
        for (const b of halves(dev.buffers, 1)) set(`buffers ${dev.buffers} -> ${b}`, { buffers: b });
        if (dev.strayEvery > 0) set('no stray DMAs', { strayEvery: 0 });
        if (dev.remapEvery > 0) set('no remaps', { remapEvery: 0 });
      });
      return out;
    },
    // Pages per frame, fewer or more: only when the run gets shorter for it.
    (s) => [1, Math.floor(s.params.batchPages / 2), Math.min(1024, s.params.batchPages * 4)]
      .filter((b, i, a) => b >= 1 && b !== s.params.batchPages && a.indexOf(b) === i)
      .map((b) => ({ what: `pages per frame ${s.params.batchPages} -> ${b}`, scenario: withParams(s, { batchPages: b }), fewerSteps: true })),
  ];
}

/**
 * Shrinks a deterministic replay file: first the scenario (guest memory, host writes,
 * devices, vCPUs, slots, warm-up, passes, device buffers, frame size), each smaller
 * scenario run afresh under the file's strategy with a few seeds and kept when it fails
 * the same way (same failure kind); then the schedule of the smallest failing run, by
 * delta debugging: chunks are cut out of it and the rest replayed with the seeded
 * strategy finishing the run, kept when it still fails the same way in fewer steps. The
 * file written holds the full schedule the last kept run took, and replays exactly.
 */
export async function shrink(f: ReplayFile, o: ShrinkOptions = {}): Promise<ShrinkResult> {
  if (f.command !== 'migrate') throw new UserError(`shrink: only migrate replay files can be shrunk (this one is '${String(f.command)}')`);
  if (f.schedule === null || f.strategy === 'free' || f.driver !== 'deterministic') {
    throw new UserError('shrink: this replay file records a free-run failure (real threads, no schedule): it cannot be replayed, so it cannot be shrunk; '
      + 'hunt its scenario with the deterministic strategies first (random or pct) and shrink the replay file that hunt writes');
  }
  const strategy: Strategy = f.strategy;
  const kind: FailureKind = f.failure.kind;
  const maxRuns = o.maxRuns ?? 400;
  const maxMs = (o.maxSeconds ?? Infinity) * 1000;
  const seedsPerCandidate = Math.max(1, o.seeds ?? 3);
  const progress = o.onProgress ?? ((): void => {});
  const started = performance.now();
  let runs = 0;
  let candidateRuns = 0;
  const changes: string[] = [];
  const accepted = (what: string): void => { changes.push(what); progress(`shrink: ${what} (run ${runs})`); };

  // The file's failure must reproduce first.
  runs++;
  const first = await replayRun(f, { watchdogMs: WATCHDOG_MS, burst: BURST });
  const got = failureOf(first.result);
  if (got === null || got.kind !== kind) {
    throw new UserError(`shrink: the replay does not fail as recorded (${kind}: ${f.failure.summary}); it ${got === null ? 'passed' : `failed otherwise (${got.kind}: ${got.summary})`}, so there is nothing to shrink`);
  }
  if (!first.exact) progress('shrink: the replay fails the same way but not exactly as recorded; shrinking from this run');
  const before = sizesOf(f.scenario, f.schedule.length);
  let best: Best = { scenario: { ...f.scenario, seed: f.seed }, seed: f.seed, result: first.result, schedule: first.result.schedule ?? f.schedule };
  progress(`shrink: reproduced ${kind} in ${best.schedule.length} steps (${before.vcpus} vCPUs, ${before.pages} pages, ${before.actors} actors)`);

  const budgetLeft = (limit: number): boolean => candidateRuns < limit && performance.now() - started < maxMs;
  /** Runs one candidate; null when it threw (an invalid smaller scenario). */
  const attempt = async (s: MigrationScenario, seed: number, replay?: Uint8Array): Promise<MigrationRunResult | null> => {
    runs++;
    candidateRuns++;
    try {
      return await runMigration({ ...s, seed }, {
        driver: 'deterministic', strategy, replay, replayThenStrategy: replay !== undefined,
        watchdogMs: WATCHDOG_MS, burst: BURST, resumeOps: 0,
      });
    } catch {
      return null;
    }
  };
  const fails = (r: MigrationRunResult | null): r is MigrationRunResult => r !== null && failureOf(r)?.kind === kind && r.schedule !== undefined;

  // Phase 1: the scenario. Half the runs at most; what is left goes to the schedule.
  const scenarioBudget = Math.floor(maxRuns / 2);
  const groups = reducers(f);
  let changed = true;
  for (let round = 0; changed && round < 4 && budgetLeft(scenarioBudget); round++) {
    changed = false;
    for (const group of groups) {
      let again = true;
      while (again && budgetLeft(scenarioBudget)) {
        again = false;
        for (const c of group(best.scenario)) {
          const n = seedsPerCandidate * (c.moreSeeds ?? 1);
          const seeds = [best.seed, ...Array.from({ length: n }, (_, i) => f.seed + i)]
            .filter((s, i, a) => s <= 0xffffffff && a.indexOf(s) === i).slice(0, n);
          let hit: Best | null = null;
          for (const seed of seeds) {
            if (!budgetLeft(scenarioBudget)) break;
            const r = await attempt(c.scenario, seed);
            if (fails(r) && (!c.fewerSteps || r.schedule!.length < best.schedule.length * 0.95)) {
              hit = { scenario: { ...c.scenario, seed }, seed, result: r, schedule: r.schedule! };
              break;
            }
          }
          if (hit) {
            best = hit;
            accepted(`${c.what}${hit.seed !== f.seed ? ` (seed ${hit.seed})` : ''}: still ${kind}, ${hit.schedule.length} steps`);
            changed = again = true;
            break;
          }
          if (!budgetLeft(scenarioBudget)) break;
        }
      }
    }
  }
  progress(`shrink: scenario done after ${runs} runs: ${best.scenario.vcpus} vCPUs, ${Math.floor(best.scenario.memoryBytes / PAGE_SIZE)} pages, ${best.schedule.length} steps`);

  // Phase 2: the schedule, on the smallest failing scenario.
  const scheduleBudget = maxRuns;
  const tryReplay = async (candidate: Uint8Array, what: string): Promise<boolean> => {
    const r = await attempt(best.scenario, best.seed, candidate);
    if (fails(r) && r.schedule!.length < best.schedule.length) {
      const from = best.schedule.length;
      best = { ...best, result: r, schedule: r.schedule! };
      accepted(`schedule ${from} -> ${best.schedule.length} steps (${what})`);
      return true;
    }
    return false;
  };
  // Cut short: the seeded strategy finishes the run from there.
  for (const frac of [0.5, 0.75]) {
    if (!budgetLeft(scheduleBudget)) break;
    const n = Math.floor(best.schedule.length * frac);
    if (n > 0) await tryReplay(best.schedule.slice(0, n), `first ${n} steps, then the strategy`);
  }
  // Delta debugging: cut chunks out of the schedule, first all their steps, then one
  // role's steps in them (a role's steps while it waited, or while nothing it did
  // mattered); the chunk halves after each sweep.
  for (let chunk = Math.floor(best.schedule.length / 2); chunk >= 1 && budgetLeft(scheduleBudget); chunk = Math.floor(chunk / 2)) {
    for (let start = 0; start < best.schedule.length && budgetLeft(scheduleBudget);) {
      const s = best.schedule;
      const names = roleNames(best.scenario);
      const end = Math.min(start + chunk, s.length);
      const roles = [-1, ...new Set(s.subarray(start, end))];
      let kept = false;
      for (const role of roles.length === 2 ? [-1] : roles) {
        if (!budgetLeft(scheduleBudget)) break;
        const candidate = without(s, start, end, role);
        if (await tryReplay(candidate, `${role < 0 ? 'steps' : `${names[role] ?? `role ${role}`}'s steps in`} ${start}..${end - 1} cut`)) { kept = true; break; }
      }
      // Kept: the same start now holds the steps that followed the cut; else move on.
      if (!kept) start += chunk;
    }
  }

  // The minimal file: the full schedule of the last failing run, which replays exactly.
  const failure = failureOf(best.result)!;
  const file: ReplayFile = {
    format: 'vmemlab-replay', formatVersion: 1, vmemlabVersion: VMEMLAB_VERSION, command: 'migrate',
    scenario: best.scenario, driver: 'deterministic', strategy, seed: best.seed, schedule: best.schedule,
    failure, fingerprint: fingerprint(best.result),
    shrunk: { from: f.shrunk?.from ?? { steps: before.steps, vcpus: before.vcpus, pages: before.pages }, rounds: (f.shrunk?.rounds ?? 0) + changes.length },
    created: new Date().toISOString(),
  };
  runs++;
  const check = await replayRun(file, { watchdogMs: WATCHDOG_MS, burst: BURST });
  if (!check.exact) throw new Error(`shrink: the shrunk replay file does not replay exactly (${failureOf(check.result)?.kind ?? 'passed'}); this is a vmemlab bug`);
  const after = sizesOf(file.scenario, best.schedule.length);
  const seconds = (performance.now() - started) / 1000;
  progress(`shrink: done: ${before.steps} -> ${after.steps} steps, ${before.vcpus} -> ${after.vcpus} vCPUs, ${before.pages} -> ${after.pages} pages, ${runs} runs in ${seconds.toFixed(1)} s`);
  return { file, before, after, runs, seconds, changes };
}
