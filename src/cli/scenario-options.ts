import type { Command } from 'commander';
import { OPTIONS, type OptionDef, type Raw, type ScenarioKind, type SettingKey, commanderKey } from '../scenarios/options.ts';
import { type Layer, parseLayer } from '../scenarios/settings.ts';

const collect = (value: string, previous: string[] | undefined): string[] => [...(previous ?? []), value];

/** The flag a command registers an option under: `run` and dirty-log-test call the tracking mode --mode. */
function flagIn(o: OptionDef, modeFlag: '--mode' | '--tracking'): string {
  return o.key === 'tracking' ? modeFlag : o.flag;
}

/**
 * Registers the scenario options of `kinds` (options.ts) on a command, with their help
 * and, for `defaultsOf`, their defaults in the help text. Commander gets no defaults:
 * they come after the injected bugs' demonstration settings (settings.ts).
 */
export function addScenarioOptions(cmd: Command, kinds: readonly ScenarioKind[], modeFlag: '--mode' | '--tracking', defaultsOf?: ScenarioKind): Command {
  for (const o0 of OPTIONS) {
    const o = o0 as unknown as OptionDef;
    if (!o.kinds.some((k) => kinds.includes(k))) continue;
    const flag = flagIn(o, modeFlag);
    const spec = o.boolean ? flag : `${flag} ${o.arg}`;
    const d = defaultsOf ? o.defaults?.[defaultsOf] : undefined;
    const help = d !== undefined && !o.boolean && !o.repeatable && !/\bdefault\b/.test(o.help) ? `${o.help} (default: ${o.format(d as never)})` : o.help;
    if (o.repeatable) cmd.option(spec, help, collect);
    else cmd.option(spec, help);
  }
  return cmd.option('--json', 'print one JSON document instead of text');
}

/** Options a run of `kind` does not take: [commander key, flag, the kinds that take it] (what `run` refuses). */
export function notFor(kind: ScenarioKind): [string, string, readonly ScenarioKind[]][] {
  const out: [string, string, readonly ScenarioKind[]][] = [];
  for (const o0 of OPTIONS) {
    const o = o0 as unknown as OptionDef;
    if (!o.kinds.includes(kind)) out.push([o.key === 'tracking' ? 'mode' : commanderKey(o), o.key === 'tracking' ? '--mode' : o.flag, o.kinds]);
  }
  return out;
}

/**
 * The scenario settings a command line gave (only those typed: commander's own
 * defaults are none), parsed, each named by the flag typed.
 */
export function givenLayer(cmd: Command, flags: Record<string, unknown>, kinds: readonly ScenarioKind[], modeFlag: '--mode' | '--tracking', skip: readonly string[] = []): Layer {
  const raw: Partial<Record<SettingKey, Raw>> = {};
  const flagOf: Partial<Record<SettingKey, string>> = {};
  for (const o0 of OPTIONS) {
    const o = o0 as unknown as OptionDef;
    if (!o.kinds.some((k) => kinds.includes(k))) continue;
    const key = o.key === 'tracking' ? modeFlag.slice(2) : commanderKey(o);
    if (skip.includes(key) || cmd.getOptionValueSource(key) !== 'cli') continue;
    raw[o.key] = flags[key];
    flagOf[o.key] = flagIn(o, modeFlag);
  }
  return parseLayer(raw, (key) => flagOf[key]!);
}
