import { describe, expect, it } from 'vitest';
import { Step, WaitCode } from '../src/roles/role.ts';
import { DEFAULT_WORKLOAD, type WorkloadName, createWorkload } from '../src/guest/workload.ts';
import { OpKind } from '../src/host/guest-op.ts';
import { KVM_EXIT_MMIO, KVM_MEM_READONLY } from '../src/host/constants.ts';
import { GlobalWord, REGION_PAGES_SHIFT, VcpuRunState, VcpuWord } from '../src/host/layout.ts';
import { Phase, Vcpu } from '../src/host/vcpu.ts';
import type { Vm } from '../src/host/vm.ts';
import { DirtyRingHarvester } from '../src/host/vmm/ring-harvester.ts';
import { LEGACY, RING, VmmControl, complete, makeVm, retire, vcpuWith } from './helpers.ts';

describe('the write path: TLB, SPTE walk, write-protect fault, store', () => {
  it('takes TRANSLATE -> WALK -> FAULT -> WALK -> STORE on a protected page, then TRANSLATE -> STORE on a TLB hit', () => {
    const vm = makeVm({ tracking: RING() });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 4, value: 9 }, { gfn: slot.baseGfn + 4, value: 10 }]);
    const phases: Phase[] = [];
    while (v.retired < 2) { v.step(); phases.push(v.phase); }
    // After each step, the phase the next step will run (TRANSLATE after a retire).
    expect(phases).toEqual([
      Phase.WALK, Phase.FAULT, Phase.WALK, Phase.STORE, Phase.TRANSLATE,
      Phase.STORE, Phase.TRANSLATE,
    ]);
    expect(vm.rings![0]!.used()).toBe(1);
    expect(slot.readU64(4)).toBe(10);
    expect(slot.stampOf(4)).toEqual({ writer: 1, seq: 2, iteration: 0 });
  });

  it('an access outside every slot exits with KVM_EXIT_MMIO and the GPA', () => {
    const vm = makeVm({ tracking: LEGACY });
    const v = vcpuWith(vm, 0, [{ gfn: 0x5000, value: 1 }]);
    v.step(); v.step();
    expect(v.runState).toBe(VcpuRunState.EXITED);
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_MMIO);
    expect(Atomics.load(vm.vcpuWords, VcpuWord.MMIO_GPA_LO)).toBe(0x5000 * 4096);
    expect(v.step()).toBe(Step.BLOCKED);
    expect(v.wait.code).toBe(WaitCode.VCPU_EXIT);
  });

  it('a write to a read-only slot exits with KVM_EXIT_MMIO and leaves memory unchanged; reads go through', () => {
    const vm = makeVm({ tracking: LEGACY, slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 16, flags: KVM_MEM_READONLY }] });
    const v = vcpuWith(vm, 0, [{ gfn: 0x101, value: 0, kind: OpKind.READ }, { gfn: 0x101, value: 5 }]);
    retire(v, 1);
    for (let i = 0; i < 4; i++) v.step();
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_MMIO);
    expect(vm.memory.slots[0]!.readU64(1)).toBe(0);
  });
});

describe('re-protection is complete only after the TLB shootdown', () => {
  function setup(bugs = {}) {
    const vm = makeVm({ tracking: RING(), bugs });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 2, value: 1 }, { gfn: slot.baseGfn + 2, value: 2 }, { gfn: slot.baseGfn + 2, value: 3 }]);
    retire(v, 1); // page 2 faulted, logged, writable, cached in the TLB
    const h = new DirtyRingHarvester(1);
    h.harvest(vm.rings![0]!, 10, () => {});
    return { vm, slot, v, h };
  }

  it('the reset waits for a vCPU in guest mode to acknowledge; the vCPU then re-faults and logs the page again', () => {
    const { vm, v, h } = setup();
    const reset = vm.resetDirtyRings();
    let r = reset.next();
    while (!r.done && r.value === undefined) r = reset.next();
    expect(r.done).toBe(false);
    expect(r.value).toMatchObject({ code: WaitCode.FLUSH_ACK, arg: 0 });
    expect(reset.next().value).toMatchObject({ code: WaitCode.FLUSH_ACK }); // still waiting: nobody stepped
    retire(v, 1); // acknowledges at its step boundary, drops its TLB, faults again
    expect(reset.next()).toEqual({ done: true, value: 1 });
    let logged = 0;
    h.harvest(vm.rings![0]!, 10, () => logged++);
    expect(logged).toBe(1);
  });

  it('a vCPU outside guest mode counts as acknowledged', () => {
    const { vm } = setup();
    Atomics.store(vm.vcpuWords, VcpuWord.MODE, 0);
    expect(complete(vm.resetDirtyRings())).toBe(1);
  });

  it('skip-tlb-shootdown: the vCPU keeps writing through its stale TLB entry and the write is never logged', () => {
    const { vm, slot, v, h } = setup({ skipTlbShootdown: true });
    expect(complete(vm.resetDirtyRings())).toBe(1);
    retire(v, 1);
    expect(slot.readU64(2)).toBe(2);
    let logged = 0;
    h.harvest(vm.rings![0]!, 10, () => logged++);
    expect(logged).toBe(0);
  });

  it('a flush that lands between the TLB check and the store restarts the access, which then faults', () => {
    const { vm, v } = setup();
    v.step(); // TRANSLATE: TLB hit, next phase STORE
    expect(v.phase).toBe(Phase.STORE);
    const reset = vm.resetDirtyRings();
    let r = reset.next();
    while (!r.done && r.value === undefined) r = reset.next();
    v.step(); // boundary: acknowledge the flush, restart the instruction
    expect(v.phase).not.toBe(Phase.STORE);
    expect(reset.next().done).toBe(true);
    retire(v, 1);
    expect(vm.rings![0]!.used()).toBe(1);
  });
});

describe('runBurst (the free-run fast paths) does what stepping one phase at a time does', () => {
  // Two ranges of one slot straddle its 2 GiB region boundary; a hole between the slots
  // makes MMIO exits. Every first write to a page faults (logging is on).
  const REGION = 1 << REGION_PAGES_SHIFT;
  const slots = [
    { id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: 0 },
    { id: 2, asId: 0, baseGfn: 0x100000, pages: REGION + 64, flags: 0 },
  ];
  const ranges = [
    { baseGfn: 0x100, pages: 64 },
    { baseGfn: 0x200, pages: 4 }, // the hole
    { baseGfn: 0x100000 + REGION - 48, pages: 96 },
  ];
  const OPS = 6000;

  function run(workload: WorkloadName, burst: boolean): { vm: Vm; vcpu: Vcpu } {
    const vm = makeVm({ slots, tracking: LEGACY });
    for (const s of vm.memory.slots) complete(vm.enableDirtyLogging(s));
    Atomics.store(vm.global, GlobalWord.ITERATION, 3);
    const vcpu = new Vcpu(vm, 0, createWorkload({ ...DEFAULT_WORKLOAD, name: workload }, ranges, 0, 1, 11));
    const vmm = new VmmControl(vm);
    for (let guard = 0; vcpu.retired < OPS; guard++) {
      if (guard > 100 * OPS) throw new Error(`stuck at ${vcpu.retired} operations`);
      if (vcpu.runState === VcpuRunState.EXITED) vmm.reenter(0);
      if (burst) vcpu.runBurst(Math.min(37, OPS - vcpu.retired)); else vcpu.step();
    }
    return { vm, vcpu };
  }

  for (const workload of ['random', 'hotset', 'sweep', 'perf'] as const) {
    it(`${workload}: the same memory, stamps, faults and exits`, () => {
      const a = run(workload, false);
      const b = run(workload, true);
      const word = (r: { vm: Vm }, w: number): number => Atomics.load(r.vm.vcpuWords, w);
      for (const w of [VcpuWord.FAULTS, VcpuWord.EXITS]) expect(word(b, w), `vCPU word ${w}`).toBe(word(a, w));
      expect(word(a, VcpuWord.EXITS), 'the hole made MMIO exits').toBeGreaterThan(0);
      for (const r of ranges) {
        for (let gfn = r.baseGfn; gfn < r.baseGfn + r.pages; gfn++) {
          const sa = a.vm.memory.findSlot(gfn);
          if (sa === undefined) continue;
          const sb = b.vm.memory.findSlot(gfn)!;
          const p = gfn - sa.baseGfn;
          expect([sb.readU64(p), sb.stampOf(p)], `gfn 0x${gfn.toString(16)}`).toEqual([sa.readU64(p), sa.stampOf(p)]);
        }
      }
    });
  }
});
