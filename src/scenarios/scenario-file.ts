import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { z } from 'zod';
import { UserError } from '../util/errors.ts';
import { FACTS, type Outcome, type OutcomeFact, VERDICTS } from './outcome.ts';

/**
 * Scenario files (YAML): what `vmemlab run FILE` runs. A scenario sets the same settings
 * as the command's flags; flags given on the command line override the file. Each
 * setting maps to one flag, so the commands' own validation applies, and its messages
 * are re-addressed to the file and field.
 */
const num = z.union([z.number(), z.string()]).transform(String);
const Scenario = z.strictObject({
  kind: z.enum(['dirty-log-test', 'migrate']),
  description: z.string().optional(),
  vm: z.strictObject({ memory: num.optional(), vcpus: num.optional(), slots: num.optional(), dirty_limit: num.optional() }).optional(),
  tracking: z.strictObject({ mode: z.string().optional(), ring_size: num.optional() }).optional(),
  workload: z.strictObject({
    name: z.string().optional(), hot_fraction: num.optional(), hot_share: num.optional(), write_percent: num.optional(),
    random_order: z.boolean().optional(), op_rate: num.optional(),
  }).optional(),
  host_writes: z.strictObject({ every: num.optional() }).optional(),
  test: z.strictObject({ iterations: num.optional(), writes: num.optional() }).optional(),
  migration: z.strictObject({
    bandwidth: num.optional(), downtime_limit_ms: num.optional(), max_iterations: num.optional(), timeout_s: num.optional(),
    policy: z.string().optional(), warmup: num.optional(), to: z.string().optional(), resume_ops: num.optional(),
    batch_pages: num.optional(), page_history: z.boolean().optional(), vcpu_dirty_limit: num.optional(),
  }).optional(),
  iommu: z.strictObject({ backend: z.string().optional(), dma_entry_limit: num.optional(), on_fault: z.string().optional() }).optional(),
  devices: z.array(z.looseObject({ kind: z.string() })).optional(),
  driver: z.string().optional(),
  seed: num.optional(),
  inject: z.array(z.string()).optional(),
  watchdog_s: num.optional(),
  /** What a run of this scenario ends with: a verdict, then facts (outcome.ts). */
  expect: z.union([z.string(), z.array(z.string())]).optional(),
});

/** field path in the file -> [flag, commander option key] */
const FIELDS: Record<string, [string, string]> = {
  'vm.memory': ['--memory', 'memory'], 'vm.vcpus': ['--vcpus', 'vcpus'], 'vm.slots': ['--slots', 'slots'], 'vm.dirty_limit': ['--dirty-limit', 'dirtyLimit'],
  'workload.op_rate': ['--op-rate', 'opRate'], 'migration.vcpu_dirty_limit': ['--vcpu-dirty-limit', 'vcpuDirtyLimit'],
  'tracking.ring_size': ['--ring-size', 'ringSize'],
  'workload.name': ['--workload', 'workload'], 'workload.hot_fraction': ['--hot-fraction', 'hotFraction'],
  'workload.hot_share': ['--hot-share', 'hotShare'], 'workload.write_percent': ['--write-percent', 'writePercent'],
  'workload.random_order': ['--random-order', 'randomOrder'],
  'host_writes.every': ['--host-write-every', 'hostWriteEvery'],
  'test.iterations': ['--iterations', 'iterations'], 'test.writes': ['--writes', 'writes'],
  'migration.bandwidth': ['--bandwidth', 'bandwidth'], 'migration.downtime_limit_ms': ['--downtime-limit', 'downtimeLimit'],
  'migration.max_iterations': ['--max-iterations', 'maxIterations'], 'migration.timeout_s': ['--timeout', 'timeout'],
  'migration.policy': ['--policy', 'policy'], 'migration.warmup': ['--warmup', 'warmup'], 'migration.to': ['--to', 'to'],
  'migration.resume_ops': ['--resume-ops', 'resumeOps'],
  'migration.batch_pages': ['--batch-pages', 'batchPages'], 'migration.page_history': ['--no-page-history', 'pageHistory'],
  'iommu.backend': ['--iommu', 'iommu'], 'iommu.dma_entry_limit': ['--dma-entry-limit', 'dmaEntryLimit'], 'iommu.on_fault': ['--on-device-fault', 'onDeviceFault'],
  driver: ['--driver', 'driver'], seed: ['--seed', 'seed'], inject: ['--inject', 'inject'], watchdog_s: ['--watchdog', 'watchdog'],
};

export interface ScenarioFile {
  path: string;
  kind: 'dirty-log-test' | 'migrate';
  /** Commander option key -> value, as if given as flags. */
  values: Record<string, unknown>;
  /** Flag -> the field it came from, to re-address error messages. */
  fieldOfFlag: Record<string, string>;
  /** What the scenario says a run of it ends with. */
  expect?: Outcome;
}

export function loadScenario(path: string): ScenarioFile {
  let text: string;
  try { text = readFileSync(path, 'utf8'); } catch (e) { throw new UserError(`${path}: cannot read the scenario (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`); }
  let doc: unknown;
  try { doc = parse(text); } catch (e) { throw new UserError(`${path}: not valid YAML: ${(e as Error).message.split('\n')[0]}`); }
  const r = Scenario.safeParse(doc);
  if (!r.success) {
    throw new UserError(r.error.issues.map((i) => {
      const where = i.path.length ? i.path.join('.') : '(top level)';
      const keys = 'keys' in i ? ` '${(i.keys as string[]).join("', '")}'` : '';
      return `${path}: ${where}:${keys} ${i.message}`;
    }).join('\n'));
  }
  const s = r.data;
  const values: Record<string, unknown> = {};
  const fieldOfFlag: Record<string, string> = {};
  const modeFlag = s.kind === 'migrate' ? ['--tracking', 'tracking'] : ['--mode', 'mode'];
  const set = (field: string, value: unknown, flag: [string, string] | string[]): void => {
    if (value === undefined) return;
    values[flag[1]!] = value;
    fieldOfFlag[flag[0]!] = field;
  };
  set('tracking.mode', s.tracking?.mode, modeFlag);
  const doc2 = s as unknown as Record<string, unknown>;
  for (const [field, flag] of Object.entries(FIELDS)) {
    const [a, b] = field.split('.') as [string, string | undefined];
    const value = b === undefined ? doc2[a] : (doc2[a] as Record<string, unknown> | undefined)?.[b];
    set(field, value, flag);
  }
  if (s.devices) {
    if (s.kind !== 'migrate') throw new UserError(`${path}: devices: only for kind: migrate`);
    set('devices', s.devices.map((d, i) => deviceSpec(d, `${path}: devices.${i}`)), ['--device', 'device']);
  }
  if (s.kind === 'dirty-log-test' && s.iommu) throw new UserError(`${path}: iommu: only for kind: migrate`);
  if (s.kind === 'dirty-log-test' && s.migration) throw new UserError(`${path}: migration: only for kind: migrate`);
  if (s.kind === 'migrate' && s.test) throw new UserError(`${path}: test: only for kind: dirty-log-test`);
  const expect = s.expect === undefined ? undefined : expectation(s.expect, `${path}: expect`);
  return { path, kind: s.kind, values, fieldOfFlag, expect };
}

/** `expect: VERDICT` or `expect: [VERDICT, FACT, ...]`. */
function expectation(e: string | string[], where: string): Outcome {
  const items = Array.isArray(e) ? e : [e];
  const verdicts = items.filter((x) => (VERDICTS as readonly string[]).includes(x));
  const unknown = items.filter((x) => !(VERDICTS as readonly string[]).includes(x) && !(FACTS as readonly string[]).includes(x));
  if (unknown.length > 0) throw new UserError(`${where}: unknown outcome '${unknown[0]}' (verdicts: ${VERDICTS.join(', ')}; facts: ${FACTS.join(', ')})`);
  if (verdicts.length !== 1) throw new UserError(`${where}: '${items.join(', ')}' must name exactly one verdict (${VERDICTS.join(', ')})`);
  return { verdict: verdicts[0] as Outcome['verdict'], facts: items.filter((x) => (FACTS as readonly string[]).includes(x)) as OutcomeFact[] };
}

/** A device entry as the `--device KIND:key=value,...` text it stands for (snake_case keys become the flag's kebab-case). */
function deviceSpec(d: { kind: string } & Record<string, unknown>, where: string): string {
  const opts = Object.entries(d).filter(([k]) => k !== 'kind').map(([k, v]) => {
    if (typeof v !== 'string' && typeof v !== 'number' && typeof v !== 'boolean') throw new UserError(`${where}.${k}: expected a number, word or true/false`);
    return `${k.replace(/_/g, '-')}=${String(v)}`;
  });
  return opts.length ? `${d.kind}:${opts.join(',')}` : d.kind;
}

/** Rewrites "--flag: msg" into "FILE: field: msg" when the flag's value came from the file. */
export function readdress(e: UserError, file: ScenarioFile, fromCli: (key: string) => boolean): UserError {
  const m = /^(--[a-z-]+)(.*)$/s.exec(e.message);
  if (!m) return e;
  const field = file.fieldOfFlag[m[1]!];
  const key = field ? FIELDS[field]?.[1] ?? (field === 'tracking.mode' ? (file.kind === 'migrate' ? 'tracking' : 'mode') : undefined) : undefined;
  if (!field || (key !== undefined && fromCli(key))) return e;
  return new UserError(`${file.path}: ${field}${m[2]}`);
}
