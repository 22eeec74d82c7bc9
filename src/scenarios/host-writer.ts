import { GlobalWord, HostActorState } from '../host/layout.ts';
import { HOST_WRITER_BASE } from '../host/memslot.ts';
import type { Vm } from '../host/vm.ts';
import type { VmmControl } from '../host/vmm.ts';
import { type Steps, WaitCode, waitFor } from '../drivers/role.ts';
import type { Prng } from '../util/prng.ts';

/**
 * Host-side writes into guest memory with no running vCPU (kvm_write_guest from device
 * emulation or a paravirt clock update in a VMM thread): one write of the current
 * iteration into a random page every `every` guest operations. Paused by the VMM with a
 * Dekker hand-off (HOST_PAUSE / HOST_STATE) while the VM is stopped.
 */
export function* hostWriter(vm: Vm, vmm: VmmControl, every: number, prng: Prng, id = 0): Steps {
  const g = vm.global;
  const slots = vm.memory.slots;
  let seq = 0;
  let nextAt = every;
  Atomics.add(g, GlobalWord.HOST_ACTORS, 1); // the VMM waits for registered actors to pause
  for (;;) {
    const pause = Atomics.load(g, GlobalWord.HOST_PAUSE);
    if (pause !== 0) {
      if (Atomics.load(g, GlobalWord.HOST_STATE) !== HostActorState.PAUSED) {
        Atomics.store(g, GlobalWord.HOST_STATE, HostActorState.PAUSED);
        Atomics.notify(g, GlobalWord.HOST_STATE);
        yield undefined; // a state change: this step's work (a blocked step changes nothing)
        continue;
      }
      yield waitFor(WaitCode.PAUSED, 0, 0, { array: g, index: GlobalWord.HOST_PAUSE, value: pause });
      continue;
    }
    if (Atomics.load(g, GlobalWord.HOST_STATE) !== HostActorState.RUNNING) {
      Atomics.store(g, GlobalWord.HOST_STATE, HostActorState.RUNNING);
      if (Atomics.load(g, GlobalWord.HOST_PAUSE) !== 0) continue; // re-check: the VMM may have paused us meanwhile
    }
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
