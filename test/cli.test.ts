import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { cli } from './cli-helper.ts';

const BIN = fileURLToPath(new URL('../bin/vmemlab.mjs', import.meta.url));



describe('vmemlab CLI', () => {
  it('dirty-log-test prints selftest-style iteration lines and exits 0 when verified', async () => {
    const r = await cli('dirty-log-test', '--driver', 'deterministic', '--memory', '2MiB', '--iterations', '2', '--ring-size', '256');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^Iteration 1: dirty \d+ clean \d+ writes \d+/m);
    expect(r.out).toMatch(/^Iteration 2: dirty \d+ clean \d+ writes \d+/m);
    expect(r.out).toMatch(/^PASSED: every page verified \(2 iterations/m);
  });

  it('exits 1 and names the lost page when an injected bug loses a write; the mode follows the bug', async () => {
    const r = await cli('dirty-log-test', '--driver', 'deterministic', '--memory', '2MiB', '--inject', 'clear-without-protect');
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/mode clear-log/);
    expect(r.out).toMatch(/^LOST dirty page: slot 1 gfn 0x[0-9a-f]+ holds iteration (\d+) but was not reported dirty in iteration \1; last written by (vcpu\d|host writer 0) \(seq \d+\), value \d+$/m);
    expect(r.out).toMatch(/^replay exactly: vmemlab dirty-log-test --driver deterministic --seed 1 --mode clear-log/m);
  });

  it('--json prints one parseable document', async () => {
    const r = await cli('dirty-log-test', '--driver', 'deterministic', '--memory', '1MiB', '--iterations', '1', '--json');
    const doc = JSON.parse(r.out);
    expect(doc.status).toBe('passed');
    expect(doc.iterations).toHaveLength(1);
    expect(doc.config.mode).toBe('dirty-ring');
  });

  it.each([
    [['run', '--vcpus', 'abc'], "--vcpus: 'abc' is not a whole number from 1 to 64"],
    [['run', '--memory', '12QB'], "--memory: '12QB' is not a size"],
    [['run', '--memory', '1000'], "--memory: '1000' is not a whole, non-zero number of 4 KiB pages"],
    [['run', '--ring-size', '1000'], '--ring-size: 1000 entries is not a power of two'],
    [['run', '--ring-size', '128'], '--ring-size: 128 entries is less than one page'],
    [['run', '--workload', 'zigzag'], "--workload: unknown workload 'zigzag'"],
    [['run', '--mode', 'pml'], "--mode: unknown mode 'pml'"],
    [['run', '--inject', 'nope'], "--inject: unknown bug 'nope'"],
    [['run', '--inject', 'copy-before-clear', '--mode', 'dirty-ring'], '--inject copy-before-clear: this bug does not occur with --mode dirty-ring'],
    [['dirty-log-test', '--inject', 'ring-full-ignored', '--mode', 'dirty-log'], '--inject ring-full-ignored: this bug does not occur with --mode dirty-log'],
    [['run', '--iterations', '3'], '--iterations: the default job is a migration; this option is for vmemlab dirty-log-test'],
    [['run', '--resume-ops', 'lots'], "--resume-ops: 'lots' is not a whole number from 0"],
    [['migrate', '--to', 'tcp:127.0.0.1:4444', '--resume-ops', '10'], '--resume-ops: a destination process resumes the guest itself (vmemlab destination --resume)'],
    [['run', '--driver', 'fast'], "--driver: unknown driver 'fast'"],
    [['run', '--slots', '0'], "--slots: '0' is not a whole number from 1"],
  ])('bad input %j: one line naming the option and value, exit 2', async (args, message) => {
    const r = await cli(...args);
    expect(r.code).toBe(2);
    expect(r.err).toContain(`vmemlab: ${message}`);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).not.toMatch(/\n\s+at /);
  });

  it('catalog lists every bug with its reference, and --json parses', async () => {
    const r = await cli('catalog');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^no-backup-bitmap {2}\(modes: dirty-ring\)$/m);
    expect(r.out).toMatch(/^reassign-without-zap {2}\(any tracking\)$/m);
    expect(r.out).toMatch(/reference: .*CVE-2021-4095/);
    const j = await cli('catalog', '--json');
    expect(JSON.parse(j.out).map((b: { name: string }) => b.name)).toContain('harvest-skips-entry');
    expect(r.out.match(/^ {2}demo: {6}vmemlab (hunt|dirty-log-test|mdev) --inject [a-z-]+ /gm)?.length).toBe(JSON.parse(j.out).length);
  });

  it('catalog --measure measures each bug\'s detection now: every correctness bug is caught on seed 1 by some strategy', async () => {
    const r = await cli('catalog', '--measure', '1', '--json');
    expect(r.code).toBe(0);
    const bugs = JSON.parse(r.out) as { name: string; costOnly?: boolean; detection: { strategy: string; caught: number; runs: number }[] | null }[];
    for (const b of bugs) {
      if (b.costOnly) { expect(b.detection, b.name).toBeNull(); continue; }
      expect(b.detection!.map((d) => d.strategy), b.name).toEqual(['random', 'pct']);
      expect(b.detection!.every((d) => d.runs === 1), b.name).toBe(true);
      expect(Math.max(...b.detection!.map((d) => d.caught)), `${b.name} caught on seed 1`).toBe(1);
    }
  });

  it('litmus runs the shipped examples (exit 0), fails them with a bug injected (exit 1), rejects a bad file (exit 2)', async () => {
    const dir = fileURLToPath(new URL('../examples/litmus/', import.meta.url));
    const files = readdirSync(dir).filter((f) => f.endsWith('.yaml')).map((f) => dir + f);
    const ok = await cli('litmus', ...files);
    expect(ok.code).toBe(0);
    expect(ok.out).toMatch(new RegExp(`^${files.length} passed, 0 failed$`, 'm'));
    const bad = await cli('litmus', '--inject', 'skip-tlb-shootdown', ...files);
    expect(bad.code).toBe(1);
    expect(bad.out).toMatch(/^FAIL .*02-reset-rearms-logging\.yaml/m);
    const tmp = join(mkdtempSync(join(tmpdir(), 'vmemlab-')), 'bad.yaml');
    writeFileSync(tmp, readFileSync(files[0]!, 'utf8').replace(/memory: \w+/, 'memory: 12QB'));
    const err = await cli('litmus', tmp);
    expect(err.code).toBe(2);
    expect(err.err).toContain(tmp);
    expect(err.err).toContain('12QB');
  });

  it('the installed bin runs the default job, a migration, with real worker threads and exits 0', () => {
    const out = execFileSync(process.execPath, [BIN, 'run', '--memory', '16MiB'], { encoding: 'utf8', env: { ...process.env, CI: '1' } });
    expect(out).toMatch(/^migrate: dirty-ring \(4096 entries\), 4 vCPUs, 16MiB, workload hotset, .*driver free, destination in-process/m);
    expect(out).toMatch(/^Migration status: completed$/m);
    expect(out).toMatch(/^destination resumed: 4 vCPUs retired \d+ guest operations from the migrated memory, then stopped/m);
    expect(out).toMatch(/^PASSED: all 4096 destination pages equal the source; the destination resumed the guest \(/m);
  });

  it('the installed bin still runs dirty_log_test with its defaults', () => {
    const out = execFileSync(process.execPath, [BIN, 'dirty-log-test', '--memory', '16MiB', '--iterations', '2'], { encoding: 'utf8', env: { ...process.env, CI: '1' } });
    expect(out).toMatch(/^dirty_log_test: mode dirty-ring \(4096 entries\), 2 vCPUs, 16MiB in 1 slot\(s\), workload random, .*driver free/m);
    expect(out).toMatch(/^PASSED: every page verified \(2 iterations/m);
  });

  it('migrate --workload sweep: migration-test\'s check at completion and after the destination resumed the guest', async () => {
    const r = await cli('migrate', '--workload', 'sweep', '--driver', 'deterministic', '--memory', '1MiB', '--vcpus', '2', '--ring-size', '256');
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/^sweep pattern at completion: OK \(256 pages in 2 slice\(s\); the sweep stopped: vcpu0 at (gfn 0x[0-9a-f]+|its slice start), vcpu1 at/m);
    expect(r.out).toMatch(/^destination resumed: 2 vCPUs retired \d+ guest operations from the migrated memory, then stopped \([\d.]+ s, \d+ steps\)$/m);
    expect(r.out).toMatch(/^sweep pattern after the resume: OK/m);
    expect(r.out).toMatch(/^PASSED: all 256 destination pages equal the source; the sweep pattern holds before and after; the destination resumed the guest/m);
    const paused = await cli('migrate', '--workload', 'sweep', '--driver', 'deterministic', '--memory', '1MiB', '--ring-size', '256', '--resume-ops', '0', '--json');
    const doc = JSON.parse(paused.out);
    expect(doc.destination.atCompletion.ok).toBe(true);
    expect(doc.destination.resumed).toBeNull();
  });

  it('vmemlab destination and vmemlab migrate --to tcp: migrate between two processes', async () => {
    const dest = spawn(process.execPath, [BIN, 'destination', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let destOut = '';
    dest.stdout.on('data', (c: Buffer) => { destOut += c.toString(); });
    const port = await new Promise<number>((resolve, reject) => {
      dest.stdout.on('data', () => { const m = /listening on 127\.0\.0\.1:(\d+)/.exec(destOut); if (m) resolve(Number(m[1])); });
      dest.on('exit', () => reject(new Error(`destination exited: ${destOut}`)));
    });
    const mig = spawnSync(process.execPath, [BIN, 'migrate', '--to', `tcp:127.0.0.1:${port}`, '--memory', '16MiB'], { encoding: 'utf8', env: { ...process.env, CI: '1' } });
    const destCode = await new Promise<number | null>((resolve) => dest.on('exit', resolve));
    expect(mig.status, mig.stdout + mig.stderr).toBe(0);
    expect(mig.stdout).toMatch(/destination tcp:127\.0\.0\.1:\d+/);
    expect(mig.stdout).toMatch(/^Migration status: completed$/m);
    expect(mig.stdout).toMatch(/^PASSED: all 4096 destination pages equal the source/m);
    expect(destOut).toMatch(/destination: migration completed: \d+ pages/);
    expect(destCode).toBe(0);
  });

  it('vmemlab destination --resume runs the migrated sweep guest and checks it (migration-test across two processes)', async () => {
    const dest = spawn(process.execPath, [BIN, 'destination', '--listen', '127.0.0.1:0', '--resume', '--vcpus', '2', '--workload', 'sweep'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let destOut = '';
    dest.stdout.on('data', (c: Buffer) => { destOut += c.toString(); });
    const port = await new Promise<number>((resolve, reject) => {
      dest.stdout.on('data', () => { const m = /listening on 127\.0\.0\.1:(\d+)/.exec(destOut); if (m) resolve(Number(m[1])); });
      dest.on('exit', () => reject(new Error(`destination exited: ${destOut}`)));
    });
    const mig = spawnSync(process.execPath, [BIN, 'migrate', '--to', `tcp:127.0.0.1:${port}`, '--memory', '16MiB', '--workload', 'sweep'], { encoding: 'utf8', env: { ...process.env, CI: '1' } });
    const destCode = await new Promise<number | null>((resolve) => dest.on('exit', resolve));
    expect(mig.status, mig.stdout + mig.stderr).toBe(0);
    expect(destOut).toMatch(/^destination: sweep pattern at completion: OK \(4096 pages in 2 slice\(s\)/m);
    expect(destOut).toMatch(/^destination: destination resumed: 2 vCPUs retired \d+ guest operations from the migrated memory, then stopped/m);
    expect(destOut).toMatch(/^destination: sweep pattern after the resume: OK/m);
    expect(destOut).toMatch(/^destination: PASSED/m);
    expect(destCode, destOut).toBe(0);
  });

  it('destination: the guest options need --resume', async () => {
    const r = await cli('destination', '--listen', '127.0.0.1:0', '--workload', 'sweep');
    expect(r.code).toBe(2);
    expect(r.err).toContain('vmemlab: --workload: only with --resume');
  });

  it('refuses a non-loopback listen address without --allow-remote', async () => {
    const r = await cli('destination', '--listen', '192.168.1.5:4444');
    expect(r.code).toBe(2);
    expect(r.err).toContain("vmemlab: --listen: '192.168.1.5' is not a loopback address; pass --allow-remote");
  });

  it('the bin reports an unknown option without a stack trace, exit 2', () => {
    const r = spawnSync(process.execPath, [BIN, 'run', '--bogus'], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toBe("error: unknown option '--bogus'");
  });
});
