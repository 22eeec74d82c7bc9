import { availableParallelism } from 'node:os';
import { STRATEGIES } from '../drivers/strategy.ts';
import { type HuntLine, type HuntReport, type HuntStrategy, type Shard, type StrategyReport, hunt, summarize } from '../hunt/hunt.ts';
import { readReplayFile } from '../hunt/replay-file.ts';
import { replayRun } from '../hunt/replay.ts';
import { describeExplanation, explainReplay } from '../hunt/explain.ts';
import { describeShrink, shrink } from '../hunt/shrink.ts';
import { writeReplayFile } from '../hunt/replay-file.ts';
import type { MigrationScenario } from '../scenarios/migration.ts';
import { z } from 'zod';
import { UserError } from '../util/errors.ts';
import { LIMITS } from '../util/limits.ts';
import { checkKeys, readUserFile } from '../util/user-file.ts';
import { checkScenario } from '../scenarios/scenario-check.ts';
import { type FailureKind, VERDICTS } from '../scenarios/outcome.ts';
import { formatSize } from '../util/size.ts';
import { limitedNumber, wholeNumber } from '../scenarios/options.ts';
import { type Resolved, buildMigration } from '../scenarios/settings.ts';
import { describeResult } from './migrate-command.ts';
import { Progress } from './progress.ts';

export interface HuntFlags { seeds: string; strategy: string; out: string; all?: boolean; shrink?: boolean; shard: string; workers?: string; json?: boolean }

export const HUNT_DEFAULTS = { seeds: '16', strategy: 'random,pct,free', out: 'vmemlab-hunt', shard: '1/1' } as const;

export function parseShard(text: string): Shard {
  const m = /^(\d+)\/(\d+)$/.exec(text.trim());
  const index = m ? Number(m[1]) : NaN;
  const count = m ? Number(m[2]) : NaN;
  if (!m || count < 1 || index < 1 || index > count || count > LIMITS.shards.max) throw new UserError(`--shard: '${text}' is not i/n with 1 <= i <= n <= ${LIMITS.shards.max} (e.g. 2/4)`);
  return { index, count };
}

export function parseStrategies(text: string): HuntStrategy[] {
  const all: readonly string[] = [...STRATEGIES, 'free'];
  const list = text.split(',').map((s) => s.trim()).filter(Boolean);
  if (list.length === 0) throw new UserError(`--strategy: empty (one or more of: ${all.join(', ')})`);
  for (const s of list) if (!all.includes(s)) throw new UserError(`--strategy: unknown strategy '${s}' (one or more of: ${all.join(', ')}, comma-separated)`);
  return [...new Set(list)] as HuntStrategy[];
}

export function describeScenario(s: MigrationScenario): string {
  const devices = s.devices?.devices.length ? `, devices ${s.devices.devices.map((d) => d.kind).join('+')}` : '';
  return `${s.tracking}, ${s.vcpus} vCPUs, ${formatSize(s.memoryBytes)}, workload ${s.workload.name}${devices}${s.bugs.length ? `, injected: ${s.bugs.join(', ')}` : ''}`;
}

function strategyLines(r: StrategyReport, all: boolean): string[] {
  const pct = r.runs ? Math.round(r.detectionRate * 100) : 0;
  const name = r.strategy.padEnd(7);
  const acted = r.acted === null ? '' : `, the bug acted in ${r.acted}`;
  const head = `${name}${String(r.runs).padStart(4)} runs, ${r.failures} failed${all ? ` (${pct} %)` : ''}${acted}`;
  const f = r.firstDetection;
  if (f === null) return [`${head}: nothing found`];
  const steps = f.steps !== null ? `, ${f.steps} steps` : '';
  const lines = [`${head}; first: seed ${f.seed} after ${f.runs} run(s)${steps}, ${f.seconds.toFixed(2)} s: ${f.summary}`];
  if (f.replay) lines.push(`        replay: vmemlab replay ${f.replay}`);
  return lines;
}

export function describeMemory(m: NonNullable<HuntReport['memory']>): string {
  return `memory: at most ${formatMiB(m.peakRssBytes)} resident (this process and its ${m.workers} worker(s)); a worker held at most ${formatMiB(m.heldBytes)} of buffers between runs`;
}

function formatMiB(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 2 : 0)} MiB`;
}

export function describeHunt(report: HuntReport): string[] {
  const lines = report.strategies.flatMap((r) => strategyLines(r, report.all));
  if (!report.all && report.strategies.some((r) => r.failures > 0)) lines.push('(each strategy stopped at its first failure; --all runs every seed and gives detection rates)');
  return lines;
}

export async function huntCommand(settings: Resolved, h: HuntFlags, file: string | undefined): Promise<number> {
  // Built as for the deterministic driver (its warm-up); the free strategy runs the same scenario on threads.
  const { scenario, watchdogMs, burst } = buildMigration({ ...settings, s: { ...settings.s, driver: 'deterministic' } });
  const strategies = parseStrategies(h.strategy);
  const seeds = limitedNumber(h.seeds, '--seeds', 'seeds');
  const shard = parseShard(h.shard);
  const workers = h.workers === undefined ? availableParallelism() : wholeNumber(h.workers, '--workers', 1, 256);
  const json = h.json === true;
  const progress = new Progress(json);
  if (!json) {
    console.log(`hunt: ${file ?? (settings.s.inject.length ? 'the injected bug\'s demonstration scenario' : 'the default scenario')}: ${describeScenario(scenario)}; seeds 1-${seeds}` +
      `${shard.count > 1 ? ` (shard ${shard.index}/${shard.count})` : ''}, strategies ${strategies.join(', ')}, ${workers} worker(s)`);
  }
  const started = performance.now();
  let found = 0;
  const { report } = await hunt({
    scenario, strategies, seeds, shard, all: h.all === true, workers, outDir: h.out, watchdogMs, burst,
    onRun: (r, done, total) => {
      if (r?.failure) found++;
      const width = 20;
      const bar = '#'.repeat(Math.round((done / total) * width)).padEnd(width, '.');
      progress.update(`hunting [${bar}] ${done}/${total} runs, ${found} failed${r ? ` (last: ${r.strategy} seed ${r.seed})` : ''}`);
    },
  });
  progress.clear();
  const shrunk: { strategy: string; file: string; lines: string[] }[] = [];
  if (h.shrink) {
    // Each strategy's first detection, shrunk (deterministic ones: free-run files cannot be).
    for (const r of report.strategies) {
      const file = r.firstDetection?.replay;
      if (!file || r.strategy === 'free') continue;
      progress.update(`shrinking ${file}`);
      const res = await shrink(readReplayFile(file));
      const out = minimalPath(file);
      writeReplayFile(out, res.file);
      shrunk.push({ strategy: r.strategy, file: out, lines: describeShrink(res) });
    }
    progress.clear();
  }
  const seconds = (performance.now() - started) / 1000;
  const failed = report.strategies.some((r) => r.failures > 0);
  if (json) console.log(JSON.stringify({ command: 'hunt', scenario, seconds, ...report, shrunk }, null, 2));
  else {
    for (const line of describeHunt(report)) console.log(line);
    for (const x of shrunk) {
      console.log(`${x.strategy}: shrunk to ${x.file}`);
      for (const line of x.lines) console.log(`  ${line}`);
    }
    console.log(`${failed ? 'FOUND' : 'CLEAN'}: ${report.strategies.reduce((n, r) => n + r.runs, 0)} runs in ${seconds.toFixed(1)} s${h.out ? `; run records in ${h.out}/` : ''}`);
    if (report.memory) console.log(describeMemory(report.memory));
  }
  return failed ? 1 : 0;
}

/** `vmemlab replay FILE`: runs it again; deterministic files must reproduce exactly. */
export async function replayCommand(path: string, json: boolean): Promise<number> {
  const f = readReplayFile(path);
  const o = await replayRun(f);
  if (json) {
    console.log(JSON.stringify({ command: 'replay', file: path, strategy: f.strategy, seed: f.seed, failure: f.failure, reproduced: o.reproduced, exact: o.exact, result: o.result }, null, 2));
  } else {
    console.log(`replay: ${path}: ${describeScenario(f.scenario)}; seed ${f.seed}, ${f.strategy === 'free' ? 'free-run' : `deterministic (${f.strategy}), ${f.schedule!.length} steps`}; recorded: ${f.failure.summary}`);
    for (const line of describeResult(o.result)) console.log(line);
    if (f.schedule !== null && o.exact) {
      console.log('');
      for (const line of describeExplanation(await explainReplay(f))) console.log(line);
      console.log('');
    }
    if (f.schedule !== null) {
      console.log(o.exact ? `REPRODUCED exactly: the same ${o.result.steps} steps, lost pages, stamps and DMA records as recorded`
        : 'NOT REPRODUCED: the replay differs from the recording (a different vmemlab build, or a bug in replay)');
    } else {
      console.log(o.reproduced ? 'failed again under free-run (real threads interleave differently each time: this is not an exact replay)'
        : 'did not fail this time under free-run; hunt the same scenario under the deterministic driver to pin it down (README, Hunting)');
    }
  }
  if (f.schedule !== null) return o.exact ? 1 : 3;
  return o.reproduced ? 1 : 0;
}

/** Where a shrunk replay goes by default: next to the file, `.min` before the extension. */
export function minimalPath(path: string): string {
  return path.endsWith('.vmreplay') ? `${path.slice(0, -'.vmreplay'.length)}.min.vmreplay` : `${path}.min.vmreplay`;
}

/** `vmemlab shrink FILE`: the smallest scenario and schedule that still fail the same way, written as a replay file. */
export async function shrinkCommand(path: string, o: { out?: string; maxRuns?: string; json?: boolean }): Promise<number> {
  const f = readReplayFile(path);
  const maxRuns = o.maxRuns === undefined ? undefined : limitedNumber(o.maxRuns, '--max-runs', 'seeds');
  const progress = new Progress(o.json === true);
  const r = await shrink(f, { maxRuns, onProgress: (t) => progress.update(`shrinking: ${t}`) });
  progress.clear();
  const out = o.out ?? minimalPath(path);
  writeReplayFile(out, r.file);
  if (o.json) console.log(JSON.stringify({ command: 'shrink', file: path, out, before: r.before, after: r.after, runs: r.runs, seconds: r.seconds, changes: r.changes, failure: r.file.failure }, null, 2));
  else {
    console.log(`shrink: ${path}: ${f.failure.summary}`);
    for (const line of r.changes) console.log(`  accepted: ${line}`);
    for (const line of describeShrink(r)) console.log(line);
    console.log(`minimal replay: ${out} (${r.file.failure.summary}); vmemlab replay ${out}`);
  }
  return 0;
}

/** `vmemlab explain FILE`: the causal chain of the file's failure. */
export async function explainCommand(path: string, subject: string, json: boolean): Promise<number> {
  if (subject !== 'auto' && subject !== 'lost-write' && subject !== 'dma') throw new UserError(`--subject: '${subject}' is not auto, lost-write or dma`);
  const e = await explainReplay(readReplayFile(path), { subject });
  if (json) console.log(JSON.stringify({ command: 'explain', file: path, ...e }, null, 2));
  else for (const line of describeExplanation(e)) console.log(line);
  return e.steps.length > 0 ? 0 : 1;
}

const HUNT_STRATEGIES = [...STRATEGIES, 'free'] as const;
const RunLine = z.strictObject({
  type: z.literal('run'), strategy: z.enum(HUNT_STRATEGIES), seed: z.number().int().min(LIMITS.seeds.min).max(LIMITS.seeds.max),
  failure: z.enum(VERDICTS.filter((v) => v !== 'passed') as [FailureKind, ...FailureKind[]]).nullable(), summary: z.string().max(10_000).nullable(),
  steps: z.number().int().min(0).nullable(), seconds: z.number().min(0), replay: z.string().max(4096).nullable(), acted: z.boolean().nullable().optional(),
});
const HeaderLine = z.strictObject({
  type: z.literal('hunt'), scenario: z.unknown(), strategies: z.array(z.enum(HUNT_STRATEGIES)).min(1).max(HUNT_STRATEGIES.length),
  seeds: z.number().int().min(LIMITS.seeds.min).max(LIMITS.seeds.max), all: z.boolean(),
  shard: z.strictObject({ index: z.number().int().min(1), count: z.number().int().min(1).max(LIMITS.shards.max) }).refine((x) => x.index <= x.count, 'shard index past the shard count'),
});

/** One line of a shard file, checked field by field (the scenario as a replay file's is). */
function huntLine(data: unknown, where: string): HuntLine {
  checkKeys(data, where);
  const type = (data as { type?: unknown } | null)?.type;
  const r = (type === 'hunt' ? HeaderLine : type === 'run' ? RunLine : null)?.safeParse(data);
  if (r === undefined) throw new UserError(`${where}: not a hunt line (type: hunt or run)`);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new UserError(`${where}: ${i.path.join('.') || '(line)'}: ${i.message}`);
  }
  if (r.data.type === 'hunt') return { ...r.data, scenario: checkScenario(r.data.scenario, `${where}: scenario`) };
  return r.data as HuntLine;
}

/** `vmemlab merge FILES...`: one report from shards' JSON lines; the shards must be of one hunt and cover it once. */
export function mergeCommand(files: string[], json: boolean): number {
  const lines: HuntLine[] = [];
  let header: Extract<HuntLine, { type: 'hunt' }> | null = null;
  const shards: Shard[] = [];
  for (const path of files) {
    const text = readUserFile(path, 'hunt shard file', 'shardFileBytes').toString('utf8');
    text.split('\n').forEach((raw, i) => {
      if (raw.trim() === '') return;
      let data: unknown;
      try { data = JSON.parse(raw); } catch { throw new UserError(`${path}:${i + 1}: not JSON`); }
      const l = huntLine(data, `${path}:${i + 1}`);
      if (l.type === 'hunt') {
        const key = (x: Extract<HuntLine, { type: 'hunt' }>): string => JSON.stringify([x.scenario, x.strategies, x.seeds, x.all, x.shard.count]);
        if (header !== null && key(header) !== key(l)) throw new UserError(`${path}: from another hunt (scenario, strategies, seeds, --all or shard count differ from ${files[0]})`);
        header = l;
        if (shards.some((s) => s.index === l.shard.index)) throw new UserError(`${path}: shard ${l.shard.index}/${l.shard.count} given twice`);
        shards.push(l.shard);
      } else {
        if (header !== null && (!header.strategies.includes(l.strategy) || l.seed > header.seeds)) {
          throw new UserError(`${path}:${i + 1}: a run of strategy ${l.strategy}, seed ${l.seed}: not in this hunt (strategies ${header.strategies.join(', ')}, seeds 1-${header.seeds})`);
        }
        lines.push(l);
      }
    });
  }
  if (header === null) throw new UserError(`${files.join(', ')}: no hunt header line (these are not vmemlab hunt JSON lines)`);
  const h: Extract<HuntLine, { type: 'hunt' }> = header;
  const missing = Array.from({ length: h.shard.count }, (_, i) => i + 1).filter((i) => !shards.some((s) => s.index === i));
  const report: HuntReport = {
    seeds: h.seeds, shards: shards.sort((a, b) => a.index - b.index), all: h.all, strategies: summarize(lines, h.strategies, h.all),
    replayFiles: lines.flatMap((l) => (l.type === 'run' && l.replay ? [l.replay] : [])).sort(),
  };
  if (json) console.log(JSON.stringify({ command: 'merge', scenario: h.scenario, missingShards: missing, ...report }, null, 2));
  else {
    console.log(`merge: ${shards.length} of ${h.shard.count} shards of a hunt over seeds 1-${h.seeds}: ${describeScenario(h.scenario)}`);
    if (missing.length) console.log(`missing shards: ${missing.map((i) => `${i}/${h.shard.count}`).join(', ')} (totals cover the others only)`);
    for (const line of describeHunt(report)) console.log(line);
  }
  return report.strategies.some((r) => r.failures > 0) ? 1 : 0;
}
