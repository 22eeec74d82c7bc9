import { GlobalWord } from './layout.ts';
import { type Steps, WaitCode, waitFor } from '../roles/role.ts';

/**
 * A host-side actor that writes guest memory or changes what devices can reach (device
 * emulation, a DMA device, the IOMMU service), and honours the VMM's pause while the VM
 * is stopped. Each actor registers in HOST_ACTORS and counts itself in HOST_PAUSED while
 * paused; the VMM's pause is complete when every registered actor is counted. Both sides
 * use seq-cst Atomics (a Dekker pair): an actor that registers after the VMM looked sees
 * the pause before it acts.
 */
export class HostActor {
  private paused = false;

  constructor(
    private readonly g: Int32Array,
    /** Called as the actor pauses (a device quiesces its DMA) and as it runs again. */
    private readonly hooks: { quiesce?: () => void; resume?: () => void } = {},
  ) {
    Atomics.add(g, GlobalWord.HOST_ACTORS, 1);
  }

  /** Returns once the actor may act; while the VMM pauses host actors it yields waits. */
  *gate(): Steps {
    const g = this.g;
    for (;;) {
      const pause = Atomics.load(g, GlobalWord.HOST_PAUSE);
      if (pause !== 0) {
        if (!this.paused) {
          this.paused = true;
          this.hooks.quiesce?.();
          Atomics.add(g, GlobalWord.HOST_PAUSED, 1);
          Atomics.notify(g, GlobalWord.HOST_PAUSED);
          yield undefined; // a state change: this step's work (a blocked step changes nothing)
          continue;
        }
        yield waitFor(WaitCode.PAUSED, 0, 0, { array: g, index: GlobalWord.HOST_PAUSE, value: pause });
        continue;
      }
      if (this.paused) {
        this.paused = false;
        Atomics.sub(g, GlobalWord.HOST_PAUSED, 1);
        this.hooks.resume?.();
        continue; // re-check: the VMM may have paused us again meanwhile
      }
      return;
    }
  }
}
