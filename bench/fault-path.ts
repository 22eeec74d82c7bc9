/**
 * Dirty-log fault path: the first write to a write-protected page, in ring mode.
 *
 *   tsx bench/fault-path.ts <ring|bitmap>
 *
 * One vCPU (a real Vcpu, runBurst with the CLI's default burst) runs dirty_log_perf_test's
 * guest (the 'perf' workload: one write to each page of its slice, in order) over a slot
 * whose every page is write-protected, so each guest write takes the whole path: TLB
 * miss, SPTE walk, write-protect fault (SPTE made writable, page pushed to the vCPU's
 * dirty ring or set in the bitmap), walk again, TLB fill, store and stamp. A timed round
 * is PAGES such writes; between rounds, untimed, the vCPU is stopped and the VMM
 * harvests and resets the ring (which write-protects every page again, with a TLB flush)
 * or, in bitmap mode, does GET + CLEAR. PAGES stays under the ring's soft limit, so no
 * round takes a ring-full exit; the exits are counted and reported anyway.
 */
import { DirtyRingHarvester } from '../src/host/vmm/ring-harvester.ts';
import { DEFAULT_WORKLOAD, createWorkload } from '../src/guest/workload.ts';
import { VcpuWord } from '../src/host/layout.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import {
  BITMAP_MANUAL, type Figure, RING_65536, caseArgs, consume, drive, emit, median, mps, now, singleSlotVm,
} from './harness.ts';

const PAGES = 49152; // 192 MiB; the 65536-entry ring's soft limit is 65472
const BURST = 256;
const ROUNDS = 9;
const WARMUP = 8;

function main(): void {
  const [mode = 'ring'] = caseArgs();
  const ring = mode === 'ring';
  const vm = singleSlotVm(PAGES, 1, ring ? RING_65536 : BITMAP_MANUAL);
  const slot = vm.memory.slots[0]!;
  const vmm = new VmmControl(vm);
  drive(vm.enableDirtyLogging(slot));
  const workload = createWorkload({ ...DEFAULT_WORKLOAD, name: 'perf', writePercent: 100 }, [{ baseGfn: slot.baseGfn, pages: PAGES }], 0, 1, 1);
  const vcpu = new Vcpu(vm, 0, workload);
  const harvester = new DirtyRingHarvester(1);
  const scratch = new Uint32Array(slot.dirtyBitmap.length);
  let harvested = 0;
  const record = (_slot: number, offset: number): void => { harvested += offset; };

  const round = (): number => {
    const start = vcpu.retired;
    const t0 = now();
    while (vcpu.retired - start < PAGES) vcpu.runBurst(Math.min(BURST, PAGES - (vcpu.retired - start)));
    const seconds = (now() - t0) / 1000;
    // Untimed: stop the vCPU (it leaves guest mode), collect and re-protect, let it run.
    vmm.requestStop(0);
    vcpu.runBurst(1);
    if (ring) {
      const n = harvester.harvest(vm.rings![0]!, 65536, record);
      const reset = drive(vm.resetDirtyRings());
      if (n !== PAGES || reset !== PAGES) throw new Error(`round harvested ${n} and reset ${reset} entries, expected ${PAGES}`);
    } else {
      const out = drive(vm.getDirtyLog(slot, scratch));
      const cleared = drive(vm.clearDirtyLog(slot, 0, slot.pages, out));
      if (cleared !== PAGES) throw new Error(`round cleared ${cleared} pages, expected ${PAGES}`);
    }
    vmm.release(0);
    return seconds;
  };

  for (let i = 0; i < WARMUP; i++) round();
  const faults0 = vmm.word(0, VcpuWord.FAULTS);
  const fullExits0 = vmm.word(0, VcpuWord.RING_FULL_EXITS);
  const times: number[] = [];
  for (let i = 0; i < ROUNDS; i++) times.push(round());
  const faults = vmm.word(0, VcpuWord.FAULTS) - faults0;
  const fullExits = vmm.word(0, VcpuWord.RING_FULL_EXITS) - fullExits0;
  if (faults !== ROUNDS * PAGES) throw new Error(`${faults} faults in ${ROUNDS} rounds of ${PAGES} first writes`);
  consume(harvested);
  const rate = PAGES / median(times);
  const figure: Figure = {
    id: `fault-path/${mode}`,
    what: ring
      ? 'dirty-log fault path, ring (65536 entries): first writes to write-protected pages, per vCPU'
      : 'dirty-log fault path, bitmap (manual protect): first writes to write-protected pages, per vCPU',
    figure: `${mps(rate)}faults/s`,
    value: rate,
    target: ring ? { kind: 'min', value: 5e6, text: '>= 5 M faults/s' } : undefined,
    detail: `whole guest write per fault (translate, walk, fault: SPTE writable then ${ring ? 'ring push' : 'bitmap bit'}, walk, TLB fill, store, stamp); median of ${ROUNDS} rounds of ${PAGES} faults (${WARMUP} warm-up rounds), ${(median(times) * 1000).toFixed(1)} ms per round; ${ring ? 'harvest + reset' : 'GET + CLEAR'} between rounds not timed; ring-full exits while timed: ${fullExits}`,
  };
  emit([figure]);
}

main();
