import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { describeWriter } from '../src/host/memslot.ts';
import { type Explanation, describeExplanation, explainReplay } from '../src/hunt/explain.ts';
import { failureOf, fingerprint } from '../src/hunt/failure.ts';
import { type ReplayFile, readReplayFile, writeReplayFile } from '../src/hunt/replay-file.ts';
import { type MigrationRunResult, runMigration } from '../src/scenarios/migration.ts';
import { UserError } from '../src/util/errors.ts';
import { VMEMLAB_VERSION } from '../src/version.ts';

/** `vmemlab migrate --inject BUG --driver deterministic --seed SEED`, failed, as an in-memory replay file. */
async function replayOf(bug: string, seed = 1): Promise<{ file: ReplayFile; result: MigrationRunResult }> {
  const { scenario } = migrationSetup({ inject: [bug], driver: 'deterministic', seed: String(seed) });
  const result = await runMigration(scenario, { driver: 'deterministic', watchdogMs: 10_000, burst: 256, resumeOps: 0 });
  const failure = failureOf(result);
  if (failure === null) throw new Error(`${bug} seed ${seed}: the run passed`);
  const file: ReplayFile = {
    format: 'vmemlab-replay', formatVersion: 1, vmemlabVersion: VMEMLAB_VERSION, command: 'migrate', scenario, driver: 'deterministic',
    strategy: 'random', seed, schedule: result.schedule!, failure, fingerprint: fingerprint(result), created: new Date(0).toISOString(),
  };
  return { file, result };
}

const hex = (n: number): string => `0x${n.toString(16)}`;

/** The index of the first step whose text matches, after `from`; fails naming the explanation when there is none. */
function find(e: Explanation, re: RegExp, from = -1): number {
  const i = e.steps.findIndex((s, k) => k > from && re.test(s.text));
  expect(i, `no step matching ${re} after step line ${from}:\n${describeExplanation(e).join('\n')}`).toBeGreaterThan(from);
  return i;
}

/** Well formed: at most 20 lines, step numbers never decreasing, every line with an actor. */
function wellFormed(e: Explanation): void {
  expect(e.steps.length).toBeGreaterThan(0);
  expect(e.steps.length).toBeLessThanOrEqual(20);
  for (let i = 1; i < e.steps.length; i++) expect(e.steps[i]!.step).toBeGreaterThanOrEqual(e.steps[i - 1]!.step);
  for (const s of e.steps) expect(s.actor).toMatch(/^(vcpu\d+|migration|host-writer|device\d+|iommu-service|destination|vmm)$/);
}

/** "the destination holds seq N from W, the source seq M from V" for the run's first lost page. */
function seqs(r: MigrationRunResult): string {
  const m = r.mismatches[0]!;
  return `the destination holds seq ${m.destination.seq} from ${describeWriter(m.destination.writer)}, the source seq ${m.source.seq} from ${describeWriter(m.source.writer)}`;
}

describe('explainReplay: the causal chain of a lost write', () => {
  it('migrate-noncoherent-without-flush: the copy read the page through the CPU cache, and sent a line older than memory', async () => {
    const { file, result } = await replayOf('migrate-noncoherent-without-flush');
    const e = await explainReplay(file);
    wellFormed(e);
    find(e, /^the migration copied gfn 0x[0-9a-f]+ .*reading it write-back through the CPU cache \(memory held seq \d+ from vcpu\d\)$/);
    expect(e.conclusion).toMatch(/that copy read a line the CPU cache held from before a write that went around it \(a UC or WC store, or no-snoop DMA\), and sent it \(page aliasing; the migration thread read stale data \d+ times\)/);
    expect(e.conclusion).toContain(seqs(result));
  });

  it('skip-tlb-shootdown: re-protected with no flush, copied, then written through the stale TLB entry', async () => {
    const { file, result } = await replayOf('skip-tlb-shootdown');
    const m = result.mismatches[0]!;
    const g = `gfn ${hex(m.gfn)}`;
    const e = await explainReplay(file);
    wellFormed(e);
    expect(e.subject).toContain(`slot ${m.slot} ${g}`);
    const fill = find(e, new RegExp(`^vcpu\\d wrote ${g} \\(seq \\d+\\) through its writable SPTE, caching a writable translation in its TLB`));
    const protect = find(e, new RegExp(`write-protected ${g}, but no remote TLB flush followed`), fill);
    const copy = find(e, new RegExp(`the migration copied ${g} \\(pass \\d+\\): it sent seq ${m.destination.seq} from`), protect);
    const stale = find(e, new RegExp(`^vcpu\\d wrote ${g} \\(seq (\\d+)\\) through its stale writable TLB entry`), copy);
    expect(e.steps[stale]!.text).toMatch(/acknowledged no TLB flush/);
    expect(e.steps[stale]!.actor).toBe(describeWriter(m.source.writer));
    expect(Number(/\(seq (\d+)\)/.exec(e.steps[stale]!.text)![1])).toBeGreaterThan(m.destination.seq);
    expect(e.steps[protect]!.step).toBeLessThan(e.steps[copy]!.step);
    expect(e.steps[copy]!.step).toBeLessThan(e.steps[stale]!.step);
    expect(e.conclusion).toBe(`no later log reported ${g}; ${seqs(result)}`);
  });

  it('copy-before-reset: harvested, copied, written through the still-writable SPTE, re-protected by KVM_RESET_DIRTY_RINGS only after the copy', async () => {
    const { file, result } = await replayOf('copy-before-reset');
    const m = result.mismatches[0]!;
    const g = `gfn ${hex(m.gfn)}`;
    const e = await explainReplay(file);
    wellFormed(e);
    expect(e.subject).toContain(g);
    const fault = find(e, new RegExp(`^vcpu\\d took a write-protect fault on ${g}: KVM made its SPTE writable and logged it in vcpu\\d's dirty ring`));
    const harvest = find(e, new RegExp(`harvested ${g} from the ring of vcpu\\d \\(not re-protected yet\\)`), fault);
    const copy = find(e, new RegExp(`the migration copied ${g}`), harvest);
    const write = find(e, new RegExp(`^vcpu\\d wrote ${g} \\(seq \\d+\\) through the still-writable SPTE .*no fault, so nothing logged this write`), copy);
    const reset = find(e, new RegExp(`^KVM_RESET_DIRTY_RINGS re-protected ${g}, after its copy at step ${e.steps[copy]!.step} and the write at step ${e.steps[write]!.step}`), write);
    const at = (i: number): number => e.steps[i]!.step;
    expect(at(harvest)).toBeLessThan(at(copy));
    expect(at(copy)).toBeLessThan(at(write));
    expect(at(write)).toBeLessThan(at(reset));
    expect(e.steps[reset]!.actor).toBe('migration');
    expect(e.steps[reset]!.text).toMatch(/a remote TLB flush followed \(generation \d+, step \d+\) and completed at step \d+/);
    expect(e.conclusion).toBe(`no later log reported ${g}; ${seqs(result)}`);
  });

  it('untracked-host-write: copied, then written by kvm_write_guest without mark_page_dirty_in_slot', async () => {
    const { file, result } = await replayOf('untracked-host-write');
    const m = result.mismatches[0]!;
    const g = `gfn ${hex(m.gfn)}`;
    const e = await explainReplay(file);
    wellFormed(e);
    expect(e.subject).toContain(g);
    const copy = find(e, new RegExp(`the migration copied ${g}`));
    const host = find(e, new RegExp(`^host writer 0 wrote ${g} \\(seq ${m.source.seq}\\) with kvm_write_guest: without mark_page_dirty_in_slot, so not logged`), copy);
    expect(e.steps[host]!.actor).toBe('host-writer');
    expect(e.steps[copy]!.step).toBeLessThan(e.steps[host]!.step);
    expect(e.conclusion).toBe(`no later log reported ${g}; ${seqs(result)}`);
  });
});

describe('explainReplay: a DMA oracle record', () => {
  it('stale-iotlb-after-unmap: revoked, freed with no IOTLB invalidation, remapped, then DMA through the stale entry', async () => {
    const { file, result } = await replayOf('stale-iotlb-after-unmap');
    const rec = result.dma!.records[0]!;
    expect(rec.kind).toBe('stale-iotlb');
    const io = `IOVA ${hex(rec.iova)}`;
    const cached = `gfn ${hex(rec.cachedGfn)}`;
    const e = await explainReplay(file);
    wellFormed(e);
    expect(e.subject).toContain(io);
    expect(e.subject).toContain(cached);
    const revoke = find(e, new RegExp(`began unmapping ${io}: it revoked the IOPTE`));
    const free = find(e, new RegExp(`the unmap freed the IOPTE of ${io} and returned, with no IOTLB invalidation since the revoke`), revoke);
    const remap = find(e, new RegExp(`mapped ${io} to gfn 0x[0-9a-f]+$`), free);
    const dma = find(e, new RegExp(`^device ${rec.device} wrote ${cached}.* through its stale IOTLB entry for ${io}: the DMA oracle recorded it`), remap);
    expect(e.steps[revoke]!.actor).toBe('iommu-service');
    expect(e.steps[dma]!.actor).toBe(`device${rec.device}`);
    expect(e.steps[revoke]!.step).toBeLessThan(e.steps[free]!.step);
    expect(e.steps[free]!.step).toBeLessThan(e.steps[dma]!.step);
    expect(e.conclusion).toMatch(new RegExp(`^no IOTLB invalidation followed the unmap of ${io}; device ${rec.device} wrote ${cached} through the stale translation at step ${e.steps[dma]!.step}`));
    // The lost page of the same run, on request.
    const lost = await explainReplay(file, { subject: 'lost-write' });
    expect(lost.subject).toContain(`gfn ${hex(result.mismatches[0]!.gfn)}`);
    expect(lost.conclusion).toContain(seqs(result));
  });
});

describe('explainReplay: the other catalogued bugs', () => {
  const cases: [bug: string, step: RegExp | null, conclusion: RegExp][] = [
    ['copy-before-clear', /^KVM_CLEAR_DIRTY_LOG cleared the dirty bit of gfn 0x[0-9a-f]+ and re-protected it, after its copy/, /never harvested: KVM_CLEAR_DIRTY_LOG cleared its dirty bit and re-protected it/],
    ['clear-without-protect', /dirty bit was cleared without write-protecting the page: its SPTE stays writable/, /^no later log reported/],
    ['harvest-skips-entry', /dirty ring was marked collected without being recorded/, /never harvested: its dirty ring entry was marked collected without being recorded/],
    ['ring-full-ignored', /dirty ring wrapped: the entry for gfn 0x[0-9a-f]+ was overwritten/, /never harvested: its dirty ring entry was overwritten/],
    ['skip-final-sync', /took a write-protect fault/, /never harvested: no later sync collected it before the migration completed/],
    ['no-backup-bitmap', /no running vCPU and no backup bitmap, so not logged/, /^no later log reported/],
    ['untracked-dma', /^device 0 wrote gfn 0x[0-9a-f]+ \(seq \d+\) by DMA/, /^no dirty source reported/],
    ['gpa-as-iova', /^device 0's (write|read) to IOVA 0x[0-9a-f]+ faulted \(unmapped-iova\)/, /nothing had mapped it since the run began/],
  ];
  for (const [bug, step, conclusion] of cases) {
    it(`${bug}: a short chain with its key event`, async () => {
      const { file, result } = await replayOf(bug);
      const e = await explainReplay(file);
      wellFormed(e);
      if (step) find(e, step);
      expect(e.conclusion).toMatch(conclusion);
      if (result.mismatchCount > 0 && !result.dma?.records.length) expect(e.conclusion).toContain(seqs(result));
    });
  }
});

describe('explainReplay and replay files', () => {
  it('is deterministic: the same text twice, through a replay file written and read back', async () => {
    const { file } = await replayOf('skip-tlb-shootdown');
    const dir = mkdtempSync(join(tmpdir(), 'vmemlab-explain-'));
    try {
      const path = join(dir, 'run.vmreplay');
      writeReplayFile(path, file);
      const a = describeExplanation(await explainReplay(readReplayFile(path)));
      const b = describeExplanation(await explainReplay(file));
      expect(a).toEqual(b);
      expect(a[0]).toMatch(/^explaining: lost write: slot 1 gfn 0x[0-9a-f]+/);
      expect(a.at(-1)).toMatch(/^conclusion: no later log reported/);
      expect(a.slice(1, -1).every((l) => /^ {2}step +\d+ {2}\S+ +\S/.test(l))).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a free-run replay file (no schedule to follow)', async () => {
    const { file } = await replayOf('skip-tlb-shootdown');
    await expect(explainReplay({ ...file, driver: 'free', strategy: 'free', schedule: null })).rejects.toThrow(UserError);
  });
});
