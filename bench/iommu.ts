/**
 * IOMMU benchmarks (issue 4): the IOMMU service's map/unmap, a device's IOVA translation,
 * migration under each DMA tracking mode, and type1's dma_entry_limit.
 *
 *   tsx bench/iommu.ts map-unmap      mapDma + unmapDma of one 4 KiB page, in-process per
 *                                     backend, and as mailbox round trips to the
 *                                     iommu-service role on its own worker thread
 *   tsx bench/iommu.ts translate      DmaEngine.access (warm IOTLB) and DeviceIotlb.lookup
 *                                     vs a plain Int32Array lookup over the same IOVAs
 *   tsx bench/iommu.ts migration      a 256 MiB guest with one device, per DMA tracking
 *                                     mode, free-run, in-process destination
 *   tsx bench/iommu.ts read-pin-dirties  the mdev migration with and without the
 *                                     read-pin-dirties bug: the extra pages it sends
 *   tsx bench/iommu.ts entry-limit    4 KiB mappings into a type1 container until ENOSPC;
 *                                     a 16 GiB guest with the limit raised; iommufd
 */
import type { Worker } from 'node:worker_threads';
import { DEFAULT_WORKLOAD } from '../src/guest/workload.ts';
import { ENOSPC, PAGE_SIZE } from '../src/host/constants.ts';
import { DEVICE_DEFAULTS, type DeviceConfig, type DeviceKind } from '../src/host/devices/device-config.ts';
import { DmaEngine } from '../src/host/devices/dma-engine.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../src/host/iommu/constants.ts';
import { LockHolder } from '../src/host/iommu/domain-lock.ts';
import { type IommuBackendKind, type IommuConfig, IommuWord, MailboxOp, MailboxWord, deviceBase } from '../src/host/iommu/iommu-layout.ts';
import type { Iommu } from '../src/host/iommu/iommu.ts';
import { type DirtyTracking, createVmLayout, type VmLayout } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { actorBase, ActorWord } from '../src/drivers/actor-words.ts';
import type { RoleWorkerData, RunControl } from '../src/drivers/actor-words.ts';
import * as Comlink from 'comlink';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import { spawnWorker } from '../src/drivers/spawn.ts';
import { LINE_WORDS } from '../src/host/layout.ts';
import { slotLayout } from '../src/scenarios/dirty-log-test.ts';
import { type DeviceSetup, attachDevices, deviceWindow, iommuConfigFor } from '../src/scenarios/devices.ts';
import { type MigrationRunResult, type MigrationScenario, runMigration } from '../src/scenarios/migration.ts';
import { Prng } from '../src/util/prng.ts';
import { type Figure, type Sample, alternate, caseArgs, consume, drive, emit, median, mps, sinkValue, settle } from './harness.ts';

const MiB = 1 << 20;
const GiB = 1 << 30;
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
const BITMAP: DirtyTracking = { kind: 'bitmap', manualProtect: true, initiallySet: false };
const verbose = process.env['BENCH_VERBOSE'] !== undefined;
function log(text: string): void {
  if (verbose) console.error(text);
}

/** A VM whose IOMMU has `devices` mailboxes and nothing mapped: the IOVA space covers guest RAM plus a window above it. */
function iommuVm(memoryBytes: number, backend: IommuBackendKind, devices: number, dmaEntryLimit = VFIO_DEFAULT_DMA_ENTRY_LIMIT): { layout: VmLayout; vm: Vm } {
  const slots = slotLayout(memoryBytes, 1);
  const end = slots[0]!.baseGfn + slots[0]!.pages;
  const iommu: IommuConfig = {
    backend, dmaEntryLimit, iovaPages: Math.ceil(end / 1024) * 1024 + 1024, devices,
    tracking: Array.from({ length: devices }, () => 'iommu' as const),
  };
  const layout = createVmLayout({ slots, vcpus: 1, tracking: BITMAP, iommu });
  return { layout, vm: new Vm(layout) };
}

// ---------------------------------------------------------------------------------------
// map-unmap

/** Repeats `body` (one map + one unmap) for at least `ms`; returns the pairs done and the seconds. */
function timed(ms: number, body: () => void): Sample {
  let ops = 0;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < ms) {
    for (let i = 0; i < 64; i++) body();
    ops += 64;
    t = performance.now();
  }
  return { ops, seconds: (t - t0) / 1000 };
}

const MAP_REPS = 7;
const MAP_WARMUP = 2;
const WINDOW_MS = 250;

/** VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA (or IOMMU_IOAS_MAP/UNMAP) of one 4 KiB page, called in-process. */
function inProcess(backend: IommuBackendKind): { rate: number; rates: number[] } {
  const { vm } = iommuVm(64 * MiB, backend, 0);
  const iommu = vm.iommu!;
  const slot = vm.memory.slots[0]!;
  const iova = (slot.baseGfn + slot.pages + 16) * PAGE_SIZE; // above guest RAM, like a device's window
  const gpa = (slot.baseGfn + 7) * PAGE_SIZE;
  const pair = (): void => {
    if (!iommu.lock.tryAcquire(LockHolder.SERVICE)) throw new Error('lock taken');
    const m = iommu.mapDma(iova, PAGE_SIZE, gpa, RW);
    iommu.lock.release();
    if (m.ret !== 0) throw new Error(m.detail);
    const u = drive(iommu.unmapDma(iova, PAGE_SIZE));
    if (u.ret !== PAGE_SIZE) throw new Error(`unmap returned ${u.ret}: ${u.detail}`);
  };
  for (let i = 0; i < MAP_WARMUP; i++) timed(WINDOW_MS, pair);
  const rates = Array.from({ length: MAP_REPS }, () => { const s = timed(WINDOW_MS, pair); return s.ops / s.seconds; });
  const st = iommu.stats();
  if (st.entries !== 0 || st.mapErrors + st.unmapErrors !== 0 || st.maps !== st.unmaps) throw new Error(`in-process ${backend}: ${JSON.stringify(st)}`);
  return { rate: median(rates), rates };
}

/**
 * The same pair as mailbox requests to the iommu-service role, which runs on its own
 * worker thread in the free-run driver's loop (runFreeLoop: spin 50 us, then park on the
 * doorbell). This thread plays a device's driver: it writes the request, rings the
 * doorbell and waits for the answer the same way (spin 50 us, then park on RESP_SEQ).
 * The device is quiesced (it holds no IOTLB entries), so an unmap's invalidation does not
 * wait for an acknowledgement.
 */
async function throughService(backend: IommuBackendKind): Promise<{ rate: number; rates: number[]; roundTripUs: number; parks: number }> {
  const { layout, vm } = iommuVm(64 * MiB, backend, 1);
  const iommu = vm.iommu!;
  const actors = new SharedArrayBuffer(2 * LINE_WORDS * 4);
  const actorWords = new Int32Array(actors);
  const data: RoleWorkerData = { layout, bugs: [], spec: { kind: 'iommu-service' }, actors, actor: 0, burst: 256 };
  const worker: Worker = spawnWorker('role', data);
  const errors: string[] = [];
  await new Promise<void>((resolve, reject) => {
    const control: RunControl = { ready: () => resolve(), event: (_a, e) => errors.push(JSON.stringify(e)), done: () => {} };
    Comlink.expose(control, nodeEndpoint(worker));
    worker.once('error', reject);
  });
  Atomics.store(actorWords, ActorWord.START, 1); // the free-run driver's start barrier
  Atomics.notify(actorWords, ActorWord.START);
  const w = iommu.words;
  const b = deviceBase(0);
  const slot = vm.memory.slots[0]!;
  const window = slot.baseGfn + slot.pages + 16;
  let parks = 0;
  const request = (op: MailboxOp): number => {
    w[b + MailboxWord.OP] = op;
    w[b + MailboxWord.IOVA] = window;
    w[b + MailboxWord.PAGES] = 1;
    w[b + MailboxWord.GFN] = slot.baseGfn + 7;
    w[b + MailboxWord.PROT] = RW;
    const seq = Atomics.add(w, b + MailboxWord.REQ_SEQ, 1) + 1;
    Atomics.add(w, IommuWord.DOORBELL, 1);
    Atomics.notify(w, IommuWord.DOORBELL);
    let spins = 0;
    let spinStart = 0;
    for (;;) {
      const got = Atomics.load(w, b + MailboxWord.RESP_SEQ);
      if (got === seq) return w[b + MailboxWord.RESULT]!;
      if (spins++ === 0) spinStart = performance.now();
      if (spins < 32 || performance.now() - spinStart < 0.05) continue;
      parks++;
      Atomics.wait(w, b + MailboxWord.RESP_SEQ, got, 1);
    }
  };
  const pair = (): void => {
    const m = request(MailboxOp.MAP);
    if (m !== 0) throw new Error(`map through the service: ${m} ${errors.join('; ')}`);
    const u = request(MailboxOp.UNMAP);
    if (u !== 0) throw new Error(`unmap through the service: ${u} ${errors.join('; ')}`);
  };
  try {
    for (let i = 0; i < MAP_WARMUP; i++) timed(WINDOW_MS, pair);
    parks = 0;
    let total = 0;
    let seconds = 0;
    const rates = Array.from({ length: MAP_REPS }, () => {
      const s = timed(WINDOW_MS, pair);
      total += s.ops;
      seconds += s.seconds;
      return s.ops / s.seconds;
    });
    const st = iommu.stats();
    if (st.entries !== 0 || st.mapErrors + st.unmapErrors !== 0 || errors.length > 0) throw new Error(`service ${backend}: ${JSON.stringify(st)} ${errors.join('; ')}`);
    const progress = Atomics.load(actorWords, actorBase(0) + ActorWord.PROGRESS);
    log(`service ${backend}: ${total} pairs, service steps ${progress}, client parks ${parks}`);
    return { rate: median(rates), rates, roundTripUs: (seconds * 1e6) / (2 * total), parks: parks / total };
  } finally {
    Atomics.store(actorWords, ActorWord.SHUTDOWN, 1);
    await worker.terminate();
  }
}

function kps(x: number): string {
  return x >= 1e6 ? `${mps(x)}` : `${(x / 1e3).toFixed(x >= 1e5 ? 0 : 1)} k`;
}

async function mapUnmap(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const backend of ['type1', 'iommufd'] as const) {
    const r = inProcess(backend);
    figures.push({
      id: `iommu/map-unmap/in-process/${backend}`,
      what: `${backend === 'type1' ? 'VFIO_IOMMU_MAP_DMA + UNMAP_DMA (type1)' : 'IOMMU_IOAS_MAP + UNMAP (iommufd)'} of one 4 KiB page, called in-process, no devices`,
      figure: `${kps(r.rate)}maps+unmaps/s`, value: r.rate,
      detail: `Iommu.mapDma (domain lock taken around it, as the service does) then Iommu.unmapDma run to completion, repeated at one IOVA above a 64 MiB guest's RAM; `
        + `median of ${MAP_REPS} windows of ${WINDOW_MS} ms after ${MAP_WARMUP} warm-up windows (${r.rates.map((x) => kps(x).trim()).join(', ')} pairs/s)`,
    });
  }
  for (const backend of ['type1', 'iommufd'] as const) {
    const r = await throughService(backend);
    figures.push({
      id: `iommu/map-unmap/service/${backend}`,
      what: `map + unmap of one 4 KiB page as mailbox requests to the iommu-service role on a worker thread (${backend})`,
      figure: `${kps(r.rate)}maps+unmaps/s`, value: r.rate,
      detail: `the service runs in the free-run driver's loop on its own thread (spin 50 us, then park on the doorbell); this thread writes each request, rings the doorbell and waits for RESP_SEQ (spin 50 us, then Atomics.wait); `
        + `${r.roundTripUs.toFixed(1)} us per request round trip on average, the client parked ${r.parks.toFixed(2)} times per pair (a request not answered within its 50 us spin); the device is quiesced, so an unmap's IOTLB invalidation waits for nobody; `
        + `median of ${MAP_REPS} windows of ${WINDOW_MS} ms after ${MAP_WARMUP} warm-up windows (${r.rates.map((x) => kps(x).trim()).join(', ')} pairs/s)`,
    });
  }
  return figures;
}

// ---------------------------------------------------------------------------------------
// translate

const T_REPS = 7;
const T_WARMUP = 3;

function translate(): Figure[] {
  const setup: DeviceSetup = {
    backend: 'iommufd', dmaEntryLimit: VFIO_DEFAULT_DMA_ENTRY_LIMIT, stopOnFault: false,
    devices: [{ kind: 'dma-engine', ...DEVICE_DEFAULTS }],
  };
  const config = setup.devices[0]!;
  const slots = slotLayout(64 * MiB, 1);
  const layout = createVmLayout({ slots, vcpus: 1, tracking: BITMAP, iommu: iommuConfigFor(setup, slots)! });
  const vm = new Vm(layout);
  vm.populate();
  attachDevices(vm, setup, 1);
  const window = deviceWindow(setup, 0, vm)!;
  const engine = new DmaEngine(vm, 0, config, 1, window);
  const iommu: Iommu = vm.iommu!;
  // A working set of as many buffers as the IOTLB has entries: consecutive IOVAs from the
  // window's base (a multiple of 1024) land in distinct entries of the direct-mapped IOTLB.
  const ws = config.iotlbEntries;
  if (ws > config.buffers) throw new Error('the working set needs more buffers than the device maps');
  const SEQ = 4096;
  const seq = new Int32Array(SEQ);
  const prng = new Prng(Prng.derive(7, 0));
  for (let i = 0; i < SEQ; i++) seq[i] = window.base + prng.below(ws);
  // The baseline's table: a flat Int32Array of gfns by IOVA page (what the I/O page table holds, without Atomics).
  const flat = new Int32Array(layout.iommu!.config.iovaPages);
  for (let i = 0; i < ws; i++) flat[window.base + i] = iommu.table.gfn(window.base + i);
  const slot = vm.memory.slots[0]!;
  const mem = slot.u32[0]!;
  const baseGfn = slot.baseGfn;
  // Warm the IOTLB: one miss per working-set page, then every access hits.
  for (let i = 0; i < ws; i++) engine.access(window.base + i, false);
  const missesWarm = engine.iotlb.misses;

  const N_ACCESS = 2_000_000;
  const N_LOOKUP = 10_000_000;
  const access = (): Sample => {
    const t0 = performance.now();
    for (let k = 0; k < N_ACCESS; k++) engine.access(seq[k & (SEQ - 1)]!, false);
    const seconds = (performance.now() - t0) / 1000;
    consume(engine.iotlb.hits);
    return { ops: N_ACCESS, seconds };
  };
  const plainRead = (): Sample => {
    let sum = 0;
    const t0 = performance.now();
    for (let k = 0; k < N_ACCESS; k++) {
      const i = (flat[seq[k & (SEQ - 1)]!]! - baseGfn) * 1024;
      sum = (sum + mem[i]! + mem[i + 1]!) | 0;
    }
    const seconds = (performance.now() - t0) / 1000;
    consume(sum);
    return { ops: N_ACCESS, seconds };
  };
  const lookup = (): Sample => {
    const tlb = engine.iotlb;
    let sum = 0;
    const t0 = performance.now();
    for (let k = 0; k < N_LOOKUP; k++) sum = (sum + tlb.lookup(seq[k & (SEQ - 1)]!)) | 0;
    const seconds = (performance.now() - t0) / 1000;
    consume(sum);
    return { ops: N_LOOKUP, seconds };
  };
  const plainLookup = (): Sample => {
    let sum = 0;
    const t0 = performance.now();
    for (let k = 0; k < N_LOOKUP; k++) sum = (sum + flat[seq[k & (SEQ - 1)]!]!) | 0;
    const seconds = (performance.now() - t0) / 1000;
    consume(sum);
    return { ops: N_LOOKUP, seconds };
  };
  const a = alternate(T_REPS, T_WARMUP, access, plainRead);
  const l = alternate(T_REPS, T_WARMUP, lookup, plainLookup);
  const misses = engine.iotlb.misses - missesWarm;
  const faults = iommu.dmaRecords.records().length;
  if (misses !== 0 || faults !== 0) throw new Error(`translate: ${misses} IOTLB misses and ${faults} faults while measured`);
  const ra = median(a.ratios);
  const rl = median(l.ratios);
  const common = `working set ${ws} IOVA pages (the device's first ${ws} buffers, 4 KiB mappings in its window) in a ${ws}-entry IOTLB (DEVICE_DEFAULTS), warmed with one miss each, no miss while measured (checked); `
    + `IOVAs drawn from a ${SEQ}-entry random sequence both sides replay; median of ${T_REPS} paired ratios after ${T_WARMUP} warm-up pairs`;
  return [{
    id: 'iommu/translate/dma-read',
    what: 'DMA reads through a warm device IOTLB: DmaEngine.access(iova, false) vs a plain lookup + read',
    figure: `${ra.toFixed(2)}x`, value: ra,
    detail: `DmaEngine.access ${mps(median(a.a))}DMAs/s (IOTLB lookup, the oracle's check against the I/O page table, the 8-byte read of the guest page, the device's read count) `
      + `vs a plain loop (gfn from a flat Int32Array by IOVA, the same 8 bytes read from guest memory) ${mps(median(a.b))}/s, ${N_ACCESS / 1e6} M each; ${common}`,
  }, {
    id: 'iommu/translate/iotlb-lookup',
    what: 'IOVA translation alone: DeviceIotlb.lookup (warm) vs a plain Int32Array lookup',
    figure: `${rl.toFixed(2)}x`, value: rl,
    detail: `DeviceIotlb.lookup ${mps(median(l.a))}translations/s (tag compare, hit counter) vs gfn = flat[iova] ${mps(median(l.b))}/s, ${N_LOOKUP / 1e6} M each; ${common}`,
  }];
}

// ---------------------------------------------------------------------------------------
// migration

const M_MEMORY = 256 * MiB;
const M_HOT = 8 * MiB;

function scenario(devices: DeviceSetup, bugs: string[] = []): MigrationScenario {
  return {
    tracking: 'dirty-ring', vcpus: 2, memoryBytes: M_MEMORY, slots: 1, ringEntries: 4096, seed: 1, bugs, hostWriteEvery: 0,
    workload: { ...DEFAULT_WORKLOAD, name: 'hotset', hotFraction: M_HOT / M_MEMORY, hotShare: 1 },
    params: {
      bandwidth: 128 * MiB, downtimeLimitMs: 300, maxIterations: 8, timeoutMs: 40_000, policy: 'fail', batchPages: 256,
      warmupOps: M_MEMORY / PAGE_SIZE,
    },
    devices,
  };
}

function device(kind: DeviceKind, o: Partial<DeviceConfig> = {}): DeviceConfig {
  return { kind, ...DEVICE_DEFAULTS, ...o };
}

interface Row { id: string; what: string; backend: IommuBackendKind; device: DeviceConfig; bugs?: string[] }

const ROWS: Row[] = [
  { id: 'type1-identity', what: 'type1, dma-engine mapping all guest RAM (identity), no pinned scope', backend: 'type1', device: device('dma-engine', { identity: true }) },
  { id: 'type1-mdev', what: 'type1, mdev (pins, dma_rw: pinned page scope)', backend: 'type1', device: device('mdev') },
  { id: 'iommufd-hwpt', what: 'iommufd, dma-engine, HWPT dirty bits', backend: 'iommufd', device: device('dma-engine') },
  { id: 'device-logging', what: 'type1, dma-engine with device DMA logging', backend: 'type1', device: device('dma-engine', { tracking: 'device' }) },
  { id: 'gvt', what: 'gvt device (writes by GPA: KVM\'s log only)', backend: 'type1', device: device('gvt') },
];

function pagesSent(r: MigrationRunResult): number {
  return r.info!.normalPages + r.info!.zeroPages;
}

function outcome(r: MigrationRunResult): string {
  const i = r.info!;
  if (i.status === 'completed') return `${r.status === 'passed' ? 'completed' : `completed but ${r.status}`} in ${(i.totalTimeMs / 1000).toFixed(2)} s, downtime ${i.downtimeMs.toFixed(0)} ms, ${r.passes.length} passes, ${pagesSent(r)} pages sent`;
  return `did not converge after ${r.passes.length} passes (${(i.totalTimeMs / 1000).toFixed(1)} s, ${pagesSent(r)} pages sent)`;
}

interface RowRun { r: MigrationRunResult; figure: Figure }

async function runRow(row: Row): Promise<RowRun> {
  await settle();
  const setup: DeviceSetup = { backend: row.backend, dmaEntryLimit: VFIO_DEFAULT_DMA_ENTRY_LIMIT, stopOnFault: false, devices: [row.device] };
  let source: Vm | null = null;
  const r = await runMigration(scenario(setup, row.bugs), { driver: 'free', watchdogMs: 30_000, burst: 256, prepare: (vm) => { source = vm; } });
  const guestOps = new VmmControl(source!).totalOps();
  const i = r.info;
  if (i === null || r.status === 'stuck' || r.status === 'crashed') throw new Error(`${row.id}: ${r.status} ${r.reason ?? ''} ${r.errors.join('; ')}`);
  const d = r.dma!.devices[0]!;
  const io = r.dma!.iommu;
  const sources = i.dmaSources.map((s) => `${s.source} ${s.pagesReported} pages in ${s.syncs} syncs`).join('; ');
  log(`${row.id}: ${outcome(r)}; ${sources}; guest ${guestOps} ops, device ${d.operations} ops`);
  return {
    r,
    figure: {
      id: `iommu/migration/${row.id}`,
      what: `migration, 256 MiB guest, 2 vCPUs, 8 MiB hot set, dirty ring, 128 MiB/s, downtime limit 300 ms, at most 8 passes, policy fail; ${row.what}`,
      figure: outcome(r), value: i.status === 'completed' ? i.totalTimeMs : NaN,
      detail: `status ${r.status}${r.reason ? ` (${r.reason})` : ''}; total ${i.totalTimeMs.toFixed(0)} ms, downtime ${i.downtimeMs.toFixed(0)} ms, expected downtime ${i.expectedDowntimeMs.toFixed(0)} ms; `
        + `pages sent ${i.normalPages} normal + ${i.zeroPages} zero, transferred ${(i.transferredBytes / MiB).toFixed(0)} MiB; `
        + `DMA sources: ${sources || 'none'}; `
        + `guest ${(guestOps / 1e6).toFixed(1)} M operations (warm-up included); device ${d.kind} (tracking ${d.tracking}): ${d.operations} operations (one per ${Math.round(guestOps / Math.max(1, d.operations))} guest operations; configured: every ${row.device.every}), `
        + `${d.dmaWrites} DMA writes, ${d.dmaReads} reads, ${d.pins} pins, ${d.dmaRw} dma_rw, IOTLB ${d.iotlbHits} hits ${d.iotlbMisses} misses, ${d.faults} faults, ${d.staleIotlb} stale; `
        + `IOMMU ${io.maps} maps, ${io.unmaps} unmaps, ${io.iotlbInvalidations} IOTLB invalidations; `
        + `passes (sent/dirty found): ${r.passes.map((p) => `${p.pagesSent}/${p.dirtyFound}`).join(' ')}${r.errors.length ? `; errors: ${r.errors.join('; ')}` : ''}`,
    },
  };
}

async function migration(): Promise<Figure[]> {
  const figures: Figure[] = [];
  for (const row of ROWS) figures.push((await runRow(row)).figure);
  return figures;
}

const PIN_PAIRS = 3;

/** The mdev migration with and without read-pin-dirties, in alternating pairs: the extra pages the bug sends. */
async function readPinDirties(): Promise<Figure[]> {
  const mdev = ROWS.find((x) => x.id === 'type1-mdev')!;
  const bug: Row = { ...mdev, id: 'type1-mdev/read-pin-dirties', what: `${mdev.what}, with the read-pin-dirties bug`, bugs: ['read-pin-dirties'] };
  const type1 = (r: MigrationRunResult): { pages: number; syncs: number } => {
    const x = r.info!.dmaSources.find((s) => s.source.includes('(type1)'));
    return { pages: x?.pagesReported ?? 0, syncs: x?.syncs ?? 0 };
  };
  const extra: number[] = [];
  const perQuery: number[] = [];
  const runs: string[] = [];
  for (let i = 0; i < PIN_PAIRS; i++) {
    const clean = (await runRow(mdev)).r;
    const buggy = (await runRow(bug)).r;
    for (const [name, r] of [['without', clean], ['with', buggy]] as const) {
      if (r.status !== 'passed') throw new Error(`mdev ${name} read-pin-dirties: ${r.status} ${r.reason ?? ''} ${r.errors.join('; ')}`);
    }
    const tc = type1(clean);
    const tb = type1(buggy);
    extra.push(pagesSent(buggy) - pagesSent(clean));
    perQuery.push(tb.pages / Math.max(1, tb.syncs) - tc.pages / Math.max(1, tc.syncs));
    runs.push(`${pagesSent(clean)} -> ${pagesSent(buggy)} pages sent, type1 ${tc.pages}/${tc.syncs} -> ${tb.pages}/${tb.syncs} pages/queries`);
  }
  const e = median(extra);
  const q = median(perQuery);
  return [{
    id: 'iommu/read-pin-dirties',
    what: 'extra pages the read-pin-dirties bug makes an mdev migration send (read pins reported dirty)',
    figure: `${e >= 0 ? '+' : ''}${e} pages sent; ${q >= 0 ? '+' : ''}${q.toFixed(1)} pages per type1 query`, value: e,
    detail: `the scenario of iommu/migration/type1-mdev without and with the bug, ${PIN_PAIRS} alternating pairs, medians of the paired differences (pairs: ${runs.join('; ')}). `
      + 'The pages-sent difference carries the runs\' timing noise (guest and device progress differ from run to run); the per-query difference is the read-pinned buffers the bug adds to every type1 report',
  }];
}

// ---------------------------------------------------------------------------------------
// entry-limit

interface MapRun { mapped: number; seconds: number; error: string; entries: number; pagesMapped: number }

/** Maps guest RAM page by page at IOVA = GPA, one 4 KiB mapping each, until the first error or the end of RAM. */
function mapPageByPage(memoryBytes: number, backend: IommuBackendKind, limit: number): MapRun {
  const { vm } = iommuVm(memoryBytes, backend, 0, limit);
  const iommu = vm.iommu!;
  const slot = vm.memory.slots[0]!;
  let mapped = 0;
  let error = '';
  const t0 = performance.now();
  for (let p = 0; p < slot.pages; p++) {
    const gpa = (slot.baseGfn + p) * PAGE_SIZE;
    const r = iommu.mapDma(gpa, PAGE_SIZE, gpa, RW);
    if (r.ret < 0) { error = `${r.ret === -ENOSPC ? 'ENOSPC' : `errno ${-r.ret}`}: ${r.detail}`; break; }
    mapped++;
  }
  const seconds = (performance.now() - t0) / 1000;
  const st = iommu.stats();
  return { mapped, seconds, error, entries: st.entries, pagesMapped: st.pagesMapped };
}

function entryLimit(): Figure[] {
  const small = 512 * MiB;
  const t1 = mapPageByPage(small, 'type1', VFIO_DEFAULT_DMA_ENTRY_LIMIT);
  if (t1.error === '') throw new Error('type1 mapped all of 512 MiB under the default dma_entry_limit');
  const fitsMiB = (t1.mapped * PAGE_SIZE) / MiB;
  const big = 16 * GiB;
  const raised = 2 ** 31 - 1;
  const t16 = mapPageByPage(big, 'type1', raised);
  if (t16.error !== '') throw new Error(`16 GiB with a raised limit: ${t16.error}`);
  const fd = mapPageByPage(small, 'iommufd', VFIO_DEFAULT_DMA_ENTRY_LIMIT);
  if (fd.error !== '') throw new Error(`iommufd: ${fd.error}`);
  const rate = (m: MapRun): string => `${mps(m.mapped / m.seconds)}maps/s`;
  return [{
    id: 'iommu/entry-limit/type1',
    what: 'type1 with the default dma_entry_limit (65535): a 512 MiB guest mapped 4 KiB page by page until ENOSPC',
    figure: `${t1.mapped} mappings fit: the largest guest ${fitsMiB.toFixed(3)} MiB`, value: fitsMiB,
    detail: `VFIO_IOMMU_MAP_DMA of 4 KiB at IOVA = GPA for each page of a 512 MiB guest (${small / PAGE_SIZE} pages); map ${t1.mapped + 1} failed with ${t1.error}; `
      + `the container then held ${t1.entries} entries over ${t1.pagesMapped} pages; ${t1.seconds.toFixed(2)} s (${rate(t1)})`,
  }, {
    id: 'iommu/entry-limit/16GiB',
    what: 'the dma_entry_limit a 16 GiB guest mapped in 4 KiB pages needs (type1 with the limit raised)',
    figure: `${t16.entries} entries`, value: t16.entries,
    detail: `a 16 GiB guest mapped page by page into a type1 container whose dma_entry_limit was raised to ${raised}: ${t16.mapped} maps, no error, ${t16.entries} entries over ${t16.pagesMapped} pages `
      + `(${(t16.entries / VFIO_DEFAULT_DMA_ENTRY_LIMIT).toFixed(1)}x the default); ${t16.seconds.toFixed(2)} s (${rate(t16)})`,
  }, {
    id: 'iommu/entry-limit/iommufd',
    what: 'iommufd: the same 512 MiB guest mapped 4 KiB page by page (no entry limit)',
    figure: `${fd.mapped} of ${small / PAGE_SIZE} pages mapped`, value: fd.mapped,
    detail: `IOMMU_IOAS_MAP of 4 KiB at IOVA = GPA for every page: no error, ${fd.entries} areas over ${fd.pagesMapped} pages (${(fd.mapped * PAGE_SIZE) / MiB} MiB); ${fd.seconds.toFixed(2)} s (${rate(fd)})`,
  }];
}

// ---------------------------------------------------------------------------------------

const [which = 'map-unmap'] = caseArgs();
const run = { 'map-unmap': mapUnmap, translate, migration, 'read-pin-dirties': readPinDirties, 'entry-limit': entryLimit }[which];
if (run === undefined) throw new Error(`unknown case '${which}' (map-unmap, translate, migration, read-pin-dirties, entry-limit)`);
emit(await run());
log(`sink ${sinkValue()}`);
process.exit(0);
