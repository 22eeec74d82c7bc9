import {
  KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K, PAGE_SIZE, TDVMCALL_STATUS_RETRY, TDVMCALL_STATUS_SUCCESS,
} from '../host/constants.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';

/**
 * The ranges of KVM's private_mem_conversions_test (tools/testing/selftests/kvm/x86/
 * private_mem_conversions_test.c, test_ranges), in pages from the start of a vCPU's area:
 * (0, 4K), (0, 2M), (4K, 4K), (4K, 2M), (2M, 4K).
 */
export interface ConversionRange { offset: number; pages: number }
export const CONVERSION_RANGES: readonly ConversionRange[] = [
  { offset: 0, pages: 1 }, { offset: 0, pages: 512 }, { offset: 1, pages: 1 }, { offset: 1, pages: 512 }, { offset: 512, pages: 1 },
];
/** Each vCPU's area: 2 MiB + 4 KiB, so that every range fits (the selftest's per-vCPU stride). */
export const CONVERSION_AREA_PAGES = 513;
/**
 * The whole area as one range, not one of the selftest's: a MapGPA of 2 MiB + 4 KiB, which
 * TDX serves in two chunks (TDX_MAP_GPA_MAX_LEN), so that a RETRY can come between them.
 */
export const WHOLE_AREA_RANGE: ConversionRange = { offset: 0, pages: CONVERSION_AREA_PAGES };

/**
 * What the guest writes to a page of range `range` (of `ranges` ranges) in round `round`,
 * private or shared: never 0, so a discarded page tells.
 */
export function conversionValue(round: number, range: number, priv: boolean, ranges = CONVERSION_RANGES.length): number {
  return ((round * ranges + range) * 2 + (priv ? 1 : 0)) + 1;
}

const enum Stage { MAP, WRITE }
/** A TD's MapGPA (tdx_map_gpa's loop): none in flight, issued (its result not read yet), or to be called again from R11. */
const enum MapGpa { NONE, ISSUED, RETRY }
/** Linux's tdx_map_gpa: "Retrying the hypercall a second time should succeed; use 3 just in case". */
const MAX_RETRIES_PER_PAGE = 3;

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
  /** A TD's MapGPA calls answered TDVMCALL_STATUS_RETRY (each called again from R11). */
  mapGpaRetries = 0;
  /**
   * A TD's MapGPA calls that failed: another error status, an R11 outside the range, or
   * MAX_RETRIES_PER_PAGE retries without progress (Linux's set_memory_decrypted then fails).
   * The guest writes the range all the same: each access of the other kind converts its
   * page implicitly (KVM_EXIT_MEMORY_FAULT), so the round still ends converted.
   */
  mapGpaFailures = 0;
  private range = 0;
  private priv = false;
  private stage = Stage.MAP;
  private page = 0;
  private mapGpa = MapGpa.NONE;
  /** The MapGPA in flight: [mapStart, mapEnd) in frames, and retries since it last made progress. */
  private mapStart = 0;
  private mapEnd = 0;
  private mapRetries = 0;

  /**
   * After `rounds` rounds the guest idles: it writes its last page again, private, with the
   * same value. `ranges` defaults to the selftest's (CONVERSION_RANGES).
   */
  constructor(readonly baseGfn: number, readonly rounds = Infinity, readonly ranges: readonly ConversionRange[] = CONVERSION_RANGES) {}

  /**
   * Reads the result of the MapGPA this guest issued last, once, before its next operation
   * (call it there if another workload may run operations in between; next() does it
   * itself). Returns whether the guest must call MapGPA again: on a TD, Linux's tdx_map_gpa
   * (arch/x86/coco/tdx/tdx.c) calls again from R11 on TDVMCALL_STATUS_RETRY, after checking
   * R11 (it comes from the untrusted VMM) lies inside the range, and gives up after three
   * retries that made no progress. Elsewhere (no TDVMCALL status) the hypercall's result
   * is not looked at, as the selftest's guest asserts it instead.
   */
  settleMapGpa(ctx: GuestContext): boolean {
    if (this.mapGpa !== MapGpa.ISSUED) return this.mapGpa === MapGpa.RETRY;
    this.mapGpa = MapGpa.NONE;
    const status = ctx.tdvmcallStatus;
    if (status === undefined) return false;
    if (status !== TDVMCALL_STATUS_RETRY) {
      if (status !== TDVMCALL_STATUS_SUCCESS) this.mapGpaFailures++;
      return false;
    }
    this.mapGpaRetries++;
    const resume = (ctx.tdvmcallR11 ?? -1) / PAGE_SIZE;
    if (!Number.isInteger(resume) || resume < this.mapStart || resume >= this.mapEnd) { this.mapGpaFailures++; return false; }
    if (resume === this.mapStart) {
      // "Consume" a retry without forward progress.
      if (++this.mapRetries >= MAX_RETRIES_PER_PAGE) { this.mapGpaFailures++; return false; }
    } else {
      this.mapStart = resume;
      this.mapRetries = 0;
    }
    this.mapGpa = MapGpa.RETRY;
    return true;
  }

  next(op: GuestOp, ctx: GuestContext): void {
    if (this.settleMapGpa(ctx)) { this.issueMapGpa(op, this.mapStart, this.mapEnd - this.mapStart); return; }
    const ranges = this.ranges;
    if (this.round >= this.rounds) {
      const last = ranges.length - 1;
      const r = ranges[last]!;
      op.kind = OpKind.WRITE64;
      op.gfn = this.baseGfn + r.offset + r.pages - 1;
      op.value = conversionValue(this.round - 1, last, true, ranges.length);
      op.offset = 0;
      op.private = true;
      return;
    }
    const r = ranges[this.range]!;
    op.offset = 0;
    op.private = this.priv;
    if (this.stage === Stage.MAP) {
      this.stage = Stage.WRITE;
      this.page = 0;
      if (this.round % 2 === 0) {
        this.mapRetries = 0;
        this.issueMapGpa(op, this.baseGfn + r.offset, r.pages);
        return;
      }
    }
    op.kind = OpKind.WRITE64;
    op.gfn = this.baseGfn + r.offset + this.page;
    op.value = conversionValue(this.round, this.range, this.priv, ranges.length);
    if (++this.page < r.pages) return;
    // The range is written: on to its other kind, or the next range, or the next round.
    this.stage = Stage.MAP;
    if (!this.priv) { this.priv = true; return; }
    this.priv = false;
    if (++this.range < ranges.length) return;
    this.range = 0;
    this.round++;
  }

  /** The explicit conversion of `pages` from `gfn` to the current kind, with the 2 MiB page-size hint for 2 MiB ranges. */
  private issueMapGpa(op: GuestOp, gfn: number, pages: number): void {
    op.kind = OpKind.MAP_GPA_RANGE;
    op.gfn = gfn;
    op.value = pages;
    op.offset = pages === 512 ? KVM_MAP_GPA_RANGE_PAGE_SZ_2M : KVM_MAP_GPA_RANGE_PAGE_SZ_4K;
    op.private = this.priv;
    this.mapStart = gfn;
    this.mapEnd = gfn + pages;
    this.mapGpa = MapGpa.ISSUED;
  }
}
