import { describe, expect, it } from 'vitest';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { HOST_WRITER_BASE, type Memslot } from '../src/host/memslot.ts';
import {
  COPY_COMPLETION, HARVEST_BITMAP, HostWriteLog, NoTracepoints, type PageDirtied, ProtectBy, forEachMaskPage,
} from '../src/host/tracepoints.ts';
import { Vm } from '../src/host/vm.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { KvmRingSource } from '../src/host/vmm/kvm-ring-source.ts';
import { LEGACY, MANUAL, RING, complete, makeVm, retire, vcpuWith } from './helpers.ts';

/** Every tracepoint as one line, in the order they fired. */
class Recorder extends NoTracepoints {
  readonly lines: string[] = [];
  private pages(page: number, lo: number, hi: number): string {
    const out: number[] = [];
    forEachMaskPage(page, lo, hi, (p) => out.push(p));
    return out.join(',');
  }
  override writeFault(vcpu: number, slot: Memslot, page: number): void { this.lines.push(`fault vcpu${vcpu} slot${slot.id} ${page}`); }
  override pageDirtied(e: PageDirtied): void {
    this.lines.push(e.where === 'ring' ? `dirty ${e.page} ring vcpu${e.vcpu} entry ${e.entry}${e.softFull ? ' soft-full' : ''}`
      : e.where === 'bitmap' ? `dirty ${e.page} bitmap vcpu${e.vcpu}` : `dirty ${e.page} lost`);
  }
  override hostWrite(_slot: Memslot, page: number, how: HostWriteLog): void { this.lines.push(`host-write ${page} ${how}`); }
  override writeProtected(_slot: Memslot, page: number, lo: number, hi: number, by: ProtectBy): void { this.lines.push(`protect ${this.pages(page, lo, hi)} by ${by}`); }
  override writeProtectedRange(_slot: Memslot, page: number, count: number, by: ProtectBy): void { this.lines.push(`protect ${page}+${count} by ${by}`); }
  override harvested(_slot: Memslot, page: number, lo: number, hi: number, from: number): void { this.lines.push(`harvest ${this.pages(page, lo, hi)} from ${from}`); }
  override copied(_slot: Memslot, pages: ArrayLike<number>, stage: number): void { this.lines.push(`copied ${Array.from(pages).join(',')} stage ${stage}`); }
}

function traced(vm: Vm): Recorder {
  const r = new Recorder();
  vm.tracepoints.attach(r);
  return r;
}

const stamp = { writer: HOST_WRITER_BASE, seq: 1, iteration: 1 };

describe('tracepoints', () => {
  it('legacy bitmap: logging enabled, a write fault and its log, KVM_GET_DIRTY_LOG harvesting and re-protecting', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 64 });
    const slot = vm.memory.slots[0]!;
    const t = traced(vm);
    complete(vm.enableDirtyLogging(slot));
    const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 5, value: 1 }, { gfn: slot.baseGfn + 5, value: 2 }, { gfn: slot.baseGfn + 40, value: 3 }]);
    retire(v, 3);
    complete(vm.getDirtyLog(slot), [v]);
    expect(t.lines).toEqual([
      `protect 0+64 by ${ProtectBy.ENABLE_LOGGING}`,
      'fault vcpu0 slot1 5', 'dirty 5 bitmap vcpu0', // the second write to page 5 takes no fault
      'fault vcpu0 slot1 40', 'dirty 40 bitmap vcpu0',
      `harvest 5 from ${HARVEST_BITMAP}`, `protect 5 by ${ProtectBy.GET_DIRTY_LOG}`,
      `harvest 40 from ${HARVEST_BITMAP}`, `protect 40 by ${ProtectBy.GET_DIRTY_LOG}`,
    ]);
  });

  it('manual protect: GET only harvests, CLEAR re-protects exactly the cleared pages; clear-without-protect reports none', () => {
    for (const bug of [false, true]) {
      const vm = makeVm({ tracking: MANUAL, pages: 64, bugs: { clearWithoutProtect: bug } });
      const slot = vm.memory.slots[0]!;
      complete(vm.enableDirtyLogging(slot));
      const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 3, value: 1 }]);
      retire(v, 1);
      const t = traced(vm);
      const bits = complete(vm.getDirtyLog(slot), [v]);
      complete(vm.clearDirtyLog(slot, 0, 64, bits), [v]);
      expect(t.lines).toEqual([`harvest 3 from ${HARVEST_BITMAP}`, ...(bug ? [] : [`protect 3 by ${ProtectBy.CLEAR_DIRTY_LOG}`])]);
    }
  });

  it('dirty ring: the push names the vCPU and entry, the harvest the ring, the reset the pages it re-protects', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 2 });
    const slot = vm.memory.slots[0]!;
    const source = new KvmRingSource(vm);
    complete(source.start());
    const v0 = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 1, value: 1 }]);
    const v1 = vcpuWith(vm, 1, [{ gfn: slot.baseGfn + 2, value: 1 }, { gfn: slot.baseGfn + 3, value: 1 }]);
    const t = traced(vm);
    retire(v0, 1);
    retire(v1, 2);
    complete(source.sync(new PageBitmap(vm.memory.totalPages), false), [v0, v1]);
    expect(t.lines).toEqual([
      'fault vcpu0 slot1 1', 'dirty 1 ring vcpu0 entry 0',
      'fault vcpu1 slot1 2', 'dirty 2 ring vcpu1 entry 0',
      'fault vcpu1 slot1 3', 'dirty 3 ring vcpu1 entry 1',
      'harvest 1 from 0', 'harvest 2 from 1', 'harvest 3 from 1',
      `protect 1 by ${ProtectBy.RESET_DIRTY_RINGS}`, `protect 2,3 by ${ProtectBy.RESET_DIRTY_RINGS}`,
    ]);
  });

  it('host writes: how each was logged, and the page a write with no vCPU and no backup bitmap lost', () => {
    const vm = makeVm({ tracking: RING(256), pages: 64, vcpus: 2 });
    const slot = vm.memory.slots[0]!;
    complete(new KvmRingSource(vm).start());
    const t = traced(vm);
    vm.writeGuest(slot, 12, 5, stamp, 1);
    vm.writeGuest(slot, 13, 5, stamp, -1);
    expect(t.lines).toEqual([
      'dirty 12 ring vcpu1 entry 0', `host-write 12 ${HostWriteLog.RING}`,
      'dirty 13 lost', `host-write 13 ${HostWriteLog.DROPPED}`,
    ]);
    const untracked = makeVm({ tracking: LEGACY, pages: 64, bugs: { untrackedHostWrite: true } });
    complete(untracked.enableDirtyLogging(untracked.memory.slots[0]!));
    const u = traced(untracked);
    untracked.writeGuest(untracked.memory.slots[0]!, 7, 1, stamp, -1);
    expect(u.lines).toEqual([`host-write 7 ${HostWriteLog.UNTRACKED}`]);
  });

  it('reaches every attached tracer in order, none after it detaches; page history records through them', () => {
    const vm = makeVm({ tracking: LEGACY, pages: 64 });
    const slot = vm.memory.slots[0]!;
    const a = traced(vm);
    const b = new Recorder();
    const detach = vm.tracepoints.attach(b);
    vm.tracepoints.active!.copied(slot, [4, 9], COPY_COMPLETION);
    detach();
    vm.tracepoints.active!.copied(slot, [10], 2);
    expect(a.lines).toEqual([`copied 4,9 stage ${COPY_COMPLETION}`, 'copied 10 stage 2']);
    expect(b.lines).toEqual([`copied 4,9 stage ${COPY_COMPLETION}`]);

    expect(makeVm({ tracking: LEGACY, pages: 64 }).tracepoints.active).toBeNull(); // nothing attached: the VM builds no event
    const h = new Vm(createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: 0 }], vcpus: 1, tracking: LEGACY, pageHistory: true }));
    h.populate();
    expect(h.tracepoints.active).not.toBeNull();
    const s = h.memory.slots[0]!;
    complete(h.enableDirtyLogging(s));
    h.tracepoints.active!.copied(s, [6], 3);
    expect(h.history!.read(6).map((e) => `${e.event} (${e.detail})`)).toEqual(['re-protected (dirty logging enabled)', 'copied (pass 3)']);
  });
});
