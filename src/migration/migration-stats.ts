import { PAGE_SIZE } from '../host/constants.ts';
import type { DirtySourceStats } from '../host/vmm/dirty-source.ts';
import { type VcpuCounters, type VcpuRate, vcpuRates } from '../host/vmm/vcpu-stats.ts';
import { type CompletionStats, explainDowntime } from './downtime.ts';

/** QEMU counts a page's header with it: 8 bytes of address and flags (a zero page: 1 byte more). */
export const PAGE_OVERHEAD = 8;

export interface PassStats {
  pass: number;
  pagesSent: number;
  zeroPages: number;
  dirtyFound: number;
  syncMs: number;
  /** Bytes per second over the pass. */
  bandwidth: number;
  expectedDowntimeMs: number;
  ms: number;
  /** vCPU throttle during the pass, percent. */
  throttle: number;
  /** The dirty-limit policy's quota during the pass (pages/s per vCPU), 0 when not engaged. */
  dirtyLimit: number;
}

export type MigrationEvent =
  | { kind: 'pass'; stats: PassStats }
  | { kind: 'completed'; info: MigrationInfo }
  | { kind: 'failed'; reason: string; info: MigrationInfo };

/** What QEMU's `info migrate` shows (docs/reference.md 5), plus the per-pass series. */
export interface MigrationInfo {
  status: 'completed' | 'failed';
  totalTimeMs: number;
  setupTimeMs: number;
  expectedDowntimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  normalPages: number;
  zeroPages: number;
  /** Mbit/s over the whole migration. */
  throughputMbps: number;
  pagesPerSecond: number;
  /** Pages dirtied per second, over the last pass. */
  dirtyPagesRate: number;
  dirtySyncCount: number;
  /** QEMU's cpu-throttle-percentage at the end. */
  throttlePercent: number;
  /** The dirty-limit policy's quota once it engaged (pages/s per vCPU), else 0. */
  dirtyLimit: number;
  downtimeLimitMs: number;
  /** Each vCPU's achieved operation and dirty page rates from the start of the migration to the stop. */
  vcpus: VcpuRate[];
  /** The completion (stop, final sync, last pass, destination) when the migration got that far. */
  completion: CompletionStats | null;
  /** Why the downtime exceeded the limit, in protocol words; null when it did not. */
  downtimeExceeded: string | null;
  passes: PassStats[];
  /** What each DMA dirty source reported (VMs with an IOMMU). */
  dmaSources: DirtySourceStats[];
  /** Guest operations each vCPU retired from the start of the migration to the stop (the guest's progress while it migrated). */
  guestOps: number[];
  /**
   * vCPUs found in the same KVM_EXIT_DIRTY_RING_FULL 16 frames apart in a pass: the
   * VMM answers ring-full exits after every frame, so such a vCPU was never re-entered
   * and the guest stalled.
   */
  stalledVcpus: number[];
}

/**
 * The numbers of one migration as it goes (QEMU's migration statistics, MigrationStats
 * and the RAM counters), from which `info migrate` is made.
 */
export class MigrationStats {
  transferred = 0;
  normal = 0;
  zero = 0;
  readonly passes: PassStats[] = [];
  expectedDowntimeMs = 0;
  lastDirtyRate = 0;
  setupTimeMs = 0;
  completion: CompletionStats | null = null;
  /** Each vCPU's counters at the start and at the stop, and when they were read (ms). */
  countersAtStart: VcpuCounters[] = [];
  countersAtStop: VcpuCounters[] | null = null;
  limitsAtStop: number[] | null = null;
  stopTime: number | null = null;

  constructor(readonly t0: number, readonly totalBytes: number, readonly downtimeLimitMs: number) {}

  /** A frame sent: its pages and bytes (pages with their headers). */
  sent(normal: number, zero: number): number {
    const bytes = normal * (PAGE_SIZE + PAGE_OVERHEAD) + zero * (PAGE_OVERHEAD + 1);
    this.transferred += bytes;
    this.normal += normal;
    this.zero += zero;
    return bytes;
  }

  /**
   * `info migrate` now. `live` reads what is current when the migration did not get to
   * the stop (counters, limits, stalled vCPUs, per-source counts).
   */
  info(status: MigrationInfo['status'], downtimeMs: number, now: number, live: {
    remainingPages: number; syncs: number; throttle: number; dirtyLimit: number; counters: VcpuCounters[]; limits: number[];
    dmaSources: DirtySourceStats[]; stalledVcpus: number[];
  }): MigrationInfo {
    const total = now - this.t0;
    const end = this.countersAtStop ?? live.counters;
    return {
      status, totalTimeMs: total, setupTimeMs: this.setupTimeMs, expectedDowntimeMs: this.expectedDowntimeMs, downtimeMs,
      transferredBytes: this.transferred, remainingBytes: live.remainingPages * PAGE_SIZE, totalBytes: this.totalBytes,
      normalPages: this.normal, zeroPages: this.zero,
      throughputMbps: total > 0 ? (this.transferred * 8) / 1e6 / (total / 1000) : 0,
      pagesPerSecond: total > 0 ? ((this.normal + this.zero) * 1000) / total : 0,
      dirtyPagesRate: this.lastDirtyRate, dirtySyncCount: live.syncs, throttlePercent: live.throttle, dirtyLimit: live.dirtyLimit, passes: this.passes,
      downtimeLimitMs: this.downtimeLimitMs,
      vcpus: vcpuRates(this.countersAtStart, end, (this.stopTime ?? now) - this.t0, this.limitsAtStop ?? live.limits),
      completion: this.completion,
      downtimeExceeded: status === 'completed' ? explainDowntime(downtimeMs, this.downtimeLimitMs, this.expectedDowntimeMs, this.completion) : null,
      dmaSources: live.dmaSources,
      guestOps: this.countersAtStart.map((c, v) => end[v]!.ops - c.ops),
      stalledVcpus: live.stalledVcpus,
    };
  }
}
