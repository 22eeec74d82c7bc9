import { UserError } from '../util/errors.ts';
import { ConfidentialGuest } from './confidential-guest.ts';
import { RENDER_DRIVER, RENDER_WBINVD_DRIVER, RenderGuest, renderAreaOf } from './render-guest.ts';
import { Prng } from '../util/prng.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload, type Write64Workload } from '../host/guest-op.ts';

/** A guest memory range a workload may touch. */
export interface GuestRange {
  baseGfn: number;
  pages: number;
}

export const WORKLOAD_NAMES = ['random', 'sweep', 'hotset', 'perf', 'scatter', 'convert', 'render', 'render-wbinvd'] as const;
export type WorkloadName = (typeof WORKLOAD_NAMES)[number];

/** A guest rendering through a GPU (render-guest.ts): its devices' buffers are its render buffers. */
export function isRenderWorkload(name: WorkloadName): boolean {
  return name === 'render' || name === 'render-wbinvd';
}

export interface WorkloadOptions {
  name: WorkloadName;
  /** hotset: fraction of pages that are hot. */
  hotFraction: number;
  /** hotset: share of writes that go to the hot pages. */
  hotShare: number;
  /** perf: percentage of operations that write. */
  writePercent: number;
  /** perf: visit pages in random order instead of sequentially. */
  randomOrder: boolean;
  /** Operations per second each vCPU runs at most (the guest is that busy); 0: as fast as it can. */
  opRate?: number;
  /** render, render-wbinvd: where the render buffers are when not the first range's last pages (a blob resource's memslot, one whole range). */
  renderArea?: GuestRange;
}

export const DEFAULT_WORKLOAD: WorkloadOptions = {
  name: 'random', hotFraction: 0.1, hotShare: 0.9, writePercent: 100, randomOrder: false,
};

export function parseWorkloadName(text: string, where: string): WorkloadName {
  if ((WORKLOAD_NAMES as readonly string[]).includes(text)) return text as WorkloadName;
  throw new UserError(`${where}: unknown workload '${text}' (one of: ${WORKLOAD_NAMES.join(', ')})`);
}

/** Flattens ranges into one page numbering so workloads can pick pages uniformly. */
class PageSpace {
  private readonly starts: number[] = [];
  readonly pages: number;
  readonly single: boolean;
  constructor(private readonly ranges: GuestRange[]) {
    this.single = ranges.length === 1;
    let n = 0;
    for (const r of ranges) { this.starts.push(n); n += r.pages; }
    this.pages = n;
  }
  gfn(i: number): number {
    if (this.ranges.length === 1) return this.ranges[0]!.baseGfn + i;
    let k = this.ranges.length - 1;
    while (this.starts[k]! > i) k--;
    return this.ranges[k]!.baseGfn + (i - this.starts[k]!);
  }
}

/** dirty_log_test's guest: the current iteration into the first 8 bytes of random pages. */
export class RandomWorkload implements Write64Workload {
  private readonly pages: number;
  /** The first gfn when the guest has one range (the common case, kept off the PageSpace path). */
  private readonly base: number;
  constructor(private readonly space: PageSpace, private readonly prng: Prng) {
    this.pages = space.pages;
    this.base = space.single ? space.gfn(0) : -1;
  }
  next(op: GuestOp, ctx: GuestContext): void {
    op.kind = OpKind.WRITE64;
    op.gfn = this.nextWriteGfn();
    op.value = ctx.iteration;
  }
  nextWriteGfn(): number {
    const i = this.prng.below(this.pages);
    return this.base >= 0 ? this.base + i : this.space.gfn(i);
  }
}

/**
 * migration-test's guest: zero byte 0 of every page, then increment those bytes in
 * address order forever. With several vCPUs each sweeps its own slice.
 */
export class SweepWorkload implements Workload {
  private i = 0;
  private zeroed = false;
  constructor(private readonly space: PageSpace, private readonly first: number, private readonly count: number) {}
  next(op: GuestOp): void {
    op.gfn = this.space.gfn(this.first + this.i);
    op.kind = this.zeroed ? OpKind.INC8 : OpKind.STORE8;
    op.value = 0;
    op.offset = 0;
    if (++this.i === this.count) { this.i = 0; this.zeroed = true; }
  }
}

/** A hot set: `hotFraction` of the pages takes `hotShare` of the writes. */
export class HotsetWorkload implements Write64Workload {
  private readonly hotPages: number;
  constructor(private readonly space: PageSpace, private readonly prng: Prng, private readonly o: WorkloadOptions) {
    this.hotPages = Math.max(1, Math.floor(space.pages * o.hotFraction));
  }
  next(op: GuestOp, ctx: GuestContext): void {
    op.kind = OpKind.WRITE64;
    op.gfn = this.nextWriteGfn();
    op.value = ctx.iteration;
  }
  nextWriteGfn(): number {
    const hot = this.prng.float() < this.o.hotShare;
    const i = hot ? this.prng.below(this.hotPages) : this.prng.below(this.space.pages);
    return this.space.gfn(i);
  }
}

/**
 * dirty_log_perf_test (memstress): each vCPU sweeps its own slice, writing a constant
 * into each page, or reading it, by a write percentage; optionally in random order.
 */
export class PerfWorkload implements Workload {
  private i = 0;
  constructor(
    private readonly space: PageSpace, private readonly prng: Prng,
    private readonly first: number, private readonly count: number, private readonly o: WorkloadOptions,
  ) {}
  next(op: GuestOp): void {
    const i = this.o.randomOrder ? this.prng.below(this.count) : this.i;
    if (++this.i === this.count) this.i = 0;
    op.gfn = this.space.gfn(this.first + i);
    op.kind = this.prng.below(100) < this.o.writePercent ? OpKind.WRITE64 : OpKind.READ;
    op.value = 0x01234567; // memstress writes a constant
  }
}

/**
 * Writes that land anywhere in a page: a random page, a byte at a random offset past the
 * stamp (16..4095) holding the iteration's low byte (never 0). So pages differ from their
 * copies beyond their first 16 bytes, and every oracle's whole-page comparison is at work.
 */
export class ScatterWorkload implements Workload {
  constructor(private readonly space: PageSpace, private readonly prng: Prng) {}
  next(op: GuestOp, ctx: GuestContext): void {
    op.kind = OpKind.STORE8;
    op.gfn = this.space.gfn(this.prng.below(this.space.pages));
    op.offset = 16 + this.prng.below(4096 - 16);
    op.value = (ctx.iteration & 0xff) || 1;
  }
}

export function createWorkload(o: WorkloadOptions, ranges: GuestRange[], vcpu: number, vcpus: number, seed: number): Workload {
  const space = new PageSpace(ranges);
  const prng = new Prng(Prng.derive(seed, vcpu));
  const slice = Math.floor(space.pages / vcpus);
  const first = vcpu * slice;
  const count = vcpu === vcpus - 1 ? space.pages - first : slice;
  switch (o.name) {
    case 'random': return new RandomWorkload(space, prng);
    case 'sweep': return new SweepWorkload(space, first, Math.max(1, count));
    case 'hotset': return new HotsetWorkload(space, prng, o);
    case 'perf': return new PerfWorkload(space, prng, first, Math.max(1, count), o);
    case 'scatter': return new ScatterWorkload(space, prng);
    // private_mem_conversions_test's guest over each vCPU's own area, from the start of guest memory, and the bounce buffers.
    case 'convert': return new ConfidentialGuest(space.gfn(0), vcpu, vcpus);
    case 'render':
    case 'render-wbinvd': {
      // The render buffers are the first range's last pages; the rest of memory is indexed around them.
      const driver = o.name === 'render' ? RENDER_DRIVER : vcpu === 0 ? RENDER_WBINVD_DRIVER : null;
      const blob = o.renderArea;
      if (blob !== undefined) {
        // The buffers are a range of their own; the guest's other writes go to the rest.
        const rest = new PageSpace(ranges.filter((r) => r.baseGfn !== blob.baseGfn));
        return new RenderGuest(blob, rest, prng, driver);
      }
      const area = renderAreaOf(ranges[0]!);
      const before = ranges[0]!.pages - area.pages;
      return new RenderGuest(area, { pages: space.pages - area.pages, gfn: (i) => space.gfn(i < before ? i : i + area.pages) }, prng, driver);
    }
  }
}
