import { INJECTABLE_BUGS, isBugName } from '../host/injections.ts';
import type { Vm } from '../host/vm.ts';
import { CATALOG, type DirtyLogTestDemo, type MigrateDemo } from './catalog.ts';

/** What one injected bug did in a run: how often it acted, and if never, why not. */
export interface InjectionReport {
  bug: string;
  acted: number;
  /** Why it never acted (what never happened), when it did not. */
  idle: string | null;
}

/** The injected bugs' "acted" counts after a run, read from the VM's shared counters. */
export function injectionReport(vm: Vm, bugs: readonly string[]): InjectionReport[] {
  return bugs.filter(isBugName).map((bug) => {
    const acted = vm.acts.count(bug);
    return { bug, acted, idle: acted > 0 ? null : idleReason(vm, bug) };
  });
}

function idleReason(vm: Vm, bug: (typeof INJECTABLE_BUGS)[number]): string {
  const entry = CATALOG.find((b) => b.name === bug)!;
  const rings = vm.rings;
  if ((bug === 'ring-full-ignored' || bug === 'ring-full-exit-unhandled') && rings) {
    const most = Math.max(0, ...rings.map((r) => r.maxUsed));
    return `${entry.neverActed} (at most ${most} of ${rings[0]!.softLimit} entries used)`;
  }
  return entry.neverActed;
}

/** The injected bugs that never acted. */
export function idleBugs(r: readonly InjectionReport[]): InjectionReport[] {
  return r.filter((x) => x.acted === 0);
}

/** A demonstration's settings as the flags they stand for. */
export function demoFlags(d: MigrateDemo | DirtyLogTestDemo): string {
  const flag = (k: string): string => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
  return Object.entries(d).flatMap(([k, v]) => (Array.isArray(v) ? v : [v]).map((x) => `${flag(k)} ${String(x)}`)).join(' ');
}

/**
 * The verdict's qualifier when injected bugs never acted: "ring-full-ignored never acted:
 * no ring reached its soft limit (...); its demonstration: vmemlab ...". Null when every
 * injected bug acted.
 */
export function describeIdleBugs(r: readonly InjectionReport[], command: 'dirty-log-test' | 'migrate'): string | null {
  const idle = idleBugs(r);
  if (idle.length === 0) return null;
  return idle.map((x) => {
    const e = CATALOG.find((b) => b.name === x.bug);
    const demo = command === 'migrate' ? e?.migrateDemo : e?.dirtyLogTestDemo;
    const how = demo ? `; its demonstration settings: vmemlab ${command} --inject ${x.bug} ${demoFlags(demo)}` : '';
    return `${x.bug} never acted: ${x.idle}${how}`;
  }).join('; ');
}
