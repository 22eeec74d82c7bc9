/**
 * Mediated-device MMIO mapped on fault (docs/mdev.md): the cost of a BAR fault through the
 * whole path, of an access through a mapped BAR page, and the zaps and refaults the vendor's
 * reallocations cause with several VMs sharing the device.
 *
 *   tsx bench/mdev.ts faults   first-access faults on a 64-page BAR backed by a 64-page slice:
 *                              zap everything, fault every page in (faultin + install), in
 *                              four configurations rotated in each repeat: the whole path
 *                              (one validate + remap of the slice, then follow_pfn hits),
 *                              the VMA still mapped (KVM-only faults), 64 one-page resources
 *                              (validate at every fault), and the static mapping (mmapStatic,
 *                              then KVM-only faults: the baseline)
 *   tsx bench/mdev.ts access   KvmBarMmu.access (reads, then writes) through the 64 mapped pages,
 *                              with its oracles, against plain Uint32Array loads / stores at
 *                              the same offsets of 64 pages, alternated
 *   tsx bench/mdev.ts realloc  runMdev, deterministic driver, 2 VMs, 48 reallocations, seeds
 *                              1-3: SPTEs zapped per revocation, faults per grant, retries (exact)
 *   tsx bench/mdev.ts vms      2, 4 and 8 VMs, 48 reallocations, deterministic and free-run
 *                              (worker threads); static beside on-fault for 4 VMs
 *
 * Each case builds what it measures with the emulator's own classes (a Vm with a BAR, as
 * test/kvm-bar-mmu.test.ts does) and never touches what it measures.
 */
import { type KvmBarMmu, createKvmBarMmuLayout } from '../src/host/mmio/kvm-bar-mmu.ts';
import type { MmioResource } from '../src/host/mmio/vendor-driver.ts';
import { createVendorDriverLayout } from '../src/host/mmio/vendor-driver.ts';
import { createVfioBarMappingLayout } from '../src/host/mmio/vfio-bar-mapping.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { Vm, type VmBar } from '../src/host/vm.ts';
import { MDEV_DEFAULTS, type MdevConfig, type MdevResult, runMdev } from '../src/scenarios/mdev.ts';
import { BITMAP_MANUAL, type Figure, type Sample, alternate, caseArgs, consume, drive, emit, median, mps, rate, sinkValue } from './harness.ts';

const BAR_GFN = 0x10000;
const PAGES = 64;
/** vCPU 0's mmu_lock holder id (Vcpu passes index + 1). */
const HOLDER = 1;

/** One VM with a virtual BAR over `resources`, the device's MMIO `mmioPages` pages, nothing allocated yet. */
function barVm(resources: MmioResource[], mmioPages: number): VmBar {
  const driver = createVendorDriverLayout({ vms: 1, mmioPages, resources });
  const vm = new Vm(createVmLayout({
    slots: [{ id: 1, asId: 0, baseGfn: 0, pages: 16, flags: 0 }], vcpus: 1, tracking: BITMAP_MANUAL,
    bars: [{ mmu: createKvmBarMmuLayout(0, BAR_GFN, driver.barPages), mapping: createVfioBarMappingLayout(0, driver.barPages), driver }],
  }));
  return vm.bars[0]!;
}

/** A 64-page BAR: one 64-page resource, the whole slice allocated to the VM. */
function wholeSliceBar(): VmBar {
  const bar = barVm([{ name: 'vram', barOffset: 0, maxPages: PAGES, writable: true }], PAGES);
  if (bar.driver.allocate(0, 0, PAGES) === null) throw new Error('bench: allocation failed');
  return bar;
}

/** A 64-page BAR of 64 one-page resources, each allocated: every first access validates. */
function onePageResourcesBar(): VmBar {
  const res: MmioResource[] = Array.from({ length: PAGES }, (_, i) => ({ name: `r${i}`, barOffset: i, maxPages: 1, writable: true }));
  const bar = barVm(res, PAGES);
  for (let r = 0; r < PAGES; r++) if (bar.driver.allocate(0, r, 1) === null) throw new Error('bench: allocation failed');
  return bar;
}

/** The whole fault of a vCPU's write to BAR page `p`: faultin (seq, follow_pfn, the driver's handler on a miss), then install under mmu_lock. */
function fault(mmu: KvmBarMmu, p: number): void {
  const f = mmu.faultin(p, true, 0);
  if (!f.ok) throw new Error(`bench: fault on BAR page ${p} refused: ${f.why}`);
  const r = mmu.install(p, f, HOLDER);
  if (r !== 'installed') throw new Error(`bench: install of BAR page ${p}: ${r}`);
}

/** unmap_mapping_range over the whole BAR: KVM's notifier zaps the SPTEs and flushes, the VMA's entries go. */
const zapAll = (bar: VmBar) => (): void => { drive(bar.mapping.unmapMappingRange(0, PAGES)); };
/** KVM's notifier alone over the whole BAR (the VMA keeps its entries): invalidate_range_start, _end. */
const zapKvm = (bar: VmBar) => (): void => { drive(bar.mmu.invalidateRangeStart(0, PAGES)); bar.mmu.invalidateRangeEnd(0, PAGES); };

interface FaultSample extends Sample { zapSeconds: number; rounds: number }

/** Rounds of (zap, fault every page in) for at least `ms`: faults and the time in the faults alone, the zaps timed apart. */
function faultRounds(bar: VmBar, zap: () => void, ms: number): FaultSample {
  let faultT = 0;
  let zapT = 0;
  let rounds = 0;
  const end = performance.now() + ms;
  for (;;) {
    const t0 = performance.now();
    zap();
    const t1 = performance.now();
    for (let p = 0; p < PAGES; p++) fault(bar.mmu, p);
    const t2 = performance.now();
    zapT += t1 - t0;
    faultT += t2 - t1;
    rounds++;
    if (t2 >= end) break;
  }
  return { ops: rounds * PAGES, seconds: faultT / 1000, zapSeconds: zapT / 1000, rounds };
}

/** Every side once per repeat, the order rotated each repeat, after `warmup` untimed repeats. */
function rotate<S>(reps: number, warmup: number, sides: (() => S)[]): S[][] {
  for (let i = 0; i < warmup; i++) for (const s of sides) s();
  const out: S[][] = sides.map(() => []);
  for (let i = 0; i < reps; i++) {
    for (let j = 0; j < sides.length; j++) {
      const k = (i + j) % sides.length;
      out[k]!.push(sides[k]!());
    }
  }
  return out;
}

const findingCount = (mmu: KvmBarMmu): number => mmu.findings().reduce((n, f) => n + f.count, 0);
const ns = (perSecond: number): string => `${(1e9 / perSecond).toFixed(0)} ns`;

/** The four fault configurations, each with its zap. */
function faultSides(): { name: string; bar: VmBar; zap: () => void }[] {
  const whole = wholeSliceBar();
  const kvmOnly = wholeSliceBar();
  fault(kvmOnly.mmu, 0); // validate + remap of the whole slice once: the VMA maps all 64 pages from now on
  const each = onePageResourcesBar();
  const stat = wholeSliceBar();
  const s = stat.driver.sliceOf(0, 0)!;
  stat.mapping.mmapStatic([{ barPage: 0, pfn: s.pfn, pages: s.pages, writable: true }]);
  return [
    { name: 'whole path', bar: whole, zap: zapAll(whole) },
    { name: 'kvm-only', bar: kvmOnly, zap: zapKvm(kvmOnly) },
    { name: 'validate each', bar: each, zap: zapAll(each) },
    { name: 'static', bar: stat, zap: zapKvm(stat) },
  ];
}

/** The whole path's faults/s in this process (for the vms case's estimate of time spent faulting). */
function wholePathRate(): number {
  const bar = wholeSliceBar();
  const zap = zapAll(bar);
  for (let i = 0; i < 3; i++) faultRounds(bar, zap, 100);
  return median(Array.from({ length: 5 }, () => rate(faultRounds(bar, zap, 100))));
}

function faults(): Figure[] {
  // Short repeats, many of them: on a shared machine a repeat that a neighbour preempts is an outlier the median drops.
  const REPS = 21;
  const MS = 30;
  const sides = faultSides();
  const samples = rotate(REPS, 3, sides.map((s) => () => faultRounds(s.bar, s.zap, MS)));
  const rates = samples.map((xs) => xs.map(rate));
  const med = rates.map(median);
  const baseline = 3; // static
  const ratios = rates.map((xs) => median(xs.map((x, i) => x / rates[baseline]![i]!)));
  const zapUs = samples.map((xs) => median(xs.map((x) => (x.zapSeconds / x.rounds) * 1e6)));
  const roundUs = samples.map((xs) => median(xs.map((x) => (x.seconds / x.rounds) * 1e6)));
  const found = sides.map((s) => findingCount(s.bar.mmu));
  const clean = found.every((n) => n === 0) ? 'no oracle finding in any configuration' : `!!! ORACLE FINDINGS: ${sides.map((s, i) => `${s.name} ${found[i]}`).join(', ')} !!!`;
  const how = `${REPS} repeats of at least ${MS} ms per configuration, the four rotated within each repeat, after 3 warm-up repeats; each round zaps the whole 64-page BAR (not timed with the faults) then faults pages 0-63 in with writes (KvmBarMmu.faultin + install, as a vCPU's two steps); ratios are per repeat against the static mapping's rate, then the median; ${clean}`;
  const rateText = (i: number): string => `${mps(med[i]!)} faults/s (${ns(med[i]!)}/fault), ${ratios[i]!.toFixed(2)}x the static mapping's`;
  const validateUs = roundUs[0]! - roundUs[1]!;
  return [
    {
      id: 'mdev/faults/whole-path', what: 'first-access BAR faults through the whole path (faultin: seq, follow_pfn, on the slice\'s first page the driver\'s handler: validate_map_request + remap of the 64-page slice; install under mmu_lock), 64-page BAR',
      figure: rateText(0), value: ratios[0]!,
      detail: `whole path: unmap_mapping_range of the BAR (VMA entries and SPTEs) then 64 faults, the first running validate and remapping all 64 pages, the other 63 finding the VMA entry (follow_pfn hit); ${(med[0]! / 1e6).toFixed(2)} M faults/s against ${(med[3]! / 1e6).toFixed(2)} M/s static; per repeat ${rates[0]!.map((x) => (x / 1e6).toFixed(2)).join(', ')} M/s; ${how}`,
    },
    {
      id: 'mdev/faults/kvm-only', what: 'BAR faults with the VMA entry already present (only KVM\'s SPTEs zapped: follow_pfn hit, no validate)',
      figure: rateText(1), value: ratios[1]!,
      detail: `KVM's notifier alone zaps the 64 SPTEs (invalidate_range_start + _end), the VMA keeps its validated entries; ${(med[1]! / 1e6).toFixed(2)} M faults/s; per repeat ${rates[1]!.map((x) => (x / 1e6).toFixed(2)).join(', ')} M/s; ${how}`,
    },
    {
      id: 'mdev/faults/validate-each', what: 'BAR faults that each run validate_map_request and remap one page (64 one-page resources)',
      figure: rateText(2), value: ratios[2]!,
      detail: `the BAR as 64 one-page resources, each allocated: every fault misses in the VMA and runs the handler (validate_map_request, the kernel's checks, remap of 1 page); validate's resource lookup scans the 64 resources linearly (VendorDriver.resourceAt), part of this cost; ${(med[2]! / 1e6).toFixed(2)} M faults/s; per repeat ${rates[2]!.map((x) => (x / 1e6).toFixed(2)).join(', ')} M/s; ${how}`,
    },
    {
      id: 'mdev/faults/static', what: 'the static alternative: the slice mapped by mmapStatic, then only KVM\'s faults (the baseline)',
      figure: `${mps(med[3]!)} faults/s (${ns(med[3]!)}/fault)`, value: med[3]!,
      detail: `mmapStatic maps the 64-page slice 1:1 once; rounds zap KVM's SPTEs through the notifier and fault them in again: the same code path as kvm-only, the entries flagged static instead of validated; per repeat ${rates[3]!.map((x) => (x / 1e6).toFixed(2)).join(', ')} M/s; ${how}`,
    },
    {
      id: 'mdev/faults/validate-cost', what: 'validate_map_request + remap of a 64-page slice, by difference: a round of 64 faults on the whole path minus one with the VMA present',
      figure: `${validateUs.toFixed(2)} us per slice (rounds ${roundUs[0]!.toFixed(2)} us vs ${roundUs[1]!.toFixed(2)} us)`, value: validateUs,
      detail: `medians of the time of one round's 64 faults: whole path ${roundUs[0]!.toFixed(2)} us, VMA present ${roundUs[1]!.toFixed(2)} us, 64 one-page validates ${roundUs[2]!.toFixed(2)} us, static ${roundUs[3]!.toFixed(2)} us; the difference is one handler run (validate, the checks of 64 pfns, remap of 64 entries) plus whatever the emptied VMA costs the faults after it; ${how}`,
    },
    {
      id: 'mdev/faults/zap', what: 'zapping the whole 64-page BAR: unmap_mapping_range (notifier: 64 SPTEs zapped + remote TLB flush, then 64 VMA entries one by one) vs KVM\'s notifier alone',
      figure: `${zapUs[0]!.toFixed(2)} us unmap_mapping_range, ${zapUs[1]!.toFixed(2)} us notifier alone`, value: zapUs[0]!,
      detail: `medians per zap, timed apart from the faults in the same rounds: unmap_mapping_range ${zapUs[0]!.toFixed(2)} us (64 one-page resources: ${zapUs[2]!.toFixed(2)} us), notifier-only ${zapUs[1]!.toFixed(2)} us (static: ${zapUs[3]!.toFixed(2)} us); driven to completion on this thread, no vCPU in guest mode (the flush waits for nobody)`,
    },
  ];
}

/** `n` accesses through the BAR's SPTEs (page i & 63), in chunks, for at least `ms`. */
function barAccess(mmu: KvmBarMmu, write: boolean, ms: number): Sample {
  let ops = 0;
  let sum = 0;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < ms) {
    for (let i = 0; i < 4096; i++) {
      const a = mmu.access(i & (PAGES - 1), write, i);
      if (!a.done) throw new Error('bench: BAR access not done');
      sum = (sum + a.value) | 0;
    }
    ops += 4096;
    t = performance.now();
  }
  consume(sum);
  return { ops, seconds: (t - t0) / 1000 };
}

/** The same accesses as plain Uint32Array loads / stores at the first word of each of 64 pages. */
function plainAccess(u32: Uint32Array, write: boolean, ms: number): Sample {
  let ops = 0;
  let sum = 0;
  const stride = PAGE_SIZE / 4;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < ms) {
    if (write) for (let i = 0; i < 4096; i++) { u32[(i & (PAGES - 1)) * stride] = i; sum = (sum + i) | 0; }
    else for (let i = 0; i < 4096; i++) sum = (sum + u32[(i & (PAGES - 1)) * stride]!) | 0;
    ops += 4096;
    t = performance.now();
  }
  consume(sum);
  return { ops, seconds: (t - t0) / 1000 };
}

function access(): Figure[] {
  const REPS = 15;
  const MS = 40;
  const bar = wholeSliceBar();
  for (let p = 0; p < PAGES; p++) fault(bar.mmu, p);
  const u32 = new Uint32Array(new SharedArrayBuffer(PAGES * PAGE_SIZE));
  const figures: Figure[] = [];
  for (const write of [false, true]) {
    const r = alternate(REPS, 2, () => barAccess(bar.mmu, write, MS), () => plainAccess(u32, write, MS));
    const ratio = median(r.ratios);
    const kind = write ? 'writes' : 'reads';
    figures.push({
      id: `mdev/access/${kind}`, what: `${kind} through mapped BAR pages (KvmBarMmu.access: SPTE, owner + generation + VMA oracles, the device's word), vs plain Uint32Array ${write ? 'stores' : 'loads'} over 64 pages`,
      figure: `${ratio.toFixed(4)}x (${mps(median(r.a))} BAR ${kind}/s)`, value: ratio,
      detail: `64 BAR pages faulted in once, then page i & 63 in turn: ${mps(median(r.a))}/s (${ns(median(r.a))} each) through KvmBarMmu.access against ${mps(median(r.b))}/s plain ${write ? 'stores' : 'loads'} at the same page offsets of a SharedArrayBuffer-backed Uint32Array; ${REPS} paired repeats of ${MS} ms after 2 warm-up pairs, sides alternating (who goes first too); `
        + `per-repeat ratios ${r.ratios.map((x) => x.toFixed(4)).join(', ')}; oracle findings after the runs: ${findingCount(bar.mmu)}`,
    });
  }
  return figures;
}

interface Totals { faults: number; installs: number; retries: number; zapped: number; prefetched: number; refused: number; findings: number; stopped: number }
function totals(r: MdevResult): Totals {
  const t: Totals = { faults: 0, installs: 0, retries: 0, zapped: 0, prefetched: 0, refused: 0, findings: 0, stopped: 0 };
  for (const v of r.vms) {
    t.faults += v.faults; t.installs += v.installs; t.retries += v.retries; t.zapped += v.zapped; t.prefetched += v.prefetched; t.refused += v.refused;
    t.findings += v.findings.reduce((n, f) => n + f.count, 0);
    if (v.stopped !== null) t.stopped++;
  }
  return t;
}

/** The findings and failures, loudly, or '' when none. */
function alarm(r: MdevResult, t: Totals): string {
  const parts: string[] = [];
  if (t.findings > 0) {
    const kinds = r.vms.flatMap((v) => v.findings.filter((f) => f.count > 0).map((f) => `vm${v.vm} ${f.count} ${f.kind} (first at BAR page ${f.firstPage})`));
    parts.push(`!!! ${t.findings} ISOLATION FINDING(S) WITHOUT ANY INJECTED BUG: ${kinds.join(', ')} !!!`);
  }
  if (r.status !== 'passed') parts.push(`!!! STATUS ${r.status.toUpperCase()}: ${r.errors.join('; ')} !!!`);
  if (t.stopped > 0) parts.push(`!!! ${t.stopped} VM(S) STOPPED !!!`);
  if ((r.vendor?.unresponsive.length ?? 0) > 0) parts.push(`vendor found VMs unresponsive: ${JSON.stringify(r.vendor!.unresponsive)}`);
  return parts.join(' ');
}

const perVm = (r: MdevResult): string => r.vms.map((v) => `vm${v.vm} ${v.faults}/${v.installs}/${v.retries}/${v.zapped}/${v.prefetched}/${v.refused}`).join(', ');
const vendorText = (r: MdevResult): string => r.vendor === null ? 'no vendor report'
  : `${r.vendor.grants} grants, ${r.vendor.revokes} revocations (${r.vendor.evictions} evictions), ${r.vendor.unmapped} VMA entries unmapped, ${r.vendor.refusedGrants} grants refused`;

async function realloc(): Promise<Figure[]> {
  const figures: Figure[] = [];
  const DET = { driver: 'deterministic' as const, watchdogMs: 30_000, burst: 64 };
  for (const seed of [1, 2, 3]) {
    const c: MdevConfig = { ...MDEV_DEFAULTS, vms: 2, reallocations: 48, seed };
    const r = await runMdev(c, DET);
    const t = totals(r);
    const v = r.vendor;
    const revokes = v?.revokes ?? 0;
    const grants = v?.grants ?? 0;
    const loud = alarm(r, t);
    figures.push({
      id: `mdev/realloc/seed${seed}`, what: `2 VMs, 48 reallocations, deterministic driver, seed ${seed}: zaps and refaults per reallocation (exact)`,
      figure: `${(t.zapped / revokes).toFixed(2)} SPTEs zapped/revocation, ${(t.faults / grants).toFixed(2)} faults/grant, ${t.retries} retries${loud ? ` ${loud}` : ''}`, value: t.zapped / revokes,
      detail: `${r.status}, ${r.steps} steps; ${vendorText(r)}; over both VMs ${t.faults} faults, ${t.installs} SPTEs installed, ${t.retries} installs retried, ${t.zapped} SPTEs zapped, ${t.prefetched} prefetched, ${t.refused} refused, ${t.findings} oracle findings; `
        + `faults per grant counts every fault, the first touches of each VM's status and doorbell pages (6 pages per VM, never revoked) included; per VM faults/installs/retries/zapped/prefetched/refused: ${perVm(r)}${loud ? `; ${loud}` : ''}`,
    });
  }
  return figures;
}

interface VmsRun { n: number; driver: 'deterministic' | 'free'; mapping: MdevConfig['mapping'] }

async function vms(): Promise<Figure[]> {
  const faultRate = wholePathRate();
  const perFaultNs = 1e9 / faultRate;
  const runs: VmsRun[] = [];
  for (const n of [2, 4, 8]) {
    runs.push({ n, driver: 'deterministic', mapping: 'on-fault' });
    if (n === 4) runs.push({ n, driver: 'deterministic', mapping: 'static' });
  }
  for (const n of [2, 4, 8]) {
    runs.push({ n, driver: 'free', mapping: 'on-fault' });
    if (n === 4) runs.push({ n, driver: 'free', mapping: 'static' });
  }
  const figures: Figure[] = [];
  for (const run of runs) {
    const c: MdevConfig = { ...MDEV_DEFAULTS, vms: run.n, reallocations: 48, mapping: run.mapping, seed: 1 };
    const o = { driver: run.driver, watchdogMs: 30_000, burst: 64 };
    const seen: { first: number | null } = { first: null };
    let t0 = performance.now();
    const onTick = run.driver === 'free' ? (p: number[]): void => { if (seen.first === null && p.some((x) => x > 0)) seen.first = performance.now(); } : undefined;
    let r = await runMdev(c, { ...o, onTick });
    const end = performance.now();
    let wallMs = end - t0;
    let detTimes = '';
    let repeatable = '';
    if (run.driver === 'deterministic') {
      // Cheap: two more runs for the median wall time, and a check that the counts repeat.
      const times = [wallMs];
      for (let i = 0; i < 2; i++) {
        t0 = performance.now();
        const again = await runMdev(c, o);
        times.push(performance.now() - t0);
        const same = again.steps === r.steps && JSON.stringify(totals(again)) === JSON.stringify(totals(r));
        if (!same) repeatable = ' !!! A SECOND DETERMINISTIC RUN GAVE OTHER COUNTS !!!';
        r = again;
      }
      wallMs = median(times);
      detTimes = `wall ${times.map((x) => x.toFixed(0)).join(', ')} ms over 3 runs (the same counts each time${repeatable ? ': NO' : ''})`;
    }
    const t = totals(r);
    const loud = alarm(r, t) + repeatable;
    const faultingMs = (t.faults * perFaultNs) / 1e6;
    const workload = seen.first !== null ? `; the roles ran about ${((end - seen.first) / 1000).toFixed(1)} s of it (from the first 250 ms watchdog tick that saw a role's progress to runMdev's return, teardown included), the rest passed before any role made progress: spawning the worker threads, each loading the TypeScript sources through tsx's bootstrap (src/drivers/spawn.ts), until all were online` : '';
    const label = `${run.n} VMs, ${run.mapping}, ${run.driver === 'free' ? 'free-run' : 'deterministic'}`;
    figures.push({
      id: `mdev/vms/${run.n}/${run.mapping}/${run.driver === 'free' ? 'free' : 'det'}`,
      what: `${label}: 2 vCPUs each, 48 reallocations, seed 1`,
      figure: `${run.driver === 'free' ? `${(wallMs / 1000).toFixed(1)} s` : `${wallMs.toFixed(0)} ms, ${r.steps} steps`}; ${t.faults} faults, ${t.zapped} zapped, ${t.retries} retries, ${t.prefetched} prefetched; ${t.findings} findings${loud ? ` ${loud}` : ''}`,
      value: wallMs,
      detail: `${label}: ${r.status}; wall time ${(wallMs / 1000).toFixed(2)} s${detTimes ? ` (median: ${detTimes})` : ''}${workload}; ${vendorText(r)}; over all VMs ${t.faults} faults, ${t.installs} installs, ${t.retries} retries, ${t.zapped} SPTEs zapped, ${t.prefetched} prefetched, ${t.refused} refused, ${t.stopped} VMs stopped, ${t.findings} isolation findings; `
        + `time spent faulting, estimated (not measured in the run): ${t.faults} faults x ${perFaultNs.toFixed(0)} ns (the whole-path fault measured single-threaded in this process before the runs, median of 5 x 100 ms after 3 warm-up, no contention) = ${faultingMs < 1 ? `${(faultingMs * 1000).toFixed(0)} us` : `${faultingMs.toFixed(2)} ms`}; `
        + `per VM faults/installs/retries/zapped/prefetched/refused: ${perVm(r)}${loud ? `; ${loud}` : ''}`,
    });
  }
  return figures;
}

const [which = 'faults'] = caseArgs();
const run = { faults, access, realloc, vms }[which];
if (run === undefined) throw new Error(`unknown case '${which}' (faults, access, realloc, vms)`);
emit(await run());
if (process.env['BENCH_VERBOSE']) console.error(`checksum ${sinkValue()}`);
process.exit(0);
