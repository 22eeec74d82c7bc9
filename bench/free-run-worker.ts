/**
 * Worker side of bench/free-run.ts: one vCPU role on its own thread, run by the free-run
 * driver's own loop (runFreeLoop: runBurst, park on the awaited word when blocked) until
 * the shutdown word is set. Loaded through workers/ts-bootstrap.mjs.
 */
import { workerData } from 'node:worker_threads';
import { runFreeLoop } from '../src/drivers/free-run-worker.ts';
import { DEFAULT_WORKLOAD, createWorkload } from '../src/guest/workload.ts';
import type { VmLayout } from '../src/host/layout.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { Vm } from '../src/host/vm.ts';

export interface FreeRunBenchWorkerData {
  layout: VmLayout;
  vcpu: number;
  burst: number;
  seed: number;
  /** The free-run driver's actor words (src/drivers/free-run.ts); actor index = vcpu. */
  actors: SharedArrayBuffer;
}

const data = (workerData as { data: FreeRunBenchWorkerData }).data;
const vm = new Vm(data.layout);
const ranges = vm.memory.slots.map((s) => ({ baseGfn: s.baseGfn, pages: s.pages }));
// dirty_log_perf_test's guest: each vCPU writes its own slice of guest memory, pages in random order.
const workload = createWorkload({ ...DEFAULT_WORKLOAD, name: 'perf', writePercent: 100, randomOrder: true }, ranges, data.vcpu, data.layout.config.vcpus, data.seed);
runFreeLoop(new Vcpu(vm, data.vcpu, workload), new Int32Array(data.actors), data.vcpu, data.burst);
