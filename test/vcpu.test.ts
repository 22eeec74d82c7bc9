import { describe, expect, it } from 'vitest';
import { Step, WaitCode } from '../src/roles/role.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload, type Write64Workload, isWrite64Workload } from '../src/host/guest-op.ts';
import { KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO, KVM_MEM_READONLY } from '../src/host/constants.ts';
import { GlobalWord, IN_GUEST_MODE, OUTSIDE_GUEST_MODE, VcpuRequest, VcpuRunState, VcpuWord } from '../src/host/layout.ts';
import { Phase, Vcpu } from '../src/host/vcpu.ts';
import { runTlbHits, runWriteHits } from '../src/host/vcpu-fast-path.ts';
import { writeProtectPage } from '../src/host/spte.ts';
import type { Vm } from '../src/host/vm.ts';
import { DirtyRingHarvester } from '../src/host/vmm/ring-harvester.ts';
import { LEGACY, Ops, RING, ScriptWorkload, type ScriptedOp, VmmControl, complete, makeVm, retire } from './helpers.ts';

/*
 * The vCPU (vcpu.ts) and its fast paths (vcpu-fast-path.ts), stepped on the test's thread.
 * Two adjacent slots: A = gfns 0x100..0x13f (VM pages 0..63), B = 0x140..0x17f (VM pages
 * 64..127); 0x200 is outside every slot.
 */
const A = 0x100;
const B = 0x140;
const HOLE = 0x200;
const SLOTS = [
  { id: 1, asId: 0, baseGfn: A, pages: 64, flags: 0 },
  { id: 2, asId: 0, baseGfn: B, pages: 64, flags: 0 },
];

/** A Write64Workload: WRITE64 of the iteration to the scripted gfns. */
class Writes implements Write64Workload {
  i = 0;
  constructor(private readonly gfns: number[]) {}
  nextWriteGfn(): number { return this.gfns[Math.min(this.i++, this.gfns.length - 1)]!; }
  next(op: GuestOp, ctx: GuestContext): void {
    op.kind = OpKind.WRITE64;
    op.gfn = this.nextWriteGfn();
    op.value = ctx.iteration;
    op.offset = 0;
  }
}

class FakeClock {
  readonly virtual = true;
  t = 0;
  constructor(private readonly perCall = 0) {}
  nowMs(): number { const t = this.t; this.t += this.perCall; return t; }
}

const word = (vm: Vm, v: number, w: number): number => Atomics.load(vm.vcpuWords, vm.vcpuBase(v) + w);

function slotOf(vm: Vm, gfn: number) { return vm.memory.findSlot(gfn)!; }
function read(vm: Vm, gfn: number): number { const s = slotOf(vm, gfn); return s.readU64(gfn - s.baseGfn); }
function stampOf(vm: Vm, gfn: number) { const s = slotOf(vm, gfn); return s.stampOf(gfn - s.baseGfn); }
function byteAt(vm: Vm, gfn: number, offset: number): number {
  const s = slotOf(vm, gfn);
  const p = gfn - s.baseGfn;
  return s.bytes(p)[s.byteOffset(p) + offset]!;
}
/** Marks `gfns` as cached in the vCPU's TLB for its current flush generation. */
function fillTlb(vm: Vm, v: Vcpu, gfns: number[]): void {
  for (const g of gfns) { const s = slotOf(vm, g); v.tlb[s.firstPage + g - s.baseGfn] = v.tlbGen + 1; }
}
function loggingVm(tracking = LEGACY, vcpus = 1): Vm {
  const vm = makeVm({ slots: SLOTS, tracking, vcpus });
  for (const s of vm.memory.slots) complete(vm.enableDirtyLogging(s));
  return vm;
}

describe('Vcpu.step: phases, faults and counters', () => {
  it('a protected page: TRANSLATE -> WALK -> FAULT -> WALK -> STORE; FAULTS is published at the fault step, OPS at the retire step', () => {
    const vm = loggingVm();
    Atomics.store(vm.global, GlobalWord.ITERATION, 7);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: B + 3, value: 0x1234 }, { gfn: B + 3, value: 0x5678 }]));
    expect(v.name).toBe('vcpu0');
    expect(v.stepCode).toBe(Phase.TRANSLATE + 1);
    const seen: number[][] = [];
    while (v.retired < 2) {
      expect(v.step()).toBe(Step.PROGRESS);
      seen.push([v.phase, v.stepCode, word(vm, 0, VcpuWord.FAULTS), word(vm, 0, VcpuWord.OPS)]);
    }
    expect(seen).toEqual([
      [Phase.WALK, 2, 0, 0], [Phase.FAULT, 3, 0, 0], [Phase.WALK, 2, 1, 0], [Phase.STORE, 4, 1, 0], [Phase.TRANSLATE, 1, 1, 1],
      [Phase.STORE, 4, 1, 1], [Phase.TRANSLATE, 1, 1, 2],
    ]);
    expect(v.progress).toBe(2);
    expect(v.runState).toBe(VcpuRunState.RUNNING);
    expect(word(vm, 0, VcpuWord.RUN_STATE)).toBe(VcpuRunState.RUNNING);
    expect(word(vm, 0, VcpuWord.MODE)).toBe(IN_GUEST_MODE);
    expect(read(vm, B + 3)).toBe(0x5678);
    expect(stampOf(vm, B + 3)).toEqual({ writer: 1, seq: 2, iteration: 7 });
  });

  it('STORE8 writes its byte at its offset, INC8 increments; a workload that never sets offset writes byte 0', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const v = new Vcpu(vm, 0, new Ops([
      { gfn: A + 2, kind: OpKind.STORE8, offset: 20, value: 0x5a },
      { gfn: A + 2, kind: OpKind.INC8, offset: 21, value: 0x77 },
      { gfn: A + 2, kind: OpKind.INC8, offset: 21, value: 0x77 },
    ]));
    retire(v, 3);
    expect([byteAt(vm, A + 2, 20), byteAt(vm, A + 2, 21), byteAt(vm, A + 2, 0)]).toEqual([0x5a, 2, 0]);
    expect(stampOf(vm, A + 2)).toEqual({ writer: 1, seq: 3, iteration: 0 });
    // helpers' ScriptWorkload fills kind, gfn and value only: the offset is the vCPU's initial 0.
    const w = new Vcpu(vm, 0, new ScriptWorkload([{ gfn: A + 9, value: 0xab, kind: OpKind.STORE8 }]));
    retire(w, 1);
    expect([byteAt(vm, A + 9, 0), byteAt(vm, A + 9, 1)]).toEqual([0xab, 0]);
  });

  it('knows its Write64 workloads (the runWriteHits fast path) from the others', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const writes = new Writes([A]);
    expect(isWrite64Workload(writes)).toBe(true);
    expect(isWrite64Workload(new Ops([{ gfn: A }]))).toBe(false);
    expect(new Vcpu(vm, 0, writes).writes).toBe(writes);
    expect(new Vcpu(vm, 0, new Ops([{ gfn: A }])).writes).toBeUndefined();
  });
});

describe('exits', () => {
  it('an access outside every slot: KVM_EXIT_MMIO with the 64-bit GPA, no pending page, parked on RUN_SEQ until re-entered', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY, vcpus: 2 });
    const vmm = new VmmControl(vm);
    Atomics.store(vm.global, GlobalWord.ITERATION, 3);
    const far = 0x123456;
    const v = new Vcpu(vm, 1, new Ops([{ gfn: B + 5, value: 1 }, { gfn: far, value: 2 }, { gfn: B + 6, value: 3 }]));
    retire(v, 1);
    expect(v.step()).toBe(Step.PROGRESS); // TRANSLATE: no slot, the exit
    expect(v.runState).toBe(VcpuRunState.EXITED);
    expect(v.phase).toBe(Phase.TRANSLATE);
    expect(word(vm, 1, VcpuWord.RUN_STATE)).toBe(VcpuRunState.EXITED);
    expect(word(vm, 1, VcpuWord.MODE)).toBe(OUTSIDE_GUEST_MODE);
    expect(word(vm, 1, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_MMIO);
    expect(word(vm, 1, VcpuWord.MMIO_GPA_LO)).toBe((far * 4096) >>> 0);
    expect(word(vm, 1, VcpuWord.MMIO_GPA_HI)).toBe(1);
    expect(word(vm, 1, VcpuWord.EXITS)).toBe(1);
    expect(word(vm, 1, VcpuWord.RING_FULL_EXITS)).toBe(0);
    expect(word(vm, 1, VcpuWord.PENDING_PAGE)).toBe(-1);
    expect(word(vm, 1, VcpuWord.PENDING_ITERATION)).toBe(3);
    expect(word(vm, 1, VcpuWord.EXIT_RUN_SEQ)).toBe(0);
    expect(word(vm, 1, VcpuWord.OPS)).toBe(1);
    expect(vmm.parkedExit(1)).toBe(KVM_EXIT_MMIO);
    expect(word(vm, 0, VcpuWord.EXITS)).toBe(0);
    for (let i = 0; i < 3; i++) {
      expect(v.step()).toBe(Step.BLOCKED);
      expect(v.runBurst(10)).toBe(Step.BLOCKED);
    }
    expect(v.wait).toEqual({
      code: WaitCode.VCPU_EXIT, arg: KVM_EXIT_MMIO, arg2: 0,
      park: { array: vm.vcpuWords, index: vm.vcpuBase(1) + VcpuRequest.RUN_SEQ, value: 0 },
    });
    expect(v.retired).toBe(1);
    vmm.reenter(1);
    expect(v.step()).toBe(Step.PROGRESS);
    expect(v.runState).toBe(VcpuRunState.RUNNING);
    expect(word(vm, 1, VcpuWord.MODE)).toBe(IN_GUEST_MODE);
    expect(v.phase).toBe(Phase.WALK); // the first step after re-entry runs the next operation
    retire(v, 1);
    expect(read(vm, B + 6)).toBe(3);
    expect(vmm.parkedExit(1)).toBe(-1);
  });

  it('a write to a read-only slot exits at the walk with its GPA; memory unchanged', () => {
    const vm = makeVm({ tracking: LEGACY, slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 16, flags: KVM_MEM_READONLY }] });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: 0x103, value: 5 }]));
    v.step();
    expect(v.phase).toBe(Phase.WALK);
    v.step();
    expect(v.runState).toBe(VcpuRunState.EXITED);
    expect(word(vm, 0, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_MMIO);
    expect(word(vm, 0, VcpuWord.MMIO_GPA_LO)).toBe(0x103 * 4096);
    expect(word(vm, 0, VcpuWord.MMIO_GPA_HI)).toBe(0);
    expect(word(vm, 0, VcpuWord.PENDING_PAGE)).toBe(-1);
    expect(vm.memory.slots[0]!.readU64(3)).toBe(0);
  });

  for (const burst of [false, true]) {
    it(`the fault that makes the ring soft-full exits with KVM_EXIT_DIRTY_RING_FULL before the write retires, and again while still full (${burst ? 'runBurst' : 'step'})`, () => {
      const vm = makeVm({ slots: [SLOTS[0]!, { ...SLOTS[1]!, pages: 128 }], tracking: RING(128) });
      for (const s of vm.memory.slots) complete(vm.enableDirtyLogging(s));
      Atomics.store(vm.global, GlobalWord.ITERATION, 9);
      const vmm = new VmmControl(vm);
      const gfns = Array.from({ length: 66 }, (_, i) => B + i);
      const v = new Vcpu(vm, 0, new Ops(gfns.map((gfn) => ({ gfn, value: gfn }))));
      for (let i = 0; i < 1000 && v.runState !== VcpuRunState.EXITED; i++) if (burst) v.runBurst(200); else v.step();
      expect(v.retired).toBe(63);
      expect(word(vm, 0, VcpuWord.OPS)).toBe(63);
      expect(word(vm, 0, VcpuWord.FAULTS)).toBe(64);
      expect(word(vm, 0, VcpuWord.EXITS)).toBe(1);
      expect(word(vm, 0, VcpuWord.RING_FULL_EXITS)).toBe(1);
      expect(word(vm, 0, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_DIRTY_RING_FULL);
      expect(word(vm, 0, VcpuWord.PENDING_PAGE)).toBe(64 + 63);
      expect(word(vm, 0, VcpuWord.PENDING_ITERATION)).toBe(9);
      expect(read(vm, B + 63)).toBe(0);
      // Re-entered with the ring still soft-full: it exits again, running nothing.
      vmm.reenter(0);
      expect(burst ? v.runBurst(200) : v.step()).toBe(Step.PROGRESS);
      expect(v.runState).toBe(VcpuRunState.EXITED);
      expect([v.retired, v.phase, word(vm, 0, VcpuWord.EXITS), word(vm, 0, VcpuWord.RING_FULL_EXITS)]).toEqual([63, Phase.TRANSLATE, 2, 2]);
      expect(word(vm, 0, VcpuWord.PENDING_PAGE)).toBe(64 + 63);
      expect(word(vm, 0, VcpuWord.FAULTS)).toBe(64);
      // Harvest and reset: re-entry runs the interrupted write (which faults again).
      new DirtyRingHarvester(1).harvest(vm.rings![0]!, 1000, () => {});
      expect(complete(vm.resetDirtyRings(), [v])).toBe(64);
      vmm.reenter(0);
      if (burst) v.runBurst(1); else retire(v, 1);
      expect(v.retired).toBe(64);
      expect(read(vm, B + 63)).toBe(B + 63);
      expect(word(vm, 0, VcpuWord.FAULTS)).toBe(65);
      expect(v.runState).toBe(VcpuRunState.RUNNING);
      expect(word(vm, 0, VcpuWord.RING_FULL_EXITS)).toBe(2);
    });
  }
});

describe('stop requests', () => {
  it('stop is taken only between operations; the vCPU parks on STOP and runs at once when released', () => {
    const vm = loggingVm(LEGACY, 2);
    const vmm = new VmmControl(vm);
    Atomics.store(vm.global, GlobalWord.ITERATION, 4);
    const v = new Vcpu(vm, 1, new Ops([{ gfn: B + 2, value: 1 }, { gfn: B + 3, value: 2 }]));
    v.step(); // TRANSLATE -> WALK: the operation is under way
    vmm.requestStop(1);
    const phases: Phase[] = [];
    for (let i = 0; i < 4; i++) {
      expect(v.step()).toBe(Step.PROGRESS);
      expect(v.runState).toBe(VcpuRunState.RUNNING);
      phases.push(v.phase);
    }
    expect(phases).toEqual([Phase.FAULT, Phase.WALK, Phase.STORE, Phase.TRANSLATE]);
    expect(v.retired).toBe(1);
    expect(v.step()).toBe(Step.PROGRESS); // the boundary stops it
    expect(v.runState).toBe(VcpuRunState.STOPPED);
    expect([v.phase, v.retired]).toEqual([Phase.TRANSLATE, 1]);
    expect(word(vm, 1, VcpuWord.RUN_STATE)).toBe(VcpuRunState.STOPPED);
    expect(word(vm, 1, VcpuWord.MODE)).toBe(OUTSIDE_GUEST_MODE);
    expect(word(vm, 1, VcpuWord.PENDING_PAGE)).toBe(-1);
    expect(word(vm, 1, VcpuWord.PENDING_ITERATION)).toBe(4);
    expect([word(vm, 1, VcpuWord.OPS), word(vm, 1, VcpuWord.FAULTS), word(vm, 1, VcpuWord.EXITS)]).toEqual([1, 1, 0]);
    expect(vmm.isQuiescent(1)).toBe(true);
    for (let i = 0; i < 3; i++) {
      expect(v.step()).toBe(Step.BLOCKED);
      expect(v.runBurst(5)).toBe(Step.BLOCKED);
    }
    expect(v.wait).toEqual({
      code: WaitCode.VCPU_RELEASE, arg: 0, arg2: 0,
      park: { array: vm.vcpuWords, index: vm.vcpuBase(1) + VcpuRequest.STOP, value: 1 },
    });
    expect(v.retired).toBe(1);
    vmm.release(1);
    expect(v.step()).toBe(Step.PROGRESS);
    expect(v.runState).toBe(VcpuRunState.RUNNING);
    expect(word(vm, 1, VcpuWord.RUN_STATE)).toBe(VcpuRunState.RUNNING);
    expect(word(vm, 1, VcpuWord.MODE)).toBe(IN_GUEST_MODE);
    expect(v.phase).toBe(Phase.WALK);
    retire(v, 1);
    expect(read(vm, B + 3)).toBe(2);
  });

  it('runBurst: a stop between bursts is taken before any operation; mid-burst operations are never left pending', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const vmm = new VmmControl(vm);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A + 1, value: 1 }]));
    fillTlb(vm, v, [A + 1]);
    expect(v.runBurst(6)).toBe(Step.PROGRESS);
    expect([v.retired, v.phase, v.opPending]).toEqual([6, Phase.TRANSLATE, false]);
    vmm.requestStop(0);
    expect(v.runBurst(6)).toBe(Step.PROGRESS);
    expect(v.runState).toBe(VcpuRunState.STOPPED);
    expect(v.retired).toBe(6);
    expect(word(vm, 0, VcpuWord.OPS)).toBe(6);
  });

  it('a stop after a retired operation publishes no pending page, though the vCPU remembers its last slot', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const vmm = new VmmControl(vm);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A + 1, value: 1 }]));
    retire(v, 1);
    vmm.requestStop(0);
    v.step();
    expect(v.runState).toBe(VcpuRunState.STOPPED);
    expect(word(vm, 0, VcpuWord.PENDING_PAGE)).toBe(-1); // a retired operation leaves nothing pending
  });
});

describe('flush acknowledgement', () => {
  it('acknowledged at the next boundary; the TLB is dropped and an access between its TLB check and its store restarts', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY, vcpus: 2 });
    const v = new Vcpu(vm, 1, new Ops([{ gfn: B + 2, value: 1 }, { gfn: B + 2, value: 2 }, { gfn: B + 2, value: 3 }]));
    retire(v, 1); // filled the TLB
    v.step();
    expect(v.phase).toBe(Phase.STORE); // TLB hit
    writeProtectPage(slotOf(vm, B), 2);
    const flush = vm.flushRemoteTlbs();
    let r = flush.next();
    while (!r.done && r.value === undefined) r = flush.next();
    expect(r.done).toBe(false);
    expect(word(vm, 1, VcpuWord.FLUSH_ACK)).toBe(0);
    v.step(); // acknowledge, restart: TRANSLATE misses the dropped TLB
    expect(word(vm, 1, VcpuWord.FLUSH_ACK)).toBe(1);
    expect(v.tlbGen).toBe(1);
    expect(v.phase).toBe(Phase.WALK);
    expect(flush.next().done).toBe(true);
    retire(v, 1);
    expect(word(vm, 1, VcpuWord.FAULTS)).toBe(1);
    expect(read(vm, B + 2)).toBe(2);
  });

  it('runBurst: after a flush the first write misses and walks again; a write-protected page faults', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const v = new Vcpu(vm, 0, new Writes([A + 1]));
    v.runBurst(3);
    expect(v.retired).toBe(3);
    writeProtectPage(slotOf(vm, A), 1);
    v.runBurst(3); // stale TLB, no flush yet: hits
    expect(word(vm, 0, VcpuWord.FAULTS)).toBe(0);
    complete(vm.flushRemoteTlbs(), [v]);
    v.runBurst(3);
    expect([v.retired, word(vm, 0, VcpuWord.FAULTS), word(vm, 0, VcpuWord.FLUSH_ACK)]).toEqual([9, 1, 1]);
  });
});

describe('pacing', () => {
  it('throttle: step() spends `throttle` percent of its steps asleep', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const vmm = new VmmControl(vm);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A, value: 1 }]));
    retire(v, 1); // TLB warm: every later operation takes two steps
    for (let i = 0; i < 40; i++) v.step();
    expect(v.retired).toBe(21);
    vmm.setThrottle(25);
    for (let i = 0; i < 40; i++) expect(v.step()).toBe(Step.PROGRESS);
    expect([v.retired, v.phase]).toEqual([21 + 15, Phase.TRANSLATE]); // 30 steps ran, 10 slept
    vmm.setThrottle(150); // capped at 99
    for (let i = 0; i < 101; i++) v.step();
    expect(v.retired).toBe(36 + 1);
  });

  it('throttle: runBurst sleeps outside guest mode after the burst', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const vmm = new VmmControl(vm);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A, value: 1 }]));
    v.runBurst(2000);
    expect(word(vm, 0, VcpuWord.PACED_US)).toBe(0);
    vmm.setThrottle(99);
    v.runBurst(2000);
    expect(v.retired).toBe(4000);
    const us = word(vm, 0, VcpuWord.PACED_US);
    expect(us).toBeGreaterThan(0);
    expect(us).toBeLessThan(1_000_000); // one sleep of at most 5 ms, however late it woke
    expect(word(vm, 0, VcpuWord.MODE)).toBe(IN_GUEST_MODE);
  });

  it('guest operation rate under a step clock: step() idles between operations until the bucket has a token', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const clock = new FakeClock();
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A, value: 1 }]), { clock, opRate: 1 });
    retire(v, 1);
    for (let i = 0; i < 20; i++) expect(v.step()).toBe(Step.PROGRESS);
    expect([v.retired, v.phase, v.opPending]).toEqual([1, Phase.TRANSLATE, false]);
    clock.t += 1000;
    expect(retire(v, 1)).toBe(2);
    for (let i = 0; i < 5; i++) v.step();
    expect(v.retired).toBe(2);
    // opRate 0 or unset: not paced.
    for (const pacing of [{ clock, opRate: 0 }, { clock }]) {
      const u = new Vcpu(vm, 0, new Ops([{ gfn: A, value: 1 }]), pacing);
      for (let i = 0; i < 30; i++) u.step();
      expect(u.retired).toBe(14);
    }
  });

  it('guest operation rate in runBurst: as many operations as the bucket holds, else a sleep outside guest mode', () => {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const clock = new FakeClock();
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A, value: 1 }]), { clock, opRate: 100 }); // 5 tokens saved up, 10 ms each
    v.runBurst(200);
    expect(v.retired).toBe(5);
    expect(word(vm, 0, VcpuWord.PACED_US)).toBe(0);
    expect(v.runBurst(200)).toBe(Step.PROGRESS);
    expect(v.retired).toBe(5);
    expect(word(vm, 0, VcpuWord.PACED_US)).toBeGreaterThanOrEqual(2500); // slept min(10 ms, 5 ms)
    expect(word(vm, 0, VcpuWord.PACED_US)).toBeLessThan(1_000_000);
    expect(word(vm, 0, VcpuWord.MODE)).toBe(IN_GUEST_MODE);
    clock.t += 10; // one token
    v.runBurst(200);
    expect(v.retired).toBe(6);
    clock.t += 30; // three tokens, two asked for
    v.runBurst(2);
    expect(v.retired).toBe(8);
    v.runBurst(200);
    expect(v.retired).toBe(9);
  });

  it('dirty limit under a step clock: the fault waits for a token; a vCPU paced at its fault stops with its write pending', () => {
    const vm = loggingVm();
    const vmm = new VmmControl(vm);
    Atomics.store(vm.global, GlobalWord.ITERATION, 6);
    const clock = new FakeClock();
    const v = new Vcpu(vm, 0, new Ops(Array.from({ length: 10 }, (_, i) => ({ gfn: B + i, value: 100 + i }))), { clock });
    vmm.setDirtyLimit(1); // one page a second, one saved up
    retire(v, 1);
    expect(word(vm, 0, VcpuWord.FAULTS)).toBe(1);
    for (let i = 0; i < 12; i++) expect(v.step()).toBe(Step.PROGRESS);
    expect([v.phase, v.retired, word(vm, 0, VcpuWord.FAULTS)]).toEqual([Phase.FAULT, 1, 1]);
    vmm.requestStop(0);
    v.step();
    expect(v.runState).toBe(VcpuRunState.STOPPED);
    expect(word(vm, 0, VcpuWord.PENDING_PAGE)).toBe(64 + 1);
    expect(word(vm, 0, VcpuWord.PENDING_ITERATION)).toBe(6);
    expect(v.step()).toBe(Step.BLOCKED);
    vmm.release(0);
    v.step();
    expect([v.phase, word(vm, 0, VcpuWord.FAULTS)]).toEqual([Phase.FAULT, 1]);
    clock.t += 1000;
    v.step();
    expect([v.phase, word(vm, 0, VcpuWord.FAULTS)]).toEqual([Phase.WALK, 2]);
    retire(v, 1);
    expect(read(vm, B + 1)).toBe(101);
    vmm.setDirtyLimit(0); // cancelled: no pacing at all
    retire(v, 3);
    expect(word(vm, 0, VcpuWord.FAULTS)).toBe(5);
  });

  it('dirty limit in runBurst: the burst ends at the paced fault and sleeps outside guest mode', () => {
    const vm = loggingVm();
    const vmm = new VmmControl(vm);
    const clock = new FakeClock(1); // 1 ms per reading
    const v = new Vcpu(vm, 0, new Ops(Array.from({ length: 10 }, (_, i) => ({ gfn: B + i, value: 100 + i }))), { clock });
    vmm.setDirtyLimit(20); // 50 ms a page, one saved up
    expect(v.runBurst(100)).toBe(Step.PROGRESS);
    expect([v.retired, v.phase, v.opPending, word(vm, 0, VcpuWord.FAULTS)]).toEqual([1, Phase.FAULT, true, 1]);
    expect(word(vm, 0, VcpuWord.PACED_US)).toBeGreaterThanOrEqual(2500); // slept min(~50 ms, 5 ms)
    expect(word(vm, 0, VcpuWord.MODE)).toBe(IN_GUEST_MODE);
  });

  it('a fault that is not paced does not make the vCPU stoppable mid-operation', () => {
    const vm = loggingVm();
    const vmm = new VmmControl(vm);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A + 1, value: 1 }, { gfn: A + 2, value: 2 }]));
    v.step(); v.step(); v.step(); // TRANSLATE, WALK, FAULT: back to WALK
    expect(v.phase).toBe(Phase.WALK);
    vmm.requestStop(0);
    v.step();
    expect([v.runState, v.phase]).toEqual([VcpuRunState.RUNNING, Phase.STORE]);
    v.step();
    expect([v.runState, v.retired]).toEqual([VcpuRunState.RUNNING, 1]);
    v.step();
    expect(v.runState).toBe(VcpuRunState.STOPPED);
  });
});

describe('runBurst does exactly what stepping does', () => {
  // First touches fault (logging is on) and fill the TLB; then hits that cross between the
  // adjacent slots both ways, values that need the high word, byte operations, reads
  // (one of a page not in the TLB), and an access outside every slot.
  const TOUCH: ScriptedOp[] = [A, A + 63, B, B + 1, A + 1, A + 2].map((gfn) => ({ gfn, value: gfn }));
  const OPS: ScriptedOp[] = [
    ...TOUCH,
    { gfn: A + 63, value: 2 ** 32 }, { gfn: B, value: -(2 ** 32) }, { gfn: B + 1, value: -(2 ** 33) },
    { gfn: A + 1, value: 2 ** 33 + 7 }, { gfn: B, kind: OpKind.READ, value: 99, offset: 5 },
    { gfn: A + 2, kind: OpKind.STORE8, offset: 20, value: 0x5a }, { gfn: A + 2, kind: OpKind.INC8, offset: 21, value: 9 },
    { gfn: A + 2, kind: OpKind.INC8, offset: 21, value: 9 }, { gfn: HOLE, value: 1 },
    { gfn: B + 10, kind: OpKind.READ, value: 77, offset: 3 }, { gfn: A + 63, value: 0x12345 }, { gfn: B + 1, value: 3 },
    { gfn: B + 2, value: 8 }, { gfn: A, value: 1 }, { gfn: B + 63, value: 5 }, { gfn: B + 62, value: 6 }, { gfn: B + 63, value: 7 },
  ];
  const WRITES = [A, A + 63, B, B + 1, A + 1, A + 63, B, B + 1, A + 1, A, HOLE, B + 1, A + 63, B + 2, B + 2, A + 63, B];

  function run(w: () => Workload, target: number, burst: number): { vm: Vm; v: Vcpu } {
    const vm = loggingVm();
    Atomics.store(vm.global, GlobalWord.ITERATION, 5);
    const v = new Vcpu(vm, 0, w());
    const vmm = new VmmControl(vm);
    for (let guard = 0; v.retired < target; guard++) {
      if (guard > 10_000) throw new Error(`stuck at ${v.retired}`);
      if (v.runState === VcpuRunState.EXITED) vmm.reenter(0);
      if (burst > 0) {
        const before = v.retired;
        const want = Math.min(burst, target - before);
        v.runBurst(want);
        expect(v.retired - before).toBeLessThanOrEqual(want);
      } else v.step();
    }
    return { vm, v };
  }
  function snapshot(r: { vm: Vm; v: Vcpu }): unknown {
    const pages: unknown[] = [];
    for (const s of r.vm.memory.slots) {
      for (let p = 0; p < s.pages; p++) pages.push([s.readU64(p), s.stampOf(p), Array.from(s.bytes(p).subarray(s.byteOffset(p) + 16, s.byteOffset(p) + 24))]);
    }
    const w = [VcpuWord.OPS, VcpuWord.FAULTS, VcpuWord.EXITS, VcpuWord.MMIO_GPA_LO].map((x) => word(r.vm, 0, x));
    return { pages, w, progress: r.v.progress, seq: r.v.seq, phase: r.v.phase, pending: r.v.opPending };
  }

  it('scripted operations of every kind (runTlbHits)', () => {
    const target = OPS.length - 1;
    const a = run(() => new Ops(OPS), target, 0);
    expect(read(a.vm, A + 63)).toBe(0x12345);
    expect(read(a.vm, B)).toBe(0xffffffff * 2 ** 32);
    expect(read(a.vm, B + 1)).toBe(3);
    expect(read(a.vm, A + 1)).toBe(2 ** 33 + 7);
    expect(read(a.vm, B + 63)).toBe(7);
    expect([byteAt(a.vm, A + 2, 20), byteAt(a.vm, A + 2, 21), byteAt(a.vm, B, 5), byteAt(a.vm, B + 10, 3)]).toEqual([0x5a, 2, 0xff, 0]); // B's high word is all ones; reads store nothing
    expect(stampOf(a.vm, A + 1)).toEqual({ writer: 1, seq: 10, iteration: 5 });
    expect([word(a.vm, 0, VcpuWord.FAULTS), word(a.vm, 0, VcpuWord.EXITS)]).toEqual([9, 1]);
    for (const burst of [1, 2, 3, 7, 50]) expect(snapshot(run(() => new Ops(OPS), target, burst)), `burst ${burst}`).toEqual(snapshot(a));
  });

  it('large values on TLB hits: the high word', () => {
    const vals = [2 ** 32, -(2 ** 32), -(2 ** 33), 2 ** 40 + 3, 4294967295, -1, 7];
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: A, value: 0 }, ...vals.map((value) => ({ gfn: A, value }))]));
    v.runBurst(1); // the miss: fills the TLB
    const s = slotOf(vm, A);
    const w = s.words(0);
    const i = s.wordIndex(0);
    for (const value of vals) {
      v.runBurst(1);
      expect([w[i], w[i + 1], w[i + 3]], `value ${value}`).toEqual([value >>> 0, value < 2 ** 32 && value > -(2 ** 32) ? 0 : (value / 2 ** 32) >>> 0, v.seq]);
    }
    expect([v.retired, v.seq]).toEqual([vals.length + 1, vals.length + 1]);
  });

  it('a Write64 workload (runWriteHits)', () => {
    const target = WRITES.length - 1;
    const a = run(() => new Writes(WRITES), target, 0);
    expect(read(a.vm, B + 2)).toBe(5);
    expect(stampOf(a.vm, B)).toEqual({ writer: 1, seq: 16, iteration: 5 });
    expect([word(a.vm, 0, VcpuWord.FAULTS), word(a.vm, 0, VcpuWord.EXITS)]).toEqual([6, 1]);
    for (const burst of [1, 2, 3, 7, 50]) expect(snapshot(run(() => new Writes(WRITES), target, burst)), `burst ${burst}`).toEqual(snapshot(a));
  });

  for (const kind of ['ops', 'writes'] as const) {
    it(`runBurst(n) retires exactly n when nothing stops it, and stops at an MMIO exit (${kind})`, () => {
      const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
      const vmm = new VmmControl(vm);
      const gfns = [A, B, A + 5, A, B, HOLE, B + 7, B, A];
      const v = new Vcpu(vm, 0, kind === 'ops' ? new Ops(gfns.map((gfn) => ({ gfn, value: 1 }))) : new Writes(gfns));
      fillTlb(vm, v, [A, B]);
      expect(v.runBurst(2)).toBe(Step.PROGRESS);
      expect([v.retired, v.phase, v.opPending, word(vm, 0, VcpuWord.OPS)]).toEqual([2, Phase.TRANSLATE, false, 2]);
      v.runBurst(2); // a miss (A + 5) in the middle
      expect([v.retired, v.phase, v.opPending]).toEqual([4, Phase.TRANSLATE, false]);
      v.runBurst(10);
      expect(v.retired).toBe(5);
      expect(v.runState).toBe(VcpuRunState.EXITED);
      expect(word(vm, 0, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_MMIO);
      expect(word(vm, 0, VcpuWord.MMIO_GPA_LO)).toBe(HOLE * 4096);
      expect(v.runBurst(10)).toBe(Step.BLOCKED);
      expect(v.retired).toBe(5);
      vmm.reenter(0);
      v.runBurst(3);
      expect([v.retired, v.runState]).toEqual([8, VcpuRunState.RUNNING]);
      expect([read(vm, B + 7), read(vm, A + 5)]).toEqual([kind === 'ops' ? 1 : 0, kind === 'ops' ? 1 : 0]);
      expect(word(vm, 0, VcpuWord.EXITS)).toBe(1);
    });
  }
});

describe('the fast paths, called directly', () => {
  function setup(w: Workload, tlb: number[]): { vm: Vm; v: Vcpu } {
    const vm = makeVm({ slots: SLOTS, tracking: LEGACY });
    const v = new Vcpu(vm, 0, w);
    fillTlb(vm, v, tlb);
    v.ctx.iteration = 4;
    return { vm, v };
  }

  it('runTlbHits: retires the hits, leaves the first miss translated, pending, in WALK', () => {
    const ops = new Ops([
      { gfn: A, value: 10 }, { gfn: A + 63, value: 11 }, { gfn: B, value: 12 }, { gfn: A + 1, value: 13 },
      { gfn: B + 10, kind: OpKind.READ, value: 14, offset: 2 }, { gfn: B + 1, kind: OpKind.STORE8, offset: 30, value: 0x42 },
      { gfn: B + 20, value: 15 }, { gfn: A, value: 16 },
    ]);
    const { vm, v } = setup(ops, [A, A + 1, A + 63, B, B + 1]);
    expect(runTlbHits(v, 100)).toBe(6);
    expect([read(vm, A), read(vm, A + 63), read(vm, B), read(vm, A + 1)]).toEqual([10, 11, 12, 13]);
    expect(byteAt(vm, B + 1, 30)).toBe(0x42);
    expect(byteAt(vm, B + 10, 2)).toBe(0);
    expect(stampOf(vm, A + 1)).toEqual({ writer: 1, seq: 4, iteration: 4 });
    expect(stampOf(vm, B + 1)).toEqual({ writer: 1, seq: 5, iteration: 4 });
    expect(stampOf(vm, B + 10)).toEqual({ writer: 0, seq: 0, iteration: 0 });
    expect(read(vm, B + 20)).toBe(0);
    expect([v.opPending, v.phase, v.slot, v.page, v.op.gfn, v.op.value]).toEqual([true, Phase.WALK, slotOf(vm, B), 20, B + 20, 15]);
    expect([v.opIteration, v.seq, v.ops, v.progress]).toEqual([4, 5, 6, 6]);
  });

  it('runTlbHits: stops at the limit with nothing pending; limit 0 fetches nothing', () => {
    const { vm, v } = setup(new Ops([{ gfn: A, value: 1 }, { gfn: B + 1, value: 2 }, { gfn: B + 9, value: 3 }]), [A, B + 1]);
    expect(runTlbHits(v, 0)).toBe(0);
    expect([v.opPending, v.phase, v.opIteration, v.ops, v.progress, v.slot]).toEqual([false, Phase.TRANSLATE, 0, 0, 0, undefined]);
    expect(runTlbHits(v, 2)).toBe(2);
    expect([v.opPending, v.phase, v.slot, v.page, v.opIteration, v.ops, v.progress]).toEqual([false, Phase.TRANSLATE, slotOf(vm, B), 1, 4, 2, 2]);
    expect(read(vm, B + 1)).toBe(2);
  });

  it('runTlbHits: an address outside every slot is left pending in TRANSLATE for the exit', () => {
    const { vm, v } = setup(new Ops([{ gfn: A, value: 1 }, { gfn: HOLE, value: 2 }]), [A]);
    expect(runTlbHits(v, 10)).toBe(1);
    expect([v.opPending, v.phase, v.op.gfn, v.slot, v.page]).toEqual([true, Phase.TRANSLATE, HOLE, slotOf(vm, A), 0]);
  });

  it('runWriteHits: retires the hits, leaves the first miss translated, pending, in WALK', () => {
    const { vm, v } = setup(new Writes([A, A + 63, B, A + 1, B + 1, B + 20, A]), [A, A + 1, A + 63, B, B + 1]);
    slotOf(vm, A).writeU64(1, 2 ** 33 + 1); // the high word must be overwritten
    expect(runWriteHits(v, 100)).toBe(5);
    expect([read(vm, A), read(vm, A + 63), read(vm, B), read(vm, A + 1), read(vm, B + 1)]).toEqual([4, 4, 4, 4, 4]);
    expect(stampOf(vm, B + 1)).toEqual({ writer: 1, seq: 5, iteration: 4 });
    expect(read(vm, B + 20)).toBe(0);
    expect([v.opPending, v.phase, v.slot, v.page]).toEqual([true, Phase.WALK, slotOf(vm, B), 20]);
    expect(v.op).toEqual({ kind: OpKind.WRITE64, gfn: B + 20, value: 4, offset: 0 });
    expect([v.opIteration, v.seq, v.ops, v.progress]).toEqual([4, 5, 5, 5]);
  });

  it('runWriteHits: stops at the limit with nothing pending; limit 0 touches nothing', () => {
    const { vm, v } = setup(new Writes([B + 1, A, B + 9]), [A, B + 1]);
    expect(runWriteHits(v, 0)).toBe(0);
    expect([v.opPending, v.phase, v.opIteration, v.ops, v.progress, v.slot]).toEqual([false, Phase.TRANSLATE, 0, 0, 0, undefined]);
    expect(v.op).toEqual({ kind: OpKind.WRITE64, gfn: 0, value: 0, offset: 0 });
    expect(runWriteHits(v, 2)).toBe(2);
    expect([v.opPending, v.phase, v.slot, v.page, v.op.gfn, v.op.value, v.opIteration]).toEqual([false, Phase.TRANSLATE, slotOf(vm, A), 0, A, 4, 4]);
  });

  it('runWriteHits: an address outside every slot is left pending in TRANSLATE for the exit', () => {
    const { vm, v } = setup(new Writes([B, HOLE]), [B]);
    expect(runWriteHits(v, 10)).toBe(1);
    expect([v.opPending, v.phase, v.op.gfn, v.slot, v.page]).toEqual([true, Phase.TRANSLATE, HOLE, undefined, 0]);
    expect(read(vm, B)).toBe(4);
  });

  it('runWriteHits writes the iteration as writeU64Stamped does, whatever its size', () => {
    const { vm, v } = setup(new Writes([A + 3]), [A + 3]);
    v.ctx.iteration = 2 ** 32 + 3;
    expect(runWriteHits(v, 1)).toBe(1);
    const s = slotOf(vm, A);
    s.writeU64Stamped(4, 2 ** 32 + 3, 1, 1, 2 ** 32 + 3);
    expect([read(vm, A + 3), stampOf(vm, A + 3)]).toEqual([read(vm, A + 4), stampOf(vm, A + 4)]);
    expect(read(vm, A + 3)).toBe(2 ** 32 + 3);
  });
});
