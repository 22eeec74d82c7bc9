import { NOT_WAITING, type Role, Step, type Steps, type Wait } from '../roles/role.ts';

/**
 * The host (VMM thread plus the KVM code it calls) as a role that runs one operation at
 * a time: each operation is a step generator (an ioctl that ends in a TLB flush yields
 * while it waits for vCPUs). Unlike GeneratorRole it keeps how the operation ended,
 * including an exception (a failing ioctl throws KvmError).
 */
export class HostRole implements Role {
  readonly name = 'host';
  wait: Wait = NOT_WAITING;
  progress = 0;
  private body: Steps<unknown> | null = null;
  /** Set when the current operation ended by throwing. */
  thrown: unknown = undefined;

  get busy(): boolean { return this.body !== null; }

  start(body: Steps<unknown>): void {
    this.body = body;
    this.thrown = undefined;
    this.wait = NOT_WAITING;
  }

  /** One step of the current operation; DONE when it has ended (returned or thrown). */
  step(): Step {
    if (this.body === null) return Step.DONE;
    let r: IteratorResult<Wait | undefined, unknown>;
    try {
      r = this.body.next();
    } catch (e) {
      this.body = null;
      this.thrown = e;
      this.wait = NOT_WAITING;
      this.progress++;
      return Step.DONE;
    }
    if (r.done) {
      this.body = null;
      this.wait = NOT_WAITING;
      this.progress++;
      return Step.DONE;
    }
    if (r.value === undefined) {
      this.progress++;
      return Step.PROGRESS;
    }
    this.wait = r.value;
    return Step.BLOCKED;
  }
}
