import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { failureOf } from '../src/hunt/failure.ts';
import { runHuntTask } from '../src/hunt/hunt-run.ts';
import { type ReplayFile, readReplayFile, writeReplayFile } from '../src/hunt/replay-file.ts';
import { replayRun } from '../src/hunt/replay.ts';
import { actorsOf, shrink } from '../src/hunt/shrink.ts';
import { roleNames } from '../src/scenarios/migration.ts';
import { UserError } from '../src/util/errors.ts';
import { VMEMLAB_VERSION } from '../src/version.ts';

/** The replay file a deterministic hunt (strategy random) writes for a bug's demonstration, seed 1. */
async function huntedReplay(bug: string): Promise<ReplayFile> {
  const { scenario } = migrationSetup({ inject: [bug], driver: 'deterministic', seed: '1' });
  const r = await runHuntTask({ scenario, strategy: 'random', seed: 1, watchdogMs: 10_000, burst: 256 });
  expect(r.failure, `${bug} fails on seed 1`).not.toBeNull();
  return {
    format: 'vmemlab-replay', formatVersion: 1, vmemlabVersion: VMEMLAB_VERSION, command: 'migrate',
    scenario: { ...scenario, seed: 1 }, driver: 'deterministic', strategy: 'random', seed: 1,
    schedule: r.schedule, failure: r.failure!, fingerprint: r.fingerprint, created: new Date().toISOString(),
  };
}

const dir = mkdtempSync(join(tmpdir(), 'vmemlab-shrink-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('shrink', () => {
  for (const bug of ['copy-before-reset', 'skip-tlb-shootdown', 'untracked-host-write']) {
    it(`shrinks ${bug}: the same failure, smaller, and it replays exactly`, async () => {
      const f = await huntedReplay(bug);
      const progress: string[] = [];
      const s = await shrink(f, { onProgress: (t) => progress.push(t) });
      const m = s.file;

      // Fewer steps, no more vCPUs or pages, and fewer of one of them.
      expect(m.schedule!.length).toBeLessThan(f.schedule!.length);
      expect(m.scenario.vcpus).toBeLessThanOrEqual(f.scenario.vcpus);
      expect(m.scenario.memoryBytes).toBeLessThanOrEqual(f.scenario.memoryBytes);
      expect(m.scenario.vcpus < f.scenario.vcpus || m.scenario.memoryBytes < f.scenario.memoryBytes).toBe(true);
      expect(m.scenario.bugs).toEqual([bug]);
      expect(m.strategy).toBe('random');
      expect(m.scenario.seed).toBe(m.seed);

      // The sizes and the record of the shrinking.
      expect(s.before).toMatchObject({ steps: f.schedule!.length, vcpus: f.scenario.vcpus, pages: f.scenario.memoryBytes / PAGE_SIZE, actors: actorsOf(f.scenario) });
      expect(s.after).toMatchObject({ steps: m.schedule!.length, vcpus: m.scenario.vcpus, pages: m.scenario.memoryBytes / PAGE_SIZE, actors: actorsOf(m.scenario) });
      expect(m.shrunk).toEqual({ from: { steps: s.before.steps, vcpus: s.before.vcpus, pages: s.before.pages }, rounds: s.changes.length });
      expect(s.changes.length).toBeGreaterThan(0);
      expect(s.runs).toBeGreaterThan(2);
      expect(s.runs).toBeLessThanOrEqual(400 + 2);
      expect(progress.at(-1)).toMatch(/^shrink: done: /);
      expect(Math.max(...m.schedule!)).toBeLessThan(roleNames(m.scenario).length);

      // The same failure, exactly as recorded, also after a round trip through a file.
      expect(m.failure.kind).toBe(f.failure.kind);
      const path = join(dir, `${bug}.vmreplay`);
      writeReplayFile(path, m);
      const again = await replayRun(readReplayFile(path));
      expect(again.exact).toBe(true);
      expect(failureOf(again.result)?.kind).toBe(f.failure.kind);
      if (f.failure.kind === 'lost-writes') expect(again.result.mismatchCount).toBeGreaterThan(0);
    });
  }

  it('shrinks a shrunk file again, keeping where it started', async () => {
    const f = await huntedReplay('skip-final-sync');
    const first = await shrink(f, { maxRuns: 60 });
    const second = await shrink(first.file, { maxRuns: 60 });
    expect(second.file.shrunk!.from).toEqual(first.file.shrunk!.from);
    expect(second.file.shrunk!.rounds).toBeGreaterThanOrEqual(first.file.shrunk!.rounds);
    expect(second.after.steps).toBeLessThanOrEqual(first.after.steps);
    expect((await replayRun(second.file)).exact).toBe(true);
  });

  it('refuses a free-run file, pointing to the deterministic strategies', async () => {
    const f = await huntedReplay('copy-before-reset');
    const free: ReplayFile = { ...f, driver: 'free', strategy: 'free', schedule: null, fingerprint: '' };
    await expect(shrink(free)).rejects.toThrow(UserError);
    await expect(shrink(free)).rejects.toThrow(/free-run.*deterministic strategies/);
  });

  it('refuses a file whose failure does not reproduce', async () => {
    const f = await huntedReplay('copy-before-reset');
    // The same schedule without the bug: the replay does not lose writes.
    const fixed: ReplayFile = { ...f, scenario: { ...f.scenario, bugs: [] } };
    await expect(shrink(fixed)).rejects.toThrow(UserError);
    await expect(shrink(fixed)).rejects.toThrow(/does not fail as recorded \(lost-writes/);
  });
});
