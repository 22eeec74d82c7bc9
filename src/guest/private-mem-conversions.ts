import { KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K } from '../host/constants.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';

/**
 * The ranges of KVM's private_mem_conversions_test (tools/testing/selftests/kvm/x86/
 * private_mem_conversions_test.c, test_ranges), in pages from the start of a vCPU's area:
 * (0, 4K), (0, 2M), (4K, 4K), (4K, 2M), (2M, 4K).
 */
export const CONVERSION_RANGES: readonly { offset: number; pages: number }[] = [
  { offset: 0, pages: 1 }, { offset: 0, pages: 512 }, { offset: 1, pages: 1 }, { offset: 1, pages: 512 }, { offset: 512, pages: 1 },
];
/** Each vCPU's area: 2 MiB + 4 KiB, so that every range fits (the selftest's per-vCPU stride). */
export const CONVERSION_AREA_PAGES = 513;

/** What the guest writes to a page of range `range` in round `round`, private or shared: never 0, so a discarded page tells. */
export function conversionValue(round: number, range: number, priv: boolean): number {
  return ((round * CONVERSION_RANGES.length + range) * 2 + (priv ? 1 : 0)) + 1;
}

const enum Stage { MAP, WRITE }

/**
 * The guest of private_mem_conversions_test, in its spirit: a vCPU walks its area's
 * ranges round after round; for each it converts the range to shared and writes every
 * page shared, then converts it to private and writes every page private. Even rounds
 * convert explicitly (KVM_HC_MAP_GPA_RANGE, with the 2 MiB page-size hint for 2 MiB
 * ranges); odd rounds implicitly: the access of the other kind exits with
 * KVM_EXIT_MEMORY_FAULT and the VMM converts the page. After a whole round every page
 * of the area is private and holds conversionValue(round, its last range, true).
 */
export class PrivateMemConversions implements Workload {
  round = 0;
  private range = 0;
  private priv = false;
  private stage = Stage.MAP;
  private page = 0;

  /** After `rounds` rounds the guest idles: it writes its last page again, private, with the same value. */
  constructor(readonly baseGfn: number, readonly rounds = Infinity) {}

  next(op: GuestOp, _ctx: GuestContext): void {
    if (this.round >= this.rounds) {
      const last = CONVERSION_RANGES.length - 1;
      const r = CONVERSION_RANGES[last]!;
      op.kind = OpKind.WRITE64;
      op.gfn = this.baseGfn + r.offset + r.pages - 1;
      op.value = conversionValue(this.round - 1, last, true);
      op.offset = 0;
      op.private = true;
      return;
    }
    const r = CONVERSION_RANGES[this.range]!;
    op.offset = 0;
    op.private = this.priv;
    if (this.stage === Stage.MAP) {
      this.stage = Stage.WRITE;
      this.page = 0;
      if (this.round % 2 === 0) {
        op.kind = OpKind.MAP_GPA_RANGE;
        op.gfn = this.baseGfn + r.offset;
        op.value = r.pages;
        op.offset = r.pages === 512 ? KVM_MAP_GPA_RANGE_PAGE_SZ_2M : KVM_MAP_GPA_RANGE_PAGE_SZ_4K;
        return;
      }
    }
    op.kind = OpKind.WRITE64;
    op.gfn = this.baseGfn + r.offset + this.page;
    op.value = conversionValue(this.round, this.range, this.priv);
    if (++this.page < r.pages) return;
    // The range is written: on to its other kind, or the next range, or the next round.
    this.stage = Stage.MAP;
    if (!this.priv) { this.priv = true; return; }
    this.priv = false;
    if (++this.range < CONVERSION_RANGES.length) return;
    this.range = 0;
    this.round++;
  }
}
