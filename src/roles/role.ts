/**
 * Roles are non-blocking step machines (docs/architecture.md, principle 2). A step does one
 * small action on shared memory; when it cannot act it changes nothing and says what it
 * waits for. Drivers decide who steps: the free-run driver gives each role a thread,
 * the deterministic driver interleaves them on one thread with a seeded scheduler.
 */
export const enum Step {
  /** Did something. */
  PROGRESS = 0,
  /** Could not act; `role.wait` says on what. Nothing changed. */
  BLOCKED = 1,
  /** Finished for good. */
  DONE = 2,
}

export const enum WaitCode {
  NONE = 0,
  /** A TLB flush waits for vCPU `arg` to acknowledge generation `arg2`. */
  FLUSH_ACK = 1,
  /** The VMM waits for vCPU `arg` to stop. */
  VCPU_STOPPED = 2,
  /** The collector waits until the guest has retired `arg` operations. */
  GUEST_OPS = 3,
  /** A vCPU is stopped and waits for the VMM to let it run again. */
  VCPU_RELEASE = 4,
  /** A vCPU sits in an exit (reason `arg`) until the VMM re-enters KVM_RUN. */
  VCPU_EXIT = 5,
  /** A host actor is paused by the VMM. */
  PAUSED = 6,
  /** The migration thread waits for the destination (arg 0: credit, 1: completion). */
  DESTINATION = 7,
  /** The migration thread waits `arg` ms for the next bandwidth window. */
  BANDWIDTH = 8,
  /** The destination waits for the source to send. */
  SOURCE = 9,
  /** The VMM waits for host actors (device emulation) to pause. */
  HOST_PAUSED = 10,
  /** An IOTLB invalidation waits for device `arg` to acknowledge generation `arg2`. */
  IOTLB_ACK = 11,
  /** Waits for the IOMMU domain lock (held by `arg` - 1; 0: nobody any more). */
  IOMMU_LOCK = 12,
  /** A device waits for the IOMMU service to answer its request. */
  IOMMU_REPLY = 13,
  /** The IOMMU service waits for requests. */
  IOMMU_REQUEST = 14,
  /** The VMM's conversion thread waits for a vCPU exit (GlobalWord.EXIT_DOORBELL). */
  VCPU_EXITS = 15,
  /** A device waits until the VMM has mapped its buffers (a confidential guest's shared bounce buffers). */
  DMA_BUFFERS = 16,
  /** A vCPU or the migration thread waits for the VMM to boot the guest (GlobalWord.VM_START_PENDING). */
  VM_START = 17,
  /** The migration thread waits for the guest's driver to map its buffers WB again (GlobalWord.COHERENT_SWITCH). */
  GUEST_COHERENT = 18,
  /** A mediated device's vendor driver waits for VM `arg`'s vCPUs to acknowledge its change to resource `arg2`. */
  GUEST_ACK = 19,
}

export interface Wait {
  code: WaitCode;
  arg: number;
  arg2: number;
  /** Where a free-running thread may park with Atomics.wait (it re-checks after waking). */
  park?: { array: Int32Array; index: number; value: number };
}

export interface Role {
  readonly name: string;
  step(): Step;
  /** What the last BLOCKED step waited for. */
  readonly wait: Wait;
  /** Work done that counts for the watchdog (operations retired, collections, ...). */
  readonly progress: number;
  /** Free-run: runs many steps when that is equivalent and faster (vCPUs batch). */
  runBurst?(maxOps: number): Step;
  /** Where the role is as a step begins, for the watchdog's report of a wedged actor (a vCPU: its phase + 1). */
  readonly stepCode?: number;
}

export function waitFor(code: WaitCode, arg = 0, arg2 = 0, park?: Wait['park']): Wait {
  return { code, arg, arg2, park };
}

export const NOT_WAITING: Wait = waitFor(WaitCode.NONE);

/**
 * A role written as a generator: each `yield undefined` ends a step that made progress,
 * each `yield wait` ends a step that could not act (the generator re-checks when it is
 * resumed). Host-side procedures (ioctls with their TLB flush) compose with `yield*`.
 */
export type Steps<T = void> = Generator<Wait | undefined, T, void>;

export class GeneratorRole implements Role {
  wait: Wait = NOT_WAITING;
  progress = 0;
  private done = false;

  constructor(readonly name: string, private readonly body: Steps) {}

  get finished(): boolean { return this.done; }

  step(): Step {
    if (this.done) return Step.DONE;
    const r = this.body.next();
    if (r.done) { this.done = true; this.wait = NOT_WAITING; return Step.DONE; }
    if (r.value === undefined) { this.progress++; return Step.PROGRESS; }
    this.wait = r.value;
    return Step.BLOCKED;
  }
}

/**
 * Runs a procedure while no other actor runs (set-up before a VM starts): it must never
 * wait, since nobody could end the wait.
 */
export function runAlone<T>(steps: Steps<T>, what: string): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
    if (r.value !== undefined) throw new Error(`${what} waited (code ${r.value.code}) before anything runs`);
  }
}
