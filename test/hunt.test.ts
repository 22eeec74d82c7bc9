import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { cli } from './cli-helper.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { PctScheduler } from '../src/drivers/pct-scheduler.ts';
import { type HuntLine, hunt, shardSeeds, summarize } from '../src/hunt/hunt.ts';
import { readReplayFile } from '../src/hunt/replay-file.ts';
import { replayRun } from '../src/hunt/replay.ts';
import { VMEMLAB_VERSION } from '../src/version.ts';

const tmp = (): string => mkdtempSync(join(tmpdir(), 'vmemlab-hunt-'));
const demo = (bug: string) => migrationSetup({ inject: [bug], driver: 'deterministic' }).scenario;
const BASE = { shard: { index: 1, count: 1 }, workers: 2, watchdogMs: 10_000, burst: 256 };


describe('the PCT-style scheduler', () => {
  it('runs the highest-priority runnable role, the same for the same seed, and changes priorities at most depth - 1 times per window', () => {
    const picks = (seed: number): number[] => {
      const s = new PctScheduler(seed, 4, 3, 64);
      return Array.from({ length: 256 }, (_, i) => s.pick([0, 1, 2, 3], i));
    };
    expect(picks(7)).toEqual(picks(7));
    expect(picks(7)).not.toEqual(picks(8));
    const p = picks(7);
    for (let w = 0; w < 256; w += 64) {
      const window = p.slice(w, w + 64);
      const switches = window.filter((r, i) => i > 0 && r !== window[i - 1]).length;
      expect(switches, `window at ${w}: with all roles runnable, only a change point switches roles`).toBeLessThanOrEqual(2);
    }
    // A blocked leader hands over to the next priority, and gets the turn back when runnable again.
    const s = new PctScheduler(1, 3, 1, 1000);
    const leader = s.pick([0, 1, 2], 0);
    const others = [0, 1, 2].filter((r) => r !== leader);
    const second = s.pick(others, 1);
    expect(others).toContain(second);
    expect(s.pick([0, 1, 2], 2)).toBe(leader);
  });
});

describe('vmemlab hunt', () => {
  it('finds copy-before-reset under both deterministic strategies; the replay file reproduces the failure exactly', async () => {
    const out = tmp();
    const { report } = await hunt({ ...BASE, scenario: demo('copy-before-reset'), strategies: ['random', 'pct'], seeds: 4, all: false, outDir: out });
    for (const r of report.strategies) {
      expect(r.failures, r.strategy).toBeGreaterThan(0);
      expect(r.firstDetection).toMatchObject({ seed: 1, runs: 1 });
      expect(r.firstDetection!.steps).toBeGreaterThan(1000);
      expect(r.firstDetection!.summary).toMatch(/lost write/);
    }
    const file = readReplayFile(report.strategies[1]!.firstDetection!.replay!);
    expect(file).toMatchObject({ strategy: 'pct', seed: 1, driver: 'deterministic', vmemlabVersion: VMEMLAB_VERSION, failure: { kind: 'lost-writes' } });
    const again = await replayRun(file);
    expect(again.exact, 'same steps, lost pages, stamps').toBe(true);
    expect(again.result.steps).toBe(file.schedule!.length);
    const lines = readFileSync(join(out, 'hunt-1-of-1.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as HuntLine);
    expect(lines[0]!.type).toBe('hunt');
    expect(lines.filter((l) => l.type === 'run' && l.seed === 1)).toHaveLength(2);
  });

  it('a clean scenario hunts clean under every strategy, free-run included', async () => {
    const scenario = migrationSetup({ vcpus: '2', memoryBytes: '8MiB', workload: 'hotset' }).scenario;
    const { report } = await hunt({ ...BASE, scenario, strategies: ['random', 'pct', 'free'], seeds: 2, all: true });
    for (const r of report.strategies) expect(r, r.strategy).toMatchObject({ runs: 2, failures: 0, firstDetection: null });
  });

  it('a worker\'s memory stays bounded over many runs: earlier runs\' guest memory is released, and the report says how much was held', async () => {
    // 32 runs of a 16 MiB guest: each allocates ~34 MiB of SharedArrayBuffers (source and
    // destination). Without the collection between runs a worker piled them up (1 GB by run 24).
    const scenario = migrationSetup({ vcpus: '2', memoryBytes: '16MiB', workload: 'hotset', driver: 'deterministic' }).scenario;
    const { report } = await hunt({ ...BASE, scenario, strategies: ['random'], seeds: 32, all: true, workers: 1 });
    expect(report.strategies[0]).toMatchObject({ runs: 32, failures: 0 });
    expect(report.memory!.workers).toBe(1);
    expect(report.memory!.heldBytes).toBeLessThan(256 << 20);
  });

  it('sharded runs merged give the same totals as one run', async () => {
    const scenario = demo('harvest-skips-entry');
    const strategies = ['random', 'pct'] as const;
    const one = await hunt({ ...BASE, scenario, strategies: [...strategies], seeds: 6, all: true });
    const dir = tmp();
    for (let i = 1; i <= 3; i++) await hunt({ ...BASE, scenario, strategies: [...strategies], seeds: 6, all: true, shard: { index: i, count: 3 }, outDir: dir });
    expect(shardSeeds(6, { index: 2, count: 3 })).toEqual([2, 5]);
    const files = readdirSync(dir).filter((f) => f.endsWith('.jsonl')).map((f) => join(dir, f));
    expect(files).toHaveLength(3);
    const merged = await cli('merge', '--json', ...files);
    const m = JSON.parse(merged.out) as { strategies: unknown[]; missingShards: number[] };
    expect(m.missingShards).toEqual([]);
    const strip = (rs: { firstDetection: { replay?: unknown; seconds?: unknown } | null; [k: string]: unknown }[]) =>
      rs.map((r) => ({ ...r, firstDetection: r.firstDetection && { ...r.firstDetection, replay: null, seconds: null } }));
    expect(strip(m.strategies as never)).toEqual(strip(one.report.strategies as never));
    // Without --all, totals count each strategy's seeds up to its first failure only.
    const lines: HuntLine[] = [1, 2, 3].map((seed) => ({ type: 'run', strategy: 'random', seed, failure: seed === 2 ? 'lost-writes' : null, summary: 'x', steps: 10, seconds: 1, replay: null }));
    expect(summarize(lines, ['random'], false)[0]).toMatchObject({ runs: 2, failures: 1, firstDetection: { seed: 2, runs: 2, steps: 20, seconds: 2 } });
  });
});

describe('replay files and the commands', () => {
  it('a replay file from another vmemlab version is refused, naming both versions', () => {
    const dir = tmp();
    const path = join(dir, 'old.vmreplay');
    writeFileSync(path, new Packr({ useRecords: false, moreTypes: true }).pack({ format: 'vmemlab-replay', formatVersion: 1, vmemlabVersion: '0.0.1' }));
    expect(() => readReplayFile(path)).toThrow(`recorded by vmemlab 0.0.1, this is vmemlab ${VMEMLAB_VERSION}`);
    writeFileSync(join(dir, 'junk'), 'not msgpack at all');
    expect(() => readReplayFile(join(dir, 'junk'))).toThrow(/not a vmemlab replay file/);
  });

  it('hunt and replay on the command line: exit 1 with the replay command; replay reproduces exactly', async () => {
    const out = tmp();
    const h = await cli('hunt', '--inject', 'skip-tlb-shootdown', '--seeds', '2', '--strategy', 'random', '--out', out);
    expect(h.code, h.out + h.err).toBe(1);
    expect(h.out).toMatch(/^random +1 runs, 1 failed, the bug acted in 1; first: seed 1 after 1 run\(s\), \d+ steps/m);
    const replay = /vmemlab replay (\S+)/.exec(h.out)![1]!;
    const r = await cli('replay', replay);
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/^LOST write: slot \d gfn 0x[0-9a-f]+/m);
    expect(r.out).toMatch(/^REPRODUCED exactly: the same \d+ steps/m);
    expect(r.out).toMatch(/^explaining: lost write: slot \d gfn 0x[0-9a-f]+/m);
    const e = await cli('explain', replay);
    expect(e.code).toBe(0);
    expect(e.out).toMatch(/but no remote TLB flush followed/);
    expect(e.out).toMatch(/^conclusion: no later log reported gfn 0x[0-9a-f]+; the destination holds seq \d+ from vcpu\d, the source seq \d+ from vcpu\d$/m);
    expect((await cli('explain', replay, '--subject', 'tlb')).err).toBe("vmemlab: --subject: 'tlb' is not auto, lost-write or dma");
    const sh = await cli('shrink', replay);
    expect(sh.code, sh.out + sh.err).toBe(0);
    const min = replay.replace(/\.vmreplay$/, '.min.vmreplay');
    expect(sh.out).toContain(`minimal replay: ${min}`);
    const steps = /^steps: (\d+) -> (\d+)$/m.exec(sh.out)!;
    expect(Number(steps[2])).toBeLessThan(Number(steps[1]) / 10);
    const again = await cli('replay', min);
    expect(again.code).toBe(1);
    expect(again.out).toMatch(new RegExp(`^REPRODUCED exactly: the same ${steps[2]} steps`, 'm'));
  });

  it('bad hunt input is a one-line error naming the flag', async () => {
    expect((await cli('hunt', '--shard', '3/2')).err).toBe("vmemlab: --shard: '3/2' is not i/n with 1 <= i <= n <= 4096 (e.g. 2/4)");
    expect((await cli('hunt', '--strategy', 'random,dfs')).err).toMatch(/^vmemlab: --strategy: unknown strategy 'dfs'/);
    expect((await cli('hunt', '--seed', '3')).err).toBe('vmemlab: --seed: not for hunt (it runs seeds 1..N of each --strategy, in-process)');
    expect((await cli('replay', '/nonexistent.vmreplay')).err).toMatch(/cannot read the replay file \(ENOENT\)/);
    const dir = tmp();
    const a = join(dir, 'a.jsonl');
    const b = join(dir, 'b.jsonl');
    const { scenario } = migrationSetup({ driver: 'deterministic' });
    writeFileSync(a, `${JSON.stringify({ type: 'hunt', scenario, strategies: ['random'], seeds: 4, shard: { index: 1, count: 2 }, all: true })}\n`);
    writeFileSync(b, `${JSON.stringify({ type: 'hunt', scenario, strategies: ['random'], seeds: 8, shard: { index: 2, count: 2 }, all: true })}\n`);
    expect((await cli('merge', a, b)).err).toMatch(/b\.jsonl: from another hunt/);
  });
});
