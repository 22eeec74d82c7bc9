import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CATALOG } from '../src/bugs/catalog.ts';
import { CONVERSION_DESIGNS, type ConversionDesignName } from '../src/host/vmm/conversion-design.ts';
import { formatLitmusOutcome, loadLitmus, parseLitmus, runLitmus } from '../src/litmus/index.ts';
import { run, userError } from './litmus-helpers.ts';

const DIR = 'examples/litmus';
const files = readdirSync(DIR).filter((f) => f.endsWith('.yaml')).sort();
const text = (f: string): string => readFileSync(join(DIR, f), 'utf8');

/** The example's text with `from` replaced; fails loudly if `from` is not there (so tests cannot silently go stale). */
function edited(f: string, from: string | RegExp, to: string): string {
  const t = text(f);
  const out = t.replace(from, to);
  if (out === t) throw new Error(`${f}: ${String(from)} not found`);
  return out;
}


describe('the shipped litmus examples', () => {
  it('cover every behaviour the suite promises', () => {
    expect(files.length).toBeGreaterThanOrEqual(10);
  });

  it.each(files)('%s passes', (f) => {
    const o = runLitmus(loadLitmus(join(DIR, f)));
    expect(o.failures).toEqual([]);
    expect(o.passed).toBe(true);
    expect(o.file).toBe(join(DIR, f));
    // The trace has a line for every interleaving step.
    const steps = loadLitmus(join(DIR, f)).interleaving.length;
    for (let i = 0; i < steps; i++) expect(o.log.some((l) => l.startsWith(`[${i}] `))).toBe(true);
  });
});

describe('injected bugs make the examples that show them fail', () => {
  const cases: [string, string, string][] = [
    ['skip-tlb-shootdown', '02-reset-rearms-logging.yaml', "actors.vcpu0[1] 'write 0x100 2': expected faults: 1, actual: 0"],
    ['skip-tlb-shootdown', '06-legacy-get-clears-then-protects.yaml', "actors.host[3] 'get-log 1': expected dirty: [0x100], actual: []"],
    ['ring-full-ignored', '04-ring-soft-full.yaml', 'expected exit: KVM_EXIT_DIRTY_RING_FULL, actual: none'],
    ['harvest-skips-entry', '04-ring-soft-full.yaml', "actors.host[1] 'harvest': expected harvested: 192 entries, actual: 180 entries"],
    ['clear-without-protect', '07-clear-log-alignment.yaml', "actors.vcpu0[1] 'write 0x100 2': expected logged: [0x100], actual: []"],
    ['untracked-host-write', '09b-host-write-with-backup-bitmap.yaml', "actors.host[1] 'write-guest 0x100 5': expected logged: [0x100], actual: []"],
    ['untracked-host-write', '09a-host-write-without-backup-bitmap.yaml', 'expect.lost_host_writes: expected 1, actual: 0'],
    ['no-backup-bitmap', '09b-host-write-with-backup-bitmap.yaml', "actors.host[5] 'get-log 1': expected error: none, actual: KVM_GET_DIRTY_LOG: ENXIO"],
    ['convert-without-unmap', '11-convert-unmaps-before-private.yaml', "actors.host[4] 'dma 0x100 6': expected faulted: true, actual: false"],
    ['convert-without-unmap', '11-convert-unmaps-before-private.yaml', 'expect.iommu[0x100]: expected unmapped, actual: 0x100'],
    ['discard-before-unmap', '12-unmap-before-discard.yaml', 'expect.findings: expected [], actual: [discarded-while-mapped]'],
    ['map-before-shared', '13-shared-before-map.yaml', 'expect.findings: expected [], actual: [populated-while-private]'],
    ['attributes-before-zap', '14-zap-before-attributes.yaml', 'expect.findings: expected [], actual: [stale-store]'],
    ['rdm-bitmap-drift', '15-late-listener-replays-shared.yaml', 'expect.iommu[0x100]: expected unmapped, actual: 0x100'],
    ['split-huge-mapping', '16-map-per-granule.yaml', "actors.host[3] 'dma 0x201 4': expected faulted: true, actual: false"],
    ['inplace-convert-while-pinned', '17-inplace-unmap-before-private.yaml', "actors.host[3] 'dma 0x100 6': expected faulted: true, actual: false"],
    ['inplace-convert-while-pinned', '17-inplace-unmap-before-private.yaml', 'expect.findings: expected [], actual: [mapping-left]'],
    ['no-zap-on-noncoherent-transition', '18-noncoherent-registration-zaps.yaml', "actors.host[1] 'dma-read 0x100 no-snoop': expected value: 2, actual: 1"],
    ['no-zap-on-noncoherent-transition', '18-noncoherent-registration-zaps.yaml', 'expect.stale.device: expected 0, actual: 1'],
    ['migrate-noncoherent-without-flush', '19-migration-flushes-before-read.yaml', "actors.host[2] 'migration-read 0x100 flush-first': expected value: 7, actual: 0"],
    ['migrate-noncoherent-without-flush', '19-migration-flushes-before-read.yaml', 'expect.stale.migration: expected 0, actual: 1'],
    ['wbinvd-noop', '21-guest-wbinvd-before-wc.yaml', "actors.host[2] 'clflush 0x100': expected written_back: 0, actual: 1"],
    ['wbinvd-noop', '21-guest-wbinvd-before-wc.yaml', 'expect.stale.overwrite: expected 0, actual: 1'],
    ['noncoherent-unbalanced', '22-vfio-coherency-counts-every-device.yaml', "actors.host[2] 'dma-read 0x100 no-snoop': expected value: 1, actual: 0"],
    ['noncoherent-unbalanced', '22-vfio-coherency-counts-every-device.yaml', 'expect.stale.device: expected 0, actual: 1'],
    ['dma-slot-with-dirty-logging', '23-dma-slot-forced-wb-while-logging.yaml', "actors.host[0] 'enable-logging 1': expected zapped: 16, actual: 0"],
    ['dma-slot-with-dirty-logging', '23-dma-slot-forced-wb-while-logging.yaml', "actors.host[3] 'migration-read 0x100': expected value: 2, actual: 1"],
    ['dma-slot-with-dirty-logging', '23-dma-slot-forced-wb-while-logging.yaml', 'expect.stale.migration: expected 0, actual: 1'],
    ['mmio-mapped-wb', '24-device-memory-is-uc.yaml', 'expect.machine_checks: expected 0, actual: 1'],
    ['mmio-mapped-wb', '24-device-memory-is-uc.yaml', 'expect.pages[0x200]: expected 3, actual: 0'],
  ];

  it.each(cases)('%s fails %s', (bug, f, message) => {
    const o = runLitmus(loadLitmus(join(DIR, f)), { bugs: [bug] });
    expect(o.passed).toBe(false);
    expect(o.failures.some((l) => l.startsWith(`${join(DIR, f)}: `) && l.includes(message)), o.failures.join('\n')).toBe(true);
    expect(o.log[1]).toContain(`injected bugs: ${bug}`);
    // The bug did act (vm.acts), and the trace says so.
    expect(o.injections.map((i) => [i.bug, i.acted > 0])).toEqual([[bug, true]]);
    expect(o.log.some((l) => l.startsWith(`injected bug ${bug}: acted `))).toBe(true);
  });

  it('a bug that never acted is reported as such', () => {
    const o = runLitmus(loadLitmus(join(DIR, '03-two-writes-log-once.yaml')), { bugs: ['inplace-convert-while-pinned'] });
    expect(o.injections).toEqual([{ bug: 'inplace-convert-while-pinned', acted: 0, idle: expect.any(String) }]);
    expect(o.log.some((l) => l.startsWith('injected bug inplace-convert-while-pinned: never acted ('))).toBe(true);
  });

  it('every catalogued kernel or userspace bug is caught by some example', () => {
    const specs = files.map((f) => loadLitmus(join(DIR, f)));
    // Migration-thread bugs live in the migration engine, which litmus files do not run.
    for (const bug of CATALOG.filter((b) => b.commands.includes('dirty-log-test')).map((b) => b.name)) {
      if (bug === 'ring-full-exit-unhandled') continue; // the litmus file is the VMM: it handles exits itself
      const caught = specs.filter((s) => !runLitmus(s, { bugs: [bug] }).passed);
      expect(caught.length, `no example catches ${bug}`).toBeGreaterThan(0);
    }
  });

  it('a bug named in the file itself is injected too', () => {
    const o = run(`bugs: [skip-tlb-shootdown]\n${text('02-reset-rearms-logging.yaml')}`);
    expect(o.passed).toBe(false);
    expect(o.failures.join('\n')).toContain("'write 0x100 2': expected faults: 1, actual: 0");
  });

  it('rejects an unknown bug name', () => {
    expect(userError(() => runLitmus(loadLitmus(join(DIR, files[0]!)), { bugs: ['no-such-bug'] }))).toContain("unknown bug 'no-such-bug'");
  });
});

describe('failures say which expectation, where, expected and actual', () => {
  it('a wrong per-operation expectation', () => {
    const o = run(edited('02-reset-rearms-logging.yaml', '{op: reset, expect: {reset: 1}}', '{op: reset, expect: {reset: 2}}'), 'wrong.yaml');
    expect(o.passed).toBe(false);
    expect(o.failures).toEqual(["wrong.yaml: interleaving[5] 'host': actors.host[2] 'reset': expected reset: 2, actual: 1"]);
  });

  it('a wrong harvested list', () => {
    const o = run(edited('01-write-between-harvest-and-reset.yaml', '{harvested: [{slot: 1, gfn: 0x100}]}', '{harvested: [{slot: 1, gfn: 0x101}]}'), 'h.yaml');
    expect(o.failures).toEqual(["h.yaml: interleaving[2] 'host': actors.host[1] 'harvest': expected harvested: [slot 1 gfn 0x101], actual: [slot 1 gfn 0x100]"]);
  });

  it('a wrong copy value and a wrong final page value', () => {
    const src = edited('01-write-between-harvest-and-reset.yaml', '{op: copy 0x100, expect: {value: 2}}', '{op: copy 0x100, expect: {value: 1}}')
      .replace('pages: {0x100: 2}', 'pages: {0x100: 3}');
    const o = run(src, 'c.yaml');
    expect(o.failures).toEqual([
      "c.yaml: interleaving[5] 'host': actors.host[3] 'copy 0x100': expected value: 1, actual: 2",
      'c.yaml: expect.pages[0x100]: expected 3, actual: 2',
    ]);
  });

  it('a copy taken before the reset is stale: the write between copy and reset is lost', () => {
    // Example 1 with the copy moved before the reset (the copy-before-reset mistake).
    const o = run(`name: copy before reset
vm: {memory: 1MiB}
tracking: {mode: dirty-ring, entries: 256}
actors:
  vcpu0: [write 0x100 1, {op: write 0x100 2, expect: {logged: []}}]
  host: [enable-logging, harvest, {op: copy 0x100, expect: {value: 1}}, {op: reset, expect: {reset: 1}}, {op: harvest, expect: {harvested: []}}]
interleaving: [host, vcpu0, host, host, vcpu0, host with vcpu0, host]
expect: {copies: {0x100: 2}, stale_copies: []}
`, 'early-copy.yaml');
    expect(o.failures).toEqual([
      'early-copy.yaml: expect.copies[0x100]: expected 2, actual: 1',
      'early-copy.yaml: expect.stale_copies: expected [], actual: [0x100]',
    ]);
  });

  it('a host operation that waits for a vCPU the file does not let run: says who waits for what, does not hang', () => {
    const o = run(edited('02-reset-rearms-logging.yaml', /- run: host[^\n]*\n\s*expect: \{blocked: vcpu0\}/, '- host'), 'b.yaml');
    expect(o.passed).toBe(false);
    expect(o.failures).toEqual([
      "b.yaml: interleaving[3] 'host': actors.host[2] 'reset' cannot go on: host waits for vcpu0 to acknowledge TLB flush generation 2"
      + " (step vcpu0 first, or write 'host with vcpu0' to let it answer); the run stops here (6 later steps are not run)",
    ]);
  });

  it('with two vCPUs, `host with vcpu0` still blocks on vcpu1, and `host with all` completes', () => {
    const src = (reset: string): string => `name: two vcpus
vm: {memory: 1MiB, vcpus: 2}
tracking: {mode: dirty-ring, entries: 256}
actors:
  vcpu0: [write 0x100 1]
  vcpu1: [write 0x101 1]
  host: [enable-logging, {op: harvest, expect: {harvested: [0x100, 0x101]}}, {op: reset, expect: {reset: 2}}]
interleaving: [host, vcpu0, vcpu1, host, ${reset}]
expect: {sptes: {0x100: protected, 0x101: protected}}
`;
    const blocked = run(src('host with vcpu0'), 'two.yaml');
    expect(blocked.failures[0]).toContain("interleaving[4] 'host with vcpu0': actors.host[2] 'reset' cannot go on: host waits for vcpu1 to acknowledge TLB flush generation 2");
    const done = run(src('host with all'), 'two.yaml');
    expect(done.failures).toEqual([]);
    expect(done.log.filter((l) => l.includes('steps to answer')).length).toBe(2);
  });

  it('a stopped vCPU counts as having acknowledged the flush', () => {
    const o = run(`name: stopped
vm: {memory: 1MiB}
tracking: {mode: dirty-ring, entries: 256}
actors:
  vcpu0: [write 0x100 1, {op: write 0x100 2, expect: {faults: 1, logged: [0x100]}}]
  host: [enable-logging, stop vcpu0, harvest, {op: reset, expect: {reset: 1}}, release vcpu0]
interleaving: [host, vcpu0, host, vcpu0.step, host, host, host, vcpu0]
expect: {pages: {0x100: 2}}
`);
    expect(o.failures).toEqual([]);
    expect(o.log.join('\n')).toContain('stops (outside guest mode)');
  });

  it('host.step runs one step of an ioctl: the reset blocks at its TLB flush until vcpu0 acknowledges', () => {
    const o = run(`name: stepping the host
vm: {memory: 1MiB}
tracking: {mode: dirty-ring, entries: 256}
actors:
  vcpu0: [write 0x100 1, {op: write 0x100 2, expect: {faults: 1}}]
  host: [enable-logging, harvest, {op: reset, expect: {reset: 1}, note: the interesting one}]
interleaving:
  - host
  - vcpu0
  - host
  - host.step                                # resets vcpu0's ring: 0x100 write-protected
  - host.step                                # starts the flush
  - {run: host.step, expect: {blocked: vcpu0}, note: vcpu0 is in guest mode}
  - vcpu0.step                               # acknowledges, then TRANSLATE of write 2: TLB miss
  - host.step                                # the flush is complete: reset returns 1
  - vcpu0
`);
    expect(o.failures).toEqual([]);
    const trace = o.log.join('\n');
    expect(trace).toContain("[3] host.step: reset (actors.host[2]) -- the interesting one\n      KVM_RESET_DIRTY_RINGS");
    expect(trace).toContain('[5] host.step: reset (actors.host[2]), continued -- vcpu0 is in guest mode\n      waits: host waits for vcpu0 to acknowledge TLB flush generation 2\n      (blocked, as expected)');
    expect(trace).toContain('[6] vcpu0.step: write 0x100 2 (actors.vcpu0[1])\n      acknowledges TLB flush 2 (drops its TLB); write 0x100 = 2: TLB miss');
  });

  it('a step expected to wait for one vCPU that waits for another, or does not wait, fails', () => {
    const src = (blocked: string): string => `name: b
vm: {memory: 1MiB, vcpus: 2}
tracking: {mode: dirty-ring, entries: 256}
actors:
  vcpu0: [write 0x100 1]
  vcpu1: [write 0x101 1]
  host: [enable-logging, harvest, reset]
interleaving: [host, vcpu0, vcpu1, host, {run: host, expect: {blocked: ${blocked}}}, host with all]
`;
    expect(run(src('vcpu0')).failures).toEqual([]);
    expect(run(src('vcpu1')).failures).toEqual([
      "inline.yaml: interleaving[4] 'host': expected blocked: waiting for vcpu1, actual: host waits for vcpu0 to acknowledge TLB flush generation 2",
    ]);
  });

  it('a vCPU parked in an exit blocks its interleaving step until the host re-enters it', () => {
    const o = run(edited('04-ring-soft-full.yaml', '  - host              # reenter vcpu0\n', ''), 'x.yaml');
    expect(o.failures).toEqual([
      "x.yaml: interleaving[4] 'vcpu0': actors.vcpu0[0] 'write-pages 0x100 192 7' cannot go on: vcpu0 sits in exit KVM_EXIT_DIRTY_RING_FULL"
      + " and waits for the VMM to re-enter KVM_RUN (the host must 'reenter vcpu0' first); the run stops here (1 later step is not run)",
    ]);
  });

  it('an expected block that does not happen', () => {
    const o = run(edited('05-reset-without-harvest.yaml', '  - host              # reset without harvest', '  - {run: host, expect: {blocked: true}}  #'), 'nb.yaml');
    expect(o.failures).toEqual(["nb.yaml: interleaving[2] 'host': expected blocked: true, actual: it did not block"]);
  });

  it('operations never reached, and steps with no operation left', () => {
    const never = run(edited('01-write-between-harvest-and-reset.yaml', /  - host +# harvest again[^\n]*\n/, ''), 'n.yaml');
    expect(never.failures).toEqual(["n.yaml: actors.host[4] 'harvest' was never run (no interleaving step reaches it)"]);
    const extra = run(`${text('03-two-writes-log-once.yaml').replace(/expect:\n(  .*\n)+$/, '')}  - vcpu0\n`, 'e.yaml');
    expect(extra.failures).toEqual(["e.yaml: interleaving[9] 'vcpu0': vcpu0 has no operation left to run (its script has 2); the run stops here"]);
  });

  it('guest accesses outside every memslot, and writes to a read-only slot, exit with KVM_EXIT_MMIO', () => {
    const o = run(`name: mmio
vm:
  slots: [{id: 1, base_gfn: 0x100, pages: 64}, {id: 2, base_gfn: 0x200, pages: 64, flags: [KVM_MEM_READONLY]}]
tracking: dirty-log
actors:
  vcpu0:
    - {op: write 0x180 1, expect: {exit: KVM_EXIT_MMIO, retired_before_exit: 0}}
    - {op: write 0x200 1, expect: {exit: KVM_EXIT_MMIO, faults: 0}}
    - {op: read 0x100, expect: {exit: none, value: 9}}
  host: [enable-logging 1, reenter vcpu0, reenter vcpu0, {op: write-guest 0x100 9, expect: {logged: [0x100]}}, {op: get-log 1, expect: {dirty: [0x100]}}]
interleaving: [host, vcpu0, host, vcpu0, host, host, host, vcpu0]
expect: {pages: {0x200: 0}}
`);
    expect(o.failures).toEqual([]);
  });

  it('formats outcomes: PASS alone by default, FAIL with failures and the trace', () => {
    const pass = runLitmus(loadLitmus(join(DIR, '03-two-writes-log-once.yaml')));
    expect(formatLitmusOutcome(pass)).toBe(`PASS ${join(DIR, '03-two-writes-log-once.yaml')}: two writes to a writable page are logged once`);
    expect(formatLitmusOutcome(pass, { log: 'always' })).toContain('[6] vcpu0.step: write 0x100 2 (actors.vcpu0[1])\n          write 0x100 = 2: TLB hit');
    const fail = run(edited('03-two-writes-log-once.yaml', 'pages: {0x100: 2}', 'pages: {0x100: 7}'), 'f.yaml');
    const out = formatLitmusOutcome(fail);
    expect(out.split('\n').slice(0, 2)).toEqual(['FAIL f.yaml: two writes to a writable page are logged once', '  f.yaml: expect.pages[0x100]: expected 7, actual: 2']);
    expect(out).toContain('trace:');
  });
});

describe('bad litmus files give UserErrors naming the file and the field', () => {
  const base = `name: t
vm: {memory: 1MiB}
tracking: {mode: dirty-ring, entries: 256}
actors:
  vcpu0: [write 0x100 1, read 0x100]
  host: [enable-logging, harvest]
interleaving: [host, vcpu0, vcpu0, host]
`;
  const tmp = mkdtempSync(join(tmpdir(), 'vmemlab-litmus-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it('the base file is fine', () => {
    expect(run(base).failures).toEqual([]);
  });

  it('an unknown operation, read from disk', () => {
    const path = join(tmp, 'x.yaml');
    writeFileSync(path, base.replace('read 0x100', 'wrte 0x100 1'));
    expect(userError(() => loadLitmus(path))).toBe(`${path}: actors.vcpu0[1]: unknown operation 'wrte' (one of: write, write-pages, read, map-gpa, set-pat, wbinvd)`);
  });

  it('a missing file', () => {
    expect(userError(() => loadLitmus(join(tmp, 'nope.yaml')))).toContain(`${join(tmp, 'nope.yaml')}: cannot read the litmus file`);
  });

  const cases: [string, string, string][] = [
    ['a bad size', base.replace('1MiB', '1 furlong'), "b.yaml: vm.memory: '1 furlong' is not a size"],
    ['a size that is not whole pages', base.replace('1MiB', '1000'), 'b.yaml: vm.memory: 1000 is not a whole number of 4 KiB pages'],
    ['overlapping slots', base.replace('{memory: 1MiB}', '{slots: [{id: 1, base_gfn: 0x100, pages: 256}, {id: 2, base_gfn: 0x180, pages: 16}]}'),
      'b.yaml: vm.slots[1]: slot 2 (GFNs 0x180..0x18f) overlaps slot 1 (vm.slots[0], GFNs 0x100..0x1ff)'],
    ['a slot with zero pages', base.replace('{memory: 1MiB}', '{slots: [{id: 1, base_gfn: 0x100, pages: 0}]}'),
      'b.yaml: vm.slots[0].pages: a slot needs at least one page, got 0'],
    ['memory and slots both', base.replace('{memory: 1MiB}', '{memory: 1MiB, slots: [{id: 1, base_gfn: 0, pages: 1}]}'), 'b.yaml: vm: give memory or slots, not both'],
    ['an unknown actor in the interleaving', base.replace('[host, vcpu0, vcpu0, host]', '[host, vcpu1]'),
      "b.yaml: interleaving[1]: unknown actor 'vcpu1' (actors: vcpu0, host)"],
    ['an unknown actor', base.replace('  host:', '  dev0: [x]\n  host:'), 'b.yaml: actors.dev0: unknown actor (actors are host and vcpu0)'],
    ['a host operation on a vCPU', base.replace('read 0x100', 'reset'), "b.yaml: actors.vcpu0[1]: 'reset' is a host operation"],
    ['a wrong argument count', base.replace('read 0x100', 'write 0x100'), "b.yaml: actors.vcpu0[1]: 'write 0x100': write takes 2 arguments (write GFN VALUE [private|shared])"],
    ['an unknown field', base.replace('name: t', 'name: t\nnmae: u'), 'b.yaml: nmae: unknown field (fields here: name, description, bugs, vm, tracking, actors, interleaving, expect)'],
    ['a missing field', base.replace('name: t\n', ''), 'b.yaml: name: missing (expected a string)'],
    ['an unknown tracking mode', base.replace('tracking: {mode: dirty-ring, entries: 256}', 'tracking: dirty-rong'),
      "b.yaml: tracking: expected one of dirty-log, clear-log, dirty-ring or a mapping, got 'dirty-rong'"],
    ['a bad ring size', base.replace('entries: 256', 'entries: 100'), 'b.yaml: tracking.entries: 100 entries is not a power of two'],
    ['an option of another mode', base.replace('entries: 256', 'entries: 256, initially_set: true'), 'b.yaml: tracking.initially_set: only applies to mode clear-log, not dirty-ring'],
    ['an expectation the operation does not take', base.replace('read 0x100', '{op: read 0x100, expect: {harvested: 1}}'),
      "b.yaml: actors.vcpu0[1].expect.harvested: 'harvested' does not apply to read (it takes: exit, value)"],
    ['an unknown exit name', base.replace('read 0x100', '{op: read 0x100, expect: {exit: KVM_EXIT_FOO}}'), "b.yaml: actors.vcpu0[1].expect.exit: unknown exit reason 'KVM_EXIT_FOO'"],
    ['a misspelled field of an operation', base.replace('read 0x100', '{op: read 0x100, expct: {value: 1}}'), 'b.yaml: actors.vcpu0[1].expct: unknown field (fields here: op, expect, note)'],
    ['a ring operation without the ring', base.replace('{mode: dirty-ring, entries: 256}', 'dirty-log'), "b.yaml: actors.host[1]: 'harvest': harvest needs the dirty ring (tracking: dirty-ring)"],
    ['a missing slot', base.replace('harvest]', 'get-log 7]'), "b.yaml: actors.host[1]: 'get-log 7': there is no slot 7 (slots: 1 at 0x100..0x1ff)"],
    ['a clear-log with no bitmap got', base.replace('harvest]', 'clear-log 1 0 64]'), "b.yaml: actors.host[1]: 'clear-log 1 0 64' passes the bitmap of the last get-log of slot 1"],
    ['a host write outside memory', base.replace('harvest]', 'write-guest 0x5000 1]'), "b.yaml: actors.host[1]: 'write-guest 0x5000 1': GFN 0x5000 is in no memslot"],
    ['a bad number', base.replace('read 0x100', 'read 0xZZ'), "b.yaml: actors.vcpu0[1]: 'read 0xZZ': GFN: '0xZZ' is not a number"],
    ['a bad step form', base.replace('[host, vcpu0, vcpu0, host]', '[host, vcpu0.stp]'), "b.yaml: interleaving[1]: unknown step form 'vcpu0.stp'"],
    ['an empty interleaving', base.replace('[host, vcpu0, vcpu0, host]', '[]'), 'b.yaml: interleaving: must not be empty, got []'],
    ['a final expectation on a page outside memory', `${base}expect: {pages: {0x9999: 1}}\n`, 'b.yaml: expect.pages[0x9999]: GFN 0x9999 is in no memslot'],
    ['an unknown bug', `${base}bugs: [nope]\n`, "b.yaml: bugs[0]: unknown bug 'nope'"],
    ['broken YAML', `${base}x: [1\n`, 'b.yaml: Flow sequence in block collection must be sufficiently indented'],
  ];

  it.each(cases)('%s', (_what, source, message) => {
    expect(userError(() => parseLitmus(source, 'b.yaml'))).toContain(message);
  });

  it('reports every problem it finds, one per line', () => {
    const msg = userError(() => parseLitmus(base.replace('read 0x100', 'wrte 0x100 1').replace('harvest]', 'get-log 7]'), 'b.yaml'));
    expect(msg.split('\n')).toEqual([
      "b.yaml: actors.vcpu0[1]: unknown operation 'wrte' (one of: write, write-pages, read, map-gpa, set-pat, wbinvd)",
      "b.yaml: actors.host[1]: 'get-log 7': there is no slot 7 (slots: 1 at 0x100..0x1ff)",
    ]);
  });
});

const INPLACE = '17-inplace-unmap-before-private.yaml';

describe('confidential memory in litmus files', () => {
  const base = text('10-private-memory-conversion.yaml');

  it('the conversion example shows the exits, the conversions and the zeroed hole in its trace', () => {
    const o = runLitmus(loadLitmus(join(DIR, '10-private-memory-conversion.yaml')));
    const trace = formatLitmusOutcome(o, { log: 'always' });
    expect(trace).toContain('exits with KVM_EXIT_MEMORY_FAULT before its shared write to 0x100 retires');
    expect(trace).toContain('KVM_HC_MAP_GPA_RANGE 0x101+2 retires, RAX = 0');
    expect(trace).toContain('private reads 0x100 = 0, retires');
  });

  it('an oracle finding the file does not expect fails it, with the finding', () => {
    const o = run(edited('14-zap-before-attributes.yaml', /\n  findings: \[\]\n/, '\n'), 'inline.yaml', ['attributes-before-zap']);
    expect(o.passed).toBe(false);
    expect(o.failures.some((l) => l.startsWith('inline.yaml: the private memory oracle found: stale-store: slot 1 gfn 0x100'))).toBe(true);
  });

  it('a file can expect the findings a bug causes', () => {
    const o = run(edited('13-shared-before-map.yaml', 'findings: []', 'findings: [populated-while-private]'), 'inline.yaml', ['map-before-shared']);
    expect(o.failures).toEqual([]);
  });

  it.each([
    [base.replace('write 0x100 7 private', 'write 0x100 7 sideways'), "actors.vcpu0[0]: 'write 0x100 7 sideways': write takes 2 arguments"],
    [base.replace('map-gpa 0x101 2 shared', 'map-gpa 0x101 2'), "actors.vcpu0[2]: 'map-gpa 0x101 2': map-gpa takes 3 arguments (map-gpa GFN COUNT private|shared)"],
    [base.replace('flags: [GUEST_MEMFD]', 'flags: []'), "actors.vcpu0[0]: 'write 0x100 7 private': a private access needs private memory (a slot with flags [GUEST_MEMFD])"],
    [base.replace('flags: [GUEST_MEMFD]', 'flags: [GUEST_MEMFD, READONLY]'), 'vm.slots[0].flags: KVM_MEM_GUEST_MEMFD with KVM_MEM_READONLY'],
    [base.replace('    - serve-exits\n    - serve-exits\n', '    - convert 0x10f 2 shared\n    - serve-exits\n'), "actors.host[0]: 'convert 0x10f 2 shared': 0x10f+2 runs past the end of slot 1 (0x10f)"],
    [base.replace('    - serve-exits\n    - serve-exits\n', '    - dma 0x100 1\n    - serve-exits\n'), "actors.host[0]: 'dma 0x100 1': dma needs an assigned device (vm.iommu: type1 or iommufd)"],
    [base.replace('findings: []', 'findings: [lost-page]'), "expect.findings[0]: unknown finding 'lost-page' (one of: rdm-drift,"],
    [base.replace('tracking: dirty-log', 'tracking: dirty-log\nexpect_nothing: 1'), 'expect_nothing: unknown field'],
    [text('11-convert-unmaps-before-private.yaml').replace('iommu: type1', 'iommu: vfio'), "vm.iommu: expected"],
    [text('11-convert-unmaps-before-private.yaml').replace('iommu: type1', 'iommu: {backend: iommufd, dma_entry_limit: 5}'), 'vm.iommu.dma_entry_limit: only type1 has a dma_entry_limit'],
    [edited(INPLACE, 'conversion_design: in-place', 'conversion_design: in-pace'), "vm.conversion_design: 'in-pace' is not one of: rdm, notifier, in-place, kvm-iommu"],
    [edited(INPLACE, 'flags: [GUEST_MEMFD]', 'flags: []'), 'vm.conversion_design: in-place converts guest_memfd memory: the VM needs a slot with flags [GUEST_MEMFD]'],
    [edited(INPLACE, '  iommu: type1\n', ''), 'vm.conversion_design: in-place attaches an assigned device: the VM needs vm.iommu (type1 or iommufd)'],
    [edited(INPLACE, '  host:\n', '  host:\n    - vfio-register 1\n'), "actors.host[0]: 'vfio-register 1': with vm.conversion_design in-place the design attaches the device in its set-up"],
  ])('bad input is one line naming the file, the field and the value (%#)', (source, message) => {
    const msg = userError(() => parseLitmus(source, 'bad.yaml'));
    expect(msg.split('\n').some((l) => l.startsWith('bad.yaml: ') && l.includes(message)), msg).toBe(true);
  });
});

describe('conversion designs (vm.conversion_design)', () => {
  /** A page shared, written by the device, taken back: with rdm the file registers VFIO's listener itself. */
  const file = (design: ConversionDesignName): string => `name: ${design} converts for the device
vm:
  slots: [{id: 1, base_gfn: 0x100, pages: 16, flags: [GUEST_MEMFD]}]
  iommu: type1
  conversion_design: ${design}
tracking: dirty-log
actors:
  host:${design === 'rdm' ? '\n    - vfio-register 1' : ''}
    - convert 0x100 2 shared
    - {op: dma 0x101 5, expect: {faulted: false}}
    - convert 0x101 1 private
    - {op: dma 0x101 6, expect: {faulted: true}}
    - {op: dma-read 0x100, expect: {faulted: false, value: 0}}
interleaving: [${design === 'rdm' ? 'host, ' : ''}host, host, host, host, host]
expect:
  attributes: {0x100: shared, 0x101: private}
  rdm: {0x100: shared, 0x101: private}
  iommu: {0x100: 0x100, 0x101: unmapped}
  findings: []
`;

  it.each(CONVERSION_DESIGNS)('%s runs a convert shared / private / DMA file clean', (design) => {
    const o = run(file(design), `${design}.yaml`);
    expect(o.failures).toEqual([]);
    expect(o.log[1]!.includes(`conversion design ${design}`)).toBe(design !== 'rdm');
  });

  it('rdm, given or by default, is QEMU\'s as before: the file registers VFIO\'s listener itself', () => {
    const o = run(edited(INPLACE, 'conversion_design: in-place', 'conversion_design: rdm'), 'rdm.yaml');
    // rdm has no device attached until the file registers VFIO's listener: the first DMA faults.
    expect(o.failures).toEqual(["rdm.yaml: interleaving[1] 'host': actors.host[1] 'dma 0x100 5': expected faulted: false, actual: true"]);
    expect(run(file('rdm').replace('  conversion_design: rdm\n', '')).failures).toEqual([]);
  });

  it('a design whose set-up fails fails the run with the design\'s error', () => {
    const o = run(edited(INPLACE, 'iommu: type1', 'iommu: {backend: type1, dma_entry_limit: 100}'), 'limit.yaml');
    expect(o.passed).toBe(false);
    expect(o.failures).toHaveLength(1);
    expect(o.failures[0]).toMatch(/^limit\.yaml: vm\.conversion_design: the in-place design's set-up failed: vfio: possibly running out of DMA mappings: .*; the run stops here$/);
    expect(o.log).toContain('the run stopped early: operations in flight and final expectations were not checked');
  });

  it('a vCPU\'s exits are served through the design, and the oracle checks each conversion', () => {
    const src = `name: exits in place
vm:
  slots: [{id: 1, base_gfn: 0x100, pages: 16, flags: [GUEST_MEMFD]}]
  iommu: iommufd
  conversion_design: in-place
tracking: dirty-log
actors:
  vcpu0: [{op: map-gpa 0x100 1 shared, expect: {exit: KVM_EXIT_HYPERCALL}}, {op: write 0x100 3 private, expect: {exit: KVM_EXIT_MEMORY_FAULT}}]
  host: [serve-exits, {op: dma 0x100 4, expect: {faulted: false}}, serve-exits, {op: dma 0x100 5, expect: {faulted: true}}]
interleaving: [vcpu0, host, vcpu0, host, vcpu0, host, vcpu0, host]
expect:
  attributes: {0x100: private}
  iommu: {0x100: unmapped}
  private_pages: {0x100: 3}
  findings: []
`;
    expect(run(src, 'exits.yaml').failures).toEqual([]);
    // The bug keeps the page mapped through the conversion the private write asked for.
    const o = run(src, 'exits.yaml', ['inplace-convert-while-pinned']);
    expect(o.failures).toContain("exits.yaml: interleaving[7] 'host': actors.host[3] 'dma 0x100 5': expected faulted: true, actual: false");
    expect(o.log.join('\n')).toContain('ORACLE: mapping-left: slot 1 gfn 0x100: converted to private');
  });
});

const ZAPS = '18-noncoherent-registration-zaps.yaml';
const FLUSHES = '19-migration-flushes-before-read.yaml';
const DMA_SLOT = '23-dma-slot-forced-wb-while-logging.yaml';
const DEVICE_MEMORY = '24-device-memory-is-uc.yaml';

describe('the CPU cache model in litmus files (vm.cpu_cache)', () => {
  it('host operations: KVM\'s WB write, snooped and no-snoop DMA, CLFLUSH, WBINVD and the migration thread\'s reads', () => {
    const o = run(`name: host operations through the cache
vm: {memory: 1MiB, iommu: type1, cpu_cache: on}
tracking: dirty-log
actors:
  host:
    - write-guest 0x103 3
    - {op: wbinvd, expect: {written_back: 1}}
    - write-guest 0x101 5
    - {op: dma-read 0x101, expect: {value: 5}}
    - {op: dma-read 0x101 no-snoop, expect: {value: 0}}
    - {op: clflush 0x101, expect: {written_back: 1}}
    - dma 0x102 9 no-snoop
    - {op: migration-read 0x102 flush-first, expect: {value: 9}}
    - dma 0x102 10 no-snoop
    - {op: migration-read 0x102, expect: {value: 9}}
    - write-guest 0x104 7
    - dma 0x104 8 snoop
    - write-guest 0x105 6
interleaving: [host, host, host, host, host, host, host, host, host, host, host, host, host]
expect:
  pages: {0x101: 5, 0x102: 10, 0x103: 3, 0x104: 8, 0x105: 0}
  cache: {0x101: invalid, 0x102: clean, 0x103: invalid, 0x104: invalid, 0x105: dirty}
  copies: {0x102: 9}
  stale_copies: [0x102]
  stale: {cpu: 0, device: 1, migration: 1}
`, 'host.yaml');
    expect(o.failures).toEqual([]);
    const trace = o.log.join('\n');
    expect(trace).toContain('VFIO maps guest RAM for the device at IOVA = GPA: 1 mapping(s), one per memslot');
    expect(trace).toContain('device DMA reads 5 from IOVA page 0x101 -> GFN 0x101 (snooped: the cached line, if any)');
    expect(trace).toContain('device DMA with No Snoop reads 0 from IOVA page 0x101 -> GFN 0x101 (memory only, the cache not looked at); ORACLE: stale read (device): ');
    expect(trace).toContain('no non-coherent DMA registered, no KVM_MEM_DMA slot: not flushed, read write-back: 9');
    expect(trace).toContain('read write-back: 9; ORACLE: stale read (migration): ');
  });

  it('vCPU accesses take the memory type of their SPTE and the guest\'s PAT; (un)registering non-coherent DMA zaps; the idle vCPU touches nothing', () => {
    const o = run(`name: vCPU accesses through the cache
vm: {memory: 1MiB, iommu: type1, cpu_cache: on}
tracking: dirty-log
actors:
  vcpu0:
    - write 0x105 6
    - {op: read 0x105, expect: {value: 6}}
    - set-pat 0x106 1 UC
    - {op: write 0x106 1, expect: {faults: 1}}
    - {op: read 0x106, expect: {value: 1}}
  host:
    - {op: register-noncoherent-dma, expect: {zapped: 256}}
    - write-guest 0x106 2
    - {op: unregister-noncoherent-dma, expect: {zapped: 1}}
interleaving: [vcpu0, vcpu0, host with vcpu0, vcpu0, vcpu0, host, vcpu0, host with vcpu0]
expect:
  pages: {0x105: 0, 0x106: 1}
  cache: {0x100: invalid, 0x105: dirty, 0x106: dirty}
  stale: {cpu: 1, device: 0, migration: 0}
`, 'vcpu.yaml');
    expect(o.failures).toEqual([]);
    const trace = o.log.join('\n');
    expect(trace).toContain('stores 0x105 = 6 (WB: into the cache, the line dirty), retires');
    expect(trace).toContain('reads 0x105 = 6 (WB: through the cache), retires');
    expect(trace).toContain('vcpu0 steps to answer: acknowledges TLB flush 1 (drops its TLB); idle');
    expect(trace).toContain('256 SPTE(s) zapped: faults rebuild them honouring the guest\'s PAT (no IPAT)');
    expect(trace).toContain('the guest maps 0x106+1 UC (its PAT); cpa_flush flushes their lines (0 written back), retires');
    expect(trace).toContain('write-protect fault on 0x106: SPTE made writable, memory type EPT WB (the guest\'s PAT honoured)');
    expect(trace).toContain('stores 0x106 = 1 (UC: to memory), retires');
    expect(trace).toContain('reads 0x106 = 1 (UC: from memory), retires; ORACLE: stale read (cpu): ');
    expect(trace).toContain('kvm_arch_unregister_noncoherent_dma: noncoherent_dma_count 1 -> 0');
    expect(trace).toContain('1 SPTE(s) zapped: faults rebuild them with WB + IPAT');
  });

  it('a self-snooping CPU writes a cached copy back and drops it before a WC store: the migration thread reads memory even without the flush', () => {
    const o = run(edited(FLUSHES, 'cpu_cache: on', 'cpu_cache: self-snoop'), 'ss.yaml', ['migrate-noncoherent-without-flush']);
    expect(o.failures).toEqual([]);
    expect(o.log[1]).toContain('CPU cache model with self-snoop');
    expect(o.injections.map((i) => [i.bug, i.acted])).toEqual([['migrate-noncoherent-without-flush', 2]]);
  });

  it('enable-logging on a KVM_MEM_DMA slot says what KVM did: force-wb zaps the slot; with the bug nothing is zapped', () => {
    const trace = runLitmus(loadLitmus(join(DIR, DMA_SLOT))).log.join('\n');
    expect(trace).toContain('vm: slot 1 GFNs 0x100..0x10f (KVM_MEM_DMA); ');
    expect(trace).toContain('KVM_SET_USER_MEMORY_REGION: slot 1 (KVM_MEM_DMA) +KVM_MEM_LOG_DIRTY_PAGES (write-protects every page)');
    expect(trace).toContain('KVM_MEM_DMA, force-wb: KVM stops honouring the guest\'s PAT in the slot while it logs: the slot zapped, 16 SPTE(s), faults rebuild them WB + IPAT; done');
    expect(trace).toContain('write-protect fault on 0x100: SPTE made writable, memory type EPT WB + IPAT (the guest\'s PAT ignored)');
    const bug = runLitmus(loadLitmus(join(DIR, DMA_SLOT)), { bugs: ['dma-slot-with-dirty-logging'] }).log.join('\n');
    expect(bug).toContain('KVM_MEM_DMA: KVM still honours the guest\'s PAT in the slot while it logs (dma-slot-with-dirty-logging: nothing zapped)');
    expect(bug).toContain('read write-back: 1; ORACLE: stale read (migration): ');
  });

  it('vm.dma_slot_logging refuse: enable-logging on a KVM_MEM_DMA slot fails with EINVAL, the op\'s error expectation, and the PAT stays honoured', () => {
    const src = (expect: string): string => `name: refused
vm:
  slots: [{id: 1, base_gfn: 0x100, pages: 16, flags: [DMA]}, {id: 2, base_gfn: 0x200, pages: 16, flags: [KVM_ONLY]}]
  cpu_cache: on
  dma_slot_logging: refuse
tracking: dirty-log
actors:
  vcpu0: [set-pat 0x100 1 WC, write 0x100 1]
  host: [${expect}, enable-logging 2]
interleaving: [host, vcpu0, vcpu0, host with vcpu0]
expect: {pages: {0x100: 1}, cache: {0x100: invalid}}
`;
    const o = run(src('{op: enable-logging 1, expect: {error: EINVAL}}'), 'refuse.yaml');
    expect(o.failures).toEqual([]);
    const trace = o.log.join('\n');
    expect(o.log[1]).toBe('vm: slot 1 GFNs 0x100..0x10f (KVM_MEM_DMA), slot 2 GFNs 0x200..0x20f (KVM_MEM_KVM_ONLY); 1 vCPU; dirty log (legacy GET_DIRTY_LOG); '
      + 'CPU cache model; KVM refuses dirty logging on a KVM_MEM_DMA slot');
    expect(trace).toContain('fails: KVM_SET_USER_MEMORY_REGION: EINVAL: slot 1: KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_DMA slot (the two exclude each other)');
    expect(trace).toContain('stores 0x100 = 1 (WC: to memory), retires');
    expect(run(src('enable-logging 1'), 'refuse.yaml').failures).toEqual([
      "refuse.yaml: interleaving[0] 'host': actors.host[0] 'enable-logging 1': expected error: none, actual: KVM_SET_USER_MEMORY_REGION: EINVAL: slot 1: KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_DMA slot (the two exclude each other)",
    ]);
  });

  it('device memory: the trace says a store went to it, and a machine check the file does not expect fails it', () => {
    expect(runLitmus(loadLitmus(join(DIR, DEVICE_MEMORY))).log.join('\n')).toContain('stores 0x200 = 3 (UC: to device memory), retires');
    const o = run(edited(DEVICE_MEMORY, '  machine_checks: 0\n', ''), 'mce.yaml', ['mmio-mapped-wb']);
    expect(o.failures).toContain('mce.yaml: the machine check oracle found: 1 cacheable access to device memory, the first at 0x200 (write expect.machine_checks to expect them)');
    expect(o.log.join('\n')).toContain('stores 0x200 = 3 (WB: into the cache, the line dirty), retires; ORACLE: machine check: a cacheable (WB) access to device memory at 0x200');
  });

  it('a stale read the file does not expect fails it, naming the reader', () => {
    const o = run(edited(ZAPS, /\n  stale: [^\n]*\n/, '\n'), 'z.yaml', ['no-zap-on-noncoherent-transition']);
    expect(o.failures).toContain('z.yaml: the stale read oracle found: 1 by device (write expect.stale to expect them)');
  });

  it.each([
    [edited(ZAPS, 'cpu_cache: on', 'cpu_cache: maybe'), "vm.cpu_cache: 'maybe' is not one of: off, on, self-snoop"],
    [edited('10-private-memory-conversion.yaml', 'vm:\n', 'vm:\n  cpu_cache: on\n'), 'vm.cpu_cache: the CPU cache model is not modelled with private memory: it needs slots without GUEST_MEMFD'],
    [edited(ZAPS, 'cpu_cache: on', 'cpu_cache: off'), "actors.vcpu0[1]: 'set-pat 0x100 1 WC': set-pat needs the CPU cache model (vm.cpu_cache: on or self-snoop)"],
    [edited(ZAPS, ', cpu_cache: on', ''), "actors.host[1]: 'dma-read 0x100 no-snoop': no-snoop DMA differs from snooped DMA only with the CPU cache model (vm.cpu_cache: on or self-snoop)"],
    [edited(ZAPS, ', cpu_cache: on', ''), 'expect.cache: the VM has no CPU cache model (vm.cpu_cache: on or self-snoop)'],
    [edited(ZAPS, ', cpu_cache: on', ''), 'expect.stale: the VM has no CPU cache model (vm.cpu_cache: on or self-snoop)'],
    [edited(ZAPS, 'set-pat 0x100 1 WC', 'set-pat 0x100 1 WX'), "actors.vcpu0[1]: 'set-pat 0x100 1 WX': 'WX' is not a memory type (one of: UC, WC, WT, WP, WB, UC-)"],
    [edited(ZAPS, 'set-pat 0x100 1 WC', 'set-pat 0x1ff 2 WC'), "actors.vcpu0[1]: 'set-pat 0x1ff 2 WC': 0x1ff+2 runs past the end of slot 1 (0x1ff)"],
    [edited(ZAPS, 'set-pat 0x100 1 WC', 'set-pat 0x100 WC'), "actors.vcpu0[1]: 'set-pat 0x100 WC': set-pat takes 3 arguments (set-pat GFN COUNT UC|WC|WT|WP|WB|UC- [no-clflush])"],
    [edited(ZAPS, 'dma-read 0x100 no-snoop', 'dma-read 0x100 nosnoop'), "actors.host[1]: 'dma-read 0x100 nosnoop': 'nosnoop' is not a snoop attribute (snoop or no-snoop)"],
    [edited(ZAPS, ', iommu: type1', ''), "actors.host[0]: 'register-noncoherent-dma': register-noncoherent-dma needs an assigned device (vm.iommu: type1 or iommufd)"],
    [edited(ZAPS, '    - {op: register-noncoherent-dma, expect: {zapped: 256}}\n', '    - unregister-noncoherent-dma\n'),
      "actors.host[0]: 'unregister-noncoherent-dma': no non-coherent DMA is registered before it"],
    [edited(ZAPS, 'expect: {zapped: 256}', 'expect: {written_back: 256}'), "actors.host[0].expect.written_back: 'written_back' does not apply to register-noncoherent-dma (it takes: zapped, error)"],
    [edited(FLUSHES, 'migration-read 0x100 flush-first, expect: {value: 0}', 'migration-read 0x100 flush, expect: {value: 0}'),
      "actors.host[1]: 'migration-read 0x100 flush': 'flush' is not flush-first (clflush-before-read), the only option"],
    [edited(FLUSHES, 'migration-read 0x100 flush-first, expect: {value: 0}', 'copy 0x100'),
      "actors.host[1]: 'copy 0x100': with vm.cpu_cache the migration thread reads through the CPU cache: write migration-read GFN [flush-first]"],
    [edited(FLUSHES, ', cpu_cache: on', ''), "actors.host[1]: 'migration-read 0x100 flush-first': migration-read needs the CPU cache model (vm.cpu_cache: on or self-snoop)"],
    [edited(FLUSHES, '    - register-noncoherent-dma\n', '    - wbinvd\n').replace(', cpu_cache: on', ''), "actors.host[0]: 'wbinvd': wbinvd needs the CPU cache model"],
    [edited(FLUSHES, 'cache: {0x100: clean}', 'cache: {0x100: warm}'), "expect.cache.256: 'warm' is not one of: invalid, clean, dirty"],
    [edited(FLUSHES, 'cache: {0x100: clean}', 'cache: {0x900: clean}'), 'expect.cache[0x900]: GFN 0x900 is in no memslot'],
    [edited(FLUSHES, 'stale: {cpu: 0, device: 0, migration: 0}', 'stale: {gpu: 1}'), 'expect.stale.gpu: unknown field (fields here: cpu, device, migration, overwrite)'],
    [edited(FLUSHES, 'stale: {cpu: 0, device: 0, migration: 0}', 'stale: {cpu: -1}'), 'expect.stale.cpu: must be at least 0, got -1'],
    [edited(DMA_SLOT, 'flags: [KVM_MEM_DMA]', 'flags: [KVM_MEM_DMAX]'),
      "vm.slots[0].flags[0]: unknown memslot flag 'KVM_MEM_DMAX' (one of: KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD, KVM_MEM_DMA, KVM_MEM_KVM_ONLY)"],
    [edited(DMA_SLOT, 'flags: [KVM_MEM_DMA]', 'flags: 64'), 'vm.slots[0].flags: unknown flag bits in 64'],
    [edited(DMA_SLOT, '  cpu_cache: on\n', ''), 'vm.slots[0].flags: KVM_MEM_DMA (KVM honours the guest\'s PAT in the slot) needs the CPU cache model (vm.cpu_cache: on or self-snoop)'],
    [edited(DEVICE_MEMORY, '  cpu_cache: on\n', ''), 'vm.slots[1].host_mmio: device memory (vmx_get_mt_mask types it UC) needs the CPU cache model (vm.cpu_cache: on or self-snoop)'],
    [edited(DEVICE_MEMORY, '  cpu_cache: on\n', '').replace('host_mmio: true', 'host_mmio: false'), 'expect.machine_checks: the VM has no CPU cache model (vm.cpu_cache: on or self-snoop)'],
    [edited(DEVICE_MEMORY, 'host_mmio: true', 'host_mmio: 1'), 'vm.slots[1].host_mmio: expected a boolean, got 1'],
    [edited(DEVICE_MEMORY, 'machine_checks: 0', 'machine_checks: -1'), 'expect.machine_checks: must be at least 0, got -1'],
    [edited(DMA_SLOT, 'cpu_cache: on', 'cpu_cache: on\n  dma_slot_logging: forbid'), "vm.dma_slot_logging: 'forbid' is not one of: force-wb, refuse"],
    [edited(DEVICE_MEMORY, 'cpu_cache: on', 'cpu_cache: on\n  dma_slot_logging: refuse'),
      'vm.dma_slot_logging: refuse is what KVM does when dirty logging starts on a KVM_MEM_DMA slot: the VM needs a slot with flags [KVM_MEM_DMA]'],
    [edited('10-private-memory-conversion.yaml', 'flags: [GUEST_MEMFD]', 'flags: [GUEST_MEMFD, KVM_MEM_DMA]'), 'vm.slots[0].flags: KVM_MEM_GUEST_MEMFD with KVM_MEM_DMA (KVM refuses the pair: EINVAL)'],
    [edited('10-private-memory-conversion.yaml', 'flags: [GUEST_MEMFD]', 'flags: 20'), 'vm.slots[0].flags: KVM_MEM_GUEST_MEMFD with KVM_MEM_KVM_ONLY (KVM refuses the pair: EINVAL)'],
    [edited(DMA_SLOT, '{op: enable-logging 1, expect: {zapped: 16}}', '{op: get-log 1, expect: {zapped: 16}}'), "actors.host[0].expect.zapped: 'zapped' does not apply to get-log (it takes: dirty, error)"],
  ])('bad input is one line naming the file, the field and the value (%#)', (source, message) => {
    const msg = userError(() => parseLitmus(source, 'bad.yaml'));
    expect(msg.split('\n').some((l) => l.startsWith('bad.yaml: ') && l.includes(message)), msg).toBe(true);
  });
});
