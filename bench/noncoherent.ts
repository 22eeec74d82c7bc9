/**
 * Memory types and non-coherent DMA (issue 14): the CPU cache model's cost, the zap of
 * every SPTE on a non-coherent DMA transition, and the migration policies on the same guest.
 *
 *   tsx bench/noncoherent.ts cache     a vCPU's random writes over 4 MiB on a VM with the
 *                                      cache model (every store through it, no fast path)
 *                                      against the same VM without it, alternated
 *   tsx bench/noncoherent.ts zap       kvm_arch_register_noncoherent_dma's 0 -> 1 on a 1 GiB
 *                                      and a 16 GiB guest with every SPTE present: time, SPTEs zapped
 *   tsx bench/noncoherent.ts policies  a guest rendering through a no-snoop device, migrating
 *                                      under each policy (deterministic: exact counts)
 *   tsx bench/noncoherent.ts policies-free  the same under free run: time, downtime, guest throughput
 */
import { DEFAULT_WORKLOAD, createWorkload } from '../src/guest/workload.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { DEFAULT_CPU_CACHE } from '../src/host/cpu-cache.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import type { Vm } from '../src/host/vm.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { BITMAP_MANUAL, type Figure, type Sample, alternate, caseArgs, drive, emit, median, singleSlotVm } from './harness.ts';

const MiB = 1 << 20;
const GiB = 1 << 30;

function vmOf(bytes: number, cache: boolean): Vm {
  return singleSlotVm(bytes / PAGE_SIZE, 1, BITMAP_MANUAL, cache ? { cpuCache: DEFAULT_CPU_CACHE } : {});
}

/** Runs the vCPU for at least `ms`: its operations retired. */
function timed(v: Vcpu, ms: number): Sample {
  const start = v.retired;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < ms) { v.runBurst(4096); t = performance.now(); }
  return { ops: v.retired - start, seconds: (t - t0) / 1000 };
}

function cache(): Figure[] {
  const ranges = [{ baseGfn: 0x100, pages: 4 * MiB / PAGE_SIZE }];
  const cached = new Vcpu(vmOf(4 * MiB, true), 0, createWorkload(DEFAULT_WORKLOAD, ranges, 0, 1, 3));
  const plain = new Vcpu(vmOf(4 * MiB, false), 0, createWorkload(DEFAULT_WORKLOAD, ranges, 0, 1, 3));
  const r = alternate(7, 2, () => timed(cached, 200), () => timed(plain, 200));
  const ratio = median(r.ratios);
  return [{
    id: 'noncoherent/cache', what: 'a vCPU\'s random writes over 4 MiB with the CPU cache model (every store through it), vs the same VM without the model',
    figure: `${ratio.toFixed(3)}x (${(median(r.a) / 1e6).toFixed(2)} M cached stores/s)`, value: ratio,
    detail: `one vCPU, dirty_log_test's random guest over 4 MiB (1024 pages, 16384 lines against a 2 MiB cache of 32768 lines, 8 ways), no dirty logging; `
      + `${(median(r.a) / 1e6).toFixed(2)} M stores/s through the cache against ${(median(r.b) / 1e6).toFixed(2)} M/s on the plain write path (its fast path), 7 paired repeats of 200 ms after 2 warm-up pairs`,
  }];
}

function zap(): Figure[] {
  const figures: Figure[] = [];
  for (const bytes of [GiB, 16 * GiB]) {
    const times: number[] = [];
    let zapped = 0;
    for (let rep = 0; rep < 3; rep++) {
      const vm = vmOf(bytes, false);
      const t0 = performance.now();
      zapped = drive(vm.registerNoncoherentDma());
      times.push(performance.now() - t0);
    }
    const ms = median(times);
    figures.push({
      id: `noncoherent/zap/${bytes / GiB}GiB`, what: `kvm_arch_register_noncoherent_dma 0 -> 1 on a ${bytes / GiB} GiB guest, every SPTE present: the zap of all of them and the flush`,
      figure: `${ms.toFixed(1)} ms (${zapped} SPTEs)`, value: ms,
      detail: `median of 3 guests of ${bytes / PAGE_SIZE} pages, populated (every SPTE writable), one vCPU not running: kvm_zap_gfn_range over all gfns (begin, zap, flush, end); ${times.map((t) => t.toFixed(1)).join(', ')} ms`,
    });
  }
  return figures;
}

/**
 * The policies, each on the render guest with a no-snoop device: the migration's own
 * settings, and for device-state and KVM_MEM_DMA the blob slot holding the buffers (the
 * same guest and device, the buffers in a memslot of their own).
 */
const POLICIES: { name: string; settings: Record<string, string> }[] = [
  { name: 'none', settings: { noncoherentMigration: 'none' } },
  { name: 'clflush-before-read', settings: { noncoherentMigration: 'clflush-before-read' } },
  { name: 'switch-to-coherent', settings: { noncoherentMigration: 'switch-to-coherent' } },
  { name: 'switch-host-only', settings: { noncoherentMigration: 'switch-host-only' } },
  { name: 'device-state', settings: { noncoherentMigration: 'device-state', blob: 'kvm-only-ram' } },
  { name: 'kvm-mem-dma', settings: { noncoherentMigration: 'switch-host-only', blob: 'ram', noncoherentRequest: 'kvm-mem-dma' } },
  { name: 'block', settings: { noncoherentMigration: 'block' } },
];
const RENDER = { cpuCache: 'on', workload: 'render', memoryBytes: '4MiB', vcpus: '2', devices: ['dma-engine:snoop=false,every=4,buffers=32,remap-every=0'] };
const flags = (settings: Record<string, string>): string => Object.entries(settings).map(([k, v]) => `${k}=${v}`).join(' ');

async function policies(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const { name, settings } of POLICIES) {
    let lost = 0;
    let stale = 0;
    let flushed = 0;
    let sent = 0;
    let deviceState = 0;
    const verdicts: string[] = [];
    for (const seed of [1, 2, 3]) {
      const { scenario } = migrationSetup({ ...RENDER, driver: 'deterministic', ...settings, seed: String(seed) } as never);
      const r = await runMigration(scenario, { driver: 'deterministic', watchdogMs: 60_000, burst: 64 });
      verdicts.push(r.info === null ? 'refused' : r.status);
      lost += r.mismatchCount;
      stale += r.cache?.staleReads.migration ?? 0;
      flushed += r.cache?.migrationPageFlushes ?? 0;
      sent += (r.info?.normalPages ?? 0) + (r.info?.zeroPages ?? 0);
      deviceState += r.info?.completion?.deviceStatePages ?? 0;
    }
    figures.push({
      id: `noncoherent/policies/${name}`, what: `a guest rendering through a no-snoop device migrating with ${flags(settings)} (deterministic, seeds 1-3)`,
      figure: `${lost} pages stale at the destination, ${flushed} pages flushed (${verdicts.join(', ')})`, value: lost,
      detail: `${name}: ${verdicts.join(', ')}; ${lost} destination pages older than the source, ${stale} stale write-back reads by the migration thread, ${flushed} pages flushed before reading, ${sent} pages sent (${deviceState} of them by the device's save handler)`,
    });
  }
  return figures;
}

/**
 * The same guest under free run (real threads): per policy, the medians of 3 runs of the
 * total time, the downtime and the guest's throughput while it migrated (both vCPUs), with
 * the pages flushed and the destination pages found stale (summed).
 */
async function policiesFree(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const { name, settings } of POLICIES.filter((p) => p.name !== 'block')) {
    const total: number[] = [];
    const down: number[] = [];
    const ops: number[] = [];
    let flushed = 0;
    let lost = 0;
    let stale = 0;
    const verdicts: string[] = [];
    for (let rep = 0; rep < 3; rep++) {
      const { scenario } = migrationSetup({ ...RENDER, driver: 'free', ...settings, seed: String(rep + 1) } as never);
      const r = await runMigration(scenario, { driver: 'free', watchdogMs: 60_000, burst: 64, resumeOps: 0 });
      verdicts.push(r.status === 'passed' ? 'passed' : `${r.status} (${failureOf(r)?.kind ?? 'unknown'})`);
      if (r.info === null) continue;
      total.push(r.info.totalTimeMs);
      down.push(r.info.downtimeMs);
      ops.push(r.info.vcpus.reduce((n, v) => n + v.opsPerSecond, 0));
      flushed += r.cache?.migrationPageFlushes ?? 0;
      lost += r.mismatchCount;
      stale += r.cache?.staleReads.migration ?? 0;
    }
    figures.push({
      id: `noncoherent/policies-free/${name}`, what: `the render guest with a no-snoop device migrating under free run, ${flags(settings)} (3 runs)`,
      figure: `${median(total).toFixed(0)} ms total, ${median(down).toFixed(1)} ms downtime, ${(median(ops) / 1e6).toFixed(2)} M guest ops/s`, value: median(total),
      detail: `${name}: ${verdicts.join(', ')}; medians: total ${median(total).toFixed(0)} ms, downtime ${median(down).toFixed(1)} ms, both vCPUs ${(median(ops) / 1e6).toFixed(2)} M ops/s while it migrated; `
        + `summed: ${flushed} pages flushed, ${lost} destination pages stale, ${stale} stale write-back reads by the migration thread`,
    });
  }
  return figures;
}

const [which = 'cache'] = caseArgs();
const run = { cache, zap, policies, 'policies-free': policiesFree }[which];
if (run === undefined) throw new Error(`unknown case '${which}' (cache, zap, policies, policies-free)`);
emit(await run());
process.exit(0);
