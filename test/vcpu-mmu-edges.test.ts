import { describe, expect, it } from 'vitest';
import { KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE } from '../src/host/constants.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload, type Write64Workload } from '../src/host/guest-op.ts';
import { GlobalWord, type MemslotConfig, VcpuRunState, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { Phase, Vcpu } from '../src/host/vcpu.ts';
import { runTlbHits, runWriteHits } from '../src/host/vcpu-fast-path.ts';
import { Vm } from '../src/host/vm.ts';
import { Step } from '../src/roles/role.ts';
import { LEGACY, MANUAL, RING, ScriptWorkload, VmmControl, complete, makeVm, retire } from './helpers.ts';

/*
 * Edges of the vCPU (vcpu.ts), its fast paths (vcpu-fast-path.ts) and the Vm's tracking
 * getters that the other suites leave open. One slot, gfns 0x100..0x13f (VM pages 0..63).
 */
const BASE = 0x100;
const SLOT: MemslotConfig = { id: 1, asId: 0, baseGfn: BASE, pages: 64, flags: 0 };

const word = (vm: Vm, v: number, w: number): number => Atomics.load(vm.vcpuWords, vm.vcpuBase(v) + w);
const read = (vm: Vm, gfn: number): number => vm.memory.findSlot(gfn)!.readU64(gfn - BASE);
const stampOf = (vm: Vm, gfn: number) => vm.memory.findSlot(gfn)!.stampOf(gfn - BASE);

/** Marks `gfns` as cached in the vCPU's TLB for its current flush generation. */
function fillTlb(v: Vcpu, gfns: number[]): void {
  for (const g of gfns) v.tlb[g - BASE] = v.tlbGen + 1;
}

/** WRITE64 of each scripted gfn to itself (then the last again); throws past `budget` fetches, so a vCPU that re-fetches fails instead of spinning. */
class Budgeted implements Workload {
  fetched = 0;
  readonly iterationsSeen: unknown[] = [];
  constructor(private readonly gfns: number[], private readonly budget = 1000) {}
  next(op: GuestOp, ctx: GuestContext): void {
    if (++this.fetched > this.budget) throw new Error(`fetched more than ${this.budget} operations`);
    this.iterationsSeen.push(ctx.iteration);
    op.kind = OpKind.WRITE64;
    op.gfn = this.gfns[Math.min(this.fetched - 1, this.gfns.length - 1)]!;
    op.value = op.gfn;
    op.offset = 0;
  }
}

/** A Write64Workload that counts which of its two methods the vCPU asks. */
class CountedWrites implements Write64Workload {
  nexts = 0;
  gfnsAsked = 0;
  private i = 0;
  constructor(private readonly gfns: number[]) {}
  nextWriteGfn(): number {
    this.gfnsAsked++;
    return this.gfns[this.i++ % this.gfns.length]!;
  }
  next(op: GuestOp, ctx: GuestContext): void {
    this.nexts++;
    op.kind = OpKind.WRITE64;
    op.gfn = this.gfns[this.i++ % this.gfns.length]!;
    op.value = ctx.iteration;
    op.offset = 0;
  }
}

describe('the guest context and the fast paths', () => {
  it('a new vCPU\'s guest context is iteration 0: a fast path run before any step boundary shows the workload 0 and records 0', () => {
    const vm = makeVm({ slots: [SLOT], tracking: LEGACY });
    const w = new Budgeted([BASE + 1, BASE + 2]);
    const v = new Vcpu(vm, 0, w);
    expect(v.ctx).toEqual({ iteration: 0 });
    fillTlb(v, [BASE + 1, BASE + 2]);
    expect(runTlbHits(v, 2)).toBe(2);
    expect(w.iterationsSeen).toEqual([0, 0]);
    expect(v.opIteration).toBe(0);
    expect(stampOf(vm, BASE + 2)).toEqual({ writer: 1, seq: 2, iteration: 0 });
  });

  // The iteration's high word exactly as Memslot.writeU64Stamped computes it, at the edges
  // of its "below 2^32, no division" shortcut (2^32 itself, and -2^32 and below, have a
  // high word; -1 and 2^32 - 1 do not).
  it('runWriteHits writes iterations at and past the 32-bit edges as writeU64Stamped does', () => {
    const vm = makeVm({ slots: [SLOT], tracking: LEGACY });
    const s = vm.memory.slots[0]!;
    const iterations = [2 ** 32, 2 ** 32 - 1, -(2 ** 32), -(2 ** 32) - 5, -(2 ** 33), -1, 2 ** 40 + 9];
    for (const [k, iteration] of iterations.entries()) {
      const v = new Vcpu(vm, 0, new CountedWrites([BASE + 2 * k]));
      fillTlb(v, [BASE + 2 * k]);
      v.ctx.iteration = iteration;
      expect(runWriteHits(v, 1)).toBe(1);
      s.writeU64Stamped(2 * k + 1, iteration, 1, 1, iteration);
      const a = s.words(2 * k);
      const b = s.words(2 * k + 1);
      const [i, j] = [s.wordIndex(2 * k), s.wordIndex(2 * k + 1)];
      expect([a[i], a[i + 1], a[i + 2], a[i + 3]], `iteration ${iteration}`).toEqual([b[j], b[j + 1], b[j + 2], b[j + 3]]);
    }
    expect(s.words(0)[s.wordIndex(0) + 1]).toBe(1); // 2^32: high word 1
    expect(s.words(4)[s.wordIndex(4) + 1]).toBe(0xffffffff); // -2^32: high word all ones
    expect(s.words(2)[s.wordIndex(2) + 1]).toBe(0); // 2^32 - 1 fits the low word
  });
});

describe('runBurst', () => {
  it('fetches each operation once: a write that faults mid-burst is finished before the next is fetched', () => {
    const vm = makeVm({ slots: [SLOT], tracking: LEGACY });
    for (const s of vm.memory.slots) complete(vm.enableDirtyLogging(s));
    Atomics.store(vm.global, GlobalWord.ITERATION, 3);
    const gfns = [BASE, BASE + 1, BASE + 2, BASE + 3, BASE + 4, BASE + 5];
    const w = new Budgeted(gfns, 50);
    const v = new Vcpu(vm, 0, w);
    expect(v.runBurst(4)).toBe(Step.PROGRESS);
    expect([v.retired, w.fetched, v.phase, v.opPending]).toEqual([4, 4, Phase.TRANSLATE, false]);
    expect(gfns.map((g) => read(vm, g))).toEqual([BASE, BASE + 1, BASE + 2, BASE + 3, 0, 0]);
    expect(word(vm, 0, VcpuWord.FAULTS)).toBe(4);
    v.runBurst(2);
    expect([v.retired, w.fetched, read(vm, BASE + 5)]).toEqual([6, 6, BASE + 5]);
    expect(stampOf(vm, BASE + 5)).toEqual({ writer: 1, seq: 6, iteration: 3 });
  });

  it('asks a Write64 workload for the page alone (nextWriteGfn), never next(), hits and misses alike', () => {
    const vm = makeVm({ slots: [SLOT], tracking: LEGACY });
    Atomics.store(vm.global, GlobalWord.ITERATION, 2);
    const w = new CountedWrites([BASE + 7, BASE + 8, BASE + 9]);
    const v = new Vcpu(vm, 0, w);
    v.runBurst(3); // three misses: each walked, the TLB filled
    v.runBurst(30); // hits
    expect([v.retired, w.nexts, w.gfnsAsked]).toEqual([33, 0, 33]);
    expect([read(vm, BASE + 7), read(vm, BASE + 8), read(vm, BASE + 9)]).toEqual([2, 2, 2]);
  });

  it('retires exactly the operations asked for on a VM with private memory, where every access takes the phases', () => {
    const vm = new Vm(createVmLayout({ slots: [SLOT], vcpus: 1, tracking: MANUAL, privateMem: true }));
    vm.populate();
    const w = new Budgeted([BASE, BASE + 1, BASE + 2, BASE + 3, BASE + 4, BASE + 5]);
    const v = new Vcpu(vm, 0, w);
    v.runBurst(3);
    expect([v.retired, w.fetched, word(vm, 0, VcpuWord.OPS)]).toEqual([3, 3, 3]);
    v.runBurst(1);
    expect([v.retired, w.fetched]).toEqual([4, 4]);
    v.runBurst(0);
    expect([v.retired, w.fetched, v.opPending]).toEqual([4, 4, false]);
    expect([read(vm, BASE + 3), read(vm, BASE + 4)]).toEqual([BASE + 3, 0]);
  });
});

describe('pacing and exits', () => {
  it('a throttle of 0 or below throttles nothing and banks nothing against a later throttle', () => {
    const vm = makeVm({ slots: [SLOT], tracking: LEGACY });
    const vmm = new VmmControl(vm);
    const v = new Vcpu(vm, 0, new ScriptWorkload([{ gfn: BASE, value: 1 }]));
    retire(v, 1); // TLB warm: every later operation takes two steps
    vmm.setThrottle(-50);
    for (let i = 0; i < 20; i++) v.step();
    expect(v.retired).toBe(1 + 10); // every step ran
    vmm.setThrottle(50);
    for (let i = 0; i < 20; i++) v.step();
    expect(v.retired).toBe(11 + 5); // every other step asleep from the first
  });

  it('a MAP_GPA_RANGE exit publishes no pending page, though the vCPU\'s last write had a slot', () => {
    const vm = new Vm(createVmLayout({ slots: [SLOT], vcpus: 1, tracking: MANUAL, privateMem: true, exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE }));
    vm.populate();
    const v = new Vcpu(vm, 0, new ScriptWorkload([{ gfn: BASE + 6, value: 1 }, { gfn: BASE + 6, value: 2, kind: OpKind.MAP_GPA_RANGE }]));
    retire(v, 1);
    for (let i = 0; i < 5 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    expect(v.runState).toBe(VcpuRunState.EXITED);
    expect([word(vm, 0, VcpuWord.EXIT_REASON), word(vm, 0, VcpuWord.PENDING_PAGE), v.retired]).toEqual([KVM_EXIT_HYPERCALL, -1, 1]);
  });
});

describe('Vm tracking getters', () => {
  // Both are read as booleans (precopy, DirtyLog, the ring source): undefined is no answer.
  it('manualProtect and hasBackupBitmap answer true or false for every kind of tracking', () => {
    const answers = [LEGACY, MANUAL, RING(256, false), RING(256, true)].map((tracking) => {
      const vm = makeVm({ slots: [SLOT], tracking });
      return [vm.manualProtect, vm.hasBackupBitmap];
    });
    expect(answers).toStrictEqual([[false, false], [true, false], [false, false], [false, true]]);
  });
});

describe('the dirty limit\'s pacing flag', () => {
  it('a write paced at its fault that then retires without faulting again (another vCPU made the page writable, a flush restarted it) leaves no stop to be taken in the middle of a later write', () => {
    const vm = makeVm({ slots: [SLOT], tracking: MANUAL });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const vmm = new VmmControl(vm);
    const clock = { virtual: true, nowMs: (): number => 0 }; // time stands still: one saved-up token, then none
    const v = new Vcpu(vm, 0, new ScriptWorkload([{ gfn: BASE, value: 1 }, { gfn: BASE + 1, value: 2 }, { gfn: BASE + 2, value: 3 }]), { clock });
    vmm.setDirtyLimit(1);
    retire(v, 1);
    for (let i = 0; i < 4; i++) v.step();
    expect([v.phase, v.retired]).toEqual([Phase.FAULT, 1]); // paced at the fault on BASE + 1
    vm.handleWriteFault(1, slot, 1); // vcpu1 faulted BASE + 1 in: writable now
    vm.handleWriteFault(1, slot, 2);
    complete(vm.flushRemoteTlbs(), [v]); // the flush restarts the paced write from TRANSLATE
    retire(v, 1);
    expect(read(vm, BASE + 1)).toBe(2);
    v.step(); // BASE + 2: TRANSLATE, a TLB miss
    v.step(); // WALK: writable, the TLB filled
    expect(v.phase).toBe(Phase.STORE);
    vmm.requestStop(0);
    v.step();
    expect(v.retired).toBe(3); // a stop is taken between operations only
    v.step();
    expect(v.runState).toBe(VcpuRunState.STOPPED);
    expect(word(vm, 0, VcpuWord.PENDING_PAGE)).toBe(-1);
  });
});
