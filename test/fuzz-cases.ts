import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { parse, stringify } from 'yaml';
import { readReplayFile, writeReplayFile } from '../src/hunt/replay-file.ts';
import { parseLitmus } from '../src/litmus/load.ts';
import { runLitmus } from '../src/litmus/run.ts';
import { StreamDecoder, StreamError, encodeHeader, encodePages } from '../src/migration/stream.ts';
import { OPTIONS, type ScenarioKind, type SettingKey } from '../src/scenarios/options.ts';
import { loadScenario } from '../src/scenarios/scenario-file.ts';
import { type Resolved, buildDirtyLogTest, buildMdev, buildMigration, flagLayer, migrationSetup, resolve } from '../src/scenarios/settings.ts';
import { UserError } from '../src/util/errors.ts';

/**
 * The fuzzing cases, shared by the suite (test/fuzz.test.ts: a few hundred per kind, fixed
 * seeds) and the long run (bench/fuzz.ts: 100 000 and more). Each case feeds one entry
 * point generated input (valid documents mutated field by field, and random ones) and
 * classifies what it did: accepted, refused as the user's mistake (every line of the
 * message naming the flag or the file), or anything else, which is a bug.
 */
export type Verdict =
  | { kind: 'accepted' }
  | { kind: 'refused'; message: string }
  | { kind: 'bug'; what: string };

/** Runs `f` and classifies it; a refusal must be UserError lines each starting with `where`. */
export function classify(where: string | RegExp, f: () => void): Verdict {
  try {
    f();
    return { kind: 'accepted' };
  } catch (e) {
    if (!(e instanceof UserError)) return { kind: 'bug', what: `${(e as Error)?.name ?? typeof e}: ${(e as Error)?.message ?? String(e)}` };
    const bad = e.message.split('\n').find((l) => (typeof where === 'string' ? !l.startsWith(where) : !where.test(l)));
    if (bad !== undefined) return { kind: 'bug', what: `a refusal line that does not name where: '${bad}' (expected ${String(where)})` };
    if (/\n\s+at /.test(e.message)) return { kind: 'bug', what: 'a stack trace in a refusal' };
    return { kind: 'refused', message: e.message };
  }
}

/** Raw values as a hostile user writes them: edge numbers, sizes, words, junk. */
export const rawValue: fc.Arbitrary<unknown> = fc.oneof(
  fc.integer({ min: -1_000_000, max: 1_000_000 }),
  fc.constantFrom(0, -1, 1, 2, 3, 255, 256, 4096, 65536, 2 ** 31, 2 ** 32, 2 ** 53, 1e300, -0, 0.5, 1.5, Number.NaN, Infinity),
  fc.constantFrom('', ' ', '0', '-1', '1', '64', '1MiB', '4KiB', '64GiB', '128GiB', '1000', 'unlimited', 'abc', '0x10', '1e3', ' 5 ', '1MB/s',
    'dirty-ring', 'clear-log', 'dirty-log', 'sweep', 'hotset', 'random', 'perf', 'free', 'deterministic', 'fail', 'force', 'dirty-limit',
    'copy-before-reset', 'skip-tlb-shootdown', 'no-such-bug', 'tcp:127.0.0.1:1', 'tcp:999.1.1.1:80', 'dma-engine', 'gvt:every=0', 'mdev:buffers=lots',
    '__proto__', 'true', 'false', 'type1', 'iommufd', 'stop', 'continue'),
  fc.string({ maxLength: 12 }),
  fc.boolean(),
  fc.constant(null),
  fc.array(fc.constantFrom('copy-before-reset', 'skip-tlb-shootdown', 'x', 1), { maxLength: 3 }),
);

const KINDS: ScenarioKind[] = ['migrate', 'dirty-log-test', 'mdev'];

/** Flags: some options of a kind, each with a raw value, parsed and built as the command would (nothing runs). */
export const flagCase = fc.record({
  kind: fc.constantFrom(...KINDS),
  values: fc.array(fc.tuple(fc.constantFrom(...OPTIONS.map((o) => o.key)), rawValue), { maxLength: 4 }),
}).map(({ kind, values }) => () => classify(/^--[a-z]/, () => {
  const raw: Partial<Record<SettingKey, unknown>> = {};
  for (const [k, v] of values) {
    const o = OPTIONS.find((x) => x.key === k)!;
    if (!o.kinds.includes(kind)) continue;
    raw[k] = 'repeatable' in o && o.repeatable ? (Array.isArray(v) ? v.map(String) : [String(v)]) : String(v);
  }
  const r = resolve(kind, [flagLayer(kind, raw)]);
  build(kind, r);
}));

/** The configuration of a run of `kind` from its settings (where cross-setting checks live). */
function build(kind: ScenarioKind, r: Resolved): void {
  if (kind === 'migrate') buildMigration(r);
  else if (kind === 'mdev') buildMdev(r);
  else buildDirtyLogTest(r);
}

const dir = mkdtempSync(join(tmpdir(), 'vmemlab-fuzz-'));
const examples = new URL('../examples/', import.meta.url);
const scenarioDocs = readdirSync(examples).filter((f) => f.endsWith('.yaml')).map((f) => parse(readFileSync(new URL(f, examples), 'utf8')) as Record<string, unknown>);
const SCENARIO_PATHS = [...new Set(OPTIONS.flatMap((o) => ('yaml' in o && o.yaml ? [o.yaml] : [])))].concat(['kind', 'expect', 'description', 'vm', 'migration', 'nonsense', 'vm.nonsense', 'devices.0.kind', 'devices.0.every', 'devices.0.__proto__']);

function setPath(doc: Record<string, unknown>, path: string, v: unknown): void {
  const keys = path.split('.');
  let o: Record<string, unknown> = doc;
  for (const k of keys.slice(0, -1)) {
    if (o[k] === null || typeof o[k] !== 'object') o[k] = /^\d+$/.test(keys[keys.indexOf(k) + 1] ?? '') ? [] : {};
    o = o[k] as Record<string, unknown>;
  }
  Object.defineProperty(o, keys.at(-1)!, { value: v, enumerable: true, writable: true, configurable: true });
}

let counter = 0;
/** Scenario files: a shipped example with fields changed, deleted or added, or a random document, loaded and built. */
export const scenarioCase = fc.record({
  base: fc.integer({ min: 0, max: scenarioDocs.length - 1 }),
  random: fc.boolean(),
  edits: fc.array(fc.tuple(fc.constantFrom(...SCENARIO_PATHS), rawValue, fc.boolean()), { minLength: 1, maxLength: 4 }),
  junk: fc.string({ maxLength: 60 }),
}).map(({ base, random, edits, junk }) => () => {
  const path = join(dir, `s${counter++}.yaml`);
  if (random && edits.length === 1) writeFileSync(path, junk);
  else {
    const doc = structuredClone(random ? {} : scenarioDocs[base]!);
    for (const [p, v, del] of edits) {
      if (del) delete (doc as Record<string, unknown>)[p.split('.')[0]!];
      else setPath(doc as Record<string, unknown>, p, v);
    }
    writeFileSync(path, stringify(doc));
  }
  return classify(`${path}: `, () => {
    const f = loadScenario(path);
    const r = resolve(f.kind, [f.layer]);
    build(f.kind, r);
  });
});

const litmusDir = new URL('../examples/litmus/', import.meta.url);
const litmusDocs = readdirSync(litmusDir).filter((f) => f.endsWith('.yaml')).map((f) => parse(readFileSync(new URL(f, litmusDir), 'utf8')) as Record<string, unknown>);
const LITMUS_OPS = ['write 0x100 1', 'write-pages 0x100 4 1', 'read 0x100', 'harvest', 'reset', 'enable-logging', 'get-log 0', 'clear-log 0 0 64', 'copy 0x100',
  'forge-entry vcpu0 1 9 1 reset', 'reenter vcpu0', 'stop vcpu0', 'release vcpu0', 'write-guest 0x100 3', 'write 0xfffffff 1', 'write-pages 0x100 99999999 1', 'nonsense', ''];

/** Litmus files: a shipped litmus test with operations, interleaving steps or fields changed, parsed and run. */
export const litmusCase = fc.record({
  base: fc.integer({ min: 0, max: litmusDocs.length - 1 }),
  ops: fc.array(fc.tuple(fc.constantFrom('vcpu0', 'vcpu1', 'host'), fc.constantFrom(...LITMUS_OPS)), { maxLength: 3 }),
  steps: fc.array(fc.constantFrom('host', 'vcpu0', 'vcpu1', 'vcpu0 until exit', 'host with vcpu0', 'nobody'), { maxLength: 3 }),
  field: fc.option(fc.tuple(fc.constantFrom('vm', 'vm.memory', 'tracking', 'tracking.entries', 'tracking.mode', 'bugs', 'expect', 'name', 'extra'), rawValue)),
}).map(({ base, ops, steps, field }) => () => {
  const doc = structuredClone(litmusDocs[base]!) as Record<string, any>;
  for (const [actor, op] of ops) (doc['actors'] ??= {})[actor] = [...(doc['actors']?.[actor] ?? []), op];
  if (Array.isArray(doc['interleaving'])) doc['interleaving'].push(...steps);
  if (field) setPath(doc, field[0], field[1]);
  const file = `fuzz${counter++}.yaml`;
  return classify(`${file}: `, () => { runLitmus(parseLitmus(stringify(doc), file)); });
});

const packr = new Packr({ useRecords: false, moreTypes: true });
const REPLAY_PATHS = ['scenario.vcpus', 'scenario.memoryBytes', 'scenario.slots', 'scenario.ringEntries', 'scenario.tracking', 'scenario.workload.name', 'scenario.workload.hotShare',
  'scenario.bugs', 'scenario.params.batchPages', 'scenario.params.bandwidth', 'scenario.params.policy', 'scenario.params.warmupOps', 'scenario.hostWriteEvery', 'scenario.devices',
  'scenario.dirtyLimit', 'scenario.seed', 'scenario', 'seed', 'driver', 'strategy', 'schedule', 'failure', 'failure.kind', 'fingerprint', 'command', 'extra', 'scenario.extra'];
const replayBase = (() => {
  const { scenario } = migrationSetup({ memoryBytes: '4MiB', inject: ['skip-tlb-shootdown'] });
  const path = join(dir, 'base.vmreplay');
  writeReplayFile(path, { command: 'migrate', scenario, driver: 'free', strategy: 'free', seed: scenario.seed, schedule: null, failure: { kind: 'lost-writes', summary: 'x' }, fingerprint: '{}' });
  return packr.unpack(readFileSync(path)) as Record<string, unknown>;
})();

/** Replay files: a valid one with fields set to random values, read as `vmemlab replay` reads it (nothing runs). */
export const replayCase = fc.array(fc.tuple(fc.constantFrom(...REPLAY_PATHS), rawValue), { minLength: 1, maxLength: 3 }).map((edits) => () => {
  const f = structuredClone(replayBase);
  for (const [p, v] of edits) setPath(f, p, v);
  const path = join(dir, `r${counter++}.vmreplay`);
  writeFileSync(path, packr.pack(f));
  return classify(`${path}: `, () => { readReplayFile(path); });
});

const streamBase = [encodeHeader([{ id: 1, asId: 0, baseGfn: 0, pages: 16 }]), encodePages(1, [0, 3], { isZero: (p) => p === 3, copy: (_p, n, into, at) => { into.fill(7, at, at + n * 4096); } }).frame];

/** The migration stream's decoder: a valid stream with bytes flipped, cut or appended, or random bytes; only StreamError may come out. */
export const streamCase = fc.record({
  flips: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
  cut: fc.option(fc.nat()),
  random: fc.option(fc.uint8Array({ maxLength: 256 })),
}).map(({ flips, cut, random }) => () => {
  let bytes = random ?? new Uint8Array([...streamBase[0]!, ...streamBase[1]!]);
  bytes = bytes.slice();
  for (const [at, v] of flips) if (bytes.length > 0) bytes[at % bytes.length] = v;
  if (cut !== null) bytes = bytes.subarray(0, cut % (bytes.length + 1));
  try {
    const d = new StreamDecoder();
    d.push(bytes);
    d.end();
    return { kind: 'accepted' } as Verdict;
  } catch (e) {
    return e instanceof StreamError ? { kind: 'refused', message: e.message } as Verdict : { kind: 'bug', what: `${(e as Error).name}: ${(e as Error).message}` } as Verdict;
  }
});

export const CASES = { flags: flagCase, scenario: scenarioCase, litmus: litmusCase, replay: replayCase, stream: streamCase };
export type CaseKind = keyof typeof CASES;
