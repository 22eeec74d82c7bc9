import { describe, expect, it } from 'vitest';
import { KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO, PAGE_SIZE } from '../src/host/constants.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { GlobalWord, VcpuRequest, VcpuRunState, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { HOST_WRITER_BASE, type Memslot } from '../src/host/memslot.ts';
import { PageHistory, describeHistory } from '../src/host/page-history.ts';
import { PageEvent, createPageHistoryBuffer } from '../src/host/page-history-buffer.ts';
import {
  COPY_COMPLETION, HARVEST_BITMAP, HostWriteLog, NoTracepoints, type PageDirtied, ProtectBy, TracepointSet, forEachMaskPage,
} from '../src/host/tracepoints.ts';
import { Vm } from '../src/host/vm.ts';
import { dmaDirtySourcesFor } from '../src/host/vmm/dma-dirty-sources.ts';
import { ExitHandler } from '../src/host/vmm/exit-handler.ts';
import { hostWriter } from '../src/host/vmm/host-writer.ts';
import { KvmRingSource } from '../src/host/vmm/kvm-ring-source.ts';
import { dirtyLimits, vcpuCounters, vcpuRates } from '../src/host/vmm/vcpu-stats.ts';
import { Step, WaitCode } from '../src/roles/role.ts';
import { Prng } from '../src/util/prng.ts';
import { RING, VmmControl, complete, makeVm, retire, vcpuWith } from './helpers.ts';

const word = (vm: Vm, v: number, w: number): number => Atomics.load(vm.vcpuWords, vm.vcpuBase(v) + w);

/** A ring VM (128 entries: soft-full after 64 pushes) whose vCPU `full` fills its ring and exits. */
function ringFullRig(vcpus: number, full: number) {
  const vm = makeVm({ tracking: RING(128), pages: 256, vcpus });
  const slot = vm.memory.slots[0]!;
  const source = new KvmRingSource(vm);
  complete(source.start());
  const cpus = Array.from({ length: vcpus }, (_, i) => vcpuWith(vm, i,
    i === full ? Array.from({ length: 150 }, (_, p) => ({ gfn: slot.baseGfn + p, value: 9 })) : [{ gfn: slot.baseGfn + 200 + i, value: 1 }]));
  for (const [i, c] of cpus.entries()) if (i !== full) retire(c, 1);
  retire(cpus[full]!, 64); // the 64th push reaches the soft limit: exit before that store retires
  expect(cpus[full]!.runState).toBe(VcpuRunState.EXITED);
  expect(cpus[full]!.retired).toBe(63);
  return { vm, slot, source, cpus, vmm: new VmmControl(vm) };
}

describe('VmmControl: the request words and what a vCPU does with them', () => {
  it('requestStop/release write STOP of that vCPU only; the vCPU stops at a boundary and runs again', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 3 });
    const vmm = new VmmControl(vm);
    expect(vmm.vcpus).toBe(3);
    const v = vcpuWith(vm, 1, [{ gfn: 0x100, value: 1 }, { gfn: 0x101, value: 2 }]);
    expect(vmm.runState(1)).toBe(VcpuRunState.CREATED);
    expect(vmm.isQuiescent(1)).toBe(false);
    retire(v, 1);
    expect(vmm.runState(1)).toBe(VcpuRunState.RUNNING);
    expect(vmm.isQuiescent(1)).toBe(false);
    vmm.requestStop(1);
    expect([0, 1, 2].map((i) => vmm.word(i, VcpuRequest.STOP))).toEqual([0, 1, 0]);
    expect(v.step()).toBe(Step.PROGRESS);
    expect(vmm.runState(1)).toBe(VcpuRunState.STOPPED);
    expect(vmm.isQuiescent(1)).toBe(true);
    expect(vmm.parkedExit(1)).toBe(-1);
    expect(v.step()).toBe(Step.BLOCKED);
    expect(v.wait.code).toBe(WaitCode.VCPU_RELEASE);
    vmm.release(1);
    expect(vmm.word(1, VcpuRequest.STOP)).toBe(0);
    retire(v, 1);
    expect(vmm.runState(1)).toBe(VcpuRunState.RUNNING);
    expect(v.retired).toBe(2);
    expect(vmm.totalOps()).toBe(2);
    expect(vm.guestOps()).toBe(2);
  });

  it('isQuiescent: STOPPED and DONE are, RUNNING and CREATED are not; parkedExit -1 unless EXITED and unanswered', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 2 });
    const vmm = new VmmControl(vm);
    const set = (w: number, x: number): void => { Atomics.store(vm.vcpuWords, vm.vcpuBase(1) + w, x); };
    set(VcpuWord.EXIT_REASON, 17);
    for (const [s, q] of [[VcpuRunState.CREATED, false], [VcpuRunState.RUNNING, false], [VcpuRunState.STOPPED, true], [VcpuRunState.DONE, true]] as const) {
      set(VcpuWord.RUN_STATE, s);
      expect(vmm.parkedExit(1)).toBe(-1); // RUN_SEQ === EXIT_RUN_SEQ (both 0), but not EXITED
      expect(vmm.isQuiescent(1)).toBe(q);
    }
    set(VcpuWord.RUN_STATE, VcpuRunState.EXITED);
    expect(vmm.parkedExit(1)).toBe(17);
    expect(vmm.isQuiescent(1)).toBe(true);
    set(VcpuWord.EXIT_REASON, 0); // KVM_EXIT_UNKNOWN is still an exit
    expect(vmm.parkedExit(1)).toBe(0);
    expect(vmm.isQuiescent(1)).toBe(true);
    vmm.reenter(1);
    expect(vmm.word(1, VcpuRequest.RUN_SEQ)).toBe(1);
    expect(vmm.parkedExit(1)).toBe(-1);
    expect(vmm.isQuiescent(1)).toBe(false);
    expect(vmm.parkedExit(0)).toBe(-1);
    expect(vmm.runState(0)).toBe(VcpuRunState.CREATED);
  });

  it('setThrottle writes every vCPU; a 50% throttled vCPU spends every other step asleep', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 3 });
    const vmm = new VmmControl(vm);
    vmm.setThrottle(50);
    expect([0, 1, 2].map((i) => vmm.word(i, VcpuRequest.THROTTLE))).toEqual([50, 50, 50]);
    const free = makeVm({ tracking: RING(256), pages: 64, vcpus: 3 });
    const ops = Array.from({ length: 20 }, () => ({ gfn: 0x100, value: 1 }));
    const a = vcpuWith(free, 2, ops);
    const b = vcpuWith(vm, 2, ops);
    retire(a, 1); retire(b, 1); // first access: walk and fill the TLB
    const fast = retire(a, 10);
    const slow = retire(b, 10);
    expect(fast).toBe(20); // TRANSLATE then STORE per operation
    expect(slow).toBe(40);
    vmm.setThrottle(0);
    expect([0, 1, 2].map((i) => vmm.word(i, VcpuRequest.THROTTLE))).toEqual([0, 0, 0]);
  });

  it('setDirtyLimit: every vCPU by default, one vCPU (including vCPU 0) when named, rounded', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 3 });
    const vmm = new VmmControl(vm);
    vmm.setDirtyLimit(100.6);
    expect(dirtyLimits(vmm)).toEqual([101, 101, 101]);
    vmm.setDirtyLimit(5, 0);
    expect(dirtyLimits(vmm)).toEqual([5, 101, 101]);
    vmm.setDirtyLimit(7, 2);
    expect(dirtyLimits(vmm)).toEqual([5, 101, 7]);
    vmm.setDirtyLimit(0, 1);
    expect(dirtyLimits(vmm)).toEqual([5, 0, 7]);
    expect([0, 1, 2].map((i) => word(vm, i, VcpuRequest.DIRTY_LIMIT))).toEqual([5, 0, 7]);
  });

  it('pauseHost/resumeHost: hostPaused only once every registered host actor counts itself paused', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64 });
    const vmm = new VmmControl(vm);
    vmm.setIteration(4);
    expect(Atomics.load(vm.global, GlobalWord.ITERATION)).toBe(4);
    const w = hostWriter(vm, vmm, 5, new Prng(1));
    expect(w.next().value).toMatchObject({ code: WaitCode.GUEST_OPS, arg: 5, arg2: 0 });
    expect(Atomics.load(vm.global, GlobalWord.HOST_ACTORS)).toBe(1);
    expect(vmm.hostPaused()).toBe(false);
    vmm.pauseHost();
    expect(Atomics.load(vm.global, GlobalWord.HOST_PAUSE)).toBe(1);
    expect(vmm.hostPaused()).toBe(false); // the actor has not seen it yet
    expect(w.next().value).toBeUndefined(); // the gate: pauses
    expect(vmm.hostPaused()).toBe(true);
    expect(w.next().value).toMatchObject({ code: WaitCode.PAUSED });
    vmm.resumeHost();
    expect(Atomics.load(vm.global, GlobalWord.HOST_PAUSE)).toBe(0);
    expect(w.next().value).toMatchObject({ code: WaitCode.GUEST_OPS, arg: 5 });
    expect(Atomics.load(vm.global, GlobalWord.HOST_PAUSED)).toBe(0);
    expect(vmm.hostPaused()).toBe(false);
  });
});

describe('ExitHandler', () => {
  it('ring full: the VMM reaps, then the vCPU re-enters and redoes its write; nothing to do returns false', () => {
    const { vm, slot, source, cpus, vmm } = ringFullRig(3, 2);
    const exits = new ExitHandler(vmm);
    expect(vmm.parkedExit(2)).toBe(KVM_EXIT_DIRTY_RING_FULL);
    expect([0, 1].map((v) => vmm.parkedExit(v))).toEqual([-1, -1]);
    let reaps = 0;
    const reenteredDuringReap: number[] = [];
    const into = new PageBitmap(vm.memory.totalPages);
    function* reap() {
      reaps++;
      yield undefined;
      reenteredDuringReap.push(vmm.parkedExit(2));
      yield* source.sync(into, false);
    }
    const g = exits.serviceRingFull(reap);
    expect(g.next().done).toBe(false);
    expect(reaps).toBe(1);
    expect(vmm.parkedExit(2)).toBe(KVM_EXIT_DIRTY_RING_FULL); // not before the reap
    expect(complete(g, cpus)).toBe(true);
    expect(reenteredDuringReap).toEqual([KVM_EXIT_DIRTY_RING_FULL]);
    expect(into.count()).toBe(66); // 64 from vCPU 2, one each from vCPUs 0 and 1
    expect(vmm.parkedExit(2)).toBe(-1);
    expect(vmm.word(2, VcpuRequest.RUN_SEQ)).toBe(1);
    expect([0, 1].map((v) => vmm.word(v, VcpuRequest.RUN_SEQ))).toEqual([0, 0]);
    retire(cpus[2]!, 1);
    expect(cpus[2]!.runState).toBe(VcpuRunState.RUNNING);
    expect(slot.readU64(63)).toBe(9);
    expect(cpus[2]!.retired).toBe(64);
    // Nothing parked: no reap.
    expect(complete(exits.serviceRingFull(reap), cpus)).toBe(false);
    expect(reaps).toBe(1);
    exits.checkProgress();
    exits.checkProgress();
    expect([...exits.stalled]).toEqual([]);
  });

  it('every parked vCPU re-enters after one reap; an MMIO exit is not serviced there', () => {
    const vm = makeVm({ tracking: RING(128), pages: 256, vcpus: 3 });
    const slot = vm.memory.slots[0]!;
    const source = new KvmRingSource(vm);
    complete(source.start());
    const a = vcpuWith(vm, 0, Array.from({ length: 64 }, (_, p) => ({ gfn: slot.baseGfn + p, value: 1 })));
    const m = vcpuWith(vm, 1, [{ gfn: 0x100005, value: 1 }]);
    const b = vcpuWith(vm, 2, Array.from({ length: 64 }, (_, p) => ({ gfn: slot.baseGfn + 100 + p, value: 2 })));
    retire(a, 64); retire(b, 64); retire(m, 1);
    const vmm = new VmmControl(vm);
    expect([0, 1, 2].map((v) => vmm.parkedExit(v))).toEqual([KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO, KVM_EXIT_DIRTY_RING_FULL]);
    const exits = new ExitHandler(vmm);
    let reaps = 0;
    expect(complete(exits.serviceRingFull(function* () { reaps++; yield* source.sync(new PageBitmap(vm.memory.totalPages), false); }), [a, b])).toBe(true);
    expect(reaps).toBe(1);
    expect([0, 1, 2].map((v) => vmm.parkedExit(v))).toEqual([-1, KVM_EXIT_MMIO, -1]);
    expect([0, 1, 2].map((v) => vmm.word(v, VcpuRequest.RUN_SEQ))).toEqual([1, 0, 1]);
  });

  it('mmio(): the first vCPU parked in KVM_EXIT_MMIO and the full 64-bit GPA; reenter() answers it', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 3 });
    const vmm = new VmmControl(vm);
    const exits = new ExitHandler(vmm);
    expect(exits.mmio()).toBeNull();
    const v2 = vcpuWith(vm, 2, [{ gfn: 0x100005, value: 1 }, { gfn: 0x100, value: 3 }]);
    v2.step();
    expect(vmm.runState(2)).toBe(VcpuRunState.EXITED);
    expect(exits.mmio()).toEqual({ vcpu: 2, gpa: 0x100005 * PAGE_SIZE });
    expect(word(vm, 2, VcpuWord.MMIO_GPA_HI)).toBe(1);
    expect(word(vm, 2, VcpuWord.MMIO_GPA_LO)).toBe(0x5000);
    const v1 = vcpuWith(vm, 1, [{ gfn: 0x300007, value: 1 }]);
    v1.step();
    expect(exits.mmio()).toEqual({ vcpu: 1, gpa: 0x300007 * PAGE_SIZE });
    expect(exits.reenter(1)).toBe(KVM_EXIT_MMIO);
    expect(exits.reenter(0)).toBe(-1);
    expect(vmm.word(0, VcpuRequest.RUN_SEQ)).toBe(1);
    expect(exits.mmio()).toEqual({ vcpu: 2, gpa: 0x100005 * PAGE_SIZE });
    expect(exits.reenter(2)).toBe(KVM_EXIT_MMIO);
    expect(exits.mmio()).toBeNull();
    // A GPA with bit 31 of its low word set (2 GiB and up) reads back whole, not negative.
    const v0 = vcpuWith(vm, 0, [{ gfn: 0x80000, value: 1 }]);
    v0.step();
    expect(exits.mmio()).toEqual({ vcpu: 0, gpa: 0x80000 * PAGE_SIZE });
    expect(exits.reenter(0)).toBe(KVM_EXIT_MMIO);
    retire(v2, 1);
    expect(vm.memory.slots[0]!.readU64(0)).toBe(3);
    // A ring-full exit is not an MMIO exit.
    const r = ringFullRig(2, 1);
    expect(new ExitHandler(r.vmm).mmio()).toBeNull();
  });

  it('checkProgress: stalled only when found in the same ring-full exit at two checks', () => {
    const { vm, source, cpus, vmm } = ringFullRig(3, 1);
    const exits = new ExitHandler(vmm);
    exits.checkProgress(); // first sight of the exit (exit count 1): not yet
    expect([...exits.stalled]).toEqual([]);
    // Answered: the vCPU runs again and exits again (exit count 2) before the next check.
    complete(exits.serviceRingFull(function* () { yield* source.sync(new PageBitmap(vm.memory.totalPages), false); }), cpus);
    retire(cpus[1]!, 100); // returns blocked in the next exit
    expect(vmm.parkedExit(1)).toBe(KVM_EXIT_DIRTY_RING_FULL);
    expect(vmm.word(1, VcpuWord.EXITS)).toBe(2);
    exits.checkProgress();
    expect([...exits.stalled]).toEqual([]);
    exits.checkProgress();
    expect([...exits.stalled]).toEqual([1]);
  });

  it('a check while running, then an exit with count 1: not stalled at the first check that sees it', () => {
    const vm = makeVm({ tracking: RING(128), pages: 256, vcpus: 2 });
    const slot = vm.memory.slots[0]!;
    complete(new KvmRingSource(vm).start());
    const v = vcpuWith(vm, 1, Array.from({ length: 64 }, (_, p) => ({ gfn: slot.baseGfn + p, value: 1 })));
    const exits = new ExitHandler(new VmmControl(vm));
    retire(v, 10);
    exits.checkProgress();
    retire(v, 60);
    expect(v.runState).toBe(VcpuRunState.EXITED);
    exits.checkProgress();
    expect([...exits.stalled]).toEqual([]);
    exits.checkProgress();
    expect([...exits.stalled]).toEqual([1]);
  });

  it('ring-full-exit-unhandled: never reaps nor re-enters, counts each exit once, and the vCPU is reported stalled', () => {
    const { vm, cpus, vmm } = ringFullRig(3, 2);
    const exits = new ExitHandler(vmm, true);
    let reaps = 0;
    const reap = function* () { reaps++; yield undefined; };
    expect(complete(exits.serviceRingFull(reap))).toBe(false);
    expect(complete(exits.serviceRingFull(reap))).toBe(false);
    expect(reaps).toBe(0);
    expect(vm.acts.count('ring-full-exit-unhandled')).toBe(1);
    expect(vmm.parkedExit(2)).toBe(KVM_EXIT_DIRTY_RING_FULL);
    expect(vmm.word(2, VcpuRequest.RUN_SEQ)).toBe(0);
    expect(cpus[2]!.step()).toBe(Step.BLOCKED);
    expect(cpus[2]!.wait).toMatchObject({ code: WaitCode.VCPU_EXIT, arg: KVM_EXIT_DIRTY_RING_FULL });
    exits.checkProgress();
    exits.checkProgress();
    expect([...exits.stalled]).toEqual([2]);
    // Re-entered by someone else while still soft-full: a new exit, counted once more.
    vmm.reenter(2);
    cpus[2]!.step();
    expect(vmm.word(2, VcpuWord.EXITS)).toBe(2);
    complete(exits.serviceRingFull(reap));
    complete(exits.serviceRingFull(reap));
    expect(vm.acts.count('ring-full-exit-unhandled')).toBe(2);
  });

  it('ignoreRingFullExits counts only ring-full exits, of every vCPU, once per exit', () => {
    const { vm, vmm } = ringFullRig(2, 0);
    const m = vcpuWith(vm, 1, [{ gfn: 0x100005, value: 1 }]);
    m.step();
    expect(vmm.parkedExit(1)).toBe(KVM_EXIT_MMIO);
    const seen: number[] = [];
    vmm.ignoreRingFullExits(seen);
    expect(seen).toEqual([1]);
    expect(vm.acts.count('ring-full-exit-unhandled')).toBe(1);
    vmm.ignoreRingFullExits(seen);
    expect(vm.acts.count('ring-full-exit-unhandled')).toBe(1);
    const r = ringFullRig(3, 2);
    const s2: number[] = [];
    r.vmm.ignoreRingFullExits(s2);
    expect(s2[2]).toBe(1);
    expect(r.vm.acts.count('ring-full-exit-unhandled')).toBe(1);
  });
});

describe('vCPU statistics', () => {
  it('vcpuCounters reads ops, faults and paced time of each vCPU; dirtyLimits the request words', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 2 });
    const vmm = new VmmControl(vm);
    const v = vcpuWith(vm, 1, [{ gfn: 0x100, value: 1 }, { gfn: 0x100, value: 2 }, { gfn: 0x101, value: 3 }]);
    complete(new KvmRingSource(vm).start());
    retire(v, 3);
    Atomics.store(vm.vcpuWords, vm.vcpuBase(1) + VcpuWord.PACED_US, 2500);
    expect(vcpuCounters(vmm)).toEqual([{ ops: 0, dirtied: 0, pacedUs: 0 }, { ops: 3, dirtied: 2, pacedUs: 2500 }]);
    vmm.setDirtyLimit(30, 1);
    expect(dirtyLimits(vmm)).toEqual([0, 30]);
  });

  it('vcpuRates: differences per second, paced milliseconds, the limit or 0; a zero interval counts as 1 µs', () => {
    const from = [{ ops: 10, dirtied: 4, pacedUs: 1000 }, { ops: 0, dirtied: 0, pacedUs: 0 }];
    const to = [{ ops: 30, dirtied: 10, pacedUs: 3500 }, { ops: 5, dirtied: 1, pacedUs: 0 }];
    expect(vcpuRates(from, to, 500, [7])).toEqual([
      { vcpu: 0, ops: 20, dirtied: 6, opsPerSecond: 40, dirtyPagesPerSecond: 12, pacedMs: 2.5, dirtyLimit: 7 },
      { vcpu: 1, ops: 5, dirtied: 1, opsPerSecond: 10, dirtyPagesPerSecond: 2, pacedMs: 0, dirtyLimit: 0 },
    ]);
    const z = vcpuRates(from, to, 0, [0, 3]);
    expect(z[0]!.opsPerSecond).toBeCloseTo(20e6, 0);
    expect(z[1]!.dirtyLimit).toBe(3);
  });
});

describe('host writer', () => {
  it('writes the iteration into a random page every N guest operations, stamped HOST_WRITER_BASE + id', () => {
    const vm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x1000, pages: 32, flags: 0 }],
      vcpus: 2, tracking: RING(256),
    }));
    vm.populate();
    for (const s of vm.memory.slots) complete(vm.enableDirtyLogging(s));
    const vmm = new VmmControl(vm);
    const slots = vm.memory.slots;
    const predict = new Prng(42);
    const next = (): [Memslot, number] => { const s = slots[predict.below(slots.length)]!; return [s, predict.below(s.pages)]; };
    const setOps = (n: number): void => { Atomics.store(vm.vcpuWords, vm.vcpuBase(1) + VcpuWord.OPS, n); };
    const w = hostWriter(vm, vmm, 5, new Prng(42), 3);
    vmm.setIteration(7);
    expect(w.next().value).toMatchObject({ code: WaitCode.GUEST_OPS, arg: 5, arg2: 0 });
    setOps(4);
    expect(w.next().value).toMatchObject({ code: WaitCode.GUEST_OPS, arg: 5, arg2: 4 });
    setOps(5);
    expect(w.next().value).toBeUndefined(); // decides
    expect(Atomics.load(vm.global, GlobalWord.HOST_WRITES)).toBe(0);
    expect(w.next().value).toBeUndefined(); // writes
    expect(Atomics.load(vm.global, GlobalWord.HOST_WRITES)).toBe(1);
    const [s1, p1] = next();
    expect(s1.readU64(p1)).toBe(7);
    expect(s1.stampOf(p1)).toMatchObject({ writer: HOST_WRITER_BASE + 3, seq: 1, iteration: 7 });
    expect(w.next().value).toMatchObject({ code: WaitCode.GUEST_OPS, arg: 10, arg2: 5 });
    setOps(12);
    vmm.setIteration(8);
    w.next(); w.next();
    expect(Atomics.load(vm.global, GlobalWord.HOST_WRITES)).toBe(2);
    const [s2, p2] = next();
    expect(s2.stampOf(p2)).toMatchObject({ writer: HOST_WRITER_BASE + 3, seq: 2, iteration: 8 });
    expect(s2.readU64(p2)).toBe(8);
    expect(w.next().value).toMatchObject({ code: WaitCode.GUEST_OPS, arg: 17, arg2: 12 });
    // No vCPU context (kvm_write_guest from a VMM thread): nothing went into any vCPU's ring.
    expect(vm.rings!.map((r) => r.used())).toEqual([0, 0]);
    // Default id 0.
    const w0 = hostWriter(vm, vmm, 1, new Prng(5));
    const p0 = new Prng(5);
    w0.next(); w0.next();
    const s0 = slots[p0.below(2)]!;
    expect(s0.stampOf(p0.below(s0.pages))).toMatchObject({ writer: HOST_WRITER_BASE, seq: 1 });
  });
});

/** A VM with page history on, two slots (slot 2 starts at VM-wide page 64), on the step clock. */
function historyRig() {
  const vm = new Vm(createVmLayout({
    slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x1000, pages: 64, flags: 0 }],
    vcpus: 2, tracking: RING(256), pageHistory: true,
  }));
  vm.populate();
  const h = vm.history!;
  let step = 0;
  h.useStepClock(() => step);
  return { vm, h, s1: vm.memory.slots[0]!, s2: vm.memory.slots[1]!, at: (n: number) => { step = n; } };
}

describe('page history', () => {
  it('records each event of a page with its step and detail, oldest first, per slot', () => {
    const { vm, h, s1, s2, at } = historyRig();
    expect(h.unit).toBe('step');
    const t = h.tracer();
    at(3); t.copied(s2, [5, 9], 2);
    at(5); t.pageDirtied({ where: 'ring', slot: s2, page: 5, gfn: 0x1005, vcpu: 1, entry: 0, softFull: false });
    at(6); t.pageDirtied({ where: 'lost', slot: s2, page: 9, gfn: 0x1009 });
    at(7); t.harvested(s2, 5, 1, 0, 1);
    at(8); t.writeProtected(s2, 0, 1 << 5, 0, ProtectBy.RESET_DIRTY_RINGS);
    expect(h.read(64 + 5)).toEqual([
      { event: 'copied', at: 3, unit: 'step', detail: 'pass 2' },
      { event: 'logged', at: 5, unit: 'step', detail: 'vcpu1 write fault, dirty ring' },
      { event: 'harvested', at: 7, unit: 'step', detail: 'ring of vcpu1' },
      { event: 're-protected', at: 8, unit: 'step', detail: 'KVM_RESET_DIRTY_RINGS' },
    ]);
    expect(h.read(64 + 9)).toEqual([{ event: 'copied', at: 3, unit: 'step', detail: 'pass 2' }]);
    expect(h.read(5)).toEqual([]);
    expect(h.readGfn(vm.memory, 2, 0x1005)).toEqual(h.read(64 + 5));
    // Only the last event of each kind.
    at(9); t.copied(s2, [5], COPY_COMPLETION);
    expect(h.read(64 + 5).at(-1)).toEqual({ event: 'copied', at: 9, unit: 'step', detail: 'completion' });
    expect(h.read(64 + 5)).toHaveLength(4);
    at(0); t.hostWrite(s1, 2, HostWriteLog.RING);
    expect(h.read(2)).toEqual([{ event: 'host-write', at: 0, unit: 'step', detail: 'kvm_write_guest, dirty ring' }]);
  });

  it('events at the same step keep the protocol order', () => {
    const { h, s1, at } = historyRig();
    const t = h.tracer();
    at(4);
    t.writeProtected(s1, 0, 1, 0, ProtectBy.GET_DIRTY_LOG);
    t.copied(s1, [0], 1);
    t.harvested(s1, 0, 1, 0, HARVEST_BITMAP);
    t.pageDirtied({ where: 'bitmap', slot: s1, page: 0, gfn: 0x100, vcpu: 0 });
    expect(h.read(0).map((e) => e.event)).toEqual(['logged', 'harvested', 're-protected', 'copied']);
    at(2); t.copied(s1, [0], 1);
    at(1); t.harvested(s1, 0, 1, 0, HARVEST_BITMAP);
    expect(h.read(0).map((e) => `${e.event}@${e.at}`)).toEqual(['harvested@1', 'copied@2', 'logged@4', 're-protected@4']);
  });

  it('masks and ranges: exactly the pages of the mask (both halves) and of the range', () => {
    const { h, s2, at } = historyRig();
    const t = h.tracer();
    at(1);
    t.writeProtectedRange(s2, 3, 2, ProtectBy.ENABLE_LOGGING);
    const protectedPages = Array.from({ length: 64 * 2 }, (_, p) => p).filter((p) => h.read(p).some((e) => e.event === 're-protected'));
    expect(protectedPages).toEqual([64 + 3, 64 + 4]);
    expect(h.read(64 + 3)[0]!.detail).toBe('dirty logging enabled');
    at(2);
    t.harvested(s2, 0, 0b10, 0b101, HARVEST_BITMAP);
    const harvestedPages = Array.from({ length: 64 * 2 }, (_, p) => p).filter((p) => h.read(p).some((e) => e.event === 'harvested'));
    expect(harvestedPages).toEqual([64 + 1, 64 + 32, 64 + 34]);
    expect(h.read(64 + 34)).toEqual([{ event: 'harvested', at: 2, unit: 'step', detail: 'KVM_GET_DIRTY_LOG' }]);
    at(3);
    t.writeProtected(s2, 0, 0, 0x80000000, ProtectBy.CLEAR_DIRTY_LOG);
    expect(h.read(64 + 63)).toEqual([{ event: 're-protected', at: 3, unit: 'step', detail: 'KVM_CLEAR_DIRTY_LOG' }]);
  });

  it('details in KVM words, unknown codes by number', () => {
    const { h, s1, at } = historyRig();
    const t = h.tracer();
    at(1);
    const detail = (page: number): string => h.read(page)[0]!.detail;
    t.pageDirtied({ where: 'bitmap', slot: s1, page: 0, gfn: 0x100, vcpu: 0 });
    t.pageDirtied({ where: 'bitmap', slot: s1, page: 1, gfn: 0x101, vcpu: -1 });
    t.pageDirtied({ where: 'ring', slot: s1, page: 2, gfn: 0x102, vcpu: -1, entry: 0, softFull: false });
    expect([0, 1, 2].map(detail)).toEqual(['vcpu0 write fault, dirty bitmap', 'no running vCPU, dirty bitmap', 'no running vCPU, dirty ring']);
    const hw = [HostWriteLog.UNTRACKED, HostWriteLog.RING, HostWriteLog.BITMAP, HostWriteLog.DROPPED, 9 as HostWriteLog];
    hw.forEach((how, i) => t.hostWrite(s1, 10 + i, how));
    expect(hw.map((_, i) => detail(10 + i))).toEqual([
      'kvm_write_guest without mark_page_dirty_in_slot', 'kvm_write_guest, dirty ring', 'kvm_write_guest, dirty bitmap',
      'kvm_write_guest with no vCPU and no backup bitmap: not logged', 'host write 9',
    ]);
    const by = [ProtectBy.RESET_DIRTY_RINGS, ProtectBy.CLEAR_DIRTY_LOG, ProtectBy.GET_DIRTY_LOG, ProtectBy.ENABLE_LOGGING, 9 as ProtectBy];
    by.forEach((b, i) => t.writeProtected(s1, 20 + i, 1, 0, b));
    expect(by.map((_, i) => detail(20 + i))).toEqual([
      'KVM_RESET_DIRTY_RINGS', 'KVM_CLEAR_DIRTY_LOG', 'KVM_GET_DIRTY_LOG', 'dirty logging enabled', 'protect 9',
    ]);
    t.harvested(s1, 30, 1, 0, 0);
    t.copied(s1, [31], COPY_COMPLETION);
    t.copied(s1, [32], 1);
    expect([30, 31, 32].map(detail)).toEqual(['ring of vcpu0', 'completion', 'pass 1']);
  });

  it('readGfn: the page of that slot id containing the gfn, else nothing', () => {
    const { vm, h, s1, s2, at } = historyRig();
    const t = h.tracer();
    at(1); t.copied(s2, [0, 5, 63], 1);
    at(2); t.copied(s1, [5], 2);
    const m = vm.memory;
    expect(h.readGfn(m, 2, 0x1000)).toEqual([{ event: 'copied', at: 1, unit: 'step', detail: 'pass 1' }]);
    expect(h.readGfn(m, 2, 0x1005)).toEqual([{ event: 'copied', at: 1, unit: 'step', detail: 'pass 1' }]);
    expect(h.readGfn(m, 2, 0x103f)).toHaveLength(1);
    expect(h.readGfn(m, 1, 0x105)).toEqual([{ event: 'copied', at: 2, unit: 'step', detail: 'pass 2' }]);
    expect(h.readGfn(m, 1, 0x1005)).toEqual([]); // gfn of slot 2, asked for slot 1
    expect(h.readGfn(m, 2, 0x105)).toEqual([]);
    expect(h.readGfn(m, 2, 0x1040)).toEqual([]); // endGfn
    expect(h.readGfn(m, 2, 0x0fff)).toEqual([]);
    expect(h.readGfn(m, 3, 0x1005)).toEqual([]);
  });

  it('through the Vm: a host write with the ring and no vCPU is dropped; enabling logging protects the slot', () => {
    const { vm, h, s2, at } = historyRig();
    at(10);
    complete(vm.enableDirtyLogging(s2));
    at(11);
    vm.writeGuest(s2, 6, 1, { writer: HOST_WRITER_BASE, seq: 1, iteration: 1 }, -1);
    expect(h.readGfn(vm.memory, 2, 0x1006)).toEqual([
      { event: 'host-write', at: 11, unit: 'step', detail: 'kvm_write_guest with no vCPU and no backup bitmap: not logged' },
      { event: 're-protected', at: 10, unit: 'step', detail: 'dirty logging enabled' },
    ].reverse());
  });

  it('without the step clock: microseconds since the buffer was created', () => {
    const before = performance.now();
    const h = new PageHistory(createPageHistoryBuffer(4));
    expect(h.unit).toBe('us');
    const start = performance.now();
    while (performance.now() - start < 3) { /* let at least 3 ms pass */ }
    h.record(1, PageEvent.LOGGED, (1 << 16) | 3);
    const elapsedUs = (performance.now() - before) * 1000;
    const [e] = h.read(1);
    expect(e).toMatchObject({ event: 'logged', unit: 'us', detail: 'vcpu2 write fault, dirty ring' });
    expect(e!.at).toBeGreaterThanOrEqual(3000);
    expect(e!.at).toBeLessThanOrEqual(Math.ceil(elapsedUs) + 1); // since the buffer was made, not since the process started
  });

  it('recordEach and recordRange put one time on every page, and no other', () => {
    const h = new PageHistory(createPageHistoryBuffer(16));
    h.useStepClock(() => 6);
    h.recordEach(4, [0, 3], PageEvent.COPIED, 2);
    h.recordRange(10, 2, PageEvent.PROTECTED, ProtectBy.ENABLE_LOGGING);
    h.recordMask(0, 0b1001, 0, PageEvent.HARVESTED, 1);
    const pages = Array.from({ length: 16 }, (_, p) => p).filter((p) => h.read(p).length > 0);
    expect(pages).toEqual([0, 3, 4, 7, 10, 11]);
    expect(h.read(7)).toEqual([{ event: 'copied', at: 6, unit: 'step', detail: 'pass 2' }]);
    expect(h.read(3)).toEqual([{ event: 'harvested', at: 6, unit: 'step', detail: 'ring of vcpu1' }]);
  });

  it('describeHistory: one line in order, with the unit, naming the events that never happened', () => {
    expect(describeHistory([])).toBe('no dirty-tracking event recorded');
    const { h, s1, at } = historyRig();
    const t = h.tracer();
    at(3); t.pageDirtied({ where: 'ring', slot: s1, page: 4, gfn: 0x104, vcpu: 0, entry: 0, softFull: false });
    at(4); t.harvested(s1, 4, 1, 0, 0);
    expect(describeHistory(h.read(4))).toBe('logged step 3 (vcpu0 write fault, dirty ring), harvested step 4 (ring of vcpu0); never re-protected, copied');
    at(5); t.writeProtected(s1, 4, 1, 0, ProtectBy.RESET_DIRTY_RINGS);
    at(6); t.copied(s1, [4], 1);
    expect(describeHistory(h.read(4))).toBe(
      'logged step 3 (vcpu0 write fault, dirty ring), harvested step 4 (ring of vcpu0), re-protected step 5 (KVM_RESET_DIRTY_RINGS), copied step 6 (pass 1)');
    expect(describeHistory([{ event: 'host-write', at: 12, unit: 'us', detail: 'x' }]))
      .toBe('host-write µs 12 (x); never logged, harvested, re-protected, copied');
  });
});

class Recorder extends NoTracepoints {
  readonly lines: string[] = [];
  override writeFault(vcpu: number, _slot: Memslot, page: number): void { this.lines.push(`fault ${vcpu} ${page}`); }
  override pageDirtied(e: PageDirtied): void { this.lines.push(`dirty ${e.where} ${e.page}`); }
  override hostWrite(_slot: Memslot, page: number, how: HostWriteLog): void { this.lines.push(`host-write ${page} ${how}`); }
  override writeProtected(_slot: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void { this.lines.push(`protect ${page} ${lo} ${hi} ${by}`); }
  override writeProtectedRange(_slot: Memslot, page: number, count: number, by: ProtectBy): void { this.lines.push(`range ${page} ${count} ${by}`); }
  override harvested(_slot: Memslot, page: number, lo: number, hi: number, from: number): void { this.lines.push(`harvest ${page} ${lo} ${hi} ${from}`); }
  override copied(_slot: Memslot, pages: ArrayLike<number>, stage: number): void { this.lines.push(`copied ${Array.from(pages).join(',')} ${stage}`); }
}

describe('tracepoint set', () => {
  it('none attached: active is null; one: the tracer itself; two: every tracepoint reaches both in order', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64 });
    const slot = vm.memory.slots[0]!;
    const set = new TracepointSet();
    expect(set.active).toBeNull();
    const a = new Recorder();
    const b = new Recorder();
    const offA = set.attach(a);
    expect(set.active).toBe(a);
    const offB = set.attach(b);
    const t = set.active!;
    expect(t).not.toBe(a);
    const order: string[] = [];
    const c = new (class extends NoTracepoints { override copied(): void { order.push('c'); } })();
    const offC = set.attach(c);
    set.active!.copied(slot, [], 0);
    offC();
    t.writeFault(0, slot, 1);
    t.pageDirtied({ where: 'bitmap', slot, page: 2, gfn: 0x102, vcpu: 0 });
    t.hostWrite(slot, 3, HostWriteLog.BITMAP);
    t.writeProtected(slot, 0, 5, 1, ProtectBy.CLEAR_DIRTY_LOG);
    t.writeProtectedRange(slot, 4, 2, ProtectBy.ENABLE_LOGGING);
    t.harvested(slot, 0, 6, 2, 1);
    t.copied(slot, [7, 8], 1);
    const want = ['copied  0', 'fault 0 1', 'dirty bitmap 2', 'host-write 3 2', 'protect 0 5 1 2', 'range 4 2 4', 'harvest 0 6 2 1', 'copied 7,8 1'];
    expect(a.lines).toEqual(want);
    expect(b.lines).toEqual(want);
    expect(order).toEqual(['c']);
    offA();
    expect(set.active).toBe(b);
    offB();
    expect(set.active).toBeNull();
  });

  it('forEachMaskPage: bits of the low half from page, of the high half from page + 32', () => {
    const out: number[] = [];
    forEachMaskPage(100, 0x80000001, 0xc0000003, (p) => out.push(p));
    expect(out).toEqual([100, 131, 132, 133, 162, 163]);
  });
});

describe('DMA dirty sources', () => {
  const iommuVm = (backend: 'type1' | 'iommufd', tracking: ('iommu' | 'device' | 'kvm')[]): Vm => {
    const vm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: 0 }], vcpus: 1, tracking: RING(256),
      iommu: { backend, dmaEntryLimit: 65535, iovaPages: 64, devices: tracking.length, tracking },
    }));
    vm.populate();
    return vm;
  };

  it('which sources a VM reads: the IOMMU\'s when a device relies on it, each logging device\'s, then unmapped ranges', () => {
    const names = (vm: Vm): string[] => dmaDirtySourcesFor(vm.iommu!).map((s) => s.name);
    expect(names(iommuVm('type1', ['kvm', 'iommu', 'device']))).toEqual([
      'VFIO_IOMMU_DIRTY_PAGES (type1)', 'VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (device 2)', 'dirty bits of unmapped ranges',
    ]);
    expect(names(iommuVm('iommufd', ['device', 'iommu', 'device']))).toEqual([
      'IOMMU_HWPT_GET_DIRTY_BITMAP (iommufd)', 'VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (device 0)',
      'VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (device 2)', 'dirty bits of unmapped ranges',
    ]);
    expect(names(iommuVm('type1', ['kvm']))).toEqual(['dirty bits of unmapped ranges']);
  });

  it('the tally counts only the pages a source added', () => {
    const vm = iommuVm('type1', ['kvm']);
    const [unmapped] = dmaDirtySourcesFor(vm.iommu!);
    const into = new PageBitmap(vm.memory.totalPages);
    into.mark(3); into.mark(9);
    const tally: [string, number][] = [];
    expect(complete(unmapped!.sync(into, false, (s, n) => tally.push([s, n])))).toBe(0);
    expect(tally).toEqual([['dirty bits of unmapped ranges', 0]]);
  });
});
