import { GlobalWord } from '../layout.ts';
import { HostActor } from '../host-actor.ts';
import type { Vm } from '../vm.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';
import { BufferPages } from './dma-buffers.ts';
import { DeviceWord, deviceBase } from '../iommu/iommu-layout.ts';
import { DEVICE_WRITER_BASE, type DeviceConfig } from './device-config.ts';
import { type Device, type DeviceStats, deviceStats } from './device.ts';

/**
 * A GVT-g-style device: its vendor driver writes guest memory by GPA through the host's
 * write-guest path (kvmgt's kvmgt_rw_gpa -> kvm_write_guest), with no vCPU running. It
 * bypasses the guest IOMMU entirely, so the only dirty tracking that sees its writes is
 * KVM's own (mark_page_dirty_in_slot: the ring's backup bitmap, or the slot's bitmap).
 */
export class Gvt implements Device {
  constructor(readonly vm: Vm, readonly index: number, readonly config: DeviceConfig, private readonly seed: number) {}

  stats(): DeviceStats {
    return deviceStats(this.vm.iommu!, this.index, this.config);
  }

  run(): Steps {
    return gvtDevice(this.vm, this.index, this.config, this.seed);
  }
}

function* gvtDevice(vm: Vm, index: number, config: DeviceConfig, seed: number): Steps {
  const g = vm.global;
  // Its counters sit where the IOVA devices' do (it has no IOTLB and no mailbox).
  const words = vm.iommu!.words;
  const base = deviceBase(index);
  const pages = new BufferPages(config, index, seed, vm.memory);
  const actor = new HostActor(g);
  const writer = DEVICE_WRITER_BASE + index;
  let seq = 0;
  let nextAt = config.every;
  for (;;) {
    yield* actor.gate();
    const ops = vm.guestOps();
    if (ops < nextAt) {
      yield waitFor(WaitCode.GUEST_OPS, nextAt, ops);
      continue;
    }
    nextAt += config.every; // from the last one due: a device that slept catches up (dma-device.ts)
    // Deciding and writing are separate steps, as for the host writer: a pause may come between.
    yield undefined;
    const gfn = pages.next();
    const slot = vm.memory.findSlot(gfn)!;
    const iteration = Atomics.load(g, GlobalWord.ITERATION);
    vm.writeGuest(slot, gfn - slot.baseGfn, iteration, { writer, seq: ++seq, iteration }, -1);
    Atomics.store(words, base + DeviceWord.OPS, seq);
    Atomics.add(words, base + DeviceWord.DMA_WRITES, 1);
    yield undefined;
  }
}
