import { parseYaml, readUserFile } from '../util/user-file.ts';
import { z } from 'zod';
import { UserError } from '../util/errors.ts';
import { OPTIONS, type Raw, type ScenarioKind, type SettingKey } from './options.ts';
import { FACTS, type Outcome, type OutcomeFact, VERDICTS } from './outcome.ts';
import { type Layer, parseLayer } from './settings.ts';

/**
 * Scenario files (YAML): what `vmemlab run FILE` runs. A scenario sets the same settings
 * as the command's flags (options.ts: each option's `yaml` path), each parsed once, here,
 * with errors naming the file, the field and the value; flags given on the command line
 * override the file.
 */
const value = z.union([z.number(), z.string()]);
const SECTION_KEYS = new Map<string, string[]>();
const TOP_KEYS: string[] = [];
for (const o of OPTIONS) {
  if (!('yaml' in o) || o.yaml === undefined) continue;
  const [a, b] = o.yaml.split('.') as [string, string | undefined];
  if (b === undefined) TOP_KEYS.push(a);
  else SECTION_KEYS.set(a, [...(SECTION_KEYS.get(a) ?? []), b]);
}
const fieldType = (key: string): z.ZodType => {
  const o = OPTIONS.find((x) => 'yaml' in x && x.yaml === key)!;
  if (o.key === 'inject') return z.array(z.string());
  if (o.key === 'devices') return z.array(z.looseObject({ kind: z.string() }));
  return 'boolean' in o && o.boolean ? z.boolean() : value;
};
const shape: Record<string, z.ZodType> = {
  kind: z.enum(['dirty-log-test', 'migrate', 'mdev']),
  description: z.string().optional(),
  /** What a run of this scenario ends with: a verdict, then facts (outcome.ts). */
  expect: z.union([z.string(), z.array(z.string())]).optional(),
};
for (const [section, keys] of SECTION_KEYS) {
  shape[section] = z.strictObject(Object.fromEntries(keys.map((k) => [k, fieldType(`${section}.${k}`).optional()]))).optional();
}
for (const k of TOP_KEYS) shape[k] = fieldType(k).optional();
const Scenario = z.strictObject(shape);

/** Sections only one kind of run reads. */
const ONLY: Record<string, ScenarioKind> = { migration: 'migrate', iommu: 'migrate', devices: 'migrate', test: 'dirty-log-test', mdev: 'mdev' };

export interface ScenarioFile {
  path: string;
  kind: ScenarioKind;
  /** The file's settings, parsed, each naming its field. */
  layer: Layer;
  /** What the scenario says a run of it ends with. */
  expect?: Outcome;
}

export function loadScenario(path: string): ScenarioFile {
  const doc = parseYaml(readUserFile(path, 'scenario', 'scenarioFileBytes').toString('utf8'), path);
  const r = Scenario.safeParse(doc);
  if (!r.success) {
    throw new UserError(r.error.issues.map((i) => {
      const where = i.path.length ? i.path.join('.') : '(top level)';
      const keys = 'keys' in i ? ` '${(i.keys as string[]).join("', '")}'` : '';
      return `${path}: ${where}:${keys} ${i.message}`;
    }).join('\n'));
  }
  const s = r.data as Record<string, unknown> & { kind: ScenarioKind; expect?: string | string[] };
  for (const [section, kind] of Object.entries(ONLY)) {
    if (s[section] !== undefined && s.kind !== kind) throw new UserError(`${path}: ${section}: only for kind: ${kind}`);
  }
  const raw: Partial<Record<SettingKey, Raw>> = {};
  const fieldOf: Partial<Record<SettingKey, string>> = {};
  for (const o of OPTIONS) {
    if (!('yaml' in o) || o.yaml === undefined) continue;
    const [a, b] = o.yaml.split('.') as [string, string | undefined];
    const v = b === undefined ? s[a] : (s[a] as Record<string, unknown> | undefined)?.[b];
    if (v === undefined) continue;
    if (!o.kinds.includes(s.kind)) throw new UserError(`${path}: ${o.yaml}: not for kind: ${s.kind} (it is for ${o.kinds.join(', ')})`);
    raw[o.key] = v;
    fieldOf[o.key] = o.yaml;
  }
  const layer = parseLayer(raw, (key) => `${path}: ${fieldOf[key]}`);
  const expect = s.expect === undefined ? undefined : expectation(s.expect, `${path}: expect`);
  return { path, kind: s.kind, layer, expect };
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
