import { describe, expect, it } from 'vitest';
import { CATALOG } from '../src/bugs/catalog.ts';
import { INJECTABLE_BUGS } from '../src/host/injections.ts';
import { hunt } from '../src/hunt/hunt.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { DEMOS } from '../src/scenarios/demos.ts';
import { cli } from './cli-helper.ts';

/** Verdicts that say what they could not see: an injected bug that never acted is reported as such. */
describe('injected bugs count how often they acted', () => {
  it('every catalogued bug has an "acted" counter and a reason for never acting, and nothing else has one', () => {
    expect([...INJECTABLE_BUGS].sort()).toEqual(CATALOG.map((b) => b.name).sort());
    for (const b of CATALOG) expect(b.neverActed.length, b.name).toBeGreaterThan(10);
    for (const b of CATALOG.filter((x) => x.commands.includes('dirty-log-test'))) expect(DEMOS[b.name].dirtyLogTest, b.name).toBeDefined();
  });

  it('dirty-log-test with ring-full-ignored and a ring that never fills: "PASSED, but ring-full-ignored never acted", with the ring\'s use and the demonstration', async () => {
    const r = await cli('dirty-log-test', '--mode', 'dirty-ring', '--vcpus', '2', '--memory', '16MiB', '--iterations', '4', '--driver', 'deterministic',
      '--seed', '7', '--inject', 'ring-full-ignored', '--ring-size', '4096');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^PASSED, but ring-full-ignored never acted: no ring reached its soft limit \(at most \d+ of 4032 entries used\); its demonstration settings: vmemlab dirty-log-test --inject ring-full-ignored --memory 16MiB --ring-size 256\. Every page verified/m);
    const json = await cli('dirty-log-test', '--memory', '16MiB', '--iterations', '2', '--driver', 'deterministic', '--inject', 'ring-full-ignored', '--ring-size', '4096', '--json');
    const doc = JSON.parse(json.out);
    expect(doc.injections).toEqual([{ bug: 'ring-full-ignored', acted: 0, idle: expect.stringMatching(/^no ring reached its soft limit/) }]);
  });

  it('dirty-log-test --inject takes the bug\'s demonstration settings as defaults (flags still override), and then the bug acts and is caught', async () => {
    const r = await cli('dirty-log-test', '--iterations', '4', '--driver', 'deterministic', '--inject', 'ring-full-ignored', '--json');
    const doc = JSON.parse(r.out);
    expect(doc.config).toMatchObject({ memoryBytes: 16 << 20, ringEntries: 256 });
    expect(doc.status).toBe('failed');
    expect(doc.injections[0].acted).toBeGreaterThan(0);
    const over = await cli('dirty-log-test', '--iterations', '1', '--driver', 'deterministic', '--inject', 'ring-full-ignored', '--memory', '1MiB', '--json');
    expect(JSON.parse(over.out).config).toMatchObject({ memoryBytes: 1 << 20, ringEntries: 256 });
  });

  it('migrate: a bug that never acted qualifies PASSED the same way', async () => {
    const r = await cli('migrate', '--inject', 'ring-full-ignored', '--ring-size', '65536', '--memory', '1MiB', '--driver', 'deterministic');
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/^PASSED, but ring-full-ignored never acted: no ring reached its soft limit \(at most \d+ of 65472 entries used\); its demonstration settings: vmemlab migrate --inject ring-full-ignored --workload random --memory 32MiB --ring-size 256 .*\. all 256 destination pages equal the source/m);
  });

  it('hunt reports detection as detected / acted / runs', async () => {
    const scenario = migrationSetup({ inject: ['ring-full-ignored'], ringEntries: '65536', memoryBytes: '1MiB', driver: 'deterministic' }).scenario;
    const { report } = await hunt({ scenario, strategies: ['random'], seeds: 2, all: true, shard: { index: 1, count: 1 }, workers: 1, watchdogMs: 10_000, burst: 256 });
    expect(report.strategies[0]).toMatchObject({ runs: 2, failures: 0, acted: 0 });
    const demo = migrationSetup({ inject: ['harvest-skips-entry'], driver: 'deterministic' }).scenario;
    const caught = await hunt({ scenario: demo, strategies: ['random'], seeds: 2, all: true, shard: { index: 1, count: 1 }, workers: 1, watchdogMs: 10_000, burst: 256 });
    expect(caught.report.strategies[0]).toMatchObject({ runs: 2, failures: 2, acted: 2 });
    const clean = migrationSetup({ memoryBytes: '1MiB', driver: 'deterministic' }).scenario;
    const none = await hunt({ scenario: clean, strategies: ['random'], seeds: 1, all: true, shard: { index: 1, count: 1 }, workers: 1, watchdogMs: 10_000, burst: 256 });
    expect(none.report.strategies[0]!.acted, 'nothing injected').toBeNull();
  });
});
