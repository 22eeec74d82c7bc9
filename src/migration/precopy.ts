import { PAGE_SIZE } from '../host/constants.ts';
import { PageBitmap } from '../host/dirty-bitmap.ts';
import { type ClearChunk, DirtyLogSync, type SourceTally, chunkOf } from '../host/vmm/dirty-log.ts';
import { Acted } from '../host/injections.ts';
import { type VcpuRate, dirtyLimits, vcpuCounters, vcpuRates } from '../host/vmm/vcpu-stats.ts';
import { type CompletionStats, explainDowntime } from './downtime.ts';
import type { Memslot } from '../host/memslot.ts';
import type { Vm } from '../host/vm.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import { ExitHandler } from '../host/vmm/exit-handler.ts';
import { VcpuWord } from '../host/layout.ts';
import { type Steps, WaitCode, waitFor } from '../roles/role.ts';
import { DestState, DestWord, type MigrationChannel } from './channel.ts';
import type { Clock } from '../roles/clock.ts';
import { COPY_COMPLETION, PageEvent } from '../host/page-history.ts';
import type { DmaSourceStats } from '../host/vmm/dma-dirty-sources.ts';
import { type PageSource, checksumUpdate, encodeComplete, encodeHeader, encodePages, encodeSync } from './stream.ts';

export type ConvergencePolicy = 'fail' | 'force' | 'auto-converge' | 'dirty-limit';

/** QEMU's default vcpu-dirty-limit: 1 MB/s (DEFAULT_MIGRATE_VCPU_DIRTY_LIMIT), in 4 KiB pages per second. */
export const DEFAULT_VCPU_DIRTY_LIMIT = 256;

export interface MigrationParams {
  /** max-bandwidth in bytes per second; 0 for unlimited. */
  bandwidth: number;
  downtimeLimitMs: number;
  maxIterations: number;
  timeoutMs: number;
  /**
   * Without convergence: fail or force the switchover at the iteration or time limit; or
   * auto-converge: throttle the vCPUs (QEMU's cpu-throttle-initial 20 %, +10 % steps,
   * at most 99 %) and keep going until the time limit; or dirty-limit: hold every vCPU
   * to `vcpuDirtyLimit` (QEMU's dirty-limit capability) and keep going.
   */
  policy: ConvergencePolicy;
  /** dirty-limit: each vCPU's quota, pages dirtied per second (QEMU's vcpu-dirty-limit, there in MB/s). */
  vcpuDirtyLimit?: number;
  /** Pages per frame. */
  batchPages: number;
  /** Guest operations to let run before migration starts (QEMU's tests let the guest warm up too). */
  warmupOps: number;
}

export interface MigrationBugs {
  /** Ring: copy the harvested pages before KVM_RESET_DIRTY_RINGS re-protects them. */
  copyBeforeReset: boolean;
  /** Manual protect: copy a chunk's pages before KVM_CLEAR_DIRTY_LOG re-protects them. */
  copyBeforeClear: boolean;
  /** Completion without the final sync of the dirty log. */
  skipFinalSync: boolean;
  /** The VMM never reaps on a KVM_EXIT_DIRTY_RING_FULL exit (the vCPU stays in it). */
  ringFullExitUnhandled?: boolean;
}

/** QEMU counts a page's header with it: 8 bytes of address and flags. */
const PAGE_OVERHEAD = 8;
/** Bandwidth is accounted in 100 ms windows, as QEMU's rate limiter does. */
const WINDOW_MS = 100;

export interface PassStats {
  pass: number;
  pagesSent: number;
  zeroPages: number;
  dirtyFound: number;
  syncMs: number;
  /** Bytes per second over the pass. */
  bandwidth: number;
  expectedDowntimeMs: number;
  ms: number;
  /** vCPU throttle during the pass, percent. */
  throttle: number;
  /** The dirty-limit policy's quota during the pass (pages/s per vCPU), 0 when not engaged. */
  dirtyLimit: number;
}

export type MigrationEvent =
  | { kind: 'pass'; stats: PassStats }
  | { kind: 'completed'; info: MigrationInfo }
  | { kind: 'failed'; reason: string; info: MigrationInfo };

/** What QEMU's `info migrate` shows (REFERENCE.md 5), plus the per-pass series. */
export interface MigrationInfo {
  status: 'completed' | 'failed';
  totalTimeMs: number;
  setupTimeMs: number;
  expectedDowntimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  normalPages: number;
  zeroPages: number;
  /** Mbit/s over the whole migration. */
  throughputMbps: number;
  pagesPerSecond: number;
  /** Pages dirtied per second, over the last pass. */
  dirtyPagesRate: number;
  dirtySyncCount: number;
  /** QEMU's cpu-throttle-percentage at the end. */
  throttlePercent: number;
  /** The dirty-limit policy's quota once it engaged (pages/s per vCPU), else 0. */
  dirtyLimit: number;
  downtimeLimitMs: number;
  /** Each vCPU's achieved operation and dirty page rates from the start of the migration to the stop. */
  vcpus: VcpuRate[];
  /** The completion (stop, final sync, last pass, destination) when the migration got that far. */
  completion: CompletionStats | null;
  /** Why the downtime exceeded the limit, in protocol words; null when it did not. */
  downtimeExceeded: string | null;
  passes: PassStats[];
  /** What each DMA dirty source reported (VMs with an IOMMU). */
  dmaSources: DmaSourceStats[];
  /** Guest operations each vCPU retired from the start of the migration to the stop (the guest's progress while it migrated). */
  guestOps: number[];
  /**
   * vCPUs found in the same KVM_EXIT_DIRTY_RING_FULL 16 frames apart in a pass: the
   * VMM answers ring-full exits after every frame, so such a vCPU was never re-entered
   * and the guest stalled.
   */
  stalledVcpus: number[];
}

/**
 * The migration thread: QEMU's pre-copy (migration/ram.c). Setup: every page dirty,
 * logging on, one sync. Iterate: send the dirty pages in ascending order under the
 * bandwidth limit, then sync (harvest, re-protect, flush: only then is anything read
 * again). Converge when remaining bytes / bandwidth is under the downtime limit; else at
 * the iteration or time limit apply the policy. Complete: stop the vCPUs, final sync
 * (the ring's backup bitmap last), send the rest, wait for the destination.
 */
export function* precopy(
  vm: Vm, channel: MigrationChannel, destWords: Int32Array, clock: Clock, p: MigrationParams, bugs: MigrationBugs,
  report: (e: MigrationEvent) => void, harvestSkipEvery = 0,
): Steps {
  const mem = vm.memory;
  const vmm = new VmmControl(vm);
  const exits = new ExitHandler(vmm, bugs.ringFullExitUnhandled === true);
  /** Frames sent; the guest-progress check runs every 16th (each frame answers ring-full exits). */
  let frames = 0;
  const sync = new DirtyLogSync(vm, harvestSkipEvery);
  const dirty = new PageBitmap(mem.totalPages);
  const chunkCleared = new Uint8Array(Math.ceil(mem.totalPages / 64));
  const manualChunks = vm.manualProtect;
  const history = vm.history;
  /** The pass copying now (the page history's COPIED detail), COPY_COMPLETION at the end. */
  let copyStage = 0;
  let crc = 0;
  let normal = 0;
  let zero = 0;
  let transferred = 0;
  let windowStart = 0;
  let windowBytes = 0;
  const passes: PassStats[] = [];
  let expectedDowntime = 0;
  let lastDirtyRate = 0;
  let pendingReset = false;
  let throttle = 0;
  let dirtyRateHigh = 0;
  /** Pages newly found dirty by every sync so far (ring-full reaps included). */
  let foundTotal = 0;
  /** copy-before-reset: pages copied since the harvest whose reset is still deferred. */
  let copiedBeforeReset = 0;

  /** Frames built where the channel delivers them from, when it can (the stream ring). */
  const inPlace = channel.alloc ? (n: number): Uint8Array => channel.alloc!(n) ?? new Uint8Array(n) : undefined;

  function send(frame: Uint8Array): void {
    crc = checksumUpdate(crc, frame);
    channel.send(frame);
  }

  /** The migration ends: DMA dirty tracking stops (QEMU's log_global_stop), then the outcome is reported. */
  const end = (e: MigrationEvent): void => {
    sync.dma?.stop();
    report(e);
  };

  const cancelled = (): boolean => Atomics.load(destWords, DestWord.CANCEL) !== 0;

  function* waitForCredit(limited: boolean): Steps {
    const w = channel.creditWord;
    for (;;) {
      const seen = Atomics.load(w.array, w.index); // read before the check: a later change wakes us
      if (channel.canSend()) break;
      if (cancelled()) return;
      if (Atomics.load(destWords, DestWord.STATE) === DestState.FAILED) return;
      yield waitFor(WaitCode.DESTINATION, 0, 0, { ...w, value: seen });
    }
    if (!limited || p.bandwidth <= 0) return;
    for (;;) {
      if (cancelled()) return;
      const now = clock.nowMs();
      const budget = (p.bandwidth * WINDOW_MS) / 1000;
      if (now - windowStart >= WINDOW_MS) {
        // What a frame sent beyond a window's budget is owed by the next windows, so a
        // limit below one frame per window still holds on average.
        const windows = Math.floor((now - windowStart) / WINDOW_MS);
        windowStart += windows * WINDOW_MS;
        windowBytes = Math.max(0, windowBytes - windows * budget);
      }
      if (windowBytes < budget) return;
      yield* serviceRingFull();
      // Virtual time advances only with steps: idling is a step of its own.
      yield clock.virtual ? undefined : waitFor(WaitCode.BANDWIDTH, Math.ceil(windowStart + WINDOW_MS - now));
    }
  }

  /** Pulls KVM's log into `dirty`. With copy-before-reset the ring reset is deferred. */
  function* syncLog(final: boolean, tally?: SourceTally): Steps<number> {
    const before = dirty.count();
    if (bugs.copyBeforeReset && vm.rings && !final) {
      // The bug: harvest now, reset (re-protect) only after the pages were copied.
      const h = sync.harvester!;
      for (const ring of vm.rings) h.harvest(ring, ring.entries, sync.recorder(dirty, ring.vcpu), harvestSkipEvery);
      pendingReset = true;
      yield undefined;
      if (sync.dma) yield* sync.dma.sync(dirty);
    } else {
      yield* sync.sync(dirty, final, !manualChunks, tally);
    }
    chunkCleared.fill(0);
    const found = dirty.count() - before;
    foundTotal += found;
    return found;
  }

  /** copy-before-reset: the reset the bug deferred until after the copy. */
  function* resetDeferred(): Steps {
    if (!pendingReset) return;
    if (copiedBeforeReset > 0) vm.acts.acted(Acted.COPY_BEFORE_RESET);
    copiedBeforeReset = 0;
    yield* vm.resetDirtyRings();
    pendingReset = false;
  }

  /** Answers ring-full exits: QEMU reaps into the migration bitmap and re-enters. */
  function* serviceRingFull(): Steps {
    const reap = function* (): Steps {
      yield* resetDeferred();
      yield* syncLog(false);
      yield* resetDeferred();
    };
    if (yield* exits.serviceRingFull(reap)) yield undefined;
  }

  /** Sends every dirty page, ascending. Returns [normal, zero] pages sent. */
  function* sendDirty(limited: boolean): Steps<[number, number]> {
    let sentNormal = 0;
    let sentZero = 0;
    const batch: number[] = [];
    let batchSlot: Memslot | null = null;
    const flush = function* (): Steps {
      if (batch.length === 0 || batchSlot === null || cancelled()) return;
      yield* waitForCredit(limited);
      const s = batchSlot;
      history?.recordEach(s.firstPage, batch, PageEvent.COPIED, copyStage);
      const enc = encodePages(s.slotField, batch, pagesOf(s), inPlace);
      send(enc.frame);
      const bytes = enc.normal * (PAGE_SIZE + PAGE_OVERHEAD) + enc.zero * (PAGE_OVERHEAD + 1);
      windowBytes += bytes;
      transferred += bytes;
      normal += enc.normal; zero += enc.zero; sentNormal += enc.normal; sentZero += enc.zero;
      if (pendingReset) copiedBeforeReset += enc.normal + enc.zero;
      batch.length = 0;
      yield undefined;
      if (limited) {
        yield* serviceRingFull();
        if ((++frames & 15) === 0) exits.checkProgress();
      }
    };
    /** copy-before-clear: the chunk whose CLEAR waits until its pages were copied. */
    let unclearedChunk: ClearChunk | null = null;
    const clearAfterCopy = function* (): Steps {
      if (unclearedChunk === null) return;
      const c = unclearedChunk;
      unclearedChunk = null;
      // The bug: the chunk's pages are copied first, cleared (re-protected) afterwards.
      yield* flush();
      if ((yield* vm.clearDirtyLog(c.slot, c.first, c.num, c.bits)) > 0) vm.acts.acted(Acted.COPY_BEFORE_CLEAR);
    };
    for (const slot of mem.slots) {
      for (let page = 0; page < slot.pages; page++) {
        const g = slot.firstPage + page;
        if ((g & 31) === 0 && dirty.words[g >>> 5] === 0) { page += 31; continue; } // a clean word: skip 32 pages
        if (!dirty.isDirty(g)) continue;
        if (manualChunks && !chunkCleared[g >>> 6]) {
          chunkCleared[g >>> 6] = 1;
          if (bugs.copyBeforeClear) {
            // The same CLEAR as below (the bits this pass sends), issued once the chunk was copied.
            yield* clearAfterCopy();
            unclearedChunk = chunkOf(slot, page, dirty);
          } else {
            // QEMU clears each 64-page chunk just before sending it (then copies).
            yield* flush();
            yield* sync.clearChunk(slot, page, dirty);
          }
        }
        if (batchSlot !== slot || batch.length >= p.batchPages) { yield* flush(); batchSlot = slot; }
        batch.push(page);
        dirty.words[g >>> 5]! &= ~(1 << (g & 31));
      }
      yield* clearAfterCopy();
      yield* flush();
    }
    return [sentNormal, sentZero];
  }

  function info(status: MigrationInfo['status'], downtimeMs: number): MigrationInfo {
    const total = clock.nowMs() - t0;
    const end = countersAtStop ?? vcpuCounters(vmm);
    return {
      status, totalTimeMs: total, setupTimeMs, expectedDowntimeMs: expectedDowntime, downtimeMs,
      transferredBytes: transferred, remainingBytes: dirty.count() * PAGE_SIZE, totalBytes: mem.slots.reduce((s, x) => s + x.pages, 0) * PAGE_SIZE,
      normalPages: normal, zeroPages: zero,
      throughputMbps: total > 0 ? (transferred * 8) / 1e6 / (total / 1000) : 0,
      pagesPerSecond: total > 0 ? ((normal + zero) * 1000) / total : 0,
      dirtyPagesRate: lastDirtyRate, dirtySyncCount: sync.syncs, throttlePercent: throttle, dirtyLimit: dirtyLimitApplied, passes,
      downtimeLimitMs: p.downtimeLimitMs,
      vcpus: vcpuRates(countersAtStart, end, (stopTime ?? clock.nowMs()) - t0, limitsAtStop ?? dirtyLimits(vmm)),
      completion,
      downtimeExceeded: status === 'completed' ? explainDowntime(downtimeMs, p.downtimeLimitMs, expectedDowntime, completion) : null,
      dmaSources: sync.dma?.stats() ?? [],
      guestOps: opsAtStart.map((n, v) => (opsAtStop[v] ?? vmm.word(v, VcpuWord.OPS)) - n),
      stalledVcpus: [...exits.stalled].sort((a, b) => a - b),
    };
  }

  // Let the guest run first, so that memory is written and keeps being written.
  for (;;) {
    const ops = vmm.totalOps();
    if (ops >= p.warmupOps) break;
    yield* serviceRingFull();
    yield waitFor(WaitCode.GUEST_OPS, p.warmupOps, ops);
  }
  const t0 = clock.nowMs();
  const opsAtStart = Array.from({ length: vmm.vcpus }, (_, v) => vmm.word(v, VcpuWord.OPS));
  const opsAtStop: number[] = [];
  const countersAtStart = vcpuCounters(vmm);
  let countersAtStop: ReturnType<typeof vcpuCounters> | null = null;
  let limitsAtStop: number[] | null = null;
  /** When countersAtStop was taken (the rates' interval ends there). */
  let stopTime: number | null = null;
  let completion: CompletionStats | null = null;
  /** The dirty limits in force before the migration (set-vcpu-dirty-limit), restored at its end. */
  const standingLimits = dirtyLimits(vmm);
  let dirtyLimitApplied = 0;
  /** The migration ends on the source: auto-converge's throttle and the dirty-limit policy's quota go. */
  const unthrottle = (): void => {
    vmm.setThrottle(0);
    standingLimits.forEach((l, v) => vmm.setDirtyLimit(l, v));
  };

  // Setup.
  send(encodeHeader(mem.slots.map((s) => ({ id: s.id, asId: s.asId, baseGfn: s.baseGfn, pages: s.pages }))));
  for (const slot of mem.slots) for (let page = 0; page < slot.pages; page++) dirty.mark(slot.firstPage + page);
  for (const slot of mem.slots) yield* vm.enableDirtyLogging(slot);
  if (sync.dma) yield* sync.dma.start();
  yield* syncLog(false);
  const setupTimeMs = clock.nowMs() - t0;

  // Iterate.
  let pass = 0;
  for (;;) {
    pass++;
    const passStart = clock.nowMs();
    const before = transferred;
    const foundBefore = foundTotal;
    copyStage = pass;
    const [sent, sentZero] = yield* sendDirty(true);
    yield* resetDeferred();
    send(encodeSync(pass));
    const syncStart = clock.nowMs();
    yield* syncLog(false);
    const found = foundTotal - foundBefore; // this pass's reaps and its closing sync

    const now = clock.nowMs();
    const ms = Math.max(now - passStart, 1e-3);
    const bandwidth = ((transferred - before) * 1000) / ms;
    lastDirtyRate = (found * 1000) / ms;
    const remaining = dirty.count() * PAGE_SIZE;
    const bw = p.bandwidth > 0 ? Math.min(bandwidth, p.bandwidth) : bandwidth;
    expectedDowntime = bw > 0 ? (remaining * 1000) / bw : Infinity;
    const stats: PassStats = {
      pass, pagesSent: sent + sentZero, zeroPages: sentZero, dirtyFound: found, syncMs: now - syncStart, bandwidth, expectedDowntimeMs: expectedDowntime, ms, throttle,
      dirtyLimit: dirtyLimitApplied,
    };
    passes.push(stats);
    report({ kind: 'pass', stats });
    if (Atomics.load(destWords, DestWord.STATE) === DestState.FAILED) {
      unthrottle();
      end({ kind: 'failed', reason: 'the destination failed', info: info('failed', 0) });
      return;
    }
    if (vm.iommu?.dmaRecords.faultStopped()) {
      unthrottle();
      end({ kind: 'failed', reason: 'a device faulted and the run stops on device faults', info: info('failed', 0) });
      return;
    }
    if (cancelled()) {
      // migrate_cancel: the source VM keeps running, unthrottled.
      unthrottle();
      end({ kind: 'failed', reason: 'cancelled', info: info('failed', 0) });
      return;
    }
    if (expectedDowntime <= p.downtimeLimitMs) break;
    const throttles = p.policy === 'auto-converge' || p.policy === 'dirty-limit';
    if (throttles && found * PAGE_SIZE > 0.5 * (transferred - before) && ++dirtyRateHigh >= 2) {
      // QEMU's migration_trigger_throttle: dirtying outpaced half the transfer twice.
      dirtyRateHigh = 0;
      if (p.policy === 'auto-converge') {
        // mig_throttle_guest_down
        throttle = throttle === 0 ? 20 : Math.min(99, throttle + 10);
        vmm.setThrottle(throttle);
      } else if (dirtyLimitApplied === 0) {
        // migration_dirty_limit_guest: every vCPU gets the vcpu-dirty-limit quota, once.
        dirtyLimitApplied = p.vcpuDirtyLimit ?? DEFAULT_VCPU_DIRTY_LIMIT;
        vmm.setDirtyLimit(dirtyLimitApplied);
      }
    }
    const outOfPasses = pass >= p.maxIterations && !throttles;
    if (outOfPasses || now - t0 >= p.timeoutMs) {
      if (p.policy === 'force') break;
      unthrottle();
      const held = throttle ? `, throttle ${throttle} %` : dirtyLimitApplied ? `, dirty limit ${dirtyLimitApplied} pages/s per vCPU` : '';
      end({ kind: 'failed', reason: `did not converge in ${pass} passes (expected downtime ${expectedDowntime.toFixed(1)} ms > limit ${p.downtimeLimitMs} ms${held})`, info: info('failed', 0) });
      return;
    }
  }

  // Complete: stop the VM, final sync, send the rest, wait for the destination.
  const stoppingAt = clock.nowMs();
  for (let v = 0; v < vmm.vcpus; v++) vmm.requestStop(v);
  vmm.pauseHost();
  yield undefined;
  for (let v = 0; v < vmm.vcpus; v++) while (!vmm.isQuiescent(v)) yield waitFor(WaitCode.VCPU_STOPPED, v);
  for (let v = 0; v < vmm.vcpus; v++) opsAtStop.push(vmm.word(v, VcpuWord.OPS));
  countersAtStop = vcpuCounters(vmm);
  stopTime = clock.nowMs();
  limitsAtStop = dirtyLimits(vmm);
  unthrottle();
  while (!vmm.hostPaused()) yield waitFor(WaitCode.HOST_PAUSED);
  const stoppedAt = clock.nowMs();
  const estimatedPages = dirty.count();
  const finalSync: CompletionStats['finalSync'] = [];
  if (!bugs.skipFinalSync) yield* syncLog(true, (source, pages) => finalSync.push({ source, pages }));
  else vm.acts.acted(Acted.SKIP_FINAL_SYNC);
  const syncedAt = clock.nowMs();
  const pagesLeft = dirty.count();
  copyStage = COPY_COMPLETION;
  yield* sendDirty(false);
  send(encodeComplete(normal, zero, crc));
  const sentAt = clock.nowMs();
  yield undefined;
  for (;;) {
    const st = Atomics.load(destWords, DestWord.STATE);
    if (st === DestState.COMPLETE) break;
    if (st === DestState.FAILED) {
      end({ kind: 'failed', reason: 'the destination failed', info: info('failed', 0) });
      return;
    }
    yield waitFor(WaitCode.DESTINATION, 1, 0, { array: destWords, index: DestWord.STATE, value: st });
  }
  const doneAt = clock.nowMs();
  completion = {
    estimatedPages, finalSync, pagesSent: pagesLeft,
    stopMs: stoppedAt - stoppingAt, syncMs: syncedAt - stoppedAt, sendMs: sentAt - syncedAt, destinationMs: doneAt - sentAt,
  };
  end({ kind: 'completed', info: info('completed', doneAt - stoppingAt) });
}

/** A slot's guest memory as encodePages reads it. */
function pagesOf(slot: Memslot): PageSource {
  return { isZero: (page) => slot.isZeroPage(page), copy: (page, count, into, at) => slot.copyPages(page, count, into, at) };
}

