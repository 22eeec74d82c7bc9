import { INJECTABLE_BUGS, isBugName } from '../host/injections.ts';
import type { Vm } from '../host/vm.ts';
import { CATALOG } from './catalog.ts';

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
