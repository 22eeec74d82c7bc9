import { type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';
import type { VcpuOp } from './spec.ts';

/**
 * A vCPU's litmus script as a Workload. The runner arms one scripted operation at a time;
 * next() hands out its guest operations (one for write/read, COUNT for write-pages).
 * When nothing is armed the vCPU is idle: it is in guest mode running code that touches
 * no tracked state, modelled as a read of `idleGfn` (reads retire at once and change
 * nothing), so that a step taken only to acknowledge a TLB flush does exactly that.
 */
export class ScriptWorkload implements Workload {
  private armed: VcpuOp | null = null;
  private fetched = 0;
  /** Whether the last operation handed out was an idle one. */
  lastIdle = false;

  constructor(private readonly idleGfn: number) {}

  arm(op: VcpuOp): void {
    this.armed = op;
    this.fetched = 0;
  }

  disarm(): void {
    this.armed = null;
  }

  get armedOp(): VcpuOp | null { return this.armed; }

  next(op: GuestOp): void {
    const a = this.armed;
    if (a !== null && this.fetched < (a.kind === 'write' ? a.count : 1)) {
      op.kind = a.kind === 'write' ? OpKind.WRITE64 : OpKind.READ;
      op.gfn = a.gfn + (a.kind === 'write' ? this.fetched : 0);
      op.value = a.kind === 'write' ? a.value : 0;
      this.fetched++;
      this.lastIdle = false;
      return;
    }
    op.kind = OpKind.READ;
    op.gfn = this.idleGfn;
    op.value = 0;
    this.lastIdle = true;
  }
}
