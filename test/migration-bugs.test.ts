import { HOST_WRITER_BASE } from '../src/host/memslot.ts';
import { describe, expect, it } from 'vitest';
import { CATALOG, CONFIDENTIAL_BUGS, NONCOHERENT_BUGS } from '../src/bugs/catalog.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { type PageEventName, PageHistory, type PageHistoryEvent } from '../src/host/page-history.ts';
import { PageEvent, createPageHistoryBuffer } from '../src/host/page-history-buffer.ts';
import { describeMismatch } from '../src/oracles/stamp-oracle.ts';
import { NONCOHERENT_BLOCKER, runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';

/** The fixed seed set every migrate bug must be caught on (deterministic driver). */
const SEEDS = [1, 2, 3, 4, 5, 6, 7, 8];
const DET = { driver: 'deterministic' as const, watchdogMs: 5000, burst: 256 };

/** The scenario `vmemlab migrate --inject BUG --tracking MODE --driver deterministic --seed N` runs. */
function demo(bug: string, mode: string, seed: number, withBug = true) {
  const { scenario } = migrationSetup({ inject: [bug], tracking: mode, driver: 'deterministic', seed: String(seed) });
  return withBug ? scenario : { ...scenario, bugs: [] };
}

const at = (h: PageHistoryEvent[], e: PageEventName): number => h.find((x) => x.event === e)?.at ?? -1;

/** What catches each bug: the stamp oracle (lost writes) unless the DMA oracle is named. */
function caught(bug: string, r: Awaited<ReturnType<typeof runMigration>>): number {
  if ((CONFIDENTIAL_BUGS as readonly string[]).includes(bug)) return failureOf(r)?.kind === 'private-memory' ? 1 : 0;
  if (bug === 'stale-iotlb-after-unmap') return r.dma?.staleIotlb ?? 0;
  if (bug === 'gpa-as-iova') return r.dma?.faults ?? 0;
  if (bug === 'ring-full-exit-unhandled') return /^the guest stalled/.test(r.reason ?? '') ? 1 : 0;
  if (bug === 'no-zap-on-noncoherent-transition' || bug === 'noncoherent-unbalanced') return r.cache?.staleReads.device ?? 0;
  if (bug === 'wbinvd-noop') return (r.cache?.staleReads.device ?? 0) + (r.cache?.overwrites ?? 0);
  if (bug === 'missing-migration-blocker') return failureOf(r)?.kind === 'blocker-ignored' ? 1 : 0;
  if (bug === 'mmio-mapped-wb') return r.cache?.machineChecks.count ?? 0;
  if (bug === 'vmm-touches-kvm-only-slot') return r.kvmOnlyTouches?.count ?? 0;
  if (bug === 'migrate-noncoherent-without-flush' || bug === 'dma-slot-with-dirty-logging') return Math.min(r.mismatchCount, r.cache?.staleReads.migration ?? 0);
  return r.mismatchCount;
}

describe('every migrate bug of the catalog is caught with its demonstration settings', () => {
  for (const bug of CATALOG.filter((b) => b.commands.includes('migrate') && !b.costOnly)) {
    for (const mode of bug.modes) {
      // A device's, a confidential guest's or a non-coherent device's bug does not depend on KVM's tracking mode: its other modes run two seeds.
      const seeds = (bug.devices || CONFIDENTIAL_BUGS.includes(bug.name) || NONCOHERENT_BUGS.includes(bug.name)) && mode !== bug.modes[0] ? SEEDS.slice(0, 2) : SEEDS;
      it(`${bug.name} (${mode}): caught on seeds ${seeds[0]}-${seeds.at(-1)}; the same scenario without the bug verifies`, async () => {
        for (const seed of seeds) {
          const r = await runMigration(demo(bug.name, mode, seed), DET);
          expect(r.status, `seed ${seed}: ${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('failed');
          expect(r.info?.status, `seed ${seed}: the migration itself completed`).toBe('completed');
          expect(caught(bug.name, r), `seed ${seed}`).toBeGreaterThan(0);
          expect(r.injections, `seed ${seed}: the bug acted`).toEqual([expect.objectContaining({ bug: bug.name, idle: null })]);
          expect(r.injections[0]!.acted).toBeGreaterThan(0);
          const clean = await runMigration(demo(bug.name, mode, seed, false), DET);
          // Without missing-migration-blocker the blocker refuses the migration at once: that is the correct outcome.
          if (bug.name === 'missing-migration-blocker') expect(clean).toMatchObject({ status: 'failed', reason: NONCOHERENT_BLOCKER, info: null });
          else expect(clean.status, `seed ${seed} without the bug: ${clean.reason ?? ''} ${clean.mismatchCount} lost`).toBe('passed');
        }
      });
    }
  }
});

describe('page history in the lost-write report', () => {
  it('copy-before-reset: each lost page was harvested, then copied, and re-protected only after the copy', async () => {
    const r = await runMigration(demo('copy-before-reset', 'dirty-ring', 1), DET);
    expect(r.mismatches.length).toBeGreaterThan(0);
    for (const m of r.mismatches) {
      const h = m.history!;
      expect(h.every((e) => e.unit === 'step')).toBe(true);
      expect(at(h, 'logged')).toBeGreaterThanOrEqual(0);
      expect(at(h, 'harvested')).toBeGreaterThan(at(h, 'logged'));
      expect(at(h, 'copied')).toBeGreaterThan(at(h, 'harvested'));
      expect(at(h, 're-protected')).toBeGreaterThan(at(h, 'copied'));
      expect(h.find((e) => e.event === 're-protected')!.detail).toBe('KVM_RESET_DIRTY_RINGS');
    }
    expect(describeMismatch(r.mismatches[0]!)).toMatch(/\n {2}page history: .*harvested step \d+ \(ring of vcpu\d\), copied step \d+ \(pass \d+\), re-protected step \d+ \(KVM_RESET_DIRTY_RINGS\)/);
  });

  it('copy-before-clear: copied before KVM_CLEAR_DIRTY_LOG re-protected it', async () => {
    const r = await runMigration(demo('copy-before-clear', 'clear-log', 1), DET);
    for (const m of r.mismatches) {
      const h = m.history!;
      expect(at(h, 're-protected')).toBeGreaterThan(at(h, 'copied'));
      expect(h.find((e) => e.event === 're-protected')!.detail).toBe('KVM_CLEAR_DIRTY_LOG');
    }
  });

  it('skip-final-sync: logged after the last harvest and copy, never collected again', async () => {
    const r = await runMigration(demo('skip-final-sync', 'dirty-ring', 1), DET);
    expect(r.mismatches.length).toBeGreaterThan(0);
    for (const m of r.mismatches) {
      const h = m.history!;
      const logged = Math.max(at(h, 'logged'), at(h, 'host-write'));
      expect(logged).toBeGreaterThan(at(h, 'harvested'));
      expect(logged).toBeGreaterThan(at(h, 'copied'));
    }
  });

  it('harvest-skips-entry: logged and re-protected by the ring reset with no harvest in between', async () => {
    const r = await runMigration(demo('harvest-skips-entry', 'dirty-ring', 1), DET);
    const skipped = r.mismatches.filter((m) => at(m.history!, 'logged') > at(m.history!, 'harvested'));
    expect(skipped.length).toBeGreaterThan(0);
    for (const m of skipped) expect(at(m.history!, 're-protected')).toBeGreaterThan(at(m.history!, 'logged'));
  });

  it('untracked-host-write: the last event is a host write that was not logged', async () => {
    const r = await runMigration(demo('untracked-host-write', 'dirty-ring', 1), DET);
    const h = r.mismatches[0]!.history!;
    expect(h.at(-1)).toMatchObject({ event: 'host-write', detail: 'kvm_write_guest without mark_page_dirty_in_slot' });
    expect(r.mismatches[0]!.source.writer).toBeGreaterThanOrEqual(HOST_WRITER_BASE);
  });

  it('is measured in microseconds since the run started without the step clock, and can be switched off', async () => {
    const h = new PageHistory(createPageHistoryBuffer(4));
    await new Promise((r) => setTimeout(r, 20));
    h.record(2, PageEvent.COPIED, 3);
    const [e] = h.read(2);
    expect(e).toMatchObject({ event: 'copied', unit: 'us', detail: 'pass 3' });
    expect(e!.at).toBeGreaterThanOrEqual(15_000);
    expect(e!.at).toBeLessThan(5_000_000);
    expect(h.read(1)).toEqual([]);
    const off = await runMigration({ ...demo('copy-before-reset', 'dirty-ring', 1), pageHistory: false }, DET);
    expect(off.mismatchCount).toBeGreaterThan(0);
    expect(off.mismatches[0]!.history).toBeUndefined();
  });
});
