import { type GuestOp, OpKind, SET_PAT_NO_CLFLUSH, type Workload } from '../host/guest-op.ts';
import type { VcpuOp } from './spec.ts';

/**
 * A vCPU's litmus script as a Workload. The runner arms one scripted operation at a time;
 * next() hands out its guest operations (one for write/read/map-gpa/set-pat, COUNT for
 * write-pages). When nothing is armed the vCPU is idle: it is in guest mode running code
 * that touches no tracked state, modelled as a read of `idleGfn` (reads retire at once and
 * change nothing), so that a step taken only to acknowledge a TLB flush does exactly that.
 * With the CPU cache model a read would fill a cache line (and could count as a stale
 * read): the idle operation is then a PAT change of no pages, which touches nothing.
 */
export class ScriptWorkload implements Workload {
  private armed: VcpuOp | null = null;
  private fetched = 0;
  /** Whether the last operation handed out was an idle one. */
  lastIdle = false;

  /** `idlePrivate` says whether the idle page is private now, so that the idle read is of its kind and never exits. */
  constructor(private readonly idleGfn: number, private readonly idlePrivate: () => boolean = () => false, private readonly cached = false) {}

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
    op.offset = 0;
    if (a !== null && this.fetched < (a.kind === 'write' ? a.count : 1)) {
      this.lastIdle = false;
      this.fetched++;
      if (a.kind === 'wbinvd') {
        op.kind = OpKind.WBINVD;
        op.gfn = this.idleGfn;
        op.value = 0;
        op.private = false;
        return;
      }
      op.gfn = a.gfn + (a.kind === 'write' ? this.fetched - 1 : 0);
      if (a.kind === 'set-pat') {
        // SET_PAT's operands: `value` pages from `gfn` get memory type `offset`.
        op.kind = OpKind.SET_PAT;
        op.value = a.count;
        op.offset = a.type | (a.clflush ? 0 : SET_PAT_NO_CLFLUSH);
        op.private = false;
        return;
      }
      op.kind = a.kind === 'write' ? OpKind.WRITE64 : a.kind === 'map-gpa' ? OpKind.MAP_GPA_RANGE : OpKind.READ;
      // KVM_HC_MAP_GPA_RANGE: a1 is the page count (the 4 KiB page-size hint, 0, in a2).
      op.value = a.kind === 'write' ? a.value : a.kind === 'map-gpa' ? a.count : 0;
      op.private = a.private;
      return;
    }
    op.kind = this.cached ? OpKind.SET_PAT : OpKind.READ;
    op.gfn = this.idleGfn;
    op.value = 0;
    op.private = this.idlePrivate();
    this.lastIdle = true;
  }
}
