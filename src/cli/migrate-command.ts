import { describeMismatch } from '../oracles/stamp-oracle.ts';
import { describeSweepCheck } from '../oracles/sweep-pattern.ts';
import type { DestinationRun } from '../scenarios/resume.ts';
import type { MigrationRunResult } from '../scenarios/migration.ts';
import { runMigrationWatched } from '../scenarios/off-thread.ts';
import { type Resolved, buildMigration } from '../scenarios/settings.ts';
import { formatSize } from '../util/size.ts';
import type { MigrationInfo, PassStats } from '../migration/precopy.ts';
import { Progress } from './progress.ts';
import { describeDmaRecord } from '../oracles/dma-oracle.ts';
import type { DmaReport } from '../scenarios/devices.ts';
import type { DirtySourceStats as DmaSourceStats } from '../host/vmm/dirty-source.ts';
import { describeVcpuRates } from './vcpu-rates.ts';
import { describeIdleBugs } from '../scenarios/demos.ts';
import { migrationOutcome } from '../scenarios/outcome.ts';
import { type Expected, checkExpectation } from './expectation.ts';

const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;

/** A summary in the words of QEMU's `info migrate`. */
export function formatInfo(i: MigrationInfo): string[] {
  return [
    `Migration status: ${i.status}`,
    `total time: ${i.totalTimeMs.toFixed(1)} ms`,
    `setup: ${i.setupTimeMs.toFixed(1)} ms`,
    `expected downtime: ${i.expectedDowntimeMs.toFixed(2)} ms`,
    `downtime: ${i.downtimeMs.toFixed(2)} ms`,
    `transferred ram: ${mib(i.transferredBytes)}`,
    `throughput: ${i.throughputMbps.toFixed(1)} mbps`,
    `remaining ram: ${mib(i.remainingBytes)}`,
    `total ram: ${mib(i.totalBytes)}`,
    `duplicate: ${i.zeroPages} pages`,
    `normal: ${i.normalPages} pages`,
    `pages-per-second: ${Math.round(i.pagesPerSecond)}`,
    `dirty pages rate: ${Math.round(i.dirtyPagesRate)} pages/s`,
    `dirty sync count: ${i.dirtySyncCount}`,
    `cpu throttle percentage: ${i.throttlePercent}`,
    ...(i.dirtyLimit ? [`dirty limit: ${i.dirtyLimit} pages/s per vCPU (the dirty-limit policy engaged)`] : []),
    ...describeVcpuRates(i.vcpus, 'while it migrated'),
    ...(i.downtimeExceeded ? [i.downtimeExceeded] : []),
  ];
}

function passLine(p: PassStats): string {
  return `Pass ${p.pass}: sent ${p.pagesSent} pages (${p.zeroPages} zero), dirty ${p.dirtyFound}, sync ${p.syncMs.toFixed(2)} ms, ` +
    `bandwidth ${mib(p.bandwidth)}/s, expected downtime ${p.expectedDowntimeMs.toFixed(2)} ms${p.throttle ? `, throttle ${p.throttle} %` : ''}` +
    `${p.dirtyLimit ? `, dirty limit ${p.dirtyLimit} pages/s per vCPU` : ''}`;
}

export async function migrateCommand(settings: Resolved, json: boolean, expected?: Expected): Promise<number> {
  const { scenario: s, driver, watchdogMs, burst, to, resumeOps } = buildMigration(settings);
  const progress = new Progress(json);
  const out = (line: string): void => { if (!json) { progress.clear(); console.log(line); } };
  out(`migrate: ${s.tracking}${s.tracking === 'dirty-ring' ? ` (${s.ringEntries} entries)` : ''}, ${s.vcpus} vCPUs, ${formatSize(s.memoryBytes)}, ` +
    `workload ${s.workload.name}, bandwidth ${s.params.bandwidth ? `${mib(s.params.bandwidth)}/s` : 'unlimited'}, downtime limit ${s.params.downtimeLimitMs} ms, ` +
    `driver ${driver}, destination ${to ? `tcp:${to.host}:${to.port}` : 'in-process'}, seed ${s.seed}${s.bugs.length ? `, injected: ${s.bugs.join(', ')}` : ''}`);
  // Ctrl-C cancels the migration (migrate_cancel), or stops the resumed guest once it completed, and reports it; a second one exits.
  const cancel = new AbortController();
  const onSigint = (): void => {
    if (cancel.signal.aborted) process.exit(130);
    out('cancelling (Ctrl-C again to exit at once)');
    cancel.abort();
  };
  process.on('SIGINT', onSigint);
  const r: MigrationRunResult = await runMigrationWatched(s, {
    driver, watchdogMs, burst, to, resumeOps, cancel: cancel.signal,
    onEvent: (e) => { if (e.kind === 'pass') out(passLine(e.stats)); },
    onTick: (p, names) => progress.update(`migrating: ${p[names.indexOf('migration')] ?? 0} steps of the migration thread`),
  });
  process.off('SIGINT', onSigint);
  progress.clear();
  const code = r.status === 'passed' ? 0 : r.status === 'failed' ? 1 : 3;
  const expectation = expected ? checkExpectation(expected, migrationOutcome(r)) : undefined;
  if (json) {
    console.log(JSON.stringify({ command: 'migrate', scenario: s, driver, ...r, expectation }, null, 2));
    return code;
  }
  for (const line of describeResult(r)) console.log(line);
  if (expectation) console.log(expectation.line);
  return code;
}

/** A migration's report after it ran: `info migrate`, devices, lost writes with their history, the destination, the verdict. */
export function describeResult(r: MigrationRunResult): string[] {
  const lines: string[] = [];
  if (r.info) lines.push(...formatInfo(r.info));
  if (r.dma) lines.push(...describeDma(r.dma, r.info?.dmaSources ?? []));
  const c = r.confidential;
  if (c) {
    lines.push(`confidential guest: ${c.conversions} conversions; at the end ${c.privatePages} pages private, ${c.sharedPages} shared (only shared pages are migrated)`);
    if (c.design) {
      const d = c.design.stats;
      const ioctls = Object.entries(d.ioctls).map(([name, n]) => `${name} ${n}`).join(', ');
      const books = Object.entries(d.bookkeeping).map(([what, bytes]) => `${what} ${bytes} bytes`).join(', ') || 'none beside KVM\'s attributes';
      lines.push(`conversion design ${c.design.name}: ${d.conversions} conversions (the boot's included), ${d.iommuEntries} container mappings (${d.pagesMapped} pages reachable); ioctls: ${ioctls}; bookkeeping: ${books}`);
    }
    for (const f of c.findings) lines.push(`private memory oracle: ${f}`);
  }
  if (r.cache) {
    const st = r.cache.staleReads;
    lines.push(`CPU cache model: stale reads by vCPUs ${st.cpu}, devices ${st.device}, the migration thread ${st.migration}${st.firstGfn !== null ? ` (first gfn 0x${st.firstGfn.toString(16)})` : ''}; pages the migration thread flushed before reading ${r.cache.migrationPageFlushes}; lines written back ${r.cache.writebacks}${r.cache.overwrites > 0 ? `, ${r.cache.overwrites} of them over newer data in memory` : ''}`);
    const mc = r.cache.machineChecks;
    if (mc.count > 0) lines.push(`machine checks: ${mc.count} cacheable accesses to device memory (first gfn 0x${(mc.firstGfn ?? 0).toString(16)})`);
  }
  if (r.kvmOnlyTouches) {
    const t = r.kvmOnlyTouches;
    const saved = r.info?.completion?.deviceStatePages;
    lines.push(`KVM-only slot: the VMM touched it ${t.count} times${t.firstGfn !== null ? ` (first gfn 0x${t.firstGfn.toString(16)})` : ''}${saved !== undefined ? `; the device saved its ${saved} pages in the downtime` : ''}`);
  }
  if (r.reason) lines.push(`migration failed: ${r.reason}`);
  for (const m of r.mismatches) lines.push(describeMismatch(m));
  const d = r.destination;
  if (d) lines.push(...describeDestination(d));
  for (const e of r.errors) lines.push(e);
  const secs = `(${r.seconds.toFixed(2)} s)`;
  const broken = d?.afterResume?.ok === false ? d.afterResume : d?.atCompletion?.ok === false ? d.atCompletion : null;
  const idle = describeIdleBugs(r.injections, 'migrate');
  if (idle && r.status !== 'passed') lines.push(`note: ${idle}`);
  if (r.status === 'passed') {
    const also = `${d?.atCompletion ? '; the sweep pattern holds' : ''}${d?.resumed ? `${d.atCompletion ? ' before and after' : ''}; the destination resumed the guest` : ''}`
      + (c ? '; the destination has the same attributes, and no private memory was read' : '');
    lines.push(`${idle ? `PASSED, but ${idle}. ` : 'PASSED: '}all ${r.pagesCompared} destination pages equal the source${also} ${secs}`);
  } else if (r.mismatchCount > 0) lines.push(`FAILED: ${r.mismatchCount} of ${r.pagesCompared} pages differ: lost writes ${secs}`);
  else if (r.dma && (r.dma.faults > 0 || r.dma.staleIotlb > 0)) {
    const what = [r.dma.faults > 0 ? `${r.dma.faults} device faults` : '', r.dma.staleIotlb > 0 ? `${r.dma.staleIotlb} DMAs through stale IOTLB entries` : ''].filter(Boolean);
    lines.push(`FAILED: ${what.join(', ')} ${secs}`);
  }
  else if (broken) lines.push(`FAILED: the destination's sweep pattern is broken (${broken.outOfLine} pages out of line) ${secs}`);
  else lines.push(`${r.status === 'failed' ? 'FAILED' : 'STUCK'} ${secs}`);
  return lines;
}

/** IOMMU and device statistics, what each DMA dirty source reported, and the DMA oracle's records. */
export function describeDma(d: DmaReport, sources: DmaSourceStats[]): string[] {
  const i = d.iommu;
  const lines = [
    `IOMMU ${i.backend}${i.dmaEntryLimit !== null ? ` (dma_entry_limit ${i.dmaEntryLimit})` : ''}: ${i.maps} maps, ${i.unmaps} unmaps, ${i.mapErrors + i.unmapErrors} failed, ` +
      `${i.entries} mappings now (${i.pagesMapped} pages), ${i.iotlbInvalidations} IOTLB invalidations`,
  ];
  for (const v of d.devices) {
    const tlb = v.iotlbHits + v.iotlbMisses > 0 ? `, IOTLB ${v.iotlbHits} hits / ${v.iotlbMisses} misses` : '';
    const pins = v.kind === 'mdev' ? `, ${v.pins} pins, ${v.dmaRw} dma_rw` : '';
    const tracked = v.tracking === 'kvm' ? "KVM's dirty log" : v.tracking === 'device' ? 'its own DMA logging' : 'the IOMMU';
    lines.push(`device ${v.device} (${v.kind}, tracked by ${tracked}): ${v.operations} operations, ${v.dmaWrites} DMA writes, ${v.dmaReads} reads${pins}${tlb}, ${v.faults} faults, ${v.staleIotlb} stale-IOTLB DMAs`);
  }
  for (const s of sources) lines.push(`dirty pages reported by ${s.source}: ${s.pagesReported} in ${s.syncs} syncs`);
  // The records, in order, each distinct one once with how often it was recorded.
  const seen = new Map<string, number>();
  for (const rec of d.records) { const t = describeDmaRecord(rec); seen.set(t, (seen.get(t) ?? 0) + 1); }
  let shown = 0;
  for (const [text, n] of seen) {
    if (shown++ === 16) break;
    lines.push(n > 1 ? `${text} (${n} times)` : text);
  }
  const total = d.faults + d.staleIotlb;
  if (total > d.records.length) lines.push(`(${total} DMA oracle events in all; the first ${d.records.length} were kept)`);
  return lines;
}

/** The destination after completion: the sweep oracle before and after the resume, and the resumed run. */
export function describeDestination(d: DestinationRun): string[] {
  const lines: string[] = [];
  if (d.atCompletion) lines.push(...describeSweepCheck(d.atCompletion, 'at completion'));
  if (d.resumed) {
    const steps = d.resumed.steps !== undefined ? `, ${d.resumed.steps} steps` : '';
    lines.push(`destination resumed: ${d.resumed.vcpus} vCPUs retired ${d.resumed.ops} guest operations from the migrated memory, then stopped (${d.resumed.seconds.toFixed(2)} s${steps})`);
  }
  if (d.afterResume) lines.push(...describeSweepCheck(d.afterResume, 'after the resume'));
  lines.push(...d.errors);
  return lines;
}
