import { describe, expect, it } from 'vitest';
import { CATALOG, MDEV_BUGS } from '../src/bugs/catalog.ts';
import { type MdevResult, runMdev } from '../src/scenarios/mdev.ts';
import { mdevSettings } from '../src/scenarios/settings.ts';
import { mdevOutcome } from '../src/scenarios/outcome.ts';

/**
 * Every bug of mediated-device MMIO mapped on fault, caught by the isolation oracles in its
 * demonstration (vmemlab mdev --inject NAME) on every seed of the fixed set, under the
 * deterministic driver; the same scenario without the bug passes, its misbehaving guest
 * (if any) stopped with its reason while the other VM runs on.
 */
const SEEDS = [1, 2, 3, 4, 5, 6, 7, 8];
const DET = { driver: 'deterministic' as const, watchdogMs: 10_000, burst: 64 };

function demo(bug: string, seed: number) {
  return mdevSettings({ inject: [bug], driver: 'deterministic', seed: String(seed) }).config;
}

const found = (r: MdevResult): string[] => r.vms.flatMap((v) => v.findings.filter((f) => f.count > 0).map((f) => f.kind));

describe('the mediated-device bugs, each caught on seeds 1-8 and clean without it', () => {
  it('the catalog lists them for vmemlab mdev, each with a demonstration', () => {
    expect(CATALOG.filter((b) => b.commands.includes('mdev')).map((b) => b.name).sort()).toEqual([...MDEV_BUGS].sort());
  });

  for (const bug of MDEV_BUGS) {
    it(`${bug}: caught by the isolation oracles; the same scenario without it passes`, async () => {
      for (const seed of SEEDS) {
        const c = demo(bug, seed);
        const r = await runMdev(c, DET);
        expect(r.injections[0]!.acted, `seed ${seed}: the bug acted`).toBeGreaterThan(0);
        expect(r.status, `seed ${seed}: ${r.errors.join('; ')}`).toBe('failed');
        expect(mdevOutcome(r).verdict, `seed ${seed}`).toBe('isolation-broken');
        expect(found(r).length, `seed ${seed}`).toBeGreaterThan(0);
        const clean = await runMdev({ ...c, bugs: [] }, DET);
        expect(clean.status, `seed ${seed} without the bug: ${clean.errors.join('; ')}`).toBe('passed');
        expect(found(clean), `seed ${seed} without the bug`).toEqual([]);
        // A misbehaving vm0 is stopped for its refused access; the cooperative VMs never are.
        for (const v of clean.vms.slice(1)) expect(v.stopped, `seed ${seed}: vm${v.vm}`).toBeNull();
        if (c.guest !== 'cooperative') expect(clean.vms[0]!.stopped, `seed ${seed}: vm0 (${c.guest})`).not.toBeNull();
      }
    });
  }
});
