import { writeFileSync } from 'node:fs';
import { Packr } from 'msgpackr';
import { STRATEGIES, type Strategy } from '../drivers/strategy.ts';
import type { MigrationScenario } from '../scenarios/migration.ts';
import type { Driver } from '../scenarios/run-roles.ts';
import { UserError } from '../util/errors.ts';
import { LIMITS } from '../util/limits.ts';
import { checkKeys, readUserFile } from '../util/user-file.ts';
import { checkScenario } from '../scenarios/scenario-check.ts';
import { optionFor } from '../scenarios/options.ts';
import { VERDICTS } from '../scenarios/outcome.ts';
import { VMEMLAB_VERSION } from '../version.ts';
import type { Failure } from './failure.ts';

/**
 * A replay file: everything needed to run a failing run again, bit for bit (msgpack).
 * Deterministic runs carry their recorded schedule (one role index per step); free-run
 * failures carry their seed and configuration only: real threads cannot be replayed,
 * but the same scenario can be hunted under the deterministic driver (README).
 */
export interface ReplayFile {
  format: 'vmemlab-replay';
  formatVersion: 1;
  /** The vmemlab that recorded it: a schedule replays exactly only on the same code. */
  vmemlabVersion: string;
  command: 'migrate';
  scenario: MigrationScenario;
  driver: Driver;
  strategy: Strategy | 'free';
  seed: number;
  /** The deterministic driver's schedule; null for free-run. */
  schedule: Uint8Array | null;
  failure: Failure;
  /** fingerprint() of the recorded run: a replay must produce the same. */
  fingerprint: string;
  /** Steps and the shrinking done so far (absent before any). */
  shrunk?: { from: { steps: number; vcpus: number; pages: number }; rounds: number };
  created: string;
}

const packr = new Packr({ useRecords: false, moreTypes: true });

export function writeReplayFile(path: string, r: Omit<ReplayFile, 'format' | 'formatVersion' | 'vmemlabVersion' | 'created'>): void {
  const file: ReplayFile = { format: 'vmemlab-replay', formatVersion: 1, vmemlabVersion: VMEMLAB_VERSION, created: new Date().toISOString(), ...r };
  writeFileSync(path, packr.pack(file));
}

/**
 * Reads a replay file, bounded, and checks every field it carries as if it had been typed
 * (scenario-check.ts): a file from another vmemlab version, or one whose content no run
 * of this vmemlab could have written, is refused with one line naming the file and the
 * field, before anything runs.
 */
export function readReplayFile(path: string): ReplayFile {
  const bytes = readUserFile(path, 'replay file', 'replayFileBytes');
  let f: Record<string, unknown>;
  try { f = packr.unpack(bytes) as Record<string, unknown>; } catch { throw new UserError(`${path}: not a vmemlab replay file (not msgpack)`); }
  if (f === null || typeof f !== 'object' || f['format'] !== 'vmemlab-replay') throw new UserError(`${path}: not a vmemlab replay file`);
  if (f['formatVersion'] !== 1) throw new UserError(`${path}: replay format ${String(f['formatVersion'])}; this vmemlab reads format 1`);
  if (f['vmemlabVersion'] !== VMEMLAB_VERSION) {
    throw new UserError(`${path}: recorded by vmemlab ${String(f['vmemlabVersion'])}, this is vmemlab ${VMEMLAB_VERSION}: a schedule replays exactly only on the version that recorded it (run the hunt again with this version, or install vmemlab ${String(f['vmemlabVersion'])})`);
  }
  checkKeys(f, path);
  const known = new Set(['format', 'formatVersion', 'vmemlabVersion', 'command', 'scenario', 'driver', 'strategy', 'seed', 'schedule', 'failure', 'fingerprint', 'shrunk', 'created']);
  for (const k of Object.keys(f)) if (!known.has(k)) throw new UserError(`${path}: ${k}: not a field of a replay file`);
  if (f['command'] !== 'migrate') throw new UserError(`${path}: command: ${JSON.stringify(f['command'])} is not migrate`);
  const scenario = checkScenario(f['scenario'], `${path}: scenario`);
  const driver = optionFor('driver').parse(f['driver'], `${path}: driver`) as Driver;
  const strategies: readonly string[] = driver === 'free' ? ['free'] : STRATEGIES;
  if (typeof f['strategy'] !== 'string' || !strategies.includes(f['strategy'])) {
    throw new UserError(`${path}: strategy: ${JSON.stringify(f['strategy'])} is not ${strategies.join(' or ')} (the driver is ${driver})`);
  }
  const seed = optionFor('seed').parse(f['seed'], `${path}: seed`) as number;
  if (seed !== f['seed'] || scenario.seed !== seed) throw new UserError(`${path}: seed: ${JSON.stringify(f['seed'])} is not the scenario's seed, a whole number`);
  let schedule = f['schedule'] as Uint8Array | number[] | null | undefined;
  if (schedule === null || schedule === undefined) {
    if (driver !== 'free') throw new UserError(`${path}: schedule: a deterministic run's replay file needs its schedule`);
    schedule = null;
  } else {
    if (!(schedule instanceof Uint8Array)) {
      if (!Array.isArray(schedule) || !schedule.every((b: unknown) => Number.isInteger(b) && (b as number) >= 0 && (b as number) < 256)) throw new UserError(`${path}: schedule: not a list of role indexes (bytes)`);
      schedule = new Uint8Array(schedule);
    }
    if (driver === 'free') throw new UserError(`${path}: schedule: a free-run failure has no schedule`);
    if (schedule.length > LIMITS.scheduleSteps.max) throw new UserError(`${path}: schedule: ${schedule.length} steps; at most ${LIMITS.scheduleSteps.max}`);
  }
  const failure = f['failure'] as Record<string, unknown> | null;
  if (failure === null || typeof failure !== 'object' || !(VERDICTS as readonly unknown[]).includes(failure['kind']) || failure['kind'] === 'passed' || typeof failure['summary'] !== 'string') {
    throw new UserError(`${path}: failure: ${JSON.stringify(failure)?.slice(0, 60)} is not a failure (kind: ${VERDICTS.filter((v) => v !== 'passed').join(', ')}; summary: text)`);
  }
  if (typeof f['fingerprint'] !== 'string') throw new UserError(`${path}: fingerprint: not text`);
  return { ...(f as unknown as ReplayFile), scenario, driver, seed, schedule: schedule as Uint8Array | null };
}
