import { readFileSync, writeFileSync } from 'node:fs';
import { Packr } from 'msgpackr';
import type { Strategy } from '../drivers/strategy.ts';
import type { MigrationScenario } from '../scenarios/migration.ts';
import type { Driver } from '../scenarios/run-roles.ts';
import { UserError } from '../util/errors.ts';
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

/** Reads a replay file; a file from another vmemlab version is refused with both versions named. */
export function readReplayFile(path: string): ReplayFile {
  let bytes: Buffer;
  try { bytes = readFileSync(path); } catch (e) { throw new UserError(`${path}: cannot read the replay file (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`); }
  let f: Partial<ReplayFile>;
  try { f = packr.unpack(bytes) as Partial<ReplayFile>; } catch { throw new UserError(`${path}: not a vmemlab replay file (not msgpack)`); }
  if (f === null || typeof f !== 'object' || f.format !== 'vmemlab-replay') throw new UserError(`${path}: not a vmemlab replay file`);
  if (f.formatVersion !== 1) throw new UserError(`${path}: replay format ${String(f.formatVersion)}; this vmemlab reads format 1`);
  if (f.vmemlabVersion !== VMEMLAB_VERSION) {
    throw new UserError(`${path}: recorded by vmemlab ${f.vmemlabVersion}, this is vmemlab ${VMEMLAB_VERSION}: a schedule replays exactly only on the version that recorded it (run the hunt again with this version, or install vmemlab ${f.vmemlabVersion})`);
  }
  if (f.schedule != null && !(f.schedule instanceof Uint8Array)) f.schedule = new Uint8Array(f.schedule as ArrayLike<number>);
  return f as ReplayFile;
}
