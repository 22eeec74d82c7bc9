import { DeterministicDriver, ReplayScheduler } from '../src/drivers/deterministic.ts';
import { Packr } from 'msgpackr';
import { type Role, Step, type Steps, type Wait } from '../src/roles/role.ts';
import { type GuestOp, OpKind, type Workload } from '../src/host/guest-op.ts';
import { type DirtyTracking, type MemslotConfig, VcpuRunState, createVmLayout } from '../src/host/layout.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { type KernelBugs, Vm } from '../src/host/vm.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { UserError } from '../src/util/errors.ts';

/** A VM with one or more slots, populated (pages writable), vCPUs created but not run. */
export function makeVm(o: { slots?: MemslotConfig[]; pages?: number; vcpus?: number; tracking: DirtyTracking; bugs?: KernelBugs }): Vm {
  const slots = o.slots ?? [{ id: 1, asId: 0, baseGfn: 0x100, pages: o.pages ?? 256, flags: 0 }];
  const vm = new Vm(createVmLayout({ slots, vcpus: o.vcpus ?? 1, tracking: o.tracking }), o.bugs ?? {});
  vm.populate();
  return vm;
}

export const RING = (entries = 256, withBitmap = false): DirtyTracking => ({ kind: 'ring', entries, withBitmap });
export const LEGACY: DirtyTracking = { kind: 'bitmap', manualProtect: false, initiallySet: false };
export const MANUAL: DirtyTracking = { kind: 'bitmap', manualProtect: true, initiallySet: false };

/** A guest that performs exactly the scripted writes, then idles on its last page. */
export class ScriptWorkload implements Workload {
  private i = 0;
  constructor(private readonly ops: { gfn: number; value: number; kind?: OpKind }[]) {}
  next(op: GuestOp): void {
    const o = this.ops[Math.min(this.i++, this.ops.length - 1)]!;
    op.kind = o.kind ?? OpKind.WRITE64;
    op.gfn = o.gfn;
    op.value = o.value;
  }
}

/** One scripted guest operation: a WRITE64 of 0 unless it says otherwise. */
export interface ScriptedOp { gfn: number; value?: number; kind?: OpKind; offset?: number; private?: boolean }

/** Scripted operations with every field set (`private` only where the script says), then idles on the last one. */
export class Ops implements Workload {
  i = 0;
  constructor(private readonly ops: ScriptedOp[]) {}
  next(op: GuestOp): void {
    const o = this.ops[Math.min(this.i++, this.ops.length - 1)]!;
    op.kind = o.kind ?? OpKind.WRITE64;
    op.gfn = o.gfn;
    op.value = o.value ?? 0;
    op.offset = o.offset ?? 0;
    if (o.private !== undefined || op.private !== undefined) op.private = o.private === true;
  }
}

export function vcpuWith(vm: Vm, index: number, ops: { gfn: number; value: number; kind?: OpKind }[]): Vcpu {
  return new Vcpu(vm, index, new ScriptWorkload(ops));
}

/** Steps a vCPU until it has retired `n` more operations (or exits); returns steps taken. */
export function retire(v: Vcpu, n = 1, maxSteps = 10_000): number {
  const target = v.retired + n;
  let steps = 0;
  while (v.retired < target) {
    if (v.step() === Step.BLOCKED) return steps;
    if (++steps > maxSteps) throw new Error(`${v.name} did not retire ${n} operations in ${maxSteps} steps`);
  }
  return steps;
}

/** Runs a host procedure to completion, stepping `others` whenever it blocks (a flush). */
export function complete<T>(gen: Steps<T>, others: Role[] = [], maxSteps = 100_000): T {
  for (let i = 0; i < maxSteps; i++) {
    const r = gen.next();
    if (r.done) return r.value;
    if (r.value !== undefined) {
      if (others.length === 0) throw new Error(`host procedure blocked with nobody to step: wait code ${r.value.code} arg ${r.value.arg}`);
      for (const o of others) o.step();
    }
  }
  throw new Error('host procedure did not finish');
}

export { DeterministicDriver, ReplayScheduler, VmmControl };

/** Runs a step procedure to its end, stepping `others` whenever it blocks; returns its value and the waits it blocked on. */
export function drive<T>(gen: Steps<T>, others: Role[] = []): { value: T; waits: Wait[] } {
  const waits: Wait[] = [];
  for (let i = 0; i < 10_000; i++) {
    const r = gen.next();
    if (r.done) return { value: r.value, waits };
    if (r.value === undefined) continue;
    waits.push(r.value);
    if (others.length === 0) throw new Error(`blocked with nobody to step: wait code ${r.value.code} arg ${r.value.arg}`);
    for (const o of others) o.step();
  }
  throw new Error('procedure did not finish in 10000 steps');
}

/** A migration stream frame built by hand (any record, any payload): u32 length, u32 record length, the msgpack record padded to 8, the payload. */
export function frameOf(record: object, payload = new Uint8Array(0)): Uint8Array {
  const head = new Packr({ useRecords: false }).pack(record);
  const at = (8 + head.length + 7) & ~7; // the record padded to 8 bytes from the frame's start
  const buf = new Uint8Array(at + payload.length);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, at - 4 + payload.length);
  dv.setUint32(4, head.length);
  buf.set(head, 8);
  buf.set(payload, at);
  return buf;
}

/** Steps until the vCPU retired one more operation or exited; returns what happened. */
export function runOne(v: Vcpu): 'retired' | 'exited' {
  const target = v.retired + 1;
  for (let i = 0; i < 100; i++) {
    v.step();
    if (v.retired >= target) return 'retired';
    if (v.runState === VcpuRunState.EXITED) return 'exited';
  }
  throw new Error('neither retired nor exited in 100 steps');
}

/** The one line a migration's settings are refused with (a UserError), or 'accepted'. */
export function refusedMigration(raw: Record<string, unknown>): string {
  try { migrationSetup(raw as never); } catch (e) {
    if (!(e instanceof UserError)) throw e;
    return e.message;
  }
  return 'accepted';
}
