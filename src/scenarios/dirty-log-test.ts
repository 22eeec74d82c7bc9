import type { TrackingMode } from '../bugs/catalog.ts';
import { injectedBugs } from '../bugs/injected.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { PageBitmap } from '../host/dirty-bitmap.ts';
import { DirtyLog, trackingFor } from '../host/vmm/dirty-log.ts';
import { GlobalWord, type MemslotConfig, type VmConfig, VcpuWord } from '../host/layout.ts';
import type { Vm } from '../host/vm.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import { ExitHandler } from '../host/vmm/exit-handler.ts';
import { type Steps, WaitCode, waitFor } from '../roles/role.ts';
import { type DirtyLogViolation, verifyDirtyLogSteps } from '../oracles/dirty-log-verify.ts';
import type { WorkloadOptions } from '../guest/workload.ts';
import { Prng } from '../util/prng.ts';
import { type Clock, WALL_CLOCK } from '../roles/clock.ts';

export interface DirtyLogTestConfig {
  mode: TrackingMode;
  vcpus: number;
  memoryBytes: number;
  /** Guest memory is split into this many slots, with a one-page hole between them. */
  slots: number;
  iterations: number;
  ringEntries: number;
  workload: WorkloadOptions;
  seed: number;
  bugs: string[];
  /** Guest operations (all vCPUs together) per iteration. */
  opsPerIteration: number;
  /** One host write (no running vCPU) per this many guest operations; 0 for none. */
  hostWriteEvery: number;
  /** Each vCPU's dirty page rate limit, pages per second (QEMU's set-vcpu-dirty-limit); 0 or unset for none. */
  dirtyLimit?: number;
}

/** Events the collector reports, as plain data (they cross threads). */
export type DirtyLogEvent =
  | { kind: 'iteration'; iteration: number; dirty: number; clean: number; writes: number; hostWrites: number; ringFullExits: number; collections: number; ms: number; dirtied: number }
  | { kind: 'violation'; violations: DirtyLogViolation[] }
  | { kind: 'error'; message: string }
  | { kind: 'done'; iterations: number };

export function slotLayout(memoryBytes: number, count: number): MemslotConfig[] {
  const pages = Math.floor(memoryBytes / PAGE_SIZE);
  const per = Math.floor(pages / count);
  const slots: MemslotConfig[] = [];
  let gfn = 0x100; // the selftests keep low memory for the guest's own code
  for (let i = 0; i < count; i++) {
    const n = i === count - 1 ? pages - per * (count - 1) : per;
    slots.push({ id: i + 1, asId: 0, baseGfn: gfn, pages: n, flags: 0 });
    gfn += n + 1;
  }
  return slots;
}

export function vmConfigFor(c: DirtyLogTestConfig): VmConfig {
  const bugs = injectedBugs(c.bugs);
  const tracking = trackingFor(c.mode, { ringEntries: c.ringEntries, hostWrites: c.hostWriteEvery > 0, noBackupBitmap: bugs.noBackupBitmap, initiallySet: true });
  return { slots: slotLayout(c.memoryBytes, c.slots), vcpus: c.vcpus, tracking };
}

/**
 * The host thread of dirty_log_test (docs/reference.md §4): per iteration, let the vCPUs run,
 * collect once at a random moment while they run (and, with the ring, whenever a vCPU
 * exits with KVM_EXIT_DIRTY_RING_FULL), stop them, collect again, verify every page.
 */
export function* dirtyLogCollector(vm: Vm, c: DirtyLogTestConfig, report: (e: DirtyLogEvent) => void, clock: Clock = WALL_CLOCK): Steps {
  const vmm = new VmmControl(vm);
  const mem = vm.memory;
  const bugs = injectedBugs(c.bugs);
  const prng = new Prng(Prng.derive(c.seed, 1000));
  const reported = new PageBitmap(mem.totalPages);
  const first = new PageBitmap(mem.totalPages);
  const log = new DirtyLog(vm, { clearPerChunk: false, harvestSkipEvery: bugs.harvestSkipEvery });
  let collections = 0;
  const exits = new ExitHandler(vmm, bugs.ringFullExitUnhandled);

  function* collect(into: PageBitmap, final: boolean): Steps {
    collections++;
    yield* log.sync(into, final);
    const ring = log.ring;
    if (ring !== null && ring.lastReset !== ring.lastHarvested) {
      report({ kind: 'error', message: `KVM_RESET_DIRTY_RINGS reset ${ring.lastReset} entries but ${ring.lastHarvested} were harvested` });
    }
  }

  /** Reports a vCPU that exited with KVM_EXIT_MMIO (nothing is emulated there); true if one did. */
  function mmioExit(): boolean {
    const m = exits.mmio();
    if (m === null) return false;
    report({ kind: 'error', message: `vcpu${m.vcpu} exited with KVM_EXIT_MMIO at gpa 0x${m.gpa.toString(16)}: no memslot or device there` });
    return true;
  }

  /** Answers ring-full exits (harvest, reset, re-enter); returns false when the run cannot go on. */
  function* serviceExits(into: PageBitmap): Steps<boolean> {
    if (mmioExit()) return false;
    if (yield* exits.serviceRingFull(() => collect(into, false))) yield undefined;
    return true;
  }

  for (let v = 0; v < c.vcpus; v++) vmm.requestStop(v);
  vmm.pauseHost();
  yield undefined;
  yield* log.start();

  let prevUnretired = new Set<number>();
  let opsBase = vmm.totalOps();
  for (let it = 1; it <= c.iterations; it++) {
    vmm.setIteration(it);
    reported.clear();
    first.clear();
    const hostWritesBefore = Atomics.load(vm.global, GlobalWord.HOST_WRITES);
    const ringFullBefore = sumWord(vmm, VcpuWord.RING_FULL_EXITS);
    const dirtiedBefore = sumWord(vmm, VcpuWord.FAULTS);
    const collectionsBefore = collections;
    for (let v = 0; v < c.vcpus; v++) {
      vmm.release(v);
      if (vmm.parkedExit(v) >= 0) vmm.reenter(v);
    }
    vmm.resumeHost();
    const released = clock.nowMs();
    yield undefined;

    const target = opsBase + c.opsPerIteration;
    const collectAt = opsBase + Math.floor(c.opsPerIteration * (0.1 + 0.8 * prng.float()));
    let collectedWhileRunning = false;
    for (;;) {
      if (!(yield* serviceExits(reported))) return;
      const ops = vmm.totalOps();
      if (!collectedWhileRunning && ops >= collectAt) {
        yield* collect(first, false);
        collectedWhileRunning = true;
        continue;
      }
      if (ops >= target) break;
      yield waitFor(WaitCode.GUEST_OPS, target - opsBase, ops - opsBase);
    }

    // Stop the vCPUs and the host writer, wait until they are definitely not running.
    for (let v = 0; v < c.vcpus; v++) vmm.requestStop(v);
    vmm.pauseHost();
    yield undefined;
    // Quiescence is stable: a stopped vCPU, or one parked in an exit, stays so until the
    // VMM acts. So no exit is serviced here: re-entering a vCPU already counted as
    // stopped would let it run on while the final collection reads the log.
    for (let v = 0; v < c.vcpus; v++) {
      while (!vmm.isQuiescent(v)) yield waitFor(WaitCode.VCPU_STOPPED, v);
    }
    const ranMs = clock.nowMs() - released;
    if (mmioExit()) return;
    while (!vmm.hostPaused()) yield waitFor(WaitCode.HOST_PAUSED);
    yield* collect(reported, true);
    reported.orWords(first.words);

    const unretired = new Set<number>();
    for (let v = 0; v < c.vcpus; v++) {
      // A vCPU parked in an exit, or stopped while paced at a fault, has a write that has not retired.
      const page = vmm.word(v, VcpuWord.PENDING_PAGE);
      if (page >= 0) unretired.add(page);
    }
    const result = yield* verifyDirtyLogSteps(mem, reported, it, {
      unretired, previousUnretired: prevUnretired, initiallySet: vm.tracking.kind === 'bitmap' && vm.tracking.initiallySet, firstCollection: first,
    });
    const opsNow = vmm.totalOps();
    report({
      kind: 'iteration', iteration: it, dirty: result.dirty, clean: result.clean, writes: opsNow - opsBase,
      hostWrites: Atomics.load(vm.global, GlobalWord.HOST_WRITES) - hostWritesBefore,
      ringFullExits: sumWord(vmm, VcpuWord.RING_FULL_EXITS) - ringFullBefore,
      collections: collections - collectionsBefore, ms: ranMs, dirtied: sumWord(vmm, VcpuWord.FAULTS) - dirtiedBefore,
    });
    if (result.violations.length > 0) {
      report({ kind: 'violation', violations: result.violations });
      return;
    }
    prevUnretired = unretired;
    opsBase = opsNow;
    yield undefined;
  }
  report({ kind: 'done', iterations: c.iterations });
}

function sumWord(vmm: VmmControl, word: number): number {
  let n = 0;
  for (let v = 0; v < vmm.vcpus; v++) n += vmm.word(v, word);
  return n;
}
