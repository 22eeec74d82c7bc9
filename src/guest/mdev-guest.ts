import { type GuestContext, type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';
import type { Prng } from '../util/prng.ts';
import { statusEpoch, statusPages } from '../host/mmio/vendor-workload.ts';

/**
 * What a guest's driver for a mediated device (a vGPU's) sees of its virtual BAR: a
 * read-only status page per resource, in which the vendor driver communicates what it
 * allocated (epoch << 8 | pages; 0 pages: revoked), one doorbell page per resource and
 * vCPU, in which each vCPU acknowledges the latest epoch it saw, and the resources' pages.
 */
export interface MdevGuestBar {
  /** The guest frame of BAR page 0. */
  baseGfn: number;
  vcpus: number;
  /** BAR page of resource r's status: statusOffset + r. */
  statusOffset: number;
  /** BAR page of resource r's doorbell for vCPU v: doorbellOffset + r * vcpus + v. */
  doorbellOffset: number;
  /** The resources the vendor allocates at run time: first BAR page and most pages. */
  resources: readonly { barOffset: number; maxPages: number }[];
}


/**
 * How the guest's driver behaves:
 * - `cooperative`: touches a resource only once its status says it holds it, and
 *   acknowledges every change (a revocation only after its last access);
 * - `eager`: touches every resource's pages from the start, before any allocation was
 *   communicated (the race Xiao Guangrong raised in 2016);
 * - `lingering`: acknowledges a revocation but keeps writing the last page it had of the
 *   resource (a hostile guest: isolation must not depend on the guest's cooperation);
 * - `scribbler`: cooperative, but writes its read-only status page once it has seen its
 *   first allocation.
 */
export type MdevGuestKind = 'cooperative' | 'eager' | 'lingering' | 'scribbler';
export const MDEV_GUEST_KINDS: readonly MdevGuestKind[] = ['cooperative', 'eager', 'lingering', 'scribbler'];

const NONE = -1;

/**
 * The guest driver's loop on one vCPU: it polls the status of each resource in turn
 * (one READ), acknowledges a change it sees (one WRITE64 to its doorbell), and between
 * polls reads and writes random pages of what it holds. A write stores vm, vCPU and a
 * counter, so that a page reached from another VM carries a visible foreign stamp.
 */
export class MdevGuest implements Workload {
  /** Per resource: the epoch and pages last seen in its status. */
  private readonly epoch: number[];
  private readonly pages: number[];
  /** lingering: per resource, the pages it held before the last revocation. */
  private readonly had: number[];
  private polled = NONE;
  private nextPoll = 0;
  private ack = NONE;
  private sincePoll = 0;
  private writes = 0;
  private scribbled = false;

  constructor(
    private readonly bar: MdevGuestBar, private readonly kind: MdevGuestKind, private readonly vm: number,
    private readonly vcpu: number, private readonly prng: Prng,
  ) {
    const n = bar.resources.length;
    this.epoch = new Array<number>(n).fill(0);
    this.pages = new Array<number>(n).fill(0);
    this.had = new Array<number>(n).fill(0);
  }

  next(op: GuestOp, ctx: GuestContext): void {
    op.offset = 0;
    if (this.polled !== NONE) {
      this.seen(this.polled, ctx.mmioRead ?? 0);
      this.polled = NONE;
    }
    const bar = this.bar;
    if (this.ack !== NONE) {
      const r = this.ack;
      this.ack = NONE;
      op.kind = OpKind.WRITE64;
      op.gfn = bar.baseGfn + bar.doorbellOffset + r * bar.vcpus + this.vcpu;
      op.value = this.epoch[r]!;
      return;
    }
    if (this.kind === 'scribbler' && !this.scribbled && this.pages.some((p) => p > 0)) {
      this.scribbled = true;
      op.kind = OpKind.WRITE64;
      op.gfn = bar.baseGfn + bar.statusOffset;
      op.value = 0xdead;
      return;
    }
    if (this.sincePoll >= 2 || !this.access(op)) {
      // Poll the next resource's status.
      const r = this.nextPoll;
      this.nextPoll = (r + 1) % bar.resources.length;
      this.polled = r;
      this.sincePoll = 0;
      op.kind = OpKind.READ;
      op.gfn = bar.baseGfn + bar.statusOffset + r;
      op.value = 0;
      return;
    }
    this.sincePoll++;
  }

  /** What the status of resource r says: a change is acknowledged (after it took effect here). */
  private seen(r: number, word: number): void {
    const epoch = statusEpoch(word);
    if (epoch === this.epoch[r]) return;
    if (statusPages(word) === 0 && this.pages[r]! > 0) this.had[r] = this.pages[r]!;
    this.epoch[r] = epoch;
    this.pages[r] = statusPages(word);
    this.ack = r;
  }

  /** A read or write of a page the guest believes it may touch; false when there is none. */
  private access(op: GuestOp): boolean {
    const bar = this.bar;
    const n = bar.resources.length;
    const start = this.prng.below(n);
    for (let i = 0; i < n; i++) {
      const r = (start + i) % n;
      const res = bar.resources[r]!;
      let page: number;
      if (this.kind === 'eager') page = this.prng.below(res.maxPages);
      else if (this.pages[r]! > 0) page = this.prng.below(this.pages[r]!);
      else if (this.kind === 'lingering' && this.had[r]! > 0) page = this.had[r]! - 1;
      else continue;
      op.gfn = bar.baseGfn + res.barOffset + page;
      if (this.prng.below(2) === 0) {
        op.kind = OpKind.READ;
        op.value = 0;
      } else {
        op.kind = OpKind.WRITE64;
        op.value = (((this.vm + 1) << 24) | ((this.vcpu & 0xff) << 16) | (++this.writes & 0xffff)) >>> 0;
      }
      return true;
    }
    return false;
  }
}
