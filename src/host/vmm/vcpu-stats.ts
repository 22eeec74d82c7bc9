import { VcpuRequest, VcpuWord } from '../layout.ts';
import type { VmmControl } from './vmm-control.ts';

/** What one vCPU has published: operations retired, pages it dirtied (write-protect faults that logged a page), time paced. */
export interface VcpuCounters {
  ops: number;
  dirtied: number;
  pacedUs: number;
}

/** A vCPU's achieved rates over an interval, and the dirty limit in force at its end. */
export interface VcpuRate {
  vcpu: number;
  ops: number;
  dirtied: number;
  opsPerSecond: number;
  dirtyPagesPerSecond: number;
  /** Time it slept outside guest mode (dirty limit, operation rate, throttle). */
  pacedMs: number;
  /** Pages per second (QEMU's set-vcpu-dirty-limit), 0 for none. */
  dirtyLimit: number;
}

export function vcpuCounters(vmm: VmmControl): VcpuCounters[] {
  return Array.from({ length: vmm.vcpus }, (_, v) => ({
    ops: vmm.word(v, VcpuWord.OPS), dirtied: vmm.word(v, VcpuWord.FAULTS), pacedUs: vmm.word(v, VcpuWord.PACED_US),
  }));
}

export function dirtyLimits(vmm: VmmControl): number[] {
  return Array.from({ length: vmm.vcpus }, (_, v) => vmm.word(v, VcpuRequest.DIRTY_LIMIT));
}

/** Rates between two snapshots `ms` milliseconds apart. */
export function vcpuRates(from: VcpuCounters[], to: VcpuCounters[], ms: number, limits: number[]): VcpuRate[] {
  const s = Math.max(ms, 1e-3) / 1000;
  return to.map((b, v) => {
    const a = from[v]!;
    const ops = b.ops - a.ops;
    const dirtied = b.dirtied - a.dirtied;
    return {
      vcpu: v, ops, dirtied, opsPerSecond: ops / s, dirtyPagesPerSecond: dirtied / s,
      pacedMs: ((b.pacedUs - a.pacedUs) | 0) / 1000, dirtyLimit: limits[v] ?? 0,
    };
  });
}
