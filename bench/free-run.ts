/**
 * Free-run write throughput: vCPUs on their own worker threads, each run by the free-run
 * driver's loop (runFreeLoop over Vcpu.runBurst, burst 256 as the CLI's default), with
 * dirty tracking on; guest writes per second summed over the running vCPUs, with 1 and
 * 2 vCPUs running, and the scaling ratio.
 *
 *   tsx bench/free-run.ts <steady|collect>
 *
 * steady:  bitmap with manual protect, logging on; each vCPU writes random pages of its
 *          own 128 MiB slice (dirty_log_perf_test's guest); after the first touches,
 *          every write is a TLB hit.
 * collect: dirty ring (65536 entries), logging on, and the main thread acts as the VMM:
 *          every 10 ms it harvests every ring and calls KVM_RESET_DIRTY_RINGS (which
 *          write-protects the pages again and flushes the vCPUs' TLBs), and it answers
 *          ring-full exits; so writes keep faulting.
 *
 * One VM with two vCPU threads. Timed windows alternate between vCPU 1 stopped (parked
 * by the VMM's stop request: 1 vCPU running) and both running, so that drift hits both
 * configurations alike. Writes are counted from the vCPUs' published OPS words.
 */
import { Worker } from 'node:worker_threads';
import { cpus } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { ActorWord } from '../src/drivers/actor-words.ts';
import type { Steps } from '../src/roles/role.ts';
import { KVM_EXIT_DIRTY_RING_FULL } from '../src/host/constants.ts';
import { DirtyRingHarvester } from '../src/host/vmm/ring-harvester.ts';
import { LINE_WORDS, VcpuRunState, VcpuWord } from '../src/host/layout.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import type { FreeRunBenchWorkerData } from './free-run-worker.ts';
import { BITMAP_MANUAL, type Figure, RING_65536, caseArgs, emit, median, mps, singleSlotVm } from './harness.ts';

const VCPUS = 2;
const SLICE_PAGES = 32768; // 128 MiB per vCPU
const BURST = 256;
const WARMUP_MS = 800;
const WINDOW_MS = 500;
const PAIRS = 5;

/** Runs a host procedure to completion on the main thread while the vCPUs run elsewhere. */
function complete<T>(steps: Steps<T>): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
    const w = r.value;
    if (w?.park) Atomics.wait(w.park.array, w.park.index, w.park.value, 1);
  }
}

const [mode = 'steady'] = caseArgs();
const collect = mode === 'collect';
const vm = singleSlotVm(SLICE_PAGES * VCPUS, VCPUS, collect ? RING_65536 : BITMAP_MANUAL);
const slot = vm.memory.slots[0]!;
complete(vm.enableDirtyLogging(slot));
const vmm = new VmmControl(vm);
const actors = new SharedArrayBuffer((VCPUS + 1) * LINE_WORDS * 4);
const actorWords = new Int32Array(actors);
const entry = new URL('./free-run-worker.ts', import.meta.url).href;
const workers = Array.from({ length: VCPUS }, (_, v) => new Worker(new URL('../workers/ts-bootstrap.mjs', import.meta.url), {
  workerData: { entry, data: { layout: vm.layout, vcpu: v, burst: BURST, seed: 7, actors } satisfies FreeRunBenchWorkerData },
}));
const failed = new Promise<never>((_, reject) => workers.forEach((w) => w.on('error', reject)));
const harvester = new DirtyRingHarvester(VCPUS);
let collections = 0;
const collectOnce = (): void => {
  for (const ring of vm.rings!) harvester.harvest(ring, ring.entries, () => {});
  complete(vm.resetDirtyRings());
  collections++;
  for (let v = 0; v < VCPUS; v++) if (vmm.parkedExit(v) === KVM_EXIT_DIRTY_RING_FULL) vmm.reenter(v);
};
const wait = async (ms: number): Promise<void> => {
  if (!collect) { await Promise.race([sleep(ms), failed]); return; }
  const end = performance.now() + ms;
  while (performance.now() < end) {
    collectOnce();
    await Promise.race([sleep(10), failed]);
  }
};
/** Collections made during the timed windows with 1 and with 2 vCPUs running. */
const windowCollections = [0, 0];
const word = (w: number): number => { let n = 0; for (let v = 0; v < VCPUS; v++) n += vmm.word(v, w); return n; };
const window = async (running: number): Promise<number> => {
  const o0 = vmm.totalOps();
  const c0 = collections;
  const t0 = performance.now();
  await wait(WINDOW_MS);
  windowCollections[running - 1]! += collections - c0;
  return (vmm.totalOps() - o0) / ((performance.now() - t0) / 1000);
};
const setSecondVcpu = async (running: boolean): Promise<void> => {
  if (running) { vmm.release(1); return; }
  vmm.requestStop(1);
  while (vmm.runState(1) !== VcpuRunState.STOPPED) await Promise.race([sleep(1), failed]);
};

const one: number[] = [];
const two: number[] = [];
let faults = 0;
let fullExits = 0;
try {
  await wait(WARMUP_MS); // includes the workers' start-up; both vCPUs fault their slices in
  for (let i = 0; i < PAIRS; i++) {
    await setSecondVcpu(false);
    await wait(50);
    one.push(await window(1));
    await setSecondVcpu(true);
    await wait(50);
    two.push(await window(2));
  }
  // Stop the vCPUs (they publish their counters when they leave guest mode).
  for (let v = 0; v < VCPUS; v++) vmm.requestStop(v);
  for (let v = 0; v < VCPUS; v++) while (!vmm.isQuiescent(v)) await Promise.race([sleep(1), failed]);
  faults = word(VcpuWord.FAULTS);
  fullExits = word(VcpuWord.RING_FULL_EXITS);
} finally {
  Atomics.store(actorWords, ActorWord.SHUTDOWN, 1);
  for (let v = 0; v < VCPUS; v++) vmm.release(v);
  await Promise.all(workers.map((w) => w.terminate()));
}
const r1 = median(one);
const r2 = median(two);
const what = collect
  ? 'ring (65536), main thread harvests + resets every 10 ms'
  : 'bitmap (manual protect), logging on, steady state';
const common = `burst ${BURST}; each vCPU writes random pages of its own 128 MiB slice; median of ${PAIRS} windows of ${WINDOW_MS} ms, alternating 1 and 2 running vCPUs, after ${WARMUP_MS} ms warm-up; ${faults} faults${collect ? `, ${collections} collections, ${fullExits} ring-full exits` : ''} in all`;
const perSecond = (running: number): string => (windowCollections[running - 1]! / (PAIRS * WINDOW_MS / 1000)).toFixed(0);
const figures: Figure[] = [
  { id: `free-run/${mode}/1-vcpu`, what: `free-run write throughput, 1 vCPU thread, ${what}`, figure: `${mps(r1)}writes/s`, value: r1, detail: common + (collect ? `; ${perSecond(1)} collections/s in these windows` : '') },
  { id: `free-run/${mode}/2-vcpus`, what: `free-run write throughput, 2 vCPU threads, ${what}`, figure: `${mps(r2)}writes/s`, value: r2, detail: 'sum over both vCPUs; same windows' + (collect ? `; ${perSecond(2)} collections/s in these windows` : '') },
];
const ratios = two.map((x, i) => (x / one[i]!).toFixed(2)).join(' ');
if (!collect) {
  figures.push({
    id: `free-run/${mode}/scaling`,
    what: `free-run scaling, 2 vCPUs / 1 vCPU, ${what}`,
    figure: `${(r2 / r1).toFixed(2)}x`,
    value: r2 / r1,
    detail: `${mps(r2)}/s over ${mps(r1)}/s on a ${cpus().length}-core machine (the main thread sleeps); per-pair ratios ${ratios}`,
  });
} else {
  figures[1]!.detail += `; 2/1 = ${(r2 / r1).toFixed(2)}x, not a scaling figure: with 2 vCPUs the collecting main thread shares 2 cores with them and collects less often, so fewer writes fault`;
}
emit(figures);
