import { type GuestContext, type GuestOp, OpKind, SET_PAT_COHERENT_ACK, SET_PAT_NO_CLFLUSH, type Workload } from '../host/guest-op.ts';
import { X86_MEMTYPE_WB, X86_MEMTYPE_WC } from '../host/memory-type.ts';
import type { Prng } from '../util/prng.ts';

/** A guest memory range. */
export interface RenderRange { baseGfn: number; pages: number }

/** The render buffers: the last pages of the guest's first memory range, shared with the GPU. */
export const RENDER_PAGES = 64;

/** Where a guest's render buffers are (the devices' buffers come from there too). */
export function renderAreaOf(first: RenderRange): RenderRange {
  const pages = Math.min(RENDER_PAGES, first.pages);
  return { baseGfn: first.baseGfn + first.pages - pages, pages };
}

/**
 * A guest driving a GPU through a virtio-gpu-style device (the seed discussion's case):
 * the driver maps its render buffers write-combining (its first operation sets the PAT type
 * of the whole area to WC, as a DRM driver's ioremap_wc / set_memory_wc does), then fills
 * them with command and vertex data while the rest of the guest keeps writing ordinary
 * write-back memory: every other operation goes to a random render buffer page, the others
 * to a random page outside the area. The device reads and writes the same buffers by DMA.
 * Whether the WC mapping takes effect is KVM's decision (memory-type.ts): only while
 * non-coherent DMA is registered.
 */
export class RenderGuest implements Workload {
  private mapped = false;
  private turn = 0;
  /** render-wbinvd: the area's pages written through WB so far, then the flush still to do. */
  private cleared = 0;
  private flushPending = false;
  /** switch-to-coherent: the buffers mapped WB again at the device's request. */
  private coherent = false;

  constructor(
    private readonly area: RenderRange,
    /** The rest of guest memory the guest writes (its pages, outside the area), by index. */
    private readonly other: { pages: number; gfn(i: number): number },
    private readonly prng: Prng,
    /** The render-wbinvd guest's driver (RenderDriver), or render's; null: a vCPU that never touches the area. */
    private readonly driver: RenderDriver | null = RENDER_DRIVER,
  ) {}

  next(op: GuestOp, ctx: GuestContext): void {
    const d = this.driver;
    op.value = ctx.iteration;
    op.offset = 0;
    if (d !== null && d.clearFirst && this.cleared < this.area.pages) {
      // The buffers in use through the kernel's WB mapping before the driver takes them.
      op.kind = OpKind.WRITE64;
      op.gfn = this.area.baseGfn + this.cleared++;
      return;
    }
    if (d !== null && !this.mapped) {
      this.mapped = true;
      this.flushPending = d.flush === 'wbinvd';
      this.setAreaPat(op, X86_MEMTYPE_WC | (this.flushPending ? SET_PAT_NO_CLFLUSH : 0));
      return;
    }
    if (this.flushPending) {
      this.flushPending = false;
      op.kind = OpKind.WBINVD;
      op.gfn = this.area.baseGfn;
      return;
    }
    if (d !== null && ctx.coherentSwitch === true && !this.coherent) {
      // The device asks for coherent DMA again: the driver maps its buffers WB (cpa_flush
      // flushing them), then says so; it renders through the cache from now on.
      this.coherent = true;
      this.setAreaPat(op, X86_MEMTYPE_WB | SET_PAT_COHERENT_ACK);
      return;
    }
    op.kind = OpKind.WRITE64;
    const toArea = (d !== null && (this.turn++ & 1) === 0) || this.other.pages === 0;
    op.gfn = toArea ? this.area.baseGfn + this.prng.below(this.area.pages) : this.other.gfn(this.prng.below(this.other.pages));
  }

  /** SET_PAT over the whole area: `offset` the memory type and its flags (guest-op.ts). */
  private setAreaPat(op: GuestOp, offset: number): void {
    op.kind = OpKind.SET_PAT;
    op.gfn = this.area.baseGfn;
    op.value = this.area.pages;
    op.offset = offset;
  }
}

/**
 * When the render guest hands its buffers to the devices: render at once; render-wbinvd
 * once vCPU 0's driver has written them, mapped them WC and flushed (its first
 * area.pages + 2 operations). The device's DMA before that would race with the guest, not KVM.
 */
export function renderHandover(area: RenderRange, workload: 'render' | 'render-wbinvd'): { vcpu: number; ops: number } | undefined {
  return workload === 'render-wbinvd' ? { vcpu: 0, ops: area.pages + 2 } : undefined;
}

/** How a render guest's driver takes its buffers. */
export interface RenderDriver {
  /** The buffers were written through a WB mapping before the driver maps them WC. */
  clearFirst: boolean;
  /** How its cpa_flush flushes them when it does: CLFLUSH per line, or WBINVD (a CPU without CLFLUSH). */
  flush: 'clflush' | 'wbinvd';
}

/** render: every vCPU maps the fresh buffers WC, CLFLUSH flushing them. */
export const RENDER_DRIVER: RenderDriver = { clearFirst: false, flush: 'clflush' };
/**
 * render-wbinvd: vCPU 0 alone drives the GPU (the others write the rest of memory); its
 * buffers were in use through WB first, and its CPU has no CLFLUSH, so the change to WC
 * ends in a WBINVD, which KVM must really execute (non-coherent DMA is registered) or the
 * dirty lines stay cached and their write-back later overwrites the WC data.
 */
export const RENDER_WBINVD_DRIVER: RenderDriver = { clearFirst: true, flush: 'wbinvd' };
