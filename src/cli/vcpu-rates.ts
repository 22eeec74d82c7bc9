import type { VcpuRate } from '../host/vmm/vcpu-stats.ts';

/** Each vCPU's achieved rates: guest operations and pages dirtied per second, and time paced. */
export function describeVcpuRates(rates: VcpuRate[], when: string): string[] {
  return rates.map((r) => {
    const limit = r.dirtyLimit ? ` (dirty limit ${r.dirtyLimit} pages/s at the end)` : '';
    const paced = r.pacedMs > 0 ? `, paced ${r.pacedMs.toFixed(0)} ms` : '';
    return `vcpu${r.vcpu} ${when}: ${Math.round(r.opsPerSecond)} ops/s, ${Math.round(r.dirtyPagesPerSecond)} pages dirtied/s${limit}${paced}`;
  });
}
