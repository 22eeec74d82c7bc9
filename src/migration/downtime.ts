import { KVM_BACKUP_BITMAP, KVM_RINGS } from '../host/vmm/kvm-ring-source.ts';
import { KVM_DIRTY_BITMAP } from '../host/vmm/kvm-bitmap-source.ts';

/** What the completion did, from the stop to the destination's acknowledgement (the downtime). */
export interface CompletionStats {
  /** Pages left when the VM was stopped: what the expected downtime was computed from. */
  estimatedPages: number;
  /** Pages each source newly reported in the final sync (the ring's backup bitmap last). */
  finalSync: { source: string; pages: number }[];
  /** Pages the final pass sent. */
  pagesSent: number;
  /** device-state: pages of KVM-only slots the device's save handler sent, in the downtime too. */
  deviceStatePages?: number;
  /** Stopping the vCPUs and pausing the host actors. */
  stopMs: number;
  syncMs: number;
  sendMs: number;
  /** The destination applying the rest and acknowledging completion. */
  destinationMs: number;
}

function sourceWords(source: string): string {
  switch (source) {
    case KVM_BACKUP_BITMAP: return "in the ring's backup bitmap (kvm_write_guest with no running vCPU), which QEMU reads only at completion";
    case KVM_RINGS: return "in the vCPUs' dirty rings (written since the last sync)";
    case KVM_DIRTY_BITMAP: return "in KVM's dirty bitmap (written since the last sync)";
    default: return `reported by ${source}`;
  }
}

/**
 * Why a completed migration's downtime exceeded its limit, in protocol words, from what
 * the final sync found per source and where the time went; null when it did not.
 */
export function explainDowntime(downtimeMs: number, limitMs: number, expectedMs: number, c: CompletionStats | null): string | null {
  if (c === null || downtimeMs <= limitMs) return null;
  const head = `downtime ${downtimeMs.toFixed(0)} ms exceeded the ${limitMs} ms limit`;
  const found = c.finalSync.reduce((n, s) => n + s.pages, 0);
  const times = `stopping the VM ${c.stopMs.toFixed(1)} ms, final sync ${c.syncMs.toFixed(1)} ms, sending ${c.pagesSent} pages ${c.sendMs.toFixed(1)} ms, the destination ${c.destinationMs.toFixed(1)} ms`;
  if (found > c.estimatedPages) {
    const parts = c.finalSync.filter((s) => s.pages > 0).sort((a, b) => b.pages - a.pages);
    const top = parts[0]!;
    const rest = parts.slice(1).map((s) => `${s.pages} ${sourceWords(s.source)}`);
    return `${head}: the final sync found ${found} pages, ${top.pages} of them ${sourceWords(top.source)}` +
      `${rest.length ? `, ${rest.join(', ')}` : ''}; the estimate (${expectedMs.toFixed(2)} ms) saw only the ${c.estimatedPages} pages left before the stop (${times})`;
  }
  const phases: [string, number][] = [
    [`stopping the vCPUs and host actors took ${c.stopMs.toFixed(1)} ms`, c.stopMs],
    [`the final sync took ${c.syncMs.toFixed(1)} ms`, c.syncMs],
    [`sending the last ${c.pagesSent} pages took ${c.sendMs.toFixed(1)} ms (the estimate was ${expectedMs.toFixed(2)} ms at the measured bandwidth)`, c.sendMs],
    [`the destination took ${c.destinationMs.toFixed(1)} ms to apply them and acknowledge`, c.destinationMs],
  ];
  phases.sort((a, b) => b[1] - a[1]);
  return `${head}: ${phases[0]![0]}; the final sync found ${found} pages, the estimate saw ${c.estimatedPages} (${times})`;
}
