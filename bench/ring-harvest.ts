/**
 * Ring harvest plus reset: userspace collects every dirty entry of a vCPU's ring
 * (DirtyRingHarvester.harvest, recording each page in a bitmap as the dirty_log_test
 * collector does) and then calls KVM_RESET_DIRTY_RINGS (Vm.resetDirtyRings: DirtyRing.reset
 * re-protects the pages, coalesced per 64-page window, then one remote TLB flush).
 *
 *   tsx bench/ring-harvest.ts <sequential|random>
 *
 * Each round, untimed, a real vCPU fills its 65536-entry ring with ENTRIES first writes
 * (write-protect faults), in address order or in random order (random order is the
 * worst case for the reset's coalescing), then stops (leaves guest mode). Timed: harvest
 * of all entries + reset. Rate = entries / (harvest + reset time).
 */
import { DirtyRingHarvester } from '../src/host/vmm/ring-harvester.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { DEFAULT_WORKLOAD, createWorkload } from '../src/guest/workload.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { type Figure, RING_65536, caseArgs, consume, drive, emit, median, mps, now, singleSlotVm } from './harness.ts';

const ENTRIES = 60000; // under the 65536-entry ring's soft limit (65472)
const ROUNDS = 9;
const WARMUP = 8;

function main(): void {
  const [order = 'sequential'] = caseArgs();
  const random = order === 'random';
  // Sequential: exactly ENTRIES pages, each written once per round. Random: pages drawn at
  // random (with repeats) from a slot twice as big until ENTRIES distinct pages are dirty.
  const pages = random ? 2 * ENTRIES : ENTRIES;
  const vm = singleSlotVm(pages, 1, RING_65536);
  const slot = vm.memory.slots[0]!;
  const ring = vm.rings![0]!;
  const vmm = new VmmControl(vm);
  drive(vm.enableDirtyLogging(slot));
  const workload = createWorkload({ ...DEFAULT_WORKLOAD, name: 'perf', writePercent: 100, randomOrder: random }, [{ baseGfn: slot.baseGfn, pages }], 0, 1, 3);
  const vcpu = new Vcpu(vm, 0, workload);
  const harvester = new DirtyRingHarvester(1);
  const reported = new PageBitmap(vm.memory.totalPages);
  const record = (slotField: number, offset: number): void => {
    const s = vm.memory.slotByField(slotField);
    if (s !== undefined && offset < s.pages) reported.mark(s.firstPage + offset);
  };

  const harvestMs: number[] = [];
  const resetMs: number[] = [];
  const totalMs: number[] = [];
  let protectCalls = 0;
  const round = (): void => {
    // Fill (untimed): write until ENTRIES pages are dirty, then stop the vCPU.
    vmm.release(0);
    while (ring.used() < ENTRIES) vcpu.runBurst(Math.min(256, ENTRIES - ring.used()));
    vmm.requestStop(0);
    vcpu.runBurst(1);
    if (ring.used() !== ENTRIES) throw new Error(`ring holds ${ring.used()} entries, expected ${ENTRIES}`);
    reported.clear();
    const t0 = now();
    const n = harvester.harvest(ring, ring.entries, record);
    const t1 = now();
    const reset = drive(vm.resetDirtyRings());
    const t2 = now();
    if (n !== ENTRIES || reset !== ENTRIES) throw new Error(`harvested ${n}, reset ${reset}, expected ${ENTRIES}`);
    harvestMs.push(t1 - t0);
    resetMs.push(t2 - t1);
    totalMs.push(t2 - t0);
    protectCalls = ring.protectCalls;
  };
  for (let i = 0; i < WARMUP; i++) round();
  harvestMs.length = resetMs.length = totalMs.length = 0;
  for (let i = 0; i < ROUNDS; i++) round();
  consume(reported.count());
  const rate = ENTRIES / (median(totalMs) / 1000);
  const figure: Figure = {
    id: `ring-harvest/${order}`,
    what: `ring harvest + reset, ${ENTRIES} entries, pages dirtied in ${random ? 'random' : 'address'} order`,
    figure: `${mps(rate)}entries/s`,
    value: rate,
    target: { kind: 'min', value: 10e6, text: '>= 10 M entries/s' },
    detail: `median of ${ROUNDS} rounds (${WARMUP} warm-up): harvest ${median(harvestMs).toFixed(2)} ms (${mps(ENTRIES / (median(harvestMs) / 1000))}/s), reset + flush ${median(resetMs).toFixed(2)} ms (${mps(ENTRIES / (median(resetMs) / 1000))}/s, ${protectCalls} coalesced re-protect calls)`,
  };
  emit([figure]);
}

main();
