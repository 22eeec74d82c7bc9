import { CATALOG } from '../bugs/catalog.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { DEFAULT_WORKLOAD, parseWorkloadName } from '../guest/workload.ts';
import { type ConvergencePolicy, DEFAULT_VCPU_DIRTY_LIMIT, type MigrationInfo, type PassStats } from '../migration/precopy.ts';
import { describeMismatch } from '../oracles/stamp-oracle.ts';
import { describeSweepCheck } from '../oracles/sweep-pattern.ts';
import { type DestinationRun, defaultResumeOps } from '../scenarios/resume.ts';
import { type MigrationRunResult, type MigrationScenario, runMigration } from '../scenarios/migration.ts';
import type { Driver } from '../scenarios/run-roles.ts';
import { UserError } from '../util/errors.ts';
import { formatSize, parseSize } from '../util/size.ts';
import { MAX_OP_RATE, bugsAndMode, dirtyRate, fraction, int, memory, positive, ringSize } from './flags.ts';
import { parseEndpoint } from './destination-command.ts';
import { Progress } from './progress.ts';
import { deviceSetup } from './device-flags.ts';
import { describeDmaRecord } from '../oracles/dma-oracle.ts';
import type { DmaReport } from '../scenarios/devices.ts';
import type { DmaSourceStats } from '../host/iommu/dma-dirty-sync.ts';
import { describeVcpuRates } from './vcpu-rates.ts';
import { describeIdleBugs } from '../bugs/acted.ts';
import { migrationOutcome } from '../scenarios/outcome.ts';
import { type Expected, checkExpectation } from './expectation.ts';

export interface MigrateFlags {
  tracking?: string; vcpus: string; memory: string; slots: string; ringSize: string; workload: string;
  hotFraction: string; hotShare: string; writePercent: string; hostWriteEvery?: string; bandwidth: string;
  downtimeLimit: string; maxIterations: string; timeout: string; policy: string; warmup?: string;
  driver: string; seed: string; inject: string[]; json?: boolean; watchdog: string; burst: string;
  to?: string; allowRemote?: boolean; resumeOps?: string; batchPages: string; pageHistory?: boolean;
  device?: string[]; iommu?: string; dmaEntryLimit?: string; onDeviceFault?: string;
  dirtyLimit?: string; opRate?: string; vcpuDirtyLimit?: string;
}

export const POLICIES: readonly ConvergencePolicy[] = ['fail', 'force', 'auto-converge', 'dirty-limit'];

export const MIGRATE_DEFAULTS = {
  vcpus: '2', memory: '256MiB', slots: '1', ringSize: '4096', workload: 'hotset', hotFraction: '0.02', hotShare: '1',
  writePercent: '100', bandwidth: '128MiB', downtimeLimit: '300', maxIterations: '30', timeout: '60',
  policy: 'fail', driver: 'free', seed: '1', watchdog: '10', burst: '256', batchPages: '256',
} as const;

/**
 * The flags a migration runs with: what was given, else the injected bugs' demonstration
 * settings (the first bug's win), else the command's defaults.
 */
export function migrateFlags(given: Partial<MigrateFlags>): MigrateFlags {
  const defined = Object.fromEntries(Object.entries(given).filter(([, v]) => v !== undefined));
  const demos = (given.inject ?? []).map((n) => CATALOG.find((b) => b.name === n)?.migrateDemo ?? {}).reverse();
  return { ...MIGRATE_DEFAULTS, inject: [], ...Object.assign({}, ...demos), ...defined } as MigrateFlags;
}

function target(f: MigrateFlags): { host: string; port: number } | undefined {
  if (f.to === undefined) return undefined;
  if (!f.to.startsWith('tcp:')) throw new UserError(`--to: '${f.to}' is not tcp:HOST:PORT`);
  return parseEndpoint('--to', f.to.slice(4), f.allowRemote === true);
}

/**
 * `vmemlab run` with no scenario: a 4-vCPU, 1 GiB guest writing a 2 % hot set, each vCPU
 * held to QEMU's default vcpu-dirty-limit (1 MB/s), migrated with the dirty ring to an
 * in-process destination that resumes it; the rest as `migrate`. Held to 1 MB/s per vCPU
 * the guest dirties a sixteenth of what even a busy 2-core machine sends, so it converges
 * and completes within its downtime limit whatever the machine.
 */
export const DEFAULT_JOB = { vcpus: '4', memory: '1GiB', workload: 'hotset', tracking: 'dirty-ring', dirtyLimit: '1MB/s' } as const;

/**
 * No host writes by default: KVM writes guest memory with no running vCPU only for rare
 * things (arm64's ITS tables), and each such write waits in the ring's backup bitmap for
 * the final sync. --host-write-every turns them on (examples/backup-bitmap-downtime.yaml).
 */
export const DEFAULT_HOST_WRITE_EVERY = '0';

export function migrationScenario(f: MigrateFlags): {
  scenario: MigrationScenario; driver: Driver; watchdogMs: number; burst: number; to?: { host: string; port: number }; resumeOps?: number;
} {
  const { bugs, mode } = bugsAndMode('migrate', f.inject, '--tracking', f.tracking);
  const memoryBytes = memory('--memory', f.memory);
  const driver = f.driver;
  if (driver !== 'free' && driver !== 'deterministic') throw new UserError(`--driver: unknown driver '${driver}' (free or deterministic)`);
  if (!(POLICIES as readonly string[]).includes(f.policy)) throw new UserError(`--policy: unknown policy '${f.policy}' (one of: ${POLICIES.join(', ')})`);
  // QEMU's migrate_caps_check: the dirty-limit capability needs KVM's dirty ring.
  if (f.policy === 'dirty-limit' && mode !== 'dirty-ring') throw new UserError(`--policy: dirty-limit needs the dirty ring (QEMU's dirty-limit capability requires dirty-ring-size), not --tracking ${mode}`);
  if (f.vcpuDirtyLimit !== undefined && f.policy !== 'dirty-limit') throw new UserError(`--vcpu-dirty-limit: '${f.vcpuDirtyLimit}' is the dirty-limit policy's quota; it needs --policy dirty-limit (for a limit from the start: --dirty-limit)`);
  const bandwidth = f.bandwidth === 'unlimited' ? 0 : parseSize(f.bandwidth, '--bandwidth');
  const pages = memoryBytes / PAGE_SIZE;
  const slots = int('--slots', f.slots, 1, 32767);
  if (pages < slots) throw new UserError(`--slots: ${slots} slots do not fit in ${f.memory} (${pages} pages)`);
  const scenario: MigrationScenario = {
    tracking: mode, vcpus: int('--vcpus', f.vcpus, 1, 64), memoryBytes, slots, ringEntries: ringSize('--ring-size', f.ringSize),
    workload: {
      ...DEFAULT_WORKLOAD, name: parseWorkloadName(f.workload, '--workload'), hotFraction: fraction('--hot-fraction', f.hotFraction),
      hotShare: fraction('--hot-share', f.hotShare), writePercent: int('--write-percent', f.writePercent, 0, 100),
      opRate: f.opRate !== undefined ? int('--op-rate', f.opRate, 1, MAX_OP_RATE) : 0,
    },
    dirtyLimit: f.dirtyLimit !== undefined ? dirtyRate('--dirty-limit', f.dirtyLimit) : 0,
    seed: int('--seed', f.seed, 0, 0xffffffff),
    bugs: bugs.map((b) => b.name),
    hostWriteEvery: f.hostWriteEvery === undefined ? Number(DEFAULT_HOST_WRITE_EVERY) : int('--host-write-every', f.hostWriteEvery, 0),
    pageHistory: f.pageHistory !== false,
    devices: deviceSetup(f),
    params: {
      bandwidth,
      downtimeLimitMs: positive('--downtime-limit', f.downtimeLimit, 'milliseconds'),
      maxIterations: int('--max-iterations', f.maxIterations, 1),
      timeoutMs: positive('--timeout', f.timeout, 'seconds') * 1000,
      policy: f.policy as ConvergencePolicy,
      vcpuDirtyLimit: f.vcpuDirtyLimit !== undefined ? dirtyRate('--vcpu-dirty-limit', f.vcpuDirtyLimit) : DEFAULT_VCPU_DIRTY_LIMIT,
      batchPages: int('--batch-pages', f.batchPages, 1, 1024), // 4 MiB frames: within the stream ring's RING_MAX_FRAME
      warmupOps: f.warmup !== undefined ? int('--warmup', f.warmup, 0) : driver === 'deterministic' ? Math.min(pages * 2, 20000) : pages,
    },
  };
  for (const b of bugs) {
    const kinds = b.devices ?? [];
    if (kinds.length > 0 && !scenario.devices!.devices.some((d) => kinds.includes(d.kind))) {
      throw new UserError(`--inject ${b.name}: this bug lives in a device (${kinds.join(' or ')}); add one, e.g. --device ${kinds[0]}`);
    }
  }
  const to = target(f);
  if (to && driver !== 'free') throw new UserError(`--to: a TCP destination needs --driver free (the deterministic driver runs on one thread)`);
  if (to && f.resumeOps !== undefined) throw new UserError(`--resume-ops: a destination process resumes the guest itself (vmemlab destination --resume)`);
  const resumeOps = to ? undefined : f.resumeOps !== undefined ? int('--resume-ops', f.resumeOps, 0) : defaultResumeOps(pages, scenario.vcpus);
  return { scenario, driver, to, resumeOps, watchdogMs: positive('--watchdog', f.watchdog, 'seconds') * 1000, burst: int('--burst', f.burst, 1, 1 << 20) };
}

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

export async function migrateCommand(given: Partial<MigrateFlags>, expected?: Expected): Promise<number> {
  const f = migrateFlags(given);
  const { scenario: s, driver, watchdogMs, burst, to, resumeOps } = migrationScenario(f);
  const json = f.json === true;
  const progress = new Progress(json);
  const out = (line: string): void => { if (!json) { progress.clear(); console.log(line); } };
  out(`migrate: ${s.tracking}${s.tracking === 'dirty-ring' ? ` (${s.ringEntries} entries)` : ''}, ${s.vcpus} vCPUs, ${formatSize(s.memoryBytes)}, ` +
    `workload ${s.workload.name}, bandwidth ${s.params.bandwidth ? `${mib(s.params.bandwidth)}/s` : 'unlimited'}, downtime limit ${s.params.downtimeLimitMs} ms, ` +
    `driver ${driver}, destination ${to ? `tcp:${to.host}:${to.port}` : 'in-process'}, seed ${s.seed}${s.bugs.length ? `, injected: ${s.bugs.join(', ')}` : ''}`);
  // Ctrl-C cancels the migration (migrate_cancel) and reports it; a second one exits.
  const cancel = new AbortController();
  const onSigint = (): void => {
    if (cancel.signal.aborted) process.exit(130);
    out('cancelling the migration (Ctrl-C again to exit at once)');
    cancel.abort();
  };
  process.on('SIGINT', onSigint);
  const r: MigrationRunResult = await runMigration(s, {
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
    const also = `${d?.atCompletion ? '; the sweep pattern holds' : ''}${d?.resumed ? `${d.atCompletion ? ' before and after' : ''}; the destination resumed the guest` : ''}`;
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
