import { type GuestContext, type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';
import { X86_MEMTYPE_WC } from '../host/memory-type.ts';
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

  constructor(
    private readonly area: RenderRange,
    /** The rest of guest memory the guest writes (its pages, outside the area), by index. */
    private readonly other: { pages: number; gfn(i: number): number },
    private readonly prng: Prng,
  ) {}

  next(op: GuestOp, ctx: GuestContext): void {
    if (!this.mapped) {
      this.mapped = true;
      op.kind = OpKind.SET_PAT;
      op.gfn = this.area.baseGfn;
      op.value = this.area.pages;
      op.offset = X86_MEMTYPE_WC;
      return;
    }
    op.kind = OpKind.WRITE64;
    op.value = ctx.iteration;
    op.offset = 0;
    const toArea = (this.turn++ & 1) === 0 || this.other.pages === 0;
    op.gfn = toArea ? this.area.baseGfn + this.prng.below(this.area.pages) : this.other.gfn(this.prng.below(this.other.pages));
  }
}
