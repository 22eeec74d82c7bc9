import { describe, expect, it } from 'vitest';
import {
  EINVAL, KVM_EXIT_MEMORY_FAULT, KVM_HC_MAP_GPA_RANGE, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_GUEST_MEMFD, PAGE_SIZE,
} from '../src/host/constants.ts';
import { OpKind } from '../src/host/guest-op.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../src/host/iommu/constants.ts';
import { type MemslotConfig, VcpuRunState, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { SPTE_PRIVATE, SPTE_WRITABLE } from '../src/host/spte.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { Vm } from '../src/host/vm.ts';
import { ExitHandler } from '../src/host/vmm/exit-handler.ts';
import { GuestMemfdRam, kvmConvertMemory } from '../src/host/vmm/kvm-convert-memory.ts';
import { RDM_OK, type RamDiscardListener, type RamDiscardResult, type RamSection, wholeSection } from '../src/host/vmm/ram-block-attributes.ts';
import { vfioContainer, vfioRamDiscardRegisterListener } from '../src/host/vmm/vfio-ram-discard-listener.ts';
import type { Steps } from '../src/roles/role.ts';
import { checkPrivateMemory, describePrivateMemoryFinding } from '../src/oracles/private-memory-oracle.ts';
import { MANUAL, Ops, VmmControl, drive } from './helpers.ts';

/*
 * The VMM's side of a conversion (QEMU's kvm_convert_memory and kvm_cpu_exec's
 * KVM_EXIT_MEMORY_FAULT): slot 1 (gfns 0x200..0x2ff) has a guest_memfd, slot 2
 * (0x400..0x43f) has none; nothing at 0x800.
 */
const G = 0x200;
const N = 0x400;
const P = PAGE_SIZE;
const SLOTS: MemslotConfig[] = [
  { id: 1, asId: 0, baseGfn: G, pages: 256, flags: KVM_MEM_GUEST_MEMFD },
  { id: 2, asId: 0, baseGfn: N, pages: 64, flags: 0 },
];

function setup(o: { iommu?: boolean } = {}) {
  const iommu = o.iommu ? { backend: 'type1' as const, dmaEntryLimit: VFIO_DEFAULT_DMA_ENTRY_LIMIT, iovaPages: 0x1000, devices: 1, tracking: ['iommu' as const] } : undefined;
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: 1, tracking: MANUAL, privateMem: true, exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE, ...(iommu ? { iommu } : {}) }));
  vm.populate();
  const ram = new GuestMemfdRam(vm);
  drive(ram.setupPrivate());
  return { vm, ram, g: vm.memory.slots[0]!, rdm: ram.rdmOf(vm.memory.slots[0]!)! };
}

/** A listener that records, at each notification, what KVM and the backings say about the section's first page. */
class Witness implements RamDiscardListener {
  readonly doubleDiscardSupported = true;
  readonly seen: string[] = [];
  fail: RamDiscardResult = RDM_OK;
  constructor(private readonly vm: Vm) {}
  private state(s: RamSection): string {
    const g = this.vm.memory.slots[0]!;
    const page = s.offsetWithinRegion / P;
    return `private=${this.vm.attributes!.isPrivate(g, page)} shared=${g.readU64(page)} gmem=${g.gmem!.readU64(page)}`;
  }
  *notifyPopulate(s: RamSection): Steps<RamDiscardResult> {
    this.seen.push(`populate ${s.offsetWithinRegion / P}+${s.size / P}: ${this.state(s)}`);
    return this.fail;
  }
  *notifyDiscard(s: RamSection): Steps {
    this.seen.push(`discard ${s.offsetWithinRegion / P}+${s.size / P}: ${this.state(s)}`);
  }
}

describe('GuestMemfdRam', () => {
  it('gives every guest_memfd slot a RamBlockAttributes, all discarded, and makes its memory private in KVM at setup', () => {
    const { vm, ram, g, rdm } = setup();
    expect([...ram.blocks.keys()]).toEqual([g]);
    expect(ram.rdmOf(vm.memory.slots[1]!)).toBeUndefined();
    expect(rdm.populatedBlocks()).toBe(0);
    expect(vm.attributes!.privatePages()).toBe(256);
    expect(vm.attributes!.isPrivate(vm.memory.slots[1]!, 0)).toBe(false);
  });
});

describe('kvm_convert_memory', () => {
  it('to shared: KVM_SET_MEMORY_ATTRIBUTES, then the listeners populate, then the hole in guest_memfd', () => {
    const { vm, ram, g, rdm } = setup();
    const w = new Witness(vm);
    drive(rdm.registerListener(w, wholeSection(g)));
    g.gmem!.writeU64(4, 44);
    g.spte[4] = SPTE_PRIVATE;
    expect(drive(kvmConvertMemory(ram, (G + 4) * P, 2 * P, false)).value).toEqual({ ret: 0, error: '' });
    // The listener heard after KVM's attributes changed and before the private page was punched.
    expect(w.seen).toEqual(['populate 4+2: private=false shared=0 gmem=44']);
    expect(vm.attributes!.isPrivate(g, 4)).toBe(false);
    expect(vm.attributes!.isPrivate(g, 6)).toBe(true);
    expect(rdm.isPopulated(4 * P, 2 * P)).toBe(true);
    expect(rdm.populatedBlocks()).toBe(2);
    expect(g.gmem!.isZeroPage(4)).toBe(true);
    expect(g.spte[4]).toBe(0);
  });

  it('to private: KVM_SET_MEMORY_ATTRIBUTES, then the listeners discard, then the shared memory goes (its SPTEs zapped through the MMU notifier)', () => {
    const { vm, ram, g, rdm } = setup();
    const w = new Witness(vm);
    drive(rdm.registerListener(w, wholeSection(g)));
    drive(kvmConvertMemory(ram, (G + 8) * P, P, false));
    g.writeU64(8, 88);
    g.spte[8] = SPTE_WRITABLE;
    const seq = vm.mmuInvalidate.seq();
    expect(drive(kvmConvertMemory(ram, (G + 8) * P, P, true)).value.ret).toBe(0);
    expect(w.seen[1]).toBe('discard 8+1: private=true shared=88 gmem=0');
    expect(g.isZeroPage(8)).toBe(true);
    expect(g.spte[8]).toBe(0);
    expect(rdm.populatedBlocks()).toBe(0);
    expect(vm.mmuInvalidate.seq()).toBe(seq + 2); // the attributes' invalidation and the notifier's
    expect(vm.mmuInvalidate.inProgress()).toBe(0);
  });

  it('a range that runs past its region is clipped to it (memory_region_find)', () => {
    const { vm, ram, g, rdm } = setup();
    expect(drive(kvmConvertMemory(ram, (G + 254) * P, 4 * P, false)).value).toEqual({ ret: 0, error: '' });
    expect(rdm.isPopulated(254 * P, 2 * P)).toBe(true);
    expect(vm.attributes!.isPrivate(g, 253)).toBe(true);
  });

  it('fails as QEMU does: unaligned or empty (-EINVAL, nothing printed), outside every region (to shared ignored), memory without guest_memfd', () => {
    const { ram, vm } = setup();
    const conv = (start: number, size: number, toPrivate: boolean) => drive(kvmConvertMemory(ram, start, size, toPrivate)).value;
    expect(conv(G * P + 8, P, false)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(G * P, 100, false)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(G * P, 0, false)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(0x800 * P, P, false)).toEqual({ ret: 0, error: '' });
    expect(conv(0x800 * P, P, true)).toEqual({ ret: -EINVAL, error: '' });
    expect(conv(N * P, 2 * P, true)).toEqual({ ret: -EINVAL, error: 'Convert non guest_memfd backed memory region (0x400000 ,+ 0x2000) to private' });
    expect(vm.attributes!.isPrivate(vm.memory.slots[1]!, 0)).toBe(false);
  });

  it('a listener that refuses a populate stops the conversion before the discard: KVM says shared, guest_memfd keeps its page', () => {
    const { vm, ram, g, rdm } = setup();
    const w = new Witness(vm);
    w.fail = { ret: -28, detail: 'no space' };
    drive(rdm.registerListener(w, wholeSection(g)));
    g.gmem!.writeU64(2, 22);
    const r = drive(kvmConvertMemory(ram, (G + 2) * P, P, false)).value;
    expect(r.ret).toBe(-28);
    expect(r.error).toBe('Failed to notify the listener the state change of (0x202000 + 0x1000) to shared: no space');
    expect(vm.attributes!.isPrivate(g, 2)).toBe(false);
    expect(g.gmem!.readU64(2)).toBe(22);
  });

  it('with VFIO listening, shared memory is mapped in the IOMMU one 4 KiB page at a time and unmapped when it turns private', () => {
    const { vm, ram, g, rdm } = setup({ iommu: true });
    const container = vfioContainer(vm.iommu!);
    expect(drive(vfioRamDiscardRegisterListener(container, rdm, wholeSection(g))).value.ok).toBe(true);
    expect(vm.iommu!.table.present(G)).toBe(false);
    drive(kvmConvertMemory(ram, G * P, 3 * P, false));
    expect([0, 1, 2, 3].map((p) => vm.iommu!.table.present(G + p))).toEqual([true, true, true, false]);
    drive(kvmConvertMemory(ram, (G + 1) * P, P, true));
    expect([0, 1, 2].map((p) => vm.iommu!.table.present(G + p))).toEqual([true, false, true]);
  });
});

describe('the private memory oracle', () => {
  it('is clean after conversions in QEMU\'s order, and names each broken rule: a drifted RamDiscardManager, a mapping left behind, shared memory not discarded', () => {
    const { vm, ram, g, rdm } = setup({ iommu: true });
    const container = vfioContainer(vm.iommu!);
    drive(vfioRamDiscardRegisterListener(container, rdm, wholeSection(g)));
    drive(kvmConvertMemory(ram, G * P, 8 * P, false));
    g.writeU64(1, 11);
    drive(kvmConvertMemory(ram, (G + 1) * P, P, true));
    expect(checkPrivateMemory(vm, ram)).toEqual({ findings: [], count: 0 });
    // The RamDiscardManager told alone (as rdm-bitmap-drift would leave it): page 2 shared there, private in KVM.
    drive(kvmConvertMemory(ram, (G + 2) * P, P, true));
    drive(rdm.stateChange(2 * P, P, false));
    // A mapping left behind: page 3 private in KVM with its IOMMU mapping kept; page 5's shared memory written after the discard.
    drive(vm.setMemoryAttributes({ address: (G + 3) * P, size: P, attributes: 8, flags: 0 }));
    drive(vm.setMemoryAttributes({ address: (G + 5) * P, size: P, attributes: 8, flags: 0 }));
    drive(rdm.stateChange(5 * P, P, true));
    g.writeU64(5, 55);
    const r = checkPrivateMemory(vm, ram);
    expect(r.findings.map(describePrivateMemoryFinding)).toEqual([
      'rdm-drift: slot 1 gfn 0x202: KVM says private, the RamDiscardManager populated (shared)',
      'mapping-left: slot 1 gfn 0x202: private, still mapped in the IOMMU at IOVA 0x202000',
      'rdm-drift: slot 1 gfn 0x203: KVM says private, the RamDiscardManager populated (shared)',
      'mapping-left: slot 1 gfn 0x203: private, still mapped in the IOMMU at IOVA 0x203000',
      'shared-not-discarded: slot 1 gfn 0x205: private, its shared memory still holds data',
    ]);
    expect(r.count).toBe(5);
    expect(checkPrivateMemory(vm, ram, { max: 2 })).toMatchObject({ count: 5, findings: [{ gfn: G + 2 }, { gfn: G + 2 }] });
  });
});

describe('KVM_EXIT_MEMORY_FAULT in the VMM', () => {
  it('converts the faulting range to the access\'s kind and re-enters the vCPU, whose access then lands', () => {
    const { vm, ram, g } = setup();
    const exits = new ExitHandler(new VmmControl(vm));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 3, value: 7, private: false }, { gfn: G + 3, value: 8, private: true }]));
    for (let i = 0; i < 10 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    expect(exits.memoryFault()).toEqual({ vcpu: 0, gpa: (G + 3) * P, size: P, flags: 0 });
    expect(drive(exits.serviceMemoryFaults(ram)).value).toBeNull();
    expect(exits.memoryFault()).toBeNull();
    for (let i = 0; i < 10 && v.retired < 1; i++) v.step();
    expect(g.readU64(3)).toBe(7);
    for (let i = 0; i < 10 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    expect(exits.memoryFault()!.flags).toBe(KVM_MEMORY_EXIT_FLAG_PRIVATE);
    drive(exits.serviceMemoryFaults(ram), [v]);
    for (let i = 0; i < 10 && v.retired < 2; i++) v.step();
    expect(g.gmem!.readU64(3)).toBe(8);
    expect(g.isZeroPage(3)).toBe(true); // the shared copy was discarded when the page turned private
  });

  it('a conversion that fails, or an unknown flag, is the error that stops the VM; the vCPU stays in its exit', () => {
    const { vm, ram } = setup();
    const exits = new ExitHandler(new VmmControl(vm));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: N + 1, value: 1, private: true }]));
    for (let i = 0; i < 10 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    const r = drive(exits.serviceMemoryFaults(ram)).value;
    expect(r!.error).toBe('kvm_convert_memory(0x401000, 0x1000) failed: Convert non guest_memfd backed memory region (0x401000 ,+ 0x1000) to private');
    expect(r!.vcpu).toBe(0);
    expect(exits.memoryFault()!.vcpu).toBe(0);
    Atomics.store(vm.vcpuWords, VcpuWord.MEMORY_FAULT_FLAGS, 1);
    expect(drive(exits.serviceMemoryFaults(ram)).value!.error).toBe('KVM_EXIT_MEMORY_FAULT: Unknown flag 0x1');
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_MEMORY_FAULT);
  });
});

describe('KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE) in the VMM', () => {
  it('converts the range the guest names, then re-enters with ret 0; the guest\'s next private write needs no exit', () => {
    const { vm, ram, g, rdm } = setup();
    const exits = new ExitHandler(new VmmControl(vm));
    const v = new Vcpu(vm, 0, new Ops([
      { gfn: G + 16, value: 4, private: false, kind: OpKind.MAP_GPA_RANGE }, { gfn: G + 17, value: 1, private: false },
      { gfn: G + 16, value: 2, private: true, kind: OpKind.MAP_GPA_RANGE }, { gfn: G + 17, value: 2, private: true },
    ]));
    for (let i = 0; i < 10 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    expect(exits.hypercall()).toEqual({ vcpu: 0, nr: KVM_HC_MAP_GPA_RANGE, args: [(G + 16) * P, 4, 0] });
    expect(drive(exits.serviceHypercalls(ram)).value).toBeNull();
    expect(rdm.isPopulated(16 * P, 4 * P)).toBe(true);
    for (let i = 0; i < 20 && v.retired < 2; i++) v.step();
    expect(v.ctx.hypercallRet).toBe(0);
    expect(g.readU64(17)).toBe(1);
    for (let i = 0; i < 10 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    drive(exits.serviceHypercalls(ram), [v]);
    const exitsBefore = Atomics.load(vm.vcpuWords, VcpuWord.EXITS);
    for (let i = 0; i < 20 && v.retired < 4; i++) v.step();
    expect(v.retired).toBe(4);
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXITS)).toBe(exitsBefore);
    expect(g.gmem!.readU64(17)).toBe(2);
    expect(g.isZeroPage(17)).toBe(true);
    expect(rdm.isPopulated(16 * P, P)).toBe(false);
    expect(rdm.isPopulated(18 * P, 2 * P)).toBe(true);
  });

  it('an unknown hypercall or a failed conversion stops the VM with the reason', () => {
    const { vm, ram } = setup();
    const exits = new ExitHandler(new VmmControl(vm));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: N, value: 1, private: true, kind: OpKind.MAP_GPA_RANGE }]));
    for (let i = 0; i < 10 && v.runState !== VcpuRunState.EXITED; i++) v.step();
    expect(drive(exits.serviceHypercalls(ram)).value).toEqual({ vcpu: 0, error: 'kvm_convert_memory(0x400000, 0x1000) failed: Convert non guest_memfd backed memory region (0x400000 ,+ 0x1000) to private' });
    Atomics.store(vm.vcpuWords, VcpuWord.HYPERCALL_NR, 11);
    expect(drive(exits.serviceHypercalls(ram)).value).toEqual({ vcpu: 0, error: 'KVM_EXIT_HYPERCALL: unknown hypercall 11' });
  });
});
