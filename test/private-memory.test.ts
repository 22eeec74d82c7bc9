import { describe, expect, it } from 'vitest';
import {
  EINVAL, EOPNOTSUPP, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_EINVAL, KVM_ENOSYS, KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT,
  KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MEMORY_ATTRIBUTE_PRIVATE,
  KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY, PAGE_SIZE,
} from '../src/host/constants.ts';
import { OpKind } from '../src/host/guest-op.ts';
import { kvmGmemFallocate } from '../src/host/guest-memfd.ts';
import { GLOBAL_WORDS, GlobalWord, type MemslotConfig, VcpuRequest, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { invalidMemoryAttributes, slotRanges } from '../src/host/memory-attributes.ts';
import { MmuInvalidate } from '../src/host/mmu-invalidate.ts';
import { SPTE_PRIVATE, SPTE_WRITABLE } from '../src/host/spte.ts';
import { Phase, Vcpu } from '../src/host/vcpu.ts';
import { MMU_LOCK_HOLDER_KVM, Vm } from '../src/host/vm.ts';
import { KvmError } from '../src/util/errors.ts';
import { Step } from '../src/roles/role.ts';
import { MANUAL, Ops, RING, drive, runOne } from './helpers.ts';

/*
 * Private memory on the KVM side: KVM_SET_MEMORY_ATTRIBUTES, guest_memfd slots and their
 * holes, and the vCPU's private and shared accesses with KVM_EXIT_MEMORY_FAULT.
 * Slot 1 (gfns 0x100..0x1ff) has a guest_memfd; slot 2 (0x200..0x23f) has none.
 */
const G = 0x100;
const P = 0x200;
const SLOTS: MemslotConfig[] = [
  { id: 1, asId: 0, baseGfn: G, pages: 256, flags: KVM_MEM_GUEST_MEMFD },
  { id: 2, asId: 0, baseGfn: P, pages: 64, flags: 0 },
];
const PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE;

function cvm(o: { vcpus?: number; ring?: boolean; exitHypercalls?: number } = {}): Vm {
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus: o.vcpus ?? 1, tracking: o.ring ? RING(256, true) : MANUAL, privateMem: true, exitHypercalls: o.exitHypercalls ?? 0 }));
  vm.populate();
  return vm;
}

const attrs = (gfn: number, pages: number, attributes: number) => ({ address: gfn * PAGE_SIZE, size: pages * PAGE_SIZE, attributes, flags: 0 });


function memoryFault(vm: Vm, v = 0): { reason: number; flags: number; gpa: number; size: number } {
  const b = vm.vcpuBase(v);
  const w = vm.vcpuWords;
  return {
    reason: Atomics.load(w, b + VcpuWord.EXIT_REASON),
    flags: Atomics.load(w, b + VcpuWord.MEMORY_FAULT_FLAGS),
    gpa: (Atomics.load(w, b + VcpuWord.MMIO_GPA_LO) >>> 0) + (Atomics.load(w, b + VcpuWord.MMIO_GPA_HI) >>> 0) * 2 ** 32,
    size: Atomics.load(w, b + VcpuWord.MEMORY_FAULT_SIZE),
  };
}

function reenter(vm: Vm, v = 0): void {
  Atomics.add(vm.vcpuWords, vm.vcpuBase(v) + VcpuRequest.RUN_SEQ, 1);
}

function kvmErrno(f: () => unknown): number {
  try { f(); } catch (e) { if (e instanceof KvmError) return e.errno; throw e; }
  return 0;
}

describe('guest_memfd memslots', () => {
  it('KVM_MEM_GUEST_MEMFD needs a VM type with private memory and is refused with KVM_MEM_READONLY (EINVAL)', () => {
    const tracking = MANUAL;
    expect(() => createVmLayout({ slots: [SLOTS[0]!], vcpus: 1, tracking })).toThrow(
      'KVM_SET_USER_MEMORY_REGION2: EINVAL: slot 1: KVM_MEM_GUEST_MEMFD on a VM type without private memory');
    expect(() => createVmLayout({ slots: [{ ...SLOTS[0]!, flags: KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY }], vcpus: 1, tracking, privateMem: true })).toThrow(
      'KVM_SET_USER_MEMORY_REGION2: EINVAL: slot 1: KVM_MEM_GUEST_MEMFD with KVM_MEM_READONLY');
  });

  it('a guest_memfd slot has a private backing of its own, as large as the slot; other slots have none', () => {
    const vm = cvm();
    const [g, p] = vm.memory.slots;
    expect(g!.gmem).not.toBeNull();
    expect(g!.gmem!.pages).toBe(256);
    expect(g!.gmem!.u8[0]!.buffer).not.toBe(g!.u8[0]!.buffer);
    expect(p!.gmem).toBeNull();
    expect(vm.supportedMemoryAttributes).toBe(PRIVATE);
    expect(new Vm(createVmLayout({ slots: [SLOTS[1]!], vcpus: 1, tracking: MANUAL })).supportedMemoryAttributes).toBe(0);
  });
});

describe('KVM_SET_MEMORY_ATTRIBUTES', () => {
  it('refuses what kvm_vm_ioctl_set_mem_attributes refuses, with EINVAL, changing nothing', () => {
    const vm = cvm();
    const set = (a: { address: number; size: number; attributes: number; flags: number }): number => kvmErrno(() => drive(vm.setMemoryAttributes(a)));
    expect(set({ ...attrs(G, 1, PRIVATE), flags: 1 })).toBe(EINVAL);
    for (const bad of [1, 1 << 2, 1 << 4, PRIVATE | 1]) expect(set(attrs(G, 1, bad))).toBe(EINVAL);
    expect(set(attrs(G, 0, PRIVATE))).toBe(EINVAL);
    expect(set({ address: 2 ** 64 - PAGE_SIZE, size: 2 * PAGE_SIZE, attributes: PRIVATE, flags: 0 })).toBe(EINVAL);
    expect(set({ address: G * PAGE_SIZE + 1, size: PAGE_SIZE, attributes: PRIVATE, flags: 0 })).toBe(EINVAL);
    expect(set({ address: G * PAGE_SIZE, size: PAGE_SIZE + 512, attributes: PRIVATE, flags: 0 })).toBe(EINVAL);
    expect(set({ address: -PAGE_SIZE, size: PAGE_SIZE, attributes: PRIVATE, flags: 0 })).toBe(EINVAL);
    expect(vm.attributes!.privatePages()).toBe(0);
    expect(Atomics.load(vm.global, GlobalWord.MMU_INVALIDATE_SEQ)).toBe(0);
    // A VM without private memory supports no attribute: PRIVATE is EINVAL, 0 is accepted and does nothing.
    const plain = new Vm(createVmLayout({ slots: [SLOTS[1]!], vcpus: 1, tracking: MANUAL }));
    expect(kvmErrno(() => drive(plain.setMemoryAttributes(attrs(P, 1, PRIVATE))))).toBe(EINVAL);
    expect(kvmErrno(() => drive(plain.setMemoryAttributes(attrs(P, 1, 0))))).toBe(0);
  });

  it('names the field and value it refused', () => {
    expect(invalidMemoryAttributes({ address: 0, size: PAGE_SIZE, attributes: 0, flags: 2 }, PRIVATE)).toBe('flags 2 (must be 0)');
    expect(invalidMemoryAttributes({ address: 0, size: PAGE_SIZE, attributes: 0x10, flags: 0 }, PRIVATE)).toBe('attributes 0x10 (supported: 0x8)');
    expect(invalidMemoryAttributes({ address: 0, size: 0, attributes: 8, flags: 0 }, PRIVATE)).toBe('size 0');
    expect(invalidMemoryAttributes({ address: 0x1000, size: 0x800, attributes: 8, flags: 0 }, PRIVATE)).toBe('address 0x1000 or size 0x800 is not page aligned');
    expect(invalidMemoryAttributes({ address: 2 ** 64 - 4096, size: 8192, attributes: 8, flags: 0 }, PRIVATE)).toMatch(/wraps$/);
    expect(invalidMemoryAttributes({ address: 0x1000, size: 0x1000, attributes: 8, flags: 0 }, PRIVATE)).toBeNull();
    expect(invalidMemoryAttributes({ address: 0x1000, size: 0x1000, attributes: -8, flags: 0 }, PRIVATE)).toBe('attributes -8 (supported: 0x8)');
    expect(invalidMemoryAttributes({ address: 1.5, size: 0x1000, attributes: 8, flags: 0 }, PRIVATE)).toBe('address 1.5 or size 4096 is not a u64');
    expect(invalidMemoryAttributes({ address: 0x1000, size: 4096.5, attributes: 8, flags: 0 }, PRIVATE)).toBe('address 4096 or size 4096.5 is not a u64');
    expect(invalidMemoryAttributes({ address: 0x1000, size: -0x1000, attributes: 8, flags: 0 }, PRIVATE)).toBe('address 4096 or size -4096 is not a u64');
    // A range that ends exactly at 2^64 does not wrap.
    expect(invalidMemoryAttributes({ address: 2 ** 64 - 4096, size: 4096, attributes: 8, flags: 0 }, PRIVATE)).toBeNull();
  });

  it('runs in KVM\'s order, a step apart: reserve, then begin the invalidation and zap the shared SPTEs and flush, then store, then end', () => {
    const vm = cvm();
    const [g] = vm.memory.slots;
    const inv = vm.mmuInvalidate;
    const gen = vm.setMemoryAttributes(attrs(G + 4, 4, PRIVATE));
    const flushes = Atomics.load(vm.global, GlobalWord.FLUSHES);
    expect(gen.next().done).toBe(false); // xa_reserve
    expect(inv.inProgress()).toBe(0);
    expect(g!.spte[4]).toBe(SPTE_WRITABLE);
    expect(gen.next().done).toBe(false); // begin + zap under mmu_lock
    expect(inv.inProgress()).toBe(1);
    expect(inv.holder()).toBe(MMU_LOCK_HOLDER_KVM);
    expect([...g!.spte.subarray(3, 9)]).toEqual([SPTE_WRITABLE, 0, 0, 0, 0, SPTE_WRITABLE]);
    expect(vm.attributes!.isPrivate(g!, 4)).toBe(false); // not stored yet: the zap comes first
    let r = gen.next(); // the flush (no vCPU in guest mode: it completes at once)
    while (!r.done && inv.holder() !== 0) r = gen.next();
    expect(Atomics.load(vm.global, GlobalWord.FLUSH_GEN)).toBeGreaterThan(0);
    expect(inv.inProgress()).toBe(1);
    while (!r.done) r = gen.next();
    for (let p = 0; p < 10; p++) expect(vm.attributes!.isPrivate(g!, p), `page ${p}`).toBe(p >= 4 && p < 8);
    expect(inv.inProgress()).toBe(0);
    expect(inv.seq()).toBe(1);
    expect(Atomics.load(vm.global, GlobalWord.FLUSHES)).toBeGreaterThanOrEqual(flushes);
    // The same attributes again: nothing to do, no invalidation.
    drive(vm.setMemoryAttributes(attrs(G + 4, 4, PRIVATE)));
    expect(inv.seq()).toBe(1);
    // Back to shared: the private SPTEs are zapped (the shared ones stay).
    g!.spte[5] = SPTE_PRIVATE;
    drive(vm.setMemoryAttributes(attrs(G + 4, 2, 0)));
    expect([g!.spte[3], g!.spte[4], g!.spte[5], g!.spte[6]]).toEqual([SPTE_WRITABLE, 0, 0, 0]);
    expect(vm.attributes!.privatePages()).toBe(2);
    expect(inv.seq()).toBe(2);
  });

  it('covers every slot a range spans, and nothing outside the slots', () => {
    const vm = cvm();
    drive(vm.setMemoryAttributes(attrs(G + 250, 0x200 - 0x100 - 250 + 2 + 0x40, PRIVATE)));
    const [g, p] = vm.memory.slots;
    expect(vm.attributes!.isPrivate(g!, 249)).toBe(false);
    expect(vm.attributes!.isPrivate(g!, 250)).toBe(true);
    expect(vm.attributes!.isPrivate(g!, 255)).toBe(true);
    expect(vm.attributes!.isPrivate(p!, 0)).toBe(true);
    expect(vm.attributes!.isPrivate(p!, 63)).toBe(true);
    expect(vm.attributes!.privatePages()).toBe(6 + 64);
  });

  it('waits for a vCPU that holds mmu_lock, and for every vCPU in guest mode to acknowledge its flush', () => {
    const vm = cvm();
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 1, value: 5 }]));
    expect(runOne(v)).toBe('retired'); // in guest mode now, with G+1 in its TLB
    expect(vm.mmuInvalidate.tryLock(1)).toBe(true);
    const gen = vm.setMemoryAttributes(attrs(G + 1, 1, PRIVATE));
    gen.next(); // reserve
    for (let i = 0; i < 3; i++) expect(gen.next()).toEqual({ done: false, value: undefined }); // spins on mmu_lock
    expect(vm.mmuInvalidate.inProgress()).toBe(0);
    vm.mmuInvalidate.unlock();
    const { waits } = drive(gen, [v]);
    expect(waits.length).toBeGreaterThan(0); // blocked on vcpu0's flush acknowledgement
    expect(vm.attributes!.isPrivate(vm.memory.slots[0]!, 1)).toBe(true);
  });
});

describe('private and shared guest accesses', () => {
  it('a private write to a shared page exits with KVM_EXIT_MEMORY_FAULT (flags PRIVATE, gpa, size) and stays pending; after the conversion it lands in guest_memfd', () => {
    const vm = cvm();
    const [g] = vm.memory.slots;
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 3, value: 0x1234, private: true }, { gfn: G + 3, value: 0x99, private: true }]));
    expect(runOne(v)).toBe('exited');
    expect(memoryFault(vm)).toEqual({ reason: KVM_EXIT_MEMORY_FAULT, flags: KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa: (G + 3) * PAGE_SIZE, size: PAGE_SIZE });
    expect(v.opPending).toBe(true);
    expect(Atomics.load(vm.vcpuWords, VcpuWord.PENDING_PAGE)).toBe(3);
    expect(v.step()).toBe(Step.BLOCKED); // parked until the VMM re-enters
    drive(vm.setMemoryAttributes(attrs(G + 3, 1, PRIVATE)));
    reenter(vm);
    expect(runOne(v)).toBe('retired');
    expect(g!.gmem!.readU64(3)).toBe(0x1234);
    expect(g!.gmem!.stampOf(3)).toEqual({ writer: 1, seq: 1, iteration: 0 });
    expect(g!.readU64(3)).toBe(0); // the shared page never saw it
    expect(g!.isZeroPage(3)).toBe(true);
    expect(g!.spte[3]).toBe(SPTE_PRIVATE);
    const faults = Atomics.load(vm.vcpuWords, VcpuWord.FAULTS);
    expect(runOne(v)).toBe('retired'); // through the private TLB, no fault
    expect(g!.gmem!.readU64(3)).toBe(0x99);
    expect(Atomics.load(vm.vcpuWords, VcpuWord.FAULTS)).toBe(faults);
  });

  it('a shared write to a private page exits with flags 0; a private access to a slot without guest_memfd exits even when the attribute says private', () => {
    const vm = cvm();
    drive(vm.setMemoryAttributes(attrs(G + 7, 1, PRIVATE)));
    drive(vm.setMemoryAttributes(attrs(P + 2, 1, PRIVATE)));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 7, value: 1 }]));
    expect(runOne(v)).toBe('exited');
    expect(memoryFault(vm)).toEqual({ reason: KVM_EXIT_MEMORY_FAULT, flags: 0, gpa: (G + 7) * PAGE_SIZE, size: PAGE_SIZE });
    expect(vm.memory.slots[0]!.isZeroPage(7)).toBe(true);
    const w = new Vcpu(vm, 0, new Ops([{ gfn: P + 2, value: 1, private: true }]));
    expect(runOne(w)).toBe('exited');
    expect(memoryFault(vm)).toEqual({ reason: KVM_EXIT_MEMORY_FAULT, flags: KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa: (P + 2) * PAGE_SIZE, size: PAGE_SIZE });
  });

  it('reads are checked too, and read the backing their kind names', () => {
    const vm = cvm();
    const [g] = vm.memory.slots;
    drive(vm.setMemoryAttributes(attrs(G, 1, PRIVATE)));
    g!.gmem!.writeU64(0, 77);
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, kind: OpKind.READ, private: true }, { gfn: G, kind: OpKind.READ }]));
    expect(runOne(v)).toBe('retired');
    expect(runOne(v)).toBe('exited');
    expect(memoryFault(vm).flags).toBe(0);
  });

  it('converting a private page back to shared zaps its mapping and drops it from the TLB: the next private write exits', () => {
    const vm = cvm();
    const [g] = vm.memory.slots;
    drive(vm.setMemoryAttributes(attrs(G + 2, 1, PRIVATE)));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 2, value: 1, private: true }, { gfn: G + 2, value: 2, private: true }, { gfn: G + 2, value: 3 }]));
    expect(runOne(v)).toBe('retired');
    drive(vm.setMemoryAttributes(attrs(G + 2, 1, 0)), [v]);
    expect(g!.spte[2]).toBe(0);
    expect(runOne(v)).toBe('exited');
    expect(memoryFault(vm).flags).toBe(KVM_MEMORY_EXIT_FLAG_PRIVATE);
    expect(g!.gmem!.readU64(2)).toBe(1);
  });

  it('a fault inside an invalidation retries until it ends, then maps the page as the new attribute says', () => {
    const vm = cvm();
    const [g] = vm.memory.slots;
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 9, value: 4, private: true }]));
    const gen = vm.setMemoryAttributes(attrs(G + 9, 1, PRIVATE));
    let r = gen.next();
    while (vm.mmuInvalidate.inProgress() === 0) r = gen.next();
    // The attribute is stored after the zap; meanwhile the fault sees shared: a spurious memory fault exit, as in KVM.
    while (vm.mmuInvalidate.holder() !== 0) { r = gen.next(); v.step(); } // the zap and flush, then (same step) the store
    expect(vm.attributes!.isPrivate(g!, 9)).toBe(true);
    expect(vm.mmuInvalidate.inProgress()).toBe(1);
    const fresh = new Vcpu(vm, 0, new Ops([{ gfn: G + 9, value: 4, private: true }]));
    for (let i = 0; i < 21; i++) fresh.step(); // translate, then (walk, fault) ten times
    expect(fresh.retired).toBe(0);
    expect(fresh.phase).toBe(Phase.WALK); // RET_PF_RETRY: walks and faults again, never installs
    expect(g!.spte[9]).toBe(0);
    while (!r.done) r = gen.next();
    expect(vm.mmuInvalidate.inProgress()).toBe(0);
    expect(runOne(fresh)).toBe('retired');
    expect(g!.spte[9]).toBe(SPTE_PRIVATE);
  });

  it('a fault that finds mmu_lock taken re-enters the guest and faults again, and installs nothing meanwhile', () => {
    const vm = cvm();
    drive(vm.setMemoryAttributes(attrs(G + 1, 1, PRIVATE)));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 1, value: 4, private: true }]));
    expect(vm.mmuInvalidate.tryLock(99)).toBe(true);
    for (let i = 0; i < 10; i++) v.step();
    expect(v.phase).toBe(Phase.FAULT);
    expect(vm.memory.slots[0]!.spte[1]).toBe(0);
    vm.mmuInvalidate.unlock();
    expect(runOne(v)).toBe('retired');
  });

  it('a guest_memfd slot cannot log dirty pages (EINVAL); other slots of a confidential VM log shared writes as before', () => {
    for (const ring of [false, true]) {
      const vm = cvm({ ring });
      const [g, p] = vm.memory.slots;
      expect(() => drive(vm.enableDirtyLogging(g!))).toThrow('KVM_SET_USER_MEMORY_REGION2: EINVAL: slot 1: KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_GUEST_MEMFD slot');
      expect(vm.flags(g!)).toBe(KVM_MEM_GUEST_MEMFD);
      drive(vm.enableDirtyLogging(p!));
      const v = new Vcpu(vm, 0, new Ops([{ gfn: P + 2, value: 2 }, { gfn: P + 3, value: 1, private: true }]));
      expect(runOne(v)).toBe('retired');
      if (ring) expect(vm.rings![0]!.dirtyIndex).toBe(1);
      else expect([...p!.dirtyBitmap.subarray(0, 1)]).toEqual([1 << 2]);
      expect(p!.readU64(2)).toBe(2);
      expect(runOne(v)).toBe('exited'); // a private access to a slot without guest_memfd
    }
  });
});

describe('guest_memfd fallocate', () => {
  it('PUNCH_HOLE zaps the private SPTEs and flushes, then truncates: the next private access faults and reads zeros', () => {
    const vm = cvm();
    const [g] = vm.memory.slots;
    drive(vm.setMemoryAttributes(attrs(G, 8, PRIVATE)));
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 5, value: 55, private: true }, { gfn: G + 5, kind: OpKind.READ, private: true }]));
    expect(runOne(v)).toBe('retired');
    expect(g!.spte[5]).toBe(SPTE_PRIVATE);
    g!.gmem!.writeU64(6, 66);
    const gen = kvmGmemFallocate(vm, g!, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * PAGE_SIZE, 2 * PAGE_SIZE);
    let r = gen.next();
    expect(g!.spte[5]).toBe(0); // zapped first ...
    expect(g!.gmem!.readU64(5)).toBe(55); // ... truncated second
    while (!r.done) { v.step(); r = gen.next(); } // vcpu0 acknowledges the flush
    expect(g!.gmem!.isZeroPage(5)).toBe(true);
    expect(g!.gmem!.isZeroPage(6)).toBe(true);
    expect(vm.mmuInvalidate.inProgress()).toBe(0);
    expect(vm.mmuInvalidate.seq()).toBe(2);
    expect(runOne(v)).toBe('retired');
    expect(g!.spte[5]).toBe(0); // reads take no SPTE here; the page reads zeros
  });

  it('refuses what kvm_gmem_fallocate refuses', () => {
    const vm = cvm();
    const [g, p] = vm.memory.slots;
    const fa = (mode: number, offset: number, len: number, slot = g!): number => kvmErrno(() => drive(kvmGmemFallocate(vm, slot, mode, offset, len)));
    const PH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    expect(fa(FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE)).toBe(EOPNOTSUPP);
    expect(fa(PH | 0x10, 0, PAGE_SIZE)).toBe(EOPNOTSUPP);
    expect(fa(PH, 100, PAGE_SIZE)).toBe(EINVAL);
    expect(fa(PH, 0, 100)).toBe(EINVAL);
    expect(fa(PH, 0, 0)).toBe(EINVAL);
    expect(fa(PH, -PAGE_SIZE, PAGE_SIZE)).toBe(EINVAL);
    expect(fa(PH, 0, PAGE_SIZE, p!)).toBe(EINVAL);
    expect(fa(FALLOC_FL_KEEP_SIZE, 255 * PAGE_SIZE, 2 * PAGE_SIZE)).toBe(EINVAL);
    expect(fa(FALLOC_FL_KEEP_SIZE, 0, 256 * PAGE_SIZE)).toBe(0);
    expect(fa(PH, 255 * PAGE_SIZE, 8 * PAGE_SIZE)).toBe(0); // a hole past the end stops at it
    expect(fa(PH, 300 * PAGE_SIZE, PAGE_SIZE)).toBe(0);
    expect(fa(PH, 256 * PAGE_SIZE, PAGE_SIZE)).toBe(0); // at the end exactly: nothing to punch, no invalidation
    expect(vm.mmuInvalidate.seq()).toBe(1);
  });

  it('names what it refused', () => {
    const vm = cvm();
    const [g, p] = vm.memory.slots;
    const PH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    const fa = (mode: number, offset: number, len: number, slot = g!) => () => drive(kvmGmemFallocate(vm, slot, mode, offset, len));
    const call = 'fallocate(guest_memfd of slot 1)';
    expect(fa(PH, 0, PAGE_SIZE, p!)).toThrow('fallocate(guest_memfd of slot 2): EINVAL: slot 2 has no guest_memfd (KVM_MEM_GUEST_MEMFD)');
    expect(fa(FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE)).toThrow(`${call}: EOPNOTSUPP: mode 0x2 without FALLOC_FL_KEEP_SIZE`);
    expect(fa(PH | 0x10, 0, PAGE_SIZE)).toThrow(`${call}: EOPNOTSUPP: mode 0x13`);
    expect(fa(PH, 1.5, PAGE_SIZE)).toThrow(`${call}: EINVAL: offset 1.5, len 4096`);
    expect(fa(PH, 0, 4096.5)).toThrow(`${call}: EINVAL: offset 0, len 4096.5`);
    expect(fa(PH, PAGE_SIZE, 100)).toThrow(`${call}: EINVAL: offset 0x1000 or len 0x64 is not page aligned`);
    expect(fa(FALLOC_FL_KEEP_SIZE, 255 * PAGE_SIZE, 2 * PAGE_SIZE)).toThrow(`${call}: EINVAL: 0xff000+0x2000 passes the file's end (0x100000)`);
  });
});

describe('the MMU invalidation protocol', () => {
  it('a fault retries for a gfn inside a running invalidation, not outside it, and after one that ended since it read the sequence', () => {
    const inv = new MmuInvalidate(new Int32Array(GLOBAL_WORDS));
    const seq = inv.seq();
    expect(inv.retry(seq, 5)).toBe(false);
    inv.begin(10, 20);
    expect([9, 10, 19, 20].map((g) => inv.retry(seq, g))).toEqual([false, true, true, false]);
    inv.end();
    expect(inv.inProgress()).toBe(0);
    expect(inv.retry(seq, 5)).toBe(true); // the sequence moved
    expect(inv.retry(inv.seq(), 15)).toBe(false);
  });

  it('nested invalidations cover the union of their ranges until the last ends; the next one starts afresh', () => {
    const inv = new MmuInvalidate(new Int32Array(GLOBAL_WORDS));
    inv.begin(10, 20);
    inv.begin(30, 40);
    expect([15, 25, 35].map((g) => inv.retry(inv.seq(), g))).toEqual([true, true, true]);
    inv.begin(5, 12);
    const seq = inv.seq();
    expect([4, 5, 25, 39, 40].map((g) => inv.retry(seq, g))).toEqual([false, true, true, true, false]);
    inv.end();
    inv.end();
    expect(inv.inProgress()).toBe(1);
    expect(inv.retry(inv.seq(), 35)).toBe(true);
    inv.end();
    inv.begin(50, 60);
    expect([35, 55].map((g) => inv.retry(inv.seq(), g))).toEqual([false, true]);
  });

  it('slotRanges: the run of each slot a gfn range overlaps, and none for slots it misses', () => {
    const vm = cvm();
    const [g, p] = vm.memory.slots;
    expect(slotRanges(vm.memory, G + 0xfe, P + 3)).toEqual([{ slot: g, page: 0xfe, count: 2 }, { slot: p, page: 0, count: 3 }]);
    expect(slotRanges(vm.memory, G - 4, G)).toEqual([]);
    expect(slotRanges(vm.memory, P + 0x40, P + 0x80)).toEqual([]);
  });
});

describe('KVM_HC_MAP_GPA_RANGE', () => {
  const MAP = OpKind.MAP_GPA_RANGE;
  const hc = (vm: Vm) => {
    const w = vm.vcpuWords;
    return {
      nr: w[VcpuWord.HYPERCALL_NR], a0: (w[VcpuWord.HYPERCALL_ARG0_LO]! >>> 0) + (w[VcpuWord.HYPERCALL_ARG0_HI]! >>> 0) * 2 ** 32,
      a1: w[VcpuWord.HYPERCALL_ARG1], a2: w[VcpuWord.HYPERCALL_ARG2], ret: w[VcpuWord.HYPERCALL_RET],
    };
  };

  it('without KVM_CAP_EXIT_HYPERCALL the guest gets -KVM_ENOSYS and goes on, with no exit', () => {
    const vm = cvm();
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 4, kind: MAP, private: true }]));
    expect(runOne(v)).toBe('retired');
    expect(v.ctx.hypercallRet).toBe(-KVM_ENOSYS);
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXITS)).toBe(0);
  });

  it('no pages or a range that wraps gives -KVM_EINVAL without an exit', () => {
    const vm = cvm({ exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 0, kind: MAP }, { gfn: 2 ** 52 - 2, value: 4, kind: MAP }, { gfn: G, value: -1, kind: MAP }]));
    for (let i = 0; i < 3; i++) {
      expect(runOne(v)).toBe('retired');
      expect(v.ctx.hypercallRet).toBe(-KVM_EINVAL);
    }
  });

  it('exits with KVM_EXIT_HYPERCALL (nr, gpa, pages, attributes; ret preset to 0) and completes on re-entry with the ret the VMM left', () => {
    const vm = cvm({ exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE });
    const v = new Vcpu(vm, 0, new Ops([
      { gfn: G + 0x200, value: 512, kind: MAP, private: true, offset: KVM_MAP_GPA_RANGE_PAGE_SZ_2M }, { gfn: G, value: 3, kind: MAP },
    ]));
    Atomics.store(vm.vcpuWords, VcpuWord.HYPERCALL_RET, 77);
    expect(runOne(v)).toBe('exited');
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXIT_REASON)).toBe(KVM_EXIT_HYPERCALL);
    expect(hc(vm)).toEqual({ nr: KVM_HC_MAP_GPA_RANGE, a0: (G + 0x200) * PAGE_SIZE, a1: 512, a2: KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M, ret: 0 });
    expect(Atomics.load(vm.vcpuWords, VcpuWord.PENDING_PAGE)).toBe(-1); // no write was interrupted
    expect(v.step()).toBe(Step.BLOCKED);
    expect(v.retired).toBe(0);
    Atomics.store(vm.vcpuWords, VcpuWord.HYPERCALL_RET, 5);
    reenter(vm);
    expect(runOne(v)).toBe('retired');
    expect(v.ctx.hypercallRet).toBe(5);
    expect(runOne(v)).toBe('exited');
    expect(hc(vm).a2).toBe(0);
  });

  it('on a VM without private memory the fast path leaves a hypercall to the phases: no store, -KVM_ENOSYS', () => {
    const vm = new Vm(createVmLayout({ slots: [SLOTS[1]!], vcpus: 1, tracking: MANUAL }));
    vm.populate();
    const v = new Vcpu(vm, 0, new Ops([{ gfn: P, value: 9 }, { gfn: P, value: 9 }, { gfn: P + 1, value: 0x42, kind: MAP }, { gfn: P + 2, value: 3 }]));
    v.runBurst(2); // the page is in the TLB now
    v.runBurst(10);
    expect(v.retired).toBeGreaterThanOrEqual(4);
    expect(v.ctx.hypercallRet).toBe(-KVM_ENOSYS);
    expect(vm.memory.slots[0]!.isZeroPage(1)).toBe(true);
    expect(vm.memory.slots[0]!.readU64(2)).toBe(3);
  });
});
