import { KVM_MAP_GPA_RANGE_PAGE_SZ_4K } from '../host/constants.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';
import { CONVERSION_AREA_PAGES, PrivateMemConversions } from './private-mem-conversions.ts';

/**
 * The bounce buffers a confidential guest shares at boot (Linux's SWIOTLB, which a TDX or
 * SNP guest converts to shared for its devices' DMA; 64 MiB by default there, 1 MiB here).
 * They follow the vCPUs' conversion areas. Devices DMA into the first half; the guest's
 * driver recycles the last RECYCLED_PAGES (private and shared again, one 4 KiB page at a
 * time, as a NIC driver that takes a buffer back), while its other threads fill them.
 */
export const SWIOTLB_PAGES = 256;
export const DEVICE_BUFFER_PAGES = SWIOTLB_PAGES / 2;
export const RECYCLED_PAGES = 4;
/** Guest operations between two buffer bursts. */
const BURST_EVERY = 16;
/** Writes in a filling vCPU's burst, all to one buffer page (it keeps its translation meanwhile). */
const FILL_WRITES = 8;

/** Where the bounce buffers start: after `vcpus` conversion areas from `base`. */
export function swiotlbBase(base: number, vcpus: number): number {
  return base + vcpus * CONVERSION_AREA_PAGES;
}

/**
 * A confidential guest's vCPU: private_mem_conversions_test's guest over its own area,
 * and every BURST_EVERY operations a burst on the recycled bounce buffers: the last vCPU
 * (the driver) takes the next one private, writes it, shares it again and writes it;
 * every other vCPU writes the next one FILL_WRITES times (shared; if the driver holds it
 * private just then, the access exits with KVM_EXIT_MEMORY_FAULT and the VMM shares it).
 */
export class ConfidentialGuest implements Workload {
  readonly conversions: PrivateMemConversions;
  private readonly recycled: number;
  private readonly driver: boolean;
  private n = 0;
  private burst: GuestOp[] = [];
  private buffer = 0;

  constructor(base: number, readonly vcpu: number, vcpus: number) {
    this.conversions = new PrivateMemConversions(base + vcpu * CONVERSION_AREA_PAGES);
    this.recycled = swiotlbBase(base, vcpus) + SWIOTLB_PAGES - RECYCLED_PAGES;
    this.driver = vcpu === vcpus - 1;
  }

  next(op: GuestOp, ctx: GuestContext): void {
    // A TD's MapGPA answered RETRY is called again before anything else (tdx_map_gpa loops
    // until it is done), and its result is read before a burst's MapGPA could overwrite R10
    // (a burst's are single pages: one chunk, never RETRY).
    if (this.conversions.settleMapGpa(ctx)) { this.conversions.next(op, ctx); return; }
    if (this.burst.length === 0 && ++this.n % BURST_EVERY === 0) this.burst = this.nextBurst();
    const b = this.burst.shift();
    if (b === undefined) { this.conversions.next(op, ctx); return; }
    op.kind = b.kind; op.gfn = b.gfn; op.value = b.value; op.offset = b.offset; op.private = b.private;
  }

  private nextBurst(): GuestOp[] {
    const gfn = this.recycled + (this.buffer++ % RECYCLED_PAGES);
    const value = this.vcpu * 1_000_000 + this.buffer;
    const map = (priv: boolean): GuestOp => ({ kind: OpKind.MAP_GPA_RANGE, gfn, value: 1, offset: KVM_MAP_GPA_RANGE_PAGE_SZ_4K, private: priv });
    const write = (priv: boolean): GuestOp => ({ kind: OpKind.WRITE64, gfn, value, offset: 0, private: priv });
    if (this.driver) return [map(true), write(true), map(false), write(false)];
    return Array.from({ length: FILL_WRITES }, () => write(false));
  }
}
