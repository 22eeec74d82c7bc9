import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Packr } from 'msgpackr';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { reportError } from '../src/cli/main.ts';
import { KVM_DIRTY_RING_MAX_ENTRIES, KVM_DIRTY_RING_MIN_ENTRIES, KVM_USER_MEM_SLOTS } from '../src/host/constants.ts';
import { MAX_STAMP_ITERATION } from '../src/host/memslot.ts';
import { type ReplayFile, readReplayFile, writeReplayFile } from '../src/hunt/replay-file.ts';
import { StreamDecoder, StreamError, encodeHeader } from '../src/migration/stream.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { UserError } from '../src/util/errors.ts';
import { LIMITS } from '../src/util/limits.ts';
import { cli } from './cli-helper.ts';

const dir = mkdtempSync(join(tmpdir(), 'vmemlab-validation-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const packr = new Packr({ useRecords: false, moreTypes: true });

/** One line, no stack trace. */
function oneLine(err: string): void {
  expect(err.trim().split('\n')).toHaveLength(1);
  expect(err).not.toMatch(/\n\s+at /);
}

/** A replay file as hunt writes it for a free-run failure (no schedule: nothing to run to make one). */
function replay(): Omit<ReplayFile, 'format' | 'formatVersion' | 'vmemlabVersion' | 'created'> {
  const { scenario } = migrationSetup({ memoryBytes: '4MiB', inject: ['skip-tlb-shootdown'] });
  return { command: 'migrate', scenario, driver: 'free', strategy: 'free', seed: scenario.seed, schedule: null, failure: { kind: 'lost-writes', summary: 'lost 1 page' }, fingerprint: '{}' };
}

/** Writes the replay file with `change` applied to its decoded form, as a hand edit would. */
function tampered(name: string, change: (f: Record<string, any>) => void): string {
  const path = join(dir, `${name}.vmreplay`);
  writeReplayFile(path, replay());
  const f = packr.unpack(readFileSync(path)) as Record<string, any>;
  change(f);
  writeFileSync(path, packr.pack(f));
  return path;
}

describe('replay files are read as user input', () => {
  it('an untouched file is accepted, its scenario as written', () => {
    const path = tampered('good', () => {});
    expect(readReplayFile(path).scenario).toEqual(replay().scenario);
  });

  it.each([
    ['vcpus -1', (f: any) => { f.scenario.vcpus = -1; }, "scenario.vcpus: '-1' is not a whole number from 1 to 64"],
    ['vcpus 1000', (f: any) => { f.scenario.vcpus = 1000; }, "scenario.vcpus: '1000' is not a whole number from 1 to 64"],
    ['negative memory', (f: any) => { f.scenario.memoryBytes = -4096; }, "scenario.memoryBytes: '-4096' is not a size"],
    ['huge memory', (f: any) => { f.scenario.memoryBytes = 2 ** 50; }, 'scenario.memoryBytes: \'1125899906842624\' is more than 64GiB of guest memory'],
    ['unaligned memory', (f: any) => { f.scenario.memoryBytes = 1000; }, "scenario.memoryBytes: '1000' is not a whole, non-zero number of 4 KiB pages"],
    ['0 slots', (f: any) => { f.scenario.slots = 0; }, "scenario.slots: '0' is not a whole number from 1 to 32764"],
    ['unknown workload', (f: any) => { f.scenario.workload.name = 'nope'; }, "scenario.workload.name: unknown workload 'nope'"],
    ['a ring of 3', (f: any) => { f.scenario.ringEntries = 3; }, 'scenario.ringEntries: 3 entries is not a power of two'],
    ['unknown bug', (f: any) => { f.scenario.bugs = ['no-such-bug']; }, "scenario.bugs: unknown bug 'no-such-bug'"],
    ['the same bug twice', (f: any) => { f.scenario.bugs = ['skip-tlb-shootdown', 'skip-tlb-shootdown']; }, "scenario.bugs: 'skip-tlb-shootdown' is given twice"],
    ['batch 0', (f: any) => { f.scenario.params.batchPages = 0; }, "scenario.params.batchPages: '0' is not a whole number from 1 to 1024"],
    ['batch -5', (f: any) => { f.scenario.params.batchPages = -5; }, "scenario.params.batchPages: '-5' is not a whole number from 1 to 1024"],
    ['a string for a number', (f: any) => { f.scenario.vcpus = '2'; }, "scenario.vcpus: '2' is not a value a scenario holds there (a number)"],
    ['a key no scenario has', (f: any) => { f.scenario.extra = 1; }, 'scenario.extra: not a field of a scenario'],
    ['a null scenario', (f: any) => { f.scenario = null; }, 'scenario: not a scenario (null)'],
    ['a null failure', (f: any) => { f.failure = null; }, 'failure: null is not a failure'],
    ['a bad driver', (f: any) => { f.driver = 'warp'; }, "driver: unknown driver 'warp'"],
    ['a bad strategy', (f: any) => { f.strategy = 'dfs'; }, 'strategy: "dfs" is not free (the driver is free)'],
    ['a seed that is not the scenario\'s', (f: any) => { f.seed = 99; }, "seed: 99 is not the scenario's seed"],
    ['a schedule on a free-run failure', (f: any) => { f.schedule = new Uint8Array([0, 1]); }, 'schedule: a free-run failure has no schedule'],
    ['a prototype key', (f: any) => { f.scenario.params = JSON.parse('{"__proto__": {"x": 1}}'); }, 'scenario.params.__proto_: not a field of a scenario'], // msgpackr renames the key
  ])('%s: refused before anything runs, naming the file and the field', (name, change, message) => {
    const path = tampered(name.replace(/\W+/g, '-'), change);
    expect(() => readReplayFile(path)).toThrow(UserError);
    expect(() => readReplayFile(path)).toThrow(`${path}: ${message}`);
  });

  it('on the command line: exit 2, one line, for replay, shrink and explain alike', async () => {
    const path = tampered('cli', (f) => { f.scenario.vcpus = 1000; });
    for (const cmd of ['replay', 'shrink', 'explain']) {
      const r = await cli(cmd, path);
      expect(r.code, cmd).toBe(2);
      oneLine(r.err);
      expect(r.err).toContain("scenario.vcpus: '1000'");
    }
  });

  it('a deterministic replay whose schedule names a role the scenario does not run is refused', async () => {
    const path = tampered('schedule', (f) => { f.driver = 'deterministic'; f.strategy = 'random'; f.schedule = new Uint8Array([0, 200]); });
    const r = await cli('replay', path);
    expect(r.code).toBe(2);
    oneLine(r.err);
    expect(r.err).toMatch(/schedule: step 1 names role 200, but this scenario runs \d+ roles/);
  });
});

describe('files and flags', () => {
  const write = (name: string, text: string): string => { const p = join(dir, name); writeFileSync(p, text); return p; };

  it.each([
    ['a special file', () => ['run', '/dev/zero'], /^vmemlab: \/dev\/zero: not a regular file/],
    ['a directory', () => ['run', dir], /not a regular file \(a directory\)/],
    ['a scenario file over its limit', () => ['run', write('big.yaml', `kind: migrate\n# ${'x'.repeat(LIMITS.scenarioFileBytes.max)}\n`)], /bytes; a scenario or litmus file is at most 1048576 bytes/],
    ['a YAML alias bomb (scenario)', () => ['run', write('bomb.yaml', `kind: migrate\na: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n`)], /alias/],
    ['a YAML alias bomb (litmus)', () => ['litmus', write('bomb-litmus.yaml', `name: x\nvm: {memory: 1MiB}\na: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n`)], /alias/],
    ['YAML with an unknown directive and tag (no warnings besides the one line)', () => ['run', write('junk.yaml', '%M,t\n!# x\n')], /junk\.yaml: /],
    ['__proto__ under a device', () => ['run', write('proto.yaml', 'kind: migrate\ndevices:\n  - {kind: gvt, __proto__: {every: 1}}\n')], /devices\.0\.__proto__: '__proto__' is not a field/],
    ['--bandwidth 0', () => ['migrate', '--bandwidth', '0'], /--bandwidth: '0' is not a bandwidth from 4KiB to 1TiB per second \(write unlimited for no cap\)/],
    ['--writes beyond the limit', () => ['dirty-log-test', '--writes', '99999999999999'], /--writes: '99999999999999' is not a whole number from 1 to 100000000/],
    ['--memory beyond the limit', () => ['migrate', '--memory', '128GiB'], /--memory: '128GiB' is more than 64GiB of guest memory/],
    ['the same --inject twice', () => ['migrate', '--inject', 'skip-tlb-shootdown', '--inject', 'skip-tlb-shootdown'], /--inject: 'skip-tlb-shootdown' is given twice/],
    ['an impossible listen address', () => ['destination', '--listen', '127.999.0.1:4444'], /--listen: '127\.999\.0\.1' is not an IP address or host name/],
    ['--idle-timeout past its limit', () => ['destination', '--listen', '127.0.0.1:0', '--idle-timeout', '9999999'], /--idle-timeout: '9999999' is more than 86400 seconds/],
    ['an impossible target', () => ['migrate', '--to', 'tcp:256.1.1.1:80'], /--to: '256\.1\.1\.1' is not an IP address or host name/],
    ['a memory too small for the slots of an injected bug\'s demonstration (found by bench/fuzz.ts)', () => ['run', write('demo-slots.yaml', 'kind: migrate\nvm: {memory: 4KiB}\ndriver: deterministic\ninject: [copy-before-clear]\n')],
      /demo-slots\.yaml: vm\.memory: 4KiB \(1 pages\) is too small for the 2 slots of the demonstration settings of .*demo-slots\.yaml: inject copy-before-clear$/m],
    ['a litmus write-pages beyond the VM', () => ['litmus', write('wp.yaml', 'name: x\nvm: {memory: 1MiB}\ntracking: {mode: dirty-ring}\nactors:\n  vcpu0: [write-pages 0x100 100000000 1]\n  host: []\ninterleaving: [vcpu0]\n')], /COUNT 100000000 is more pages than the VM has \(256\)/],
    ['a litmus forged entry past u32', () => ['litmus', write('fe.yaml', 'name: x\nvm: {memory: 1MiB}\ntracking: {mode: dirty-ring}\nactors:\n  vcpu0: []\n  host: [forge-entry vcpu0 99999999999 1 1]\ninterleaving: [host]\n')], /INDEX 99999999999 is not a u32 ring index/],
    ['a litmus slot of 2^31 pages', () => ['litmus', write('big-slot.yaml', 'name: x\nvm:\n  slots: [{id: 1, base_gfn: 0, pages: 2147483648}]\ntracking: {mode: dirty-ring}\nactors:\n  vcpu0: []\n  host: [enable-logging]\ninterleaving: [host]\n')], /2147483648 pages in all is more than 64 GiB/],
  ])('%s: exit 2, one line', async (_name, args, message) => {
    const r = await cli(...args());
    expect(r.code, r.out + r.err).toBe(2);
    oneLine(r.err);
    expect(r.err).toMatch(message);
  });
});

describe('an address already taken', () => {
  it('destination --listen on a port in use: exit 2, one line naming the flag and the errno', async () => {
    const { createServer } = await import('node:net');
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const port = (taken.address() as { port: number }).port;
    try {
      const r = await cli('destination', '--listen', `127.0.0.1:${port}`);
      expect(r.code, r.out + r.err).toBe(2);
      oneLine(r.err);
      expect(r.err).toMatch(new RegExp(`--listen: 127\\.0\\.0\\.1:${port}: cannot listen there \\(EADDRINUSE\\)`));
    } finally {
      taken.close();
    }
  });
});

describe('the migration stream header is checked before memory is built', () => {
  const header = (slots: unknown[]): Uint8Array => encodeHeader(slots as never);
  it.each([
    ['a string id', [{ id: 'x', asId: 0, baseGfn: 0, pages: 1 }], /slot 0: .* is not a memslot/],
    ['fractional pages', [{ id: 1, asId: 0, baseGfn: 0, pages: 1.5 }], /slot 0: .* is not a memslot/],
    ['duplicate slots', [{ id: 1, asId: 0, baseGfn: 0, pages: 1 }, { id: 1, asId: 0, baseGfn: 16, pages: 1 }], /duplicates or overlaps slot 0:1/],
    ['overlapping slots', [{ id: 1, asId: 0, baseGfn: 0, pages: 8 }, { id: 2, asId: 0, baseGfn: 4, pages: 8 }], /duplicates or overlaps slot 0:1/],
    ['more memory than the limit', [{ id: 1, asId: 0, baseGfn: 0, pages: 2 ** 24 }, { id: 2, asId: 0, baseGfn: 2 ** 25, pages: 2 ** 24 }], /pages of guest memory; at most 16777216/],
    ['no slots', [], /0 slots/],
    ['an overlap between the first and the last of 32764 slots (found in gfn order, not by comparing every pair)',
      [{ id: 0, asId: 0, baseGfn: 100_000, pages: 2 }, ...Array.from({ length: 32762 }, (_, i) => ({ id: i + 1, asId: 0, baseGfn: i * 2, pages: 1 })), { id: 32763, asId: 0, baseGfn: 100_001, pages: 1 }],
      /slot 32763 \(0:32763\) duplicates or overlaps slot 0:0/],
  ])('%s: refused', (_name, slots, message) => {
    const d = new StreamDecoder();
    expect(() => d.push(header(slots))).toThrow(StreamError);
    expect(() => new StreamDecoder().push(header(slots))).toThrow(message);
  });
});

describe('limits and exits', () => {
  it('the limits agree with what the kernel and the stamps allow, and docs/limits.md lists every one', () => {
    expect(LIMITS.ringEntries.min).toBe(KVM_DIRTY_RING_MIN_ENTRIES);
    expect(LIMITS.ringEntries.max).toBe(KVM_DIRTY_RING_MAX_ENTRIES);
    expect(LIMITS.iterations.max).toBe(MAX_STAMP_ITERATION);
    expect(LIMITS.slots.max).toBe(KVM_USER_MEM_SLOTS);
    const doc = readFileSync(new URL('../docs/limits.md', import.meta.url), 'utf8');
    for (const l of Object.values(LIMITS)) expect(doc).toContain(`| ${l.what} | ${l.text} | ${l.why} |`);
  });

  it('--help lists the exit statuses and the limits', async () => {
    const out: string[] = [];
    vi.spyOn(process.stdout, 'write').mockImplementation((s: string | Uint8Array) => { out.push(String(s)); return true; });
    const r = await cli('--help');
    expect(r.code).toBe(0);
    const text = out.join('');
    expect(text).toContain('4 an internal error');
    for (const l of Object.values(LIMITS)) expect(text).toContain(l.text);
  });

  it('an internal error is exit 4 in one line, with the stack only under --debug', () => {
    const lines: string[] = [];
    vi.spyOn(console, 'error').mockImplementation((...a: unknown[]) => { lines.push(a.join(' ')); });
    expect(reportError(new TypeError('x is undefined'), false)).toBe(4);
    expect(lines[0]).toMatch(/^vmemlab: internal error: x is undefined \(this is vmemlab's fault/);
    oneLine(lines[0]!);
    expect(reportError(new TypeError('x is undefined'), true)).toBe(4);
    expect(lines[1]).toMatch(/\n\s+at /);
    expect(reportError(new UserError('--vcpus: bad'), false)).toBe(2);
  });
});
