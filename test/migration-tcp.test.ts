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
    expect(r.reason).toMatch(/^the connection to 127\.0\.0\.1:\d+ closed before the migration completed$|^the connection to the destination at 127\.0\.0\.1:\d+ failed: /);
    expect(Date.now() - started).toBeLessThan(30_000);
    // A new migration afterwards succeeds.
    const dest = await serveDestination('127.0.0.1', 0);
    const again = await runMigration(scenario(), { ...FREE, to: { host: '127.0.0.1', port: dest.address.port } });
    expect(again.status, `${again.reason ?? ''} ${again.errors.join('; ')}`).toBe('passed');
  });

  it('the destination process resumes migration-test\'s guest from the migrated memory; the sweep pattern holds before and after', async () => {
    const dest = await serveDestination('127.0.0.1', 0, { vcpus: 2 });
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

  it('a destination that stops answering fails the migration within the deadline, with that reason, and the source stops sending', async () => {
    // A "destination" that takes the connection and never reads from it (frozen, as by SIGSTOP).
    const sockets: import('node:net').Socket[] = [];
    const server = createServer((socket) => { socket.pause(); sockets.push(socket); });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const started = Date.now();
    const r = await runMigration(scenario(), { ...FREE, watchdogMs: 1500, to: { host: '127.0.0.1', port } });
    for (const s of sockets) s.destroy();
    server.close();
    expect(r.status).toBe('failed');
    expect(r.reason).toMatch(/^the destination at 127\.0\.0\.1:\d+ has not answered for \d+\.\d s with \d+\.\d MiB unacknowledged: it stalled or is gone$/);
    expect(Date.now() - started).toBeLessThan(30_000);
  });

  it('a refused connection and a malformed reply fail the migration with their reasons, no exception', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as { port: number }).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const refused = await runMigration(scenario(), { ...FREE, to: { host: '127.0.0.1', port } });
    expect(refused.status).toBe('failed');
    expect(refused.reason).toMatch(/^the connection to the destination at 127\.0\.0\.1:\d+ failed: connect ECONNREFUSED/);

    const liar = createServer((socket) => { socket.once('data', () => socket.write(Buffer.from([0, 0, 0, 3, 0xc1, 0xc1, 0xc1]))); });
    await new Promise<void>((resolve) => liar.listen(0, '127.0.0.1', resolve));
    const bad = await runMigration(scenario(), { ...FREE, to: { host: '127.0.0.1', port: (liar.address() as { port: number }).port } });
    liar.close();
    expect(bad.status).toBe('failed');
    expect(bad.reason).toMatch(/^the destination at 127\.0\.0\.1:\d+ sent a malformed reply/);
  });

  it('the destination drops a connection that sends nothing and serves the real source; a second source during a migration is refused', async () => {
    // The real source may sit connected a while before its stream begins (its workers start
    // first): an idle limit short enough to drop it on a busy machine would make this a race.
    const dest = await serveDestination('127.0.0.1', 0, { idleMs: 3000 });
    const { Socket } = await import('node:net');
    const squatter = new Socket();
    const dropped = new Promise<void>((resolve) => squatter.once('close', () => resolve()));
    squatter.connect(dest.address.port, '127.0.0.1');
    await dropped; // dropped after idleMs, and the destination still listens
    let passed!: () => void;
    const firstPass = new Promise<void>((resolve) => { passed = resolve; });
    const migration = runMigration(scenario({ params: { ...scenario().params, bandwidth: 32 << 20 } }), {
      ...FREE, to: { host: '127.0.0.1', port: dest.address.port }, onEvent: (e) => { if (e.kind === 'pass') passed(); },
    });
    // Once the migration's stream has begun, another source gets an error reply.
    await firstPass;
    const second = new Socket();
    const reply = new Promise<string>((resolve) => { let got = ''; second.on('data', (c) => { got += c.toString('latin1'); }); second.on('close', () => resolve(got)); });
    second.connect(dest.address.port, '127.0.0.1', () => second.write(Buffer.alloc(16)));
    // One that resets its connection at once: no failure of the destination's (no uncaught error).
    const rude = new Socket();
    rude.on('error', () => {});
    rude.connect(dest.address.port, '127.0.0.1', () => { rude.write(Buffer.alloc(16)); rude.resetAndDestroy(); });
    const r = await migration;
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect((await dest.result).status).toBe('completed');
    expect(await reply).toContain('already receiving a migration');
  });

  it('the destination\'s memory follows what was received, not what the header claimed: 4 GiB claimed, 256 pages sent', async () => {
    const { connect } = await import('node:net');
    const { encodeHeader, encodePages } = await import('../src/migration/stream.ts');
    const rss = (): number => process.memoryUsage().rss;
    const before = rss();
    const dest = await serveDestination('127.0.0.1', 0, { idleMs: 30_000 });
    const s = connect(dest.address.port, '127.0.0.1');
    await new Promise((resolve) => s.once('connect', resolve));
    s.write(encodeHeader([{ id: 0, asId: 0, baseGfn: 0, pages: 4 << 18 }]));
    const page = new Uint8Array(4096).fill(0x5a);
    const offsets = Array.from({ length: 256 }, (_, i) => i * 4093); // spread over the whole claim
    s.write(encodePages(0, offsets, { isZero: () => false, copy: (_p, n, into, at) => { for (let i = 0; i < n; i++) into.set(page, at + i * 4096); } }).frame);
    s.end();
    const served = await dest.result;
    expect(served.status).toBe('failed'); // the stream ended before its completion record
    expect(served.normal).toBe(256);
    expect(served.layout?.totalPages).toBe(4 << 18);
    // Guest memory is a zero-filled SharedArrayBuffer the kernel maps lazily: 1 MiB received,
    // a few MiB of per-page metadata; committing the claim would add 4 GiB.
    expect(rss() - before).toBeLessThan(256 << 20);
  });

  it('refuses --to with the deterministic driver', async () => {
    await expect(runMigration(scenario(), { ...FREE, driver: 'deterministic', to: { host: '127.0.0.1', port: 1 } })).rejects.toThrow(/needs --driver free/);
  });
});
