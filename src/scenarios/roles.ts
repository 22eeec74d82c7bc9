import { injectedBugs } from '../bugs/catalog.ts';
import { GeneratorRole, type Role } from '../drivers/role.ts';
import { createWorkload, type WorkloadOptions } from '../guest/workload.ts';
import { Vcpu } from '../host/vcpu.ts';
import type { VmLayout } from '../host/layout.ts';
import { Vm } from '../host/vm.ts';
import { VmmControl } from '../host/vmm.ts';
import { Prng } from '../util/prng.ts';
import { type DirtyLogEvent, type DirtyLogTestConfig, dirtyLogCollector } from './dirty-log-test.ts';
import { hostWriter } from './host-writer.ts';

/** A role described as plain data, so a worker thread can build it from its workerData. */
export type RoleSpec =
  | { kind: 'vcpu'; index: number; workload: WorkloadOptions; seed: number }
  | { kind: 'dirty-log-collector'; config: DirtyLogTestConfig }
  | { kind: 'host-writer'; every: number; seed: number };

export function roleName(spec: RoleSpec): string {
  switch (spec.kind) {
    case 'vcpu': return `vcpu${spec.index}`;
    case 'dirty-log-collector': return 'collector';
    case 'host-writer': return 'host-writer';
  }
}

/** Builds the Vm view every role of one VM shares (one per thread). */
export function vmFor(layout: VmLayout, bugs: readonly string[]): Vm {
  return new Vm(layout, injectedBugs(bugs).kernel);
}

export function buildRole(spec: RoleSpec, vm: Vm, report: (e: DirtyLogEvent) => void): Role {
  switch (spec.kind) {
    case 'vcpu': {
      const ranges = vm.memory.slots.map((s) => ({ baseGfn: s.baseGfn, pages: s.pages }));
      const vcpus = vm.layout.config.vcpus;
      return new Vcpu(vm, spec.index, createWorkload(spec.workload, ranges, spec.index, vcpus, spec.seed));
    }
    case 'dirty-log-collector':
      return new GeneratorRole('collector', dirtyLogCollector(vm, spec.config, report));
    case 'host-writer':
      return new GeneratorRole('host-writer', hostWriter(vm, new VmmControl(vm), spec.every, new Prng(Prng.derive(spec.seed, 2000))));
  }
}
