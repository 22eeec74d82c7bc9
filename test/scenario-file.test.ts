import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { cli } from './cli-helper.ts';

const EX = (f: string): string => fileURLToPath(new URL(`../examples/${f}`, import.meta.url));


function tmpFile(text: string): string {
  const f = join(mkdtempSync(join(tmpdir(), 'vmemlab-')), 'scenario.yaml');
  writeFileSync(f, text);
  return f;
}

describe('vmemlab run SCENARIO', () => {
  it('runs a migrate scenario; flags override the file', async () => {
    const r = await cli('run', EX('migrate-hotset-ring.yaml'), '--memory', '32MiB');
    expect(r.code, r.out + r.err).toBe(0);
    expect(r.out).toMatch(/^migrate: dirty-ring \(4096 entries\), 2 vCPUs, 32MiB, workload hotset/m);
    expect(r.out).toMatch(/^PASSED: all 8192 destination pages equal the source/m);
  });

  it('runs a dirty-log-test scenario', async () => {
    const r = await cli('run', EX('dirty-log-test-ring.yaml'), '--memory', '16MiB', '--iterations', '2');
    expect(r.code, r.out + r.err).toBe(0);
    expect(r.out).toMatch(/mode dirty-ring \(1024 entries\), 4 vCPUs, 16MiB in 2 slot\(s\)/);
  });

  it('the shipped bug scenario loses writes, deterministically the same ones', async () => {
    const a = await cli('run', EX('bug-copy-before-reset.yaml'));
    const b = await cli('run', EX('bug-copy-before-reset.yaml'));
    expect(a.code).toBe(1);
    expect(a.out).toMatch(/^LOST write: slot \d gfn 0x[0-9a-f]+: source last written by/m);
    expect(a.out.match(/^LOST write.*$/gm)).toEqual(b.out.match(/^LOST write.*$/gm));
  });

  it('the sweep bug scenario: the sweep-pattern oracle names the lost pages at completion and after the resume', async () => {
    const r = await cli('run', EX('bug-copy-before-clear-sweep.yaml'));
    expect(r.code).toBe(1);
    const lost = [...r.out.matchAll(/^LOST write: slot \d gfn (0x[0-9a-f]+)/gm)].map((m) => m[1]);
    expect(lost.length).toBeGreaterThan(0);
    expect(r.out).toMatch(/^sweep pattern at completion: BROKEN: \d+ page\(s\) out of line$/m);
    expect(r.out).toMatch(/^destination resumed: 4 vCPUs retired \d+ guest operations .*\d+ steps\)$/m); // migration.resume_ops: 48
    expect(r.out).toMatch(/^sweep pattern after the resume: BROKEN/m);
    const named = [...r.out.matchAll(/^ {2}SWEEP page out of line: slot \d gfn (0x[0-9a-f]+)/gm)].map((m) => m[1]);
    expect(new Set(named)).toEqual(new Set(lost));
  });

  it('the sweep example migrates migration-test\'s guest and resumes it', async () => {
    const r = await cli('run', EX('migrate-sweep.yaml'), '--memory', '4MiB', '--resume-ops', '3000');
    expect(r.code, r.out + r.err).toBe(0);
    expect(r.out).toMatch(/^sweep pattern after the resume: OK/m);
    expect(r.out).toMatch(/^PASSED: all 1024 destination pages equal the source; the sweep pattern holds before and after/m);
  });

  it('the clear-log example is valid', async () => {
    const r = await cli('run', EX('migrate-clear-log.yaml'), '--memory', '8MiB', '--driver', 'deterministic', '--bandwidth', '32MiB', '--downtime-limit', '2', '--policy', 'force', '--max-iterations', '4', '--warmup', '2000');
    expect(r.code, r.out + r.err).toBe(0);
  });

  it.each([
    ['kind: migrate\nvm: {memory: 12QB}\n', "scenario.yaml: vm.memory: '12QB' is not a size"],
    ['kind: migrate\nvm: {vcpus: 0}\n', "scenario.yaml: vm.vcpus: '0' is not a whole number from 1 to 64"],
    ['kind: migrate\ntracking: {mode: pml}\n', "scenario.yaml: tracking.mode: unknown mode 'pml'"],
    ['kind: migrate\nworkload: {name: zigzag}\n', "scenario.yaml: workload.name: unknown workload 'zigzag'"],
    ['kind: migrate\nmigration: {policy: hope}\n', "scenario.yaml: migration.policy: unknown policy 'hope'"],
    ['kind: migrate\nvm: {memroy: 1GiB}\n', "scenario.yaml: vm: 'memroy' Unrecognized key"],
    ['kind: teleport\n', 'scenario.yaml: kind:'],
    ['kind: dirty-log-test\nmigration: {bandwidth: 1MiB}\n', 'scenario.yaml: migration: only for kind: migrate'],
    ['kind: [unclosed\n', 'scenario.yaml: not valid YAML'],
  ])('a bad file %j is reported with file, field and value, exit 2', async (text, message) => {
    const r = await cli('run', tmpFile(text));
    expect(r.code).toBe(2);
    expect(r.err).toContain(message);
    expect(r.err).not.toMatch(/\n\s+at /);
  });

  it('a bad flag still names the flag, not the file', async () => {
    const r = await cli('run', EX('migrate-hotset-ring.yaml'), '--vcpus', 'x');
    expect(r.code).toBe(2);
    expect(r.err).toContain("vmemlab: --vcpus: 'x' is not a whole number");
  });

  it('a missing file is a clear error', async () => {
    const r = await cli('run', '/nonexistent/s.yaml');
    expect(r.code).toBe(2);
    expect(r.err).toContain('/nonexistent/s.yaml: cannot read the scenario (ENOENT)');
  });

  it('every example scenario parses', () => {
    for (const f of ['migrate-hotset-ring.yaml', 'migrate-clear-log.yaml', 'bug-copy-before-reset.yaml', 'dirty-log-test-ring.yaml']) {
      expect(readFileSync(EX(f), 'utf8')).toMatch(/^kind: /);
    }
  });
});

describe('devices in scenario files and flags', () => {
  it('a bad device entry is named by file, entry and key', async () => {
    const bad = tmpFile('kind: migrate\ndevices:\n  - {kind: mdev, buffers: lots}\n');
    const r = await cli('run', bad);
    expect(r.code).toBe(2);
    expect(r.err).toBe(`vmemlab: ${bad}: devices.0.buffers: 'lots' is not a whole number from 1 to 1048576`);
    const kind = tmpFile('kind: migrate\ndevices:\n  - {kind: nic}\n');
    expect((await cli('run', kind)).err).toMatch(/: devices\.0\.kind: unknown kind 'nic' \(one of: dma-engine, mdev, gvt\)$/);
    const backend = tmpFile('kind: migrate\niommu: {backend: amd-vi}\ndevices:\n  - {kind: mdev}\n');
    expect((await cli('run', backend)).err).toBe(`vmemlab: ${backend}: iommu.backend: unknown backend 'amd-vi' (type1 or iommufd)`);
    const dlt = tmpFile('kind: dirty-log-test\ndevices:\n  - {kind: mdev}\n');
    expect((await cli('run', dlt)).err).toBe(`vmemlab: ${dlt}: devices: only for kind: migrate`);
  });

  it('flags: unknown options, an mdev on iommufd, a device bug without its device, and dma_entry_limit exhaustion are user errors', async () => {
    expect((await cli('migrate', '--device', 'dma-engine:speed=9')).err).toMatch(/^vmemlab: --device: device 0 'dma-engine:speed=9': unknown option 'speed' \(one of: every, buffers/);
    expect((await cli('migrate', '--device', 'mdev', '--iommu', 'iommufd')).err).toMatch(/device 0 \(mdev\) pins pages through VFIO type1's emulated IOMMU; use the type1 backend/);
    expect((await cli('migrate', '--device', 'gvt:tracking=device')).err).toMatch(/tracking=device: only a dma-engine logs its own DMA/);
    expect((await cli('migrate', '--inject', 'gpa-as-iova', '--device', 'gvt')).err).toBe('vmemlab: --inject gpa-as-iova: this bug lives in a device (mdev); add one, e.g. --device mdev');
    const r = await cli('migrate', '--memory', '8MiB', '--device', 'dma-engine:buffers=40', '--dma-entry-limit', '32');
    expect(r.code).toBe(2);
    expect(r.err).toBe('vmemlab: device 0 (dma-engine), buffer 32: VFIO_IOMMU_MAP_DMA: ENOSPC: the container holds 32 mappings, its dma_entry_limit');
  });
});
