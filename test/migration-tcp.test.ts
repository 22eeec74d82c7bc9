import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { serveDestination } from '../src/migration/tcp.ts';
import { type MigrationScenario, runMigration } from '../src/scenarios/migration.ts';
import { resumeDestination } from '../src/scenarios/resume.ts';

function scenario(o: Partial<MigrationScenario> = {}): MigrationScenario {
  return {
    tracking: 'dirty-ring', vcpus: 2, memoryBytes: 16 << 20, slots: 2, ringEntries: 4096,
    workload: { ...DEFAULT_WORKLOAD, name: 'hotset', hotFraction: 0.02, hotShare: 1 }, seed: 1, bugs: [], hostWriteEvery: 64,
    params: { bandwidth: 0, downtimeLimitMs: 50, maxIterations: 30, timeoutMs: 30_000, policy: 'force', batchPages: 256, warmupOps: 50_000 },
    ...o,
  };
}
const FREE = { driver: 'free' as const, watchdogMs: 5000, burst: 256 };

describe('migration over TCP on loopback', () => {
  it('migrates to a destination server that builds its memory from the stream header, and verifies by digests', async () => {
    const dest = await serveDestination('127.0.0.1', 0);
    const r = await runMigration(scenario(), { ...FREE, to: { host: '127.0.0.1', port: dest.address.port } });
    const served = await dest.result;
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(r.pagesCompared).toBe(4096);
    expect(served.status).toBe('completed');
    expect(served.pages).toBe(r.info!.normalPages + r.info!.zeroPages);
  });

  it('fails cleanly, with the reason, when the destination drops the connection mid-migration; a new migration then succeeds', async () => {
    // A "destination" that reads a little and then closes the connection.
    const server = createServer((socket) => {
      let got = 0;
      socket.on('data', (c) => { got += c.length; if (got > 64 * 1024) socket.destroy(); });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const started = Date.now();
    const r = await runMigration(scenario({ params: { ...scenario().params, bandwidth: 64 << 20 } }), { ...FREE, to: { host: '127.0.0.1', port } });
    server.close();
    expect(r.status).toBe('failed');
    expect(r.reason).toMatch(/the destination failed|closed before the migration completed/);
    expect(Date.now() - started).toBeLessThan(30_000);
    // A new migration afterwards succeeds.
    const dest = await serveDestination('127.0.0.1', 0);
    const again = await runMigration(scenario(), { ...FREE, to: { host: '127.0.0.1', port: dest.address.port } });
    expect(again.status, `${again.reason ?? ''} ${again.errors.join('; ')}`).toBe('passed');
  });

  it('the destination process resumes migration-test\'s guest from the migrated memory; the sweep pattern holds before and after', async () => {
    const dest = await serveDestination('127.0.0.1', 0, 2);
    // The sweep dirties every page in turn and never converges: force the switchover after 3 passes.
    const sweep = scenario({ workload: { ...DEFAULT_WORKLOAD, name: 'sweep' }, hostWriteEvery: 0, params: { ...scenario().params, maxIterations: 3 } });
    const r = await runMigration(sweep, { ...FREE, to: { host: '127.0.0.1', port: dest.address.port } });
    const served = await dest.result;
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(served.status).toBe('completed');
    const d = await resumeDestination(served.layout!, { workload: sweep.workload, seed: 1, opsPerVcpu: 3072, driver: 'free', watchdogMs: 10_000, burst: 256, sweepCheck: true });
    expect(d.status, d.errors.join('; ')).toBe('passed');
    expect(d.atCompletion!.ok).toBe(true);
    expect(d.atCompletion!.slices).toHaveLength(2);
    expect(d.afterResume!.ok).toBe(true);
    expect(d.resumed!.ops).toBeGreaterThanOrEqual(2 * 3072);
  });

  it('refuses --to with the deterministic driver', async () => {
    await expect(runMigration(scenario(), { ...FREE, driver: 'deterministic', to: { host: '127.0.0.1', port: 1 } })).rejects.toThrow(/needs --driver free/);
  });
});
