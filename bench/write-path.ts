/**
 * Steady-state write path: pages already writable, dirty tracking on, every write a TLB
 * hit. The emulated side is a real Vcpu (runBurst) over a real Vm with logging enabled
 * on its slot; the baseline is a plain loop that stores the same 8 bytes at the same
 * page offsets, drawn by the same PRNG (same seed, same stream), into a
 * SharedArrayBuffer-backed Uint32Array of the same size.
 *
 *   tsx bench/write-path.ts <ring|bitmap> <MiB>
 *   tsx bench/write-path.ts confidential <MiB>
 *
 * `confidential`: the same guest on a VM with private memory (its slot with guest_memfd,
 * every page shared, logging on), against the same guest on a plain VM, both emulated,
 * alternated in one process: what the private/shared check (and the stale-store probe)
 * costs the steady-state write path.
 *
 * The ring case uses 255 MiB instead of 256: a warm-up pass that makes every page
 * writable logs every page once, and 65536 pages do not fit under the ring's soft limit
 * (65536 - 64 entries); a reset would write-protect them again.
 */
import { DEFAULT_WORKLOAD, createWorkload } from '../src/guest/workload.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { KVM_MEM_GUEST_MEMFD } from '../src/host/constants.ts';
import { GlobalWord, createVmLayout } from '../src/host/layout.ts';
import type { Memslot } from '../src/host/memslot.ts';
import { Vm } from '../src/host/vm.ts';
import { spteWritable } from '../src/host/spte.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { Prng } from '../src/util/prng.ts';
import {
  BITMAP_MANUAL, faultCount, type Figure, RING_65536, type Sample, alternate, caseArgs, consume, drive, emit, median, mps,
  now, sinkValue, singleSlotVm,
} from './harness.ts';

const SEED = 7;
const BURST = 256; // the CLI default (--burst)
const REPS = 7;
const WARMUP = 3;

/** Touches every 4 KiB page of `a` in address order (first touch commits the memory). */
function prefault(a: Uint32Array): void {
  for (let i = 0; i < a.length; i += 1024) a[i] = 0;
}

/**
 * A vCPU running dirty_log_test's random guest over `vm`'s one slot, logging on, warmed
 * up: every page has taken its write-protect fault once, so every page is logged,
 * writable and in the vCPU's TLB.
 */
function warmVcpu(vm: Vm, pages: number): { vcpu: Vcpu; slot: Memslot; warmOps: number; faults: number } {
  const slot = vm.memory.slots[0]!;
  drive(vm.enableDirtyLogging(slot)); // write-protects every page (no vCPU in guest mode yet)
  // Commit guest RAM up front, in address order, as a VMM that preallocates guest memory
  // does (the baseline's buffer gets the same treatment below).
  prefault(slot.u32[0]!);
  const ranges = [{ baseGfn: slot.baseGfn, pages }];
  // dirty_log_test's random guest (RandomWorkload): vCPU 0's PRNG is seeded with
  // Prng.derive(SEED, 0), and it picks pages with Prng.below(pages). The baseline below
  // draws from a PRNG seeded the same way, so both sides store to the same pages.
  const vcpu = new Vcpu(vm, 0, createWorkload(DEFAULT_WORKLOAD, ranges, 0, 1, SEED));
  Atomics.store(vm.global, GlobalWord.ITERATION, 1); // the value the guest writes
  let firstProtected = 0;
  while (firstProtected < pages) {
    vcpu.runBurst(BURST);
    while (firstProtected < pages && spteWritable(slot, firstProtected)) firstProtected++;
  }
  const faults = faultCount(vm, vcpu);
  if (faults !== pages) throw new Error(`warm-up took ${faults} faults for ${pages} pages`);
  return { vcpu, slot, warmOps: vcpu.retired, faults };
}

/** The emulated side: `n` writes of the warmed-up vCPU. */
function writes(vcpu: Vcpu, slot: Memslot, n: number): () => Sample {
  return () => {
    const start = vcpu.retired;
    const t0 = now();
    while (vcpu.retired - start < n) vcpu.runBurst(BURST);
    const seconds = (now() - t0) / 1000;
    consume(slot.readU64(0));
    return { ops: vcpu.retired - start, seconds };
  };
}

/** The confidential case: the same guest on a VM with private memory against a plain VM. */
function confidential(mib: number, pages: number): void {
  const plain = warmVcpu(singleSlotVm(pages, 1, BITMAP_MANUAL), pages);
  const cvm = new Vm(createVmLayout({
    slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages, flags: KVM_MEM_GUEST_MEMFD }], vcpus: 1, tracking: BITMAP_MANUAL,
    privateMem: true, logSharedGuestMemfd: true,
  }));
  cvm.populate();
  const conf = warmVcpu(cvm, pages);
  const n = 4_000_000;
  const r = alternate(REPS, WARMUP, writes(conf.vcpu, conf.slot, n), writes(plain.vcpu, plain.slot, n));
  const stale = Atomics.load(cvm.global, GlobalWord.STALE_STORES);
  if (stale !== 0) throw new Error(`the stale-store probe counted ${stale} stores of an all-shared guest`);
  const ratio = median(r.ratios);
  emit([{
    id: `write-path/confidential/${mib}MiB`,
    what: `steady-state write path on a VM with private memory (guest_memfd slot, all shared, bitmap), against the same guest on a plain VM, random pages over ${mib} MiB`,
    figure: `${ratio.toFixed(2)}x`,
    value: ratio,
    target: { kind: 'min', value: 0.9, text: '>= 0.90x the plain VM (the check costs at most 10 %)' },
    detail: `confidential ${mps(median(r.a))}writes/s vs plain ${mps(median(r.b))}writes/s; median of ${REPS} paired ratios (${n / 1e6} M writes each, ${WARMUP} warm-up pairs), burst ${BURST}`,
  }]);
}

function main(): void {
  const [mode = 'bitmap', mibText = '256'] = caseArgs();
  const mib = Number(mibText);
  const pages = (mib * 1024 * 1024) / PAGE_SIZE;
  if (mode === 'confidential') { confidential(mib, pages); return; }
  const tracking = mode === 'ring' ? RING_65536 : BITMAP_MANUAL;
  const { vcpu, slot, warmOps, faults } = warmVcpu(singleSlotVm(pages, 1, tracking), pages);

  // Baseline: the same 8 bytes at the same page offsets (bytes 0-7 of the page) with the
  // same PRNG stream, into a SharedArrayBuffer-backed Uint32Array of the same size; it
  // replays the same warm-up pass first, so its pages are committed and its stream is
  // aligned with the vCPU's.
  const base = new Uint32Array(new SharedArrayBuffer(pages * PAGE_SIZE));
  prefault(base);
  const prng = new Prng(Prng.derive(SEED, 0));
  const value = 1;
  for (let k = 0; k < warmOps; k++) {
    const i = prng.below(pages) * 1024;
    base[i] = value >>> 0;
    base[i + 1] = (value / 4294967296) >>> 0;
  }

  const n = mib >= 64 ? 4_000_000 : 8_000_000;
  const baseline = (): Sample => {
    const t0 = now();
    for (let k = 0; k < n; k++) {
      const i = prng.below(pages) * 1024;
      base[i] = value >>> 0;
      base[i + 1] = (value / 4294967296) >>> 0;
    }
    const seconds = (now() - t0) / 1000;
    consume(base[prng.below(pages) * 1024]!);
    return { ops: n, seconds };
  };
  const emulated = writes(vcpu, slot, n);

  const r = alternate(REPS, WARMUP, emulated, baseline);
  // Check that the measured writes were TLB hits (no new faults).
  const newFaults = faultCount(vcpu.vm, vcpu) - faults;
  const ratio = median(r.ratios);
  const figures: Figure[] = [{
    id: `write-path/${mode}/${mib}MiB`,
    what: `steady-state write path, ${mode === 'ring' ? 'ring (65536 entries)' : 'bitmap (manual protect)'}, random pages over ${mib} MiB`,
    figure: `${ratio.toFixed(2)}x`,
    value: ratio,
    target: { kind: 'min', value: 0.5, text: '>= 0.50x plain stores' },
    detail: `emulated ${mps(median(r.a))}writes/s vs plain Uint32Array stores ${mps(median(r.b))}/s; median of ${REPS} paired ratios (${n / 1e6} M writes each, ${WARMUP} warm-up pairs), burst ${BURST}; warm-up pass of ${warmOps} writes took ${faults} faults, ${newFaults} faults while measured`,
  }];
  emit(figures);
  if (process.env.BENCH_VERBOSE) console.error(`sink ${sinkValue()} ratios ${r.ratios.map((x) => x.toFixed(2)).join(' ')}`);
}

main();
