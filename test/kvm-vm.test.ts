import { describe, expect, it } from 'vitest';
import {
  EINVAL, ENOENT, ENXIO, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE,
} from '../src/host/constants.ts';
import { PageBitmap, SharedDirtyBitmap } from '../src/host/dirty-bitmap.ts';
import { GuestMemory, gfnOf, gpaOf } from '../src/host/guest-memory.ts';
import { HostActor } from '../src/host/host-actor.ts';
import { INJECTABLE_BUGS, isBugName } from '../src/host/injections.ts';
import {
  GlobalWord, IN_GUEST_MODE, REGION_PAGES, VCPU_BLOCK_WORDS, VcpuWord, createVmLayout, slotLogsDirtyPages,
} from '../src/host/layout.ts';
import { DEVICE_WRITER_BASE, HOST_WRITER_BASE, describeWriter } from '../src/host/memslot.ts';
import { makeSpteWritable, spteWritable, writeProtectPage } from '../src/host/spte.ts';
import { TlbShootdown } from '../src/host/tlb-shootdown.ts';
import {
  HostWriteLog, NoTracepoints, type PageDirtied, type ProtectBy,
} from '../src/host/tracepoints.ts';
import type { Memslot } from '../src/host/memslot.ts';
import type { Vm } from '../src/host/vm.ts';
import { WaitCode } from '../src/roles/role.ts';
import { KvmError } from '../src/util/errors.ts';
import { LEGACY, MANUAL, RING, complete, makeVm } from './helpers.ts';

/** Records every tracepoint the VM fires. */
class Recorder extends NoTracepoints {
  dirtied: PageDirtied[] = [];
  hostWrites: [number, HostWriteLog][] = [];
  protected_: [number, number, number, ProtectBy][] = [];
  harvests: [number, number, number][] = [];
  override pageDirtied(e: PageDirtied): void { this.dirtied.push(e); }
  override hostWrite(_s: Memslot, page: number, how: HostWriteLog): void { this.hostWrites.push([page, how]); }
  override writeProtected(_s: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void { this.protected_.push([page, lo, hi, by]); }
  override harvested(_s: Memslot, page: number, lo: number, hi: number): void { this.harvests.push([page, lo >>> 0, hi]); }
}

function traced(vm: Vm): Recorder {
  const r = new Recorder();
  vm.tracepoints.attach(r);
  return r;
}

function kvmError(f: () => unknown): KvmError {
  try { f(); } catch (e) {
    expect(e).toBeInstanceOf(KvmError);
    return e as KvmError;
  }
  throw new Error('expected a KvmError');
}

function bits(words: ArrayLike<number>, pages: number): number[] {
  const out: number[] = [];
  for (let p = 0; p < pages; p++) if ((words[p >>> 5]! >>> 0) & (1 << (p & 31))) out.push(p);
  return out;
}

function writable(slot: Memslot): number[] {
  const out: number[] = [];
  for (let p = 0; p < slot.pages; p++) if (spteWritable(slot, p)) out.push(p);
  return out;
}

function setMode(vm: Vm, vcpu: number, mode: number): void {
  Atomics.store(vm.vcpuWords, vcpu * VCPU_BLOCK_WORDS + VcpuWord.MODE, mode);
}

const stamp = { writer: HOST_WRITER_BASE + 1, seq: 7, iteration: 3 };

describe('remote TLB flush (kvm_flush_remote_tlbs)', () => {
  it('waits only for vCPUs in guest mode, on their own ack word, until each acknowledges the generation', () => {
    const vm = makeVm({ tracking: LEGACY, vcpus: 3 });
    const sd = vm.shootdown;
    expect(sd.anyInGuestMode()).toBe(false);
    setMode(vm, 2, IN_GUEST_MODE);
    expect(sd.anyInGuestMode()).toBe(true);
    expect(sd.ackWord(2)).toEqual({ array: vm.vcpuWords, index: 2 * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK });

    const flush = vm.flushRemoteTlbs();
    expect(flush.next()).toEqual({ done: false, value: undefined }); // generation bumped
    expect(Atomics.load(vm.global, GlobalWord.FLUSH_GEN)).toBe(1);
    expect(Atomics.load(vm.global, GlobalWord.FLUSHES)).toBe(1);
    const w = flush.next();
    expect(w.done).toBe(false);
    expect(w.value).toEqual({
      code: WaitCode.FLUSH_ACK, arg: 2, arg2: 1,
      park: { array: vm.vcpuWords, index: 2 * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK, value: 0 },
    });
    // vCPU 0 acknowledging (it is outside guest mode) does not complete the flush
    Atomics.store(vm.vcpuWords, 0 * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK, 1);
    expect(flush.next().value).toMatchObject({ code: WaitCode.FLUSH_ACK, arg: 2 });
    Atomics.store(vm.vcpuWords, 2 * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK, 1);
    expect(flush.next()).toEqual({ done: true, value: undefined });
  });

  it('a vCPU in guest mode only at index 1 is found by anyInGuestMode and pendingVcpu', () => {
    const vm = makeVm({ tracking: LEGACY, vcpus: 2 });
    const sd = new TlbShootdown(vm.layout);
    setMode(vm, 1, IN_GUEST_MODE);
    expect(sd.anyInGuestMode()).toBe(true);
    const gen = sd.begin();
    expect(gen).toBe(1);
    expect(sd.pendingVcpu(gen)).toBe(1);
    Atomics.store(vm.vcpuWords, VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK, gen);
    expect(sd.pendingVcpu(gen)).toBe(-1);
    expect(sd.ackWord(1).index).toBe(VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK);
  });

  it('skip-tlb-shootdown counts as acted only when some vCPU was in guest mode', () => {
    const vm = makeVm({ tracking: LEGACY, vcpus: 2, bugs: { skipTlbShootdown: true } });
    complete(vm.flushRemoteTlbs());
    expect(vm.acts.count('skip-tlb-shootdown')).toBe(0);
    setMode(vm, 1, IN_GUEST_MODE);
    complete(vm.flushRemoteTlbs()); // returns without waiting for the ack
    expect(vm.acts.count('skip-tlb-shootdown')).toBe(1);
    expect(Atomics.load(vm.global, GlobalWord.FLUSH_GEN)).toBe(0);
  });
});

describe('enable/disable dirty logging', () => {
  it('legacy: protects the whole slot, bitmap starts empty; INITIALLY_SET without manual protect is ignored', () => {
    for (const tracking of [LEGACY, { kind: 'bitmap', manualProtect: false, initiallySet: true } as const]) {
      const vm = makeVm({ tracking, pages: 40 });
      const slot = vm.memory.slots[0]!;
      complete(vm.enableDirtyLogging(slot));
      expect(writable(slot)).toEqual([]);
      expect(bits(slot.dirtyBitmap, 40)).toEqual([]);
    }
  });

  it('manual protect + INITIALLY_SET: all-ones bitmap (no bits past the end), nothing protected, no flush', () => {
    for (const pages of [40, 64]) {
      const vm = makeVm({ tracking: { kind: 'bitmap', manualProtect: true, initiallySet: true }, pages });
      const slot = vm.memory.slots[0]!;
      complete(vm.enableDirtyLogging(slot));
      expect(bits(slot.dirtyBitmap, 64)).toEqual(Array.from({ length: pages }, (_, i) => i));
      expect(writable(slot).length).toBe(pages);
      expect(Atomics.load(vm.global, GlobalWord.FLUSHES)).toBe(0);
    }
  });

  it('SharedDirtyBitmap.setAll on a multiple of 32 pages touches no word past the end', () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    new SharedDirtyBitmap(words, 64).setAll();
    expect(Array.from(words)).toEqual([-1, -1]);
  });

  it('disable clears only the logging flag; it maps a writable slot writable again, and a read-only slot not', () => {
    const vm = makeVm({ slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: KVM_MEM_READONLY }, { id: 2, asId: 0, baseGfn: 0x200, pages: 64, flags: 0 }], tracking: LEGACY });
    vm.populate();
    const [ro, rw] = vm.memory.slots as [Memslot, Memslot];
    for (const slot of [ro, rw]) complete(vm.enableDirtyLogging(slot));
    expect(vm.flags(ro)).toBe(KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES);
    for (const slot of [ro, rw]) vm.disableDirtyLogging(slot);
    expect(vm.flags(ro)).toBe(KVM_MEM_READONLY);
    expect([spteWritable(ro, 5), spteWritable(rw, 5)]).toEqual([false, true]);
  });
});

describe('mark_page_dirty_in_slot and kvm_write_guest', () => {
  it('a slot that does not log: nothing marked, nothing traced, returns false', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 64 });
    const slot = vm.memory.slots[0]!;
    const r = traced(vm);
    expect(vm.markPageDirtyInSlot(slot, 3, 0)).toBe(false);
    vm.writeGuest(slot, 4, 99, stamp, -1);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([]);
    expect(r.dirtied).toEqual([]);
    expect(r.hostWrites).toEqual([[4, HostWriteLog.UNTRACKED]]);
    expect(slot.readU64(4)).toBe(99);
    expect(slot.stampOf(4)).toEqual(stamp);
    expect(Atomics.load(vm.global, GlobalWord.HOST_WRITES)).toBe(1);
  });

  it('bitmap tracking: the write goes to the slot bitmap (with or without a vCPU)', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 64 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const r = traced(vm);
    vm.writeGuest(slot, 5, 1, stamp, -1);
    vm.writeGuest(slot, 6, 2, stamp, 0);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([5, 6]);
    expect(r.hostWrites).toEqual([[5, HostWriteLog.BITMAP], [6, HostWriteLog.BITMAP]]);
    expect(r.dirtied).toEqual([
      { where: 'bitmap', slot, page: 5, gfn: 0x105, vcpu: -1 },
      { where: 'bitmap', slot, page: 6, gfn: 0x106, vcpu: 0 },
    ]);
  });

  it('ring: vCPU 0 context pushes to its ring; no vCPU goes to the backup bitmap', () => {
    const vm = makeVm({ tracking: RING(256, true), pages: 64 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const r = traced(vm);
    vm.writeGuest(slot, 7, 1, stamp, 0);
    expect(vm.rings![0]!.dirtyIndex).toBe(1);
    expect(vm.markPageDirtyInSlot(slot, 8, -1)).toBe(false);
    vm.writeGuest(slot, 9, 1, stamp, -1);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([8, 9]);
    expect(r.hostWrites).toEqual([[7, HostWriteLog.RING], [9, HostWriteLog.BITMAP]]);
    expect(r.dirtied[1]).toEqual({ where: 'bitmap', slot, page: 8, gfn: 0x108, vcpu: -1 });
    expect(vm.lostHostWrites()).toBe(0);
  });

  it('ring without backup bitmap: a write with no running vCPU is lost (counted), not marked', () => {
    const vm = makeVm({ tracking: RING(), pages: 64 });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    const r = traced(vm);
    expect(vm.markPageDirtyInSlot(slot, 8, -1)).toBe(false);
    vm.writeGuest(slot, 9, 1, stamp, -1);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([]);
    expect(vm.rings![0]!.dirtyIndex).toBe(0);
    expect(vm.lostHostWrites()).toBe(2);
    expect(vm.acts.count('no-backup-bitmap')).toBe(2);
    expect(r.dirtied).toEqual([
      { where: 'lost', slot, page: 8, gfn: 0x108 },
      { where: 'lost', slot, page: 9, gfn: 0x109 },
    ]);
    expect(r.hostWrites).toEqual([[9, HostWriteLog.DROPPED]]);
  });

  it('untracked-host-write acts only on a logging slot', () => {
    const vm = makeVm({
      slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 64, flags: 0 }, { id: 2, asId: 0, baseGfn: 64, pages: 64, flags: 0 }],
      tracking: LEGACY, bugs: { untrackedHostWrite: true },
    });
    const [a, b] = vm.memory.slots as [Memslot, Memslot];
    complete(vm.enableDirtyLogging(a));
    vm.writeGuest(b, 1, 1, stamp, -1);
    expect(vm.acts.count('untracked-host-write')).toBe(0);
    vm.writeGuest(a, 1, 1, stamp, -1);
    expect(vm.acts.count('untracked-host-write')).toBe(1);
    expect(bits(a.dirtyBitmap, 64)).toEqual([]);
  });
});

describe('KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG arguments and results', () => {
  function logged(tracking = MANUAL, pages = 256) {
    const vm = makeVm({ tracking, pages });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    return { vm, slot };
  }

  it('ENOENT on a slot without dirty logging', () => {
    const vm = makeVm({ tracking: LEGACY });
    const e = kvmError(() => complete(vm.getDirtyLog(vm.memory.slots[0]!)));
    expect(e.errno).toBe(ENOENT);
    expect(e.message).toBe('KVM_GET_DIRTY_LOG: ENOENT: slot 1 does not log dirty pages');
  });

  it('ENXIO with the ring and no backup bitmap; EINVAL for CLEAR without manual protect', () => {
    const ring = makeVm({ tracking: RING() });
    complete(ring.enableDirtyLogging(ring.memory.slots[0]!));
    const e = kvmError(() => complete(ring.getDirtyLog(ring.memory.slots[0]!)));
    expect(e.message).toBe('KVM_GET_DIRTY_LOG: ENXIO: the dirty ring is enabled without a backup bitmap');
    expect(e.errno).toBe(ENXIO);
    const c = kvmError(() => complete(ring.clearDirtyLog(ring.memory.slots[0]!, 0, 64, [0, 0])));
    expect(c.errno).toBe(EINVAL);
    expect(c.message).toBe('KVM_CLEAR_DIRTY_LOG: EINVAL: manual dirty log protect is not enabled');
    const { vm, slot } = logged(LEGACY);
    expect(kvmError(() => complete(vm.clearDirtyLog(slot, 0, 64, [0, 0]))).message)
      .toBe('KVM_CLEAR_DIRTY_LOG: EINVAL: manual dirty log protect is not enabled');
  });

  it('ring with backup bitmap: GET clears and re-protects like legacy GET', () => {
    const { vm, slot } = logged(RING(256, true), 64);
    makeSpteWritable(slot, 40);
    vm.markPageDirtyInSlot(slot, 40, -1);
    expect(bits(complete(vm.getDirtyLog(slot)), 64)).toEqual([40]);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([]);
    expect(spteWritable(slot, 40)).toBe(false);
  });

  it('legacy GET write-protects exactly the returned pages of the second word', () => {
    const { vm, slot } = logged(LEGACY, 64);
    const r = traced(vm);
    makeSpteWritable(slot, 8);
    makeSpteWritable(slot, 40);
    vm.markPageDirtyInSlot(slot, 40, 0);
    expect(bits(complete(vm.getDirtyLog(slot)), 64)).toEqual([40]);
    expect(writable(slot)).toEqual([8]);
    expect(r.harvests).toEqual([[32, 1 << 8, 0]]);
  });

  it('manual GET copies, and reports harvested pages at the right word', () => {
    const { vm, slot } = logged(MANUAL, 64);
    const r = traced(vm);
    vm.markPageDirtyInSlot(slot, 40, 0);
    expect(bits(complete(vm.getDirtyLog(slot)), 64)).toEqual([40]);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([40]);
    expect(r.harvests).toEqual([[32, 1 << 8, 0]]);
  });

  it.each([
    [1, 64, 'first_page 1 is not a multiple of 64'],
    [64, 32, 'num_pages 32 is not a multiple of 64 and the range does not end at the end of the slot'],
    [64, 256, 'pages 64..320 pass the end of slot 1 (256 pages)'],
    [0, -64, 'pages 0..-64 pass the end of slot 1 (256 pages)'],
  ])('CLEAR(first %d, num %d) fails with EINVAL: %s', (first, num, msg) => {
    const { vm, slot } = logged();
    const e = kvmError(() => complete(vm.clearDirtyLog(slot, first, num, new Uint32Array(8).fill(~0))));
    expect(e.errno).toBe(EINVAL);
    expect(e.message).toBe(`KVM_CLEAR_DIRTY_LOG: EINVAL: ${msg}`);
    expect(bits(slot.dirtyBitmap, 256)).toEqual([]);
  });

  it('CLEAR of zero pages is valid and clears nothing', () => {
    const { vm, slot } = logged(MANUAL, 64);
    vm.markPageDirtyInSlot(slot, 0, 0);
    expect(complete(vm.clearDirtyLog(slot, 0, 0, []))).toBe(0);
    expect(bits(slot.dirtyBitmap, 64)).toEqual([0]);
  });

  it('CLEAR of an unaligned tail clears only the requested set bits, and protects only them', () => {
    const { vm, slot } = logged({ kind: 'bitmap', manualProtect: true, initiallySet: true }, 74);
    const r = traced(vm);
    // bitmap bit 0 = page 64 only; pages 65..73 stay dirty and writable
    expect(complete(vm.clearDirtyLog(slot, 64, 10, [1, 0]))).toBe(1);
    expect(bits(slot.dirtyBitmap, 74).slice(62)).toEqual([62, 63, 65, 66, 67, 68, 69, 70, 71, 72, 73]);
    expect(spteWritable(slot, 64)).toBe(false);
    expect(spteWritable(slot, 65)).toBe(true);
    expect(r.protected_).toEqual([[64, 1, 0, 2]]);
  });

  it('CLEAR of bits that are not set: nothing cleared, nothing protected, no flush (no ack awaited)', () => {
    const { vm, slot } = logged(MANUAL, 128);
    const r = traced(vm);
    setMode(vm, 0, IN_GUEST_MODE); // a flush would block waiting for vCPU 0
    vm.markPageDirtyInSlot(slot, 70, 0);
    const flushes = Atomics.load(vm.global, GlobalWord.FLUSHES);
    expect(complete(vm.clearDirtyLog(slot, 0, 128, [~0, ~0, 1 << 5, 0]))).toBe(0);
    expect(r.protected_).toEqual([]);
    expect(Atomics.load(vm.global, GlobalWord.FLUSHES)).toBe(flushes);
    expect(bits(slot.dirtyBitmap, 128)).toEqual([70]);
  });

  it('CLEAR that clears pages waits for the acknowledgement of the vCPU in guest mode', () => {
    const { vm, slot } = logged(MANUAL, 128);
    const r = traced(vm);
    setMode(vm, 0, IN_GUEST_MODE);
    makeSpteWritable(slot, 70);
    vm.markPageDirtyInSlot(slot, 70, 0);
    const gen = Atomics.load(vm.global, GlobalWord.FLUSH_GEN) + 1;
    const g = vm.clearDirtyLog(slot, 64, 64, [1 << 6, 0]);
    expect(g.next().value).toBeUndefined();
    expect(g.next().value).toBeUndefined();
    expect(g.next().value).toMatchObject({ code: WaitCode.FLUSH_ACK, arg: 0, arg2: gen });
    expect(g.next().value).toMatchObject({ code: WaitCode.FLUSH_ACK, arg: 0, arg2: gen });
    Atomics.store(vm.vcpuWords, VcpuWord.FLUSH_ACK, gen);
    expect(g.next()).toEqual({ done: true, value: 1 });
    expect(spteWritable(slot, 70)).toBe(false);
    expect(r.protected_).toEqual([[64, 1 << 6, 0, 2]]);
  });

  it('clear-without-protect counts the cleared pages and leaves them writable', () => {
    const vm = makeVm({ tracking: MANUAL, pages: 64, bugs: { clearWithoutProtect: true } });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    for (const p of [1, 2, 3]) { makeSpteWritable(slot, p); vm.markPageDirtyInSlot(slot, p, 0); }
    expect(complete(vm.clearDirtyLog(slot, 0, 64, [0b1110, 0]))).toBe(3);
    expect(vm.acts.count('clear-without-protect')).toBe(3);
    expect(writable(slot)).toEqual([1, 2, 3]);
  });
});

describe('KVM_RESET_DIRTY_RINGS and kvm_reset_dirty_gfn', () => {
  it('EINVAL when the ring is not enabled', () => {
    const vm = makeVm({ tracking: LEGACY });
    const e = kvmError(() => complete(vm.resetDirtyRings()));
    expect(e.errno).toBe(EINVAL);
    expect(e.message).toBe('KVM_RESET_DIRTY_RINGS: EINVAL: the dirty ring is not enabled');
  });

  function ringVm(pages: number) {
    const vm = makeVm({ tracking: RING(), pages });
    const slot = vm.memory.slots[0]!;
    complete(vm.enableDirtyLogging(slot));
    return { vm, slot, allWritable: () => { for (let p = 0; p < pages; p++) makeSpteWritable(slot, p); } };
  }

  it('protects the pages of lo and hi when the highest page is inside the slot', () => {
    const { vm, slot, allWritable } = ringVm(64);
    allWritable();
    vm.resetDirtyGfn(slot.slotField, 40, 1, 0); // fls 0: page 40
    expect(spteWritable(slot, 40)).toBe(false);
    allWritable();
    vm.resetDirtyGfn(slot.slotField, 0, 0, 1); // fls 32: page 32
    expect(writable(slot).length).toBe(63);
    expect(spteWritable(slot, 32)).toBe(false);
    allWritable();
    vm.resetDirtyGfn(slot.slotField, 0, 1 << 3, 1 << 4); // pages 3 and 36
    expect(writable(slot).filter((p) => !spteWritable(slot, p))).toEqual([]);
    expect(spteWritable(slot, 3)).toBe(false);
    expect(spteWritable(slot, 36)).toBe(false);
    expect(writable(slot).length).toBe(62);
  });

  it('skips silently a mask whose highest page is past the slot end, and entries of a missing slot', () => {
    const { vm, slot, allWritable } = ringVm(48);
    allWritable();
    vm.resetDirtyGfn(slot.slotField, 0, 1, 1 << 20); // page 52 >= 48: whole entry skipped
    vm.resetDirtyGfn(slot.slotField, 47, 2, 0); // page 48 == pages
    vm.resetDirtyGfn(slot.slotField, 48, 1, 0);
    vm.resetDirtyGfn(slot.slotField + 1, 0, 1, 0);
    expect(writable(slot).length).toBe(48);
  });

  it('skips a slot that no longer logs dirty pages', () => {
    const { vm, slot } = ringVm(64);
    vm.disableDirtyLogging(slot);
    vm.resetDirtyGfn(slot.slotField, 0, 1, 0);
    expect(spteWritable(slot, 0)).toBe(true);
  });
});

describe('guest memory lookups', () => {
  it('gfnOf / gpaOf', () => {
    expect(gfnOf(0x1234567)).toBe(0x1234);
    expect(gpaOf(0x1234)).toBe(0x1234000);
  });

  it('findSlot answers the right slot after the cache holds another one; gaps and empty VMs give undefined', () => {
    const layout = createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 16, flags: 0 }, { id: 2, asId: 0, baseGfn: 32, pages: 16, flags: 0 }],
      vcpus: 1, tracking: LEGACY,
    });
    const mem = new GuestMemory(layout);
    expect(mem.findSlot(3)?.id).toBe(1);
    expect(mem.findSlot(32)?.id).toBe(2);
    expect(mem.findSlot(0)?.id).toBe(1);
    expect(mem.findSlot(16)).toBeUndefined();
    expect(mem.findSlot(48)).toBeUndefined();
    expect(mem.slotByField(2)?.id).toBe(2);
    expect(mem.slotByField(1)?.id).toBe(1);
    expect(mem.slotByField(3)).toBeUndefined();
    const empty = new GuestMemory(createVmLayout({ slots: [], vcpus: 1, tracking: LEGACY }));
    expect(empty.findSlot(5)).toBeUndefined();
  });
});

describe('memslot accessors', () => {
  function slotOf(pages: number): Memslot {
    return makeVm({ tracking: LEGACY, pages }).memory.slots[0]!;
  }

  it('writeU64Stamped stores the high word exactly at and around 2^32 and -2^32', () => {
    const slot = slotOf(4);
    const w = slot.words(0);
    const cases: [number, number, number][] = [
      [4294967296, 0, 1], [4294967296 + 5, 5, 1], [4294967295, 0xffffffff, 0],
      [-4294967296, 0, 0xffffffff], [-1, 0xffffffff, 0], [5, 5, 0],
    ];
    for (const [value, lo, hi] of cases) {
      slot.writeU64Stamped(1, value, 2, 9, 4);
      expect([w[1024]!, w[1025]!]).toEqual([lo, hi]);
    }
    expect(slot.stampOf(1)).toEqual({ writer: 2, seq: 9, iteration: 4 });
  });

  it('isZeroPage: a page differing only in its last byte, or in its first word, is not zero; neighbours do not matter', () => {
    const slot = slotOf(4);
    expect(slot.isZeroPage(1)).toBe(true);
    slot.bytes(1)[2 * PAGE_SIZE - 1] = 1;
    expect(slot.isZeroPage(1)).toBe(false);
    expect(slot.isZeroPage(2)).toBe(true);
    slot.bytes(2)[2 * PAGE_SIZE] = 1; // first byte of page 2
    expect(slot.isZeroPage(2)).toBe(false);
    // page 0's last 16 bytes non-zero, page 1 reset to zero
    slot.bytes(1).fill(0, PAGE_SIZE, 2 * PAGE_SIZE);
    slot.bytes(0).fill(0xff, PAGE_SIZE - 16, PAGE_SIZE);
    expect(slot.isZeroPage(1)).toBe(true);
  });

  it('containsGfn at both ends', () => {
    const slot = slotOf(16); // gfns 0x100..0x10f
    expect([0xff, 0x100, 0x10f, 0x110].map((g) => slot.containsGfn(g))).toEqual([false, true, true, false]);
  });

  it('describeWriter ranges', () => {
    expect(describeWriter(0)).toBe('nobody');
    expect(describeWriter(1)).toBe('vcpu0');
    expect(describeWriter(5)).toBe('vcpu4');
    expect(describeWriter(DEVICE_WRITER_BASE)).toBe('device 0');
    expect(describeWriter(DEVICE_WRITER_BASE + 2)).toBe('device 2');
    expect(describeWriter(HOST_WRITER_BASE - 1)).toBe('device 16383');
    expect(describeWriter(HOST_WRITER_BASE)).toBe('host writer 0');
    expect(describeWriter(HOST_WRITER_BASE + 3)).toBe('host writer 3');
  });

  it('writeProtectPage drops write permission of that page only', () => {
    const slot = slotOf(4);
    writeProtectPage(slot, 2);
    expect(writable(slot)).toEqual([0, 1, 3]);
  });

  it('layout sizes: regions of 2^19 pages, one bitmap bit per page, and copyPages across a region boundary', () => {
    const pages = REGION_PAGES + 2;
    const layout = createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages, flags: 0 }], vcpus: 1, tracking: LEGACY });
    expect(layout.slots[0]!.regions.map((r) => r.byteLength)).toEqual([REGION_PAGES * PAGE_SIZE, 2 * PAGE_SIZE]);
    expect(layout.slots[0]!.dirtyBitmap.byteLength).toBe(Math.ceil(pages / 32) * 4);
    const slot = new GuestMemory(layout).slots[0]!;
    for (const [p, v] of [[REGION_PAGES - 2, 10], [REGION_PAGES - 1, 11], [REGION_PAGES, 12], [REGION_PAGES + 1, 13]] as const) {
      slot.writeU64(p, v);
      slot.bytes(p)[slot.byteOffset(p) + PAGE_SIZE - 1] = v;
    }
    expect(slot.readU64(REGION_PAGES)).toBe(12);
    expect(slot.wordIndex(REGION_PAGES + 1)).toBe(PAGE_SIZE / 4);
    const into = new Uint8Array(5 * PAGE_SIZE).fill(0xee);
    slot.copyPages(REGION_PAGES - 1, 3, into, PAGE_SIZE);
    const heads = [0, 1, 2, 3, 4].map((i) => [into[i * PAGE_SIZE]!, into[(i + 1) * PAGE_SIZE - 1]!]);
    expect(heads).toEqual([[0xee, 0xee], [11, 11], [12, 12], [13, 13], [0xee, 0xee]]);
    const one = new Uint8Array(2 * PAGE_SIZE);
    slot.copyPages(REGION_PAGES - 2, 1, one, PAGE_SIZE);
    expect([one[0], one[PAGE_SIZE], one[2 * PAGE_SIZE - 1]]).toEqual([0, 10, 10]);
    expect(slot.isZeroPage(REGION_PAGES + 1)).toBe(false);
  });

  it('a 100-page slot has a 4-word bitmap', () => {
    const layout = createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 100, flags: 0 }], vcpus: 1, tracking: LEGACY });
    expect(layout.slots[0]!.dirtyBitmap.byteLength).toBe(16);
    expect(layout.slots[0]!.regions[0]!.byteLength).toBe(100 * PAGE_SIZE);
    expect(slotLogsDirtyPages(0)).toBe(false);
    expect(slotLogsDirtyPages(KVM_MEM_READONLY)).toBe(false);
    expect(slotLogsDirtyPages(KVM_MEM_LOG_DIRTY_PAGES)).toBe(true);
  });
});

describe('userspace PageBitmap', () => {
  function take(g: Iterable<number>, max = 64): number[] {
    const out: number[] = [];
    for (const p of g) { out.push(p); if (out.length >= max) break; }
    return out;
  }

  it('pagesSet yields every set page in order, across words', () => {
    const b = new PageBitmap(100);
    expect(b.words.length).toBe(4);
    for (const p of [0, 2, 31, 33, 37, 63, 99]) b.mark(p);
    expect(take(b.pagesSet())).toEqual([0, 2, 31, 33, 37, 63, 99]);
    expect(b.count()).toBe(7);
    b.clear();
    expect(b.count()).toBe(0);
    expect(take(b.pagesSet())).toEqual([]);
  });

  it('orWords ORs in at a page offset', () => {
    const b = new PageBitmap(128);
    b.orWords([1, 2], 64);
    expect(Array.from(b.words)).toEqual([0, 0, 1, 2]);
  });
});

describe('host actor pause handshake', () => {
  it('registers, counts itself paused once, parks on HOST_PAUSE, and uncounts on resume', () => {
    const g = new Int32Array(createVmLayout({ slots: [], vcpus: 1, tracking: LEGACY }).global);
    const calls: string[] = [];
    const actor = new HostActor(g, { quiesce: () => calls.push('quiesce'), resume: () => calls.push('resume') });
    expect(g[GlobalWord.HOST_ACTORS]).toBe(1);
    expect(actor.gate().next()).toEqual({ done: true, value: undefined });
    Atomics.store(g, GlobalWord.HOST_PAUSE, 1);
    const gate = actor.gate();
    expect(gate.next()).toEqual({ done: false, value: undefined });
    expect(g[GlobalWord.HOST_PAUSED]).toBe(1);
    expect(gate.next().value).toEqual({ code: WaitCode.PAUSED, arg: 0, arg2: 0, park: { array: g, index: GlobalWord.HOST_PAUSE, value: 1 } });
    expect(gate.next().value).toMatchObject({ code: WaitCode.PAUSED });
    expect(g[GlobalWord.HOST_PAUSED]).toBe(1);
    expect(calls).toEqual(['quiesce']);
    Atomics.store(g, GlobalWord.HOST_PAUSE, 0);
    expect(gate.next()).toEqual({ done: true, value: undefined });
    expect(g[GlobalWord.HOST_PAUSED]).toBe(0);
    expect(calls).toEqual(['quiesce', 'resume']);
  });
});

describe('injections', () => {
  it('isBugName', () => {
    expect(isBugName('skip-tlb-shootdown')).toBe(true);
    expect(isBugName('read-pin-dirties')).toBe(true);
    expect(isBugName('no-such-bug')).toBe(false);
    expect(INJECTABLE_BUGS.length).toBe(38);
  });
});
