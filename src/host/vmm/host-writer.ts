import { GlobalWord } from '../layout.ts';
import { HostActor } from '../host-actor.ts';
import { HOST_WRITER_BASE } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import type { VmmControl } from './vmm-control.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';
import type { Prng } from '../../util/prng.ts';

/**
 * Host-side writes into guest memory with no running vCPU (kvm_write_guest from device
 * emulation or a paravirt clock update in a VMM thread): one write of the current
 * iteration into a random page every `every` guest operations. Paused by the VMM while
 * the VM is stopped (host-actor.ts).
 */
export function* hostWriter(vm: Vm, vmm: VmmControl, every: number, prng: Prng, id = 0): Steps {
  const g = vm.global;
  const slots = vm.memory.slots;
  const actor = new HostActor(g);
  let seq = 0;
  let nextAt = every;
  for (;;) {
    yield* actor.gate();
    const ops = vmm.totalOps();
    if (ops < nextAt) {
      yield waitFor(WaitCode.GUEST_OPS, nextAt, ops);
      continue;
    }
    nextAt = ops + every;
    // Deciding to write and writing are separate steps: the VMM may pause host actors in
    // between, and must then wait for this write before it reads the log for the last time.
    yield undefined;
    const slot = slots[prng.below(slots.length)]!;
    const page = prng.below(slot.pages);
    const iteration = Atomics.load(g, GlobalWord.ITERATION);
    vm.writeGuest(slot, page, iteration, { writer: HOST_WRITER_BASE + id, seq: ++seq, iteration }, -1);
    yield undefined;
  }
}
