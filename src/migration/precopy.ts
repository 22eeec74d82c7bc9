import { KvmError } from '../util/errors.ts';
import { switchToCoherent } from './switch-to-coherent.ts';
import { blobStateOf } from '../host/devices/blob-state.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { PageBitmap } from '../host/dirty-bitmap.ts';
import { Acted } from '../host/injections.ts';
import type { Memslot } from '../host/memslot.ts';
import { COPY_COMPLETION } from '../host/tracepoints.ts';
import type { Vm } from '../host/vm.ts';
import { GlobalWord } from '../host/layout.ts';
import type { CpuCache } from '../host/cpu-cache.ts';
import { DirtyLog } from '../host/vmm/dirty-log.ts';
import type { SourceTally } from '../host/vmm/dirty-source.ts';
import { ExitHandler } from '../host/vmm/exit-handler.ts';
import { dirtyLimits, vcpuCounters } from '../host/vmm/vcpu-stats.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import type { Clock } from '../roles/clock.ts';
import { type Steps, WaitCode, waitFor } from '../roles/role.ts';
import { BandwidthLimiter } from './bandwidth-limiter.ts';
import { DestState, DestWord, type MigrationChannel } from './channel.ts';
import { type ConvergencePolicy, NO_THROTTLE, POLICY, type Throttle, expectedDowntime, notConverged } from './convergence.ts';
import type { CompletionStats } from './downtime.ts';
import { type MigrationEvent, type MigrationInfo, MigrationStats, type PassStats } from './migration-stats.ts';
import { type PageSource, checksumUpdate, encodeAttributes, encodeComplete, encodeHeader, encodePages, encodeSync } from './stream.ts';

export { type ConvergencePolicy, DEFAULT_VCPU_DIRTY_LIMIT } from './convergence.ts';
export type { MigrationEvent, MigrationInfo, PassStats } from './migration-stats.ts';

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
   * to `vcpuDirtyLimit` (QEMU's dirty-limit capability) and keep going (convergence.ts).
   */
  policy: ConvergencePolicy;
  /** dirty-limit: each vCPU's quota, pages dirtied per second (QEMU's vcpu-dirty-limit, there in MB/s). */
  vcpuDirtyLimit?: number;
  /** Pages per frame. */
  batchPages: number;
  /** Guest operations to let run before migration starts (QEMU's tests let the guest warm up too). */
  warmupOps: number;
  /**
   * With non-coherent DMA registered and the CPU cache model: `clflush-before-read`, each
   * page is flushed from the CPU caches before the migration thread reads it, so what a
   * UC/WC store or no-snoop DMA put in memory is what it reads; `switch-to-coherent`, guest
   * and host return to coherent DMA before the first read, `switch-host-only` the host
   * alone (switch-to-coherent.ts); `device-state`, the KVM-only slots (which RAM
   * migration never reads) are saved by the device's save handler once the VM is stopped
   * (devices/blob-state.ts); `none` (the default here,
   * and the bug): read as it is, write-back. (QEMU's own answer, a migration blocker, is
   * the scenario's: scenarios/migration.ts.)
   */
  noncoherent?: 'clflush-before-read' | 'switch-to-coherent' | 'switch-host-only' | 'device-state' | 'none';
}

/** The reason a migration ends with when its destination failed (the TCP bridge may know more: scenarios/migration.ts). */
export const DESTINATION_FAILED = 'the destination failed';

export interface MigrationBugs {
  /** Ring: copy the harvested pages before KVM_RESET_DIRTY_RINGS re-protects them (an option of the ring source). */
  copyBeforeReset: boolean;
  /** Manual protect: copy a chunk's pages before KVM_CLEAR_DIRTY_LOG re-protects them (an option of the clear-log source). */
  copyBeforeClear: boolean;
  /** Completion without the final sync of the dirty log. */
  skipFinalSync: boolean;
  /** clflush-before-read does not flush: the page is read as it is (counted each time a flush was due). */
  noncoherentWithoutFlush?: boolean;
  /** The VMM never reaps on a KVM_EXIT_DIRTY_RING_FULL exit (the vCPU stays in it). */
  ringFullExitUnhandled?: boolean;
  /** harvest-skips-entry: the ring harvest drops every Nth entry (0: never). */
  harvestSkipEvery?: number;
  /** migrate-private-pages: discarded (private) pages are read and sent like any other (QEMU's 2024 bug). */
  migratePrivatePages?: boolean;
  /** vmm-touches-kvm-only-slot: a KVM_MEM_KVM_ONLY slot is migrated like RAM (read by the migration thread). */
  vmmTouchesKvmOnlySlot?: boolean;
}

/**
 * The migration thread: QEMU's pre-copy (migration/ram.c), the engine. Setup: every page
 * dirty, logging on, one sync. Iterate: send the dirty pages in ascending order under the
 * bandwidth limit, then sync every dirty source (dirty-log.ts: harvest, re-protect,
 * flush; only then is anything read again); after each pass the convergence policy
 * (convergence.ts) decides: continue (maybe throttling the guest), switch over, or fail.
 * Complete: stop the vCPUs, final sync (the ring's backup bitmap last), send the rest,
 * wait for the destination. docs/architecture.md draws the sequence.
 */
export function* precopy(
  vm: Vm, channel: MigrationChannel, destWords: Int32Array, clock: Clock, p: MigrationParams, bugs: MigrationBugs,
  report: (e: MigrationEvent) => void,
): Steps {
  const mem = vm.memory;
  const vmm = new VmmControl(vm);
  const flushFirst = (slot: Memslot, pages: number): boolean => flushBeforeRead(vm, slot, p.noncoherent === 'clflush-before-read', bugs.noncoherentWithoutFlush === true, pages) === 'flush';
  const exits = new ExitHandler(vmm, bugs.ringFullExitUnhandled === true);
  const log = new DirtyLog(vm, {
    clearPerChunk: true, harvestSkipEvery: bugs.harvestSkipEvery, deferRingReset: bugs.copyBeforeReset, clearAfterCopy: bugs.copyBeforeClear,
  });
  const limiter = new BandwidthLimiter(p.bandwidth);
  const policy = POLICY[p.policy];
  const dirty = new PageBitmap(mem.totalPages);
  /** Manual protect: the 64-page chunks of `dirty` cleared since the last sync (QEMU's clear_bmap). */
  const chunkCleared = new Uint8Array(Math.ceil(mem.totalPages / 64));
  const manualChunks = vm.manualProtect;
  /** Frames sent; the guest-progress check runs every 16th (each frame answers ring-full exits). */
  let frames = 0;
  /** The pass copying now (the page history's COPIED detail), COPY_COMPLETION at the end. */
  let copyStage = 0;
  let crc = 0;
  let throttle: Throttle = NO_THROTTLE;
  /** Pages newly found dirty by every sync so far (ring-full reaps included). */
  let foundTotal = 0;

  /** Frames built where the channel delivers them from, when it can (the stream ring). */
  const inPlace = channel.alloc ? (n: number): Uint8Array => channel.alloc!(n) ?? new Uint8Array(n) : undefined;

  function send(frame: Uint8Array): void {
    crc = checksumUpdate(crc, frame);
    channel.send(frame);
  }

  const cancelled = (): boolean => Atomics.load(destWords, DestWord.CANCEL) !== 0;

  const destinationFailed = (): boolean => Atomics.load(destWords, DestWord.STATE) === DestState.FAILED;

  function* waitForCredit(limited: boolean): Steps {
    const w = channel.creditWord;
    for (;;) {
      const seen = Atomics.load(w.array, w.index); // read before the check: a later change wakes us
      if (channel.canSend()) break;
      if (cancelled()) return;
      if (Atomics.load(destWords, DestWord.STATE) === DestState.FAILED) return;
      yield waitFor(WaitCode.DESTINATION, 0, 0, { ...w, value: seen });
    }
    if (!limited) return;
    for (;;) {
      if (cancelled()) return;
      const wait = limiter.waitMs(clock.nowMs());
      if (wait === 0) return;
      yield* serviceRingFull();
      // Virtual time advances only with steps: idling is a step of its own.
      yield clock.virtual ? undefined : waitFor(WaitCode.BANDWIDTH, Math.ceil(wait));
    }
  }

  /** One sync of every dirty source into `dirty`; returns the pages it newly found. */
  function* syncLog(final: boolean, tally?: SourceTally): Steps<number> {
    const before = dirty.count();
    yield* log.sync(dirty, final, tally);
    if (!bugs.migratePrivatePages) clearDiscarded();
    clearKvmOnly();
    chunkCleared.fill(0);
    const found = dirty.count() - before;
    foundTotal += found;
    return found;
  }

  /**
   * ramblock_dirty_bitmap_clear_discarded_pages after each sync: a guest_memfd slot's
   * private pages (discarded in the RamDiscardManager) leave the bitmap, so they are
   * neither counted as remaining nor visited (sendDirty checks each page again: a
   * conversion may discard one after this).
   */
  function clearDiscarded(): void {
    for (const slot of mem.slots) {
      const rdm = slot.rdmBitmap;
      if (rdm === null) continue;
      const at = slot.firstPage >>> 5; // a multiple of 64: the slot's words line up
      for (let i = 0; i < rdm.length; i++) dirty.words[at + i]! &= rdm[i]!;
    }
  }

  /**
   * A KVM_MEM_KVM_ONLY slot is not RAM the VMM may read: its pages leave the bitmap (the
   * VMM never maps it; the device saves it: device-state). vmm-touches-kvm-only-slot keeps
   * them, and the pass reads them like any RAM.
   */
  function clearKvmOnly(): void {
    if (bugs.vmmTouchesKvmOnlySlot) return;
    for (const slot of mem.slots) if (slot.kvmOnly) dirty.words.fill(0, slot.firstPage >>> 5, (slot.firstPage + slot.pages + 31) >>> 5);
  }

  /** Answers ring-full exits: QEMU reaps into the migration bitmap and re-enters. */
  function* serviceRingFull(): Steps {
    const reap = function* (): Steps {
      yield* log.settle();
      yield* syncLog(false);
      yield* log.settle();
    };
    if (yield* exits.serviceRingFull(reap)) yield undefined;
  }

  /** Sends every dirty page, ascending. Returns [normal, zero] pages sent. */
  function* sendDirty(limited: boolean): Steps<[number, number]> {
    let sentNormal = 0;
    let sentZero = 0;
    const batch: number[] = [];
    let batchSlot: Memslot | null = null;
    /** Conversions finished before the batch's first page was checked (pagesOf). */
    let doneAtCheck = 0;
    const flush = function* (): Steps {
      // Cancelled, or the destination failed: nothing more goes out (the pass ends at once).
      if (cancelled() || destinationFailed()) { batch.length = 0; return; }
      if (batch.length === 0 || batchSlot === null) return;
      yield* waitForCredit(limited);
      // The wait ends early on a cancel or a failed destination: the batch is dropped then too (no frame past the credit window).
      if (cancelled() || destinationFailed()) { batch.length = 0; return; }
      const s = batchSlot;
      if (s.kvmOnly) {
        // The oracle: the VMM's generic path reads a slot only KVM may map.
        vm.kvmOnlyTouched(s, batch[0]!, batch.length);
        vm.acts.acted(Acted.VMM_TOUCHES_KVM_ONLY_SLOT, batch.length);
      }
      vm.tracepoints.active?.copied(s, batch, copyStage);
      const enc = encodePages(s.slotField, batch, vm.cache !== null ? cachedPagesOf(s, vm.cache, flushFirst(s, batch.length)) : pagesOf(s, vm.global, doneAtCheck), inPlace);
      send(enc.frame);
      limiter.charge(stats.sent(enc.normal, enc.zero));
      sentNormal += enc.normal; sentZero += enc.zero;
      yield* log.afterCopy(enc.normal + enc.zero);
      batch.length = 0;
      yield undefined;
      if (limited) {
        yield* serviceRingFull();
        if ((++frames & 15) === 0) exits.checkProgress();
      }
    };
    for (const slot of mem.slots) {
      for (let page = 0; page < slot.pages; page++) {
        const g = slot.firstPage + page;
        if ((g & 31) === 0 && dirty.words[g >>> 5] === 0) { page += 31; continue; } // a clean word: skip 32 pages
        if (!dirty.isDirty(g)) continue;
        // Conversions finished before this page's check (pagesOf's probe excuses any conversion since).
        const doneBeforeCheck = slot.rdmBitmap !== null ? Atomics.load(vm.global, GlobalWord.CONVERSIONS_DONE) : 0;
        if (slot.rdmBitmap !== null && (slot.rdmBitmap[page >>> 5]! & (1 << (page & 31))) === 0) {
          // ramblock_page_is_discarded: a private page's shared memory is discarded; even
          // reading it might populate it again (migration/ram.c). Never read, never sent.
          if (!bugs.migratePrivatePages) { dirty.words[g >>> 5]! &= ~(1 << (g & 31)); continue; }
          vm.acts.acted(Acted.MIGRATE_PRIVATE_PAGES);
        }
        if (manualChunks && !chunkCleared[g >>> 6]) {
          chunkCleared[g >>> 6] = 1;
          // QEMU clears each 64-page chunk just before sending it (log_clear), then copies.
          yield* flush();
          yield* log.beforeCopy(slot, page, dirty);
        }
        if (batchSlot !== slot || batch.length >= p.batchPages) { yield* flush(); batchSlot = slot; }
        // The batch's first page was checked first: its count is the oldest, which excuses the most.
        if (batch.length === 0) doneAtCheck = doneBeforeCheck;
        batch.push(page);
        dirty.words[g >>> 5]! &= ~(1 << (g & 31));
      }
      yield* flush();
      yield* log.afterSlot(slot);
    }
    return [sentNormal, sentZero];
  }

  /**
   * device-state: the device's save handler sends each KVM-only slot's pages, read through
   * the device's own access (blobStateOf), in the stopped VM's downtime. Returns the pages.
   */
  function* sendDeviceState(): Steps<number> {
    let pages = 0;
    for (const slot of mem.slots) {
      if (!slot.kvmOnly) continue;
      const source = blobStateOf(vm, slot);
      for (let page = 0; page < slot.pages; page += p.batchPages) {
        yield* waitForCredit(false);
        if (cancelled() || destinationFailed()) return pages;
        const n = Math.min(p.batchPages, slot.pages - page);
        const enc = encodePages(slot.slotField, Array.from({ length: n }, (_, i) => page + i), source, inPlace);
        send(enc.frame);
        stats.sent(enc.normal, enc.zero);
        pages += n;
        yield undefined;
      }
    }
    return pages;
  }

  function info(status: MigrationInfo['status'], downtimeMs: number): MigrationInfo {
    return stats.info(status, downtimeMs, clock.nowMs(), {
      remainingPages: dirty.count(), syncs: log.syncs, throttle: throttle.cpuPercent, dirtyLimit: throttle.dirtyLimit,
      counters: vcpuCounters(vmm), limits: dirtyLimits(vmm), dmaSources: log.dmaStats(), stalledVcpus: [...exits.stalled].sort((a, b) => a - b),
    });
  }

  /** The migration ends: the guest is unthrottled, DMA dirty tracking stops (QEMU's log_global_stop), then the outcome is reported. */
  const end = (e: MigrationEvent): void => {
    unthrottle();
    log.stop();
    report(e);
  };

  // Let the guest run first, so that memory is written and keeps being written.
  for (;;) {
    // A guest the VMM is still booting has not started: there is nothing to migrate yet.
    const booting = Atomics.load(vm.global, GlobalWord.VM_START_PENDING);
    if (booting !== 0) { yield waitFor(WaitCode.VM_START, 0, 0, { array: vm.global, index: GlobalWord.VM_START_PENDING, value: booting }); continue; }
    const ops = vmm.totalOps();
    // A VM stopped on an internal error makes no progress: it is migrated as it is, as QEMU migrates a stopped VM.
    if (ops >= p.warmupOps || vmm.stoppedOnError()) break;
    yield* serviceRingFull();
    yield waitFor(WaitCode.GUEST_OPS, p.warmupOps, ops);
  }
  const t0 = clock.nowMs();
  // The switch back to coherent DMA comes first, and counts in the migration's time.
  if (p.noncoherent === 'switch-to-coherent' || p.noncoherent === 'switch-host-only') yield* switchToCoherent(vm, p.noncoherent === 'switch-to-coherent');
  const stats = new MigrationStats(t0, mem.slots.reduce((s, x) => s + x.pages, 0) * PAGE_SIZE, p.downtimeLimitMs);
  stats.countersAtStart = vcpuCounters(vmm);
  /** The dirty limits in force before the migration (set-vcpu-dirty-limit), restored at its end. */
  const standingLimits = dirtyLimits(vmm);
  /** The migration ends on the source: auto-converge's throttle and the dirty-limit policy's quota go. */
  const unthrottle = (): void => {
    vmm.setThrottle(0);
    standingLimits.forEach((l, v) => vmm.setDirtyLimit(l, v));
  };

  // Setup.
  send(encodeHeader(mem.slots.map((s) => ({ id: s.id, asId: s.asId, baseGfn: s.baseGfn, pages: s.pages }))));
  for (const slot of mem.slots) for (let page = 0; page < slot.pages; page++) dirty.mark(slot.firstPage + page);
  clearKvmOnly();
  try {
    yield* log.start();
  } catch (e) {
    // KVM refused to log a slot (a KVM_MEM_DMA slot under dma-slot-logging refuse): QEMU's log_global_start fails, and so does the migration.
    if (!(e instanceof KvmError)) throw e;
    end({ kind: 'failed', reason: `dirty logging could not start: ${e.message}`, info: info('failed', 0) });
    return;
  }
  yield* syncLog(false);
  stats.setupTimeMs = clock.nowMs() - t0;

  // Iterate.
  let pass = 0;
  for (;;) {
    pass++;
    const passStart = clock.nowMs();
    const before = stats.transferred;
    const foundBefore = foundTotal;
    copyStage = pass;
    const [sent, sentZero] = yield* sendDirty(true);
    yield* log.settle();
    send(encodeSync(pass));
    const syncStart = clock.nowMs();
    yield* syncLog(false);
    const found = foundTotal - foundBefore; // this pass's reaps and its closing sync

    const now = clock.nowMs();
    const measure = { pass, ms: Math.max(now - passStart, 1e-3), bytesSent: stats.transferred - before, pagesFound: found, remainingBytes: dirty.count() * PAGE_SIZE, elapsedMs: now - t0 };
    const { bandwidth, expectedMs } = expectedDowntime(measure, p);
    stats.lastDirtyRate = (found * 1000) / measure.ms;
    stats.expectedDowntimeMs = expectedMs;
    const passStats: PassStats = {
      pass, pagesSent: sent + sentZero, zeroPages: sentZero, dirtyFound: found, syncMs: now - syncStart, bandwidth, expectedDowntimeMs: expectedMs,
      ms: measure.ms, throttle: throttle.cpuPercent, dirtyLimit: throttle.dirtyLimit,
    };
    stats.passes.push(passStats);
    report({ kind: 'pass', stats: passStats });
    if (Atomics.load(destWords, DestWord.STATE) === DestState.FAILED) {
      end({ kind: 'failed', reason: DESTINATION_FAILED, info: info('failed', 0) });
      return;
    }
    if (vm.iommu?.dmaRecords.faultStopped()) {
      end({ kind: 'failed', reason: 'a device faulted and the run stops on device faults', info: info('failed', 0) });
      return;
    }
    if (cancelled()) {
      // migrate_cancel: the source VM keeps running, unthrottled.
      end({ kind: 'failed', reason: 'cancelled', info: info('failed', 0) });
      return;
    }
    const v = policy(measure, expectedMs, throttle, p);
    if (v.throttle.cpuPercent !== throttle.cpuPercent) vmm.setThrottle(v.throttle.cpuPercent);
    if (v.throttle.dirtyLimit !== throttle.dirtyLimit) vmm.setDirtyLimit(v.throttle.dirtyLimit);
    throttle = v.throttle;
    if (v.decision === 'switchover') break;
    if (v.decision === 'fail') {
      end({ kind: 'failed', reason: notConverged(pass, expectedMs, p, throttle), info: info('failed', 0) });
      return;
    }
  }

  // Complete: stop the VM, final sync, send the rest, wait for the destination.
  const stoppingAt = clock.nowMs();
  for (let v = 0; v < vmm.vcpus; v++) vmm.requestStop(v);
  vmm.pauseHost();
  yield undefined;
  for (let v = 0; v < vmm.vcpus; v++) while (!vmm.isQuiescent(v)) yield waitFor(WaitCode.VCPU_STOPPED, v);
  stats.countersAtStop = vcpuCounters(vmm);
  stats.stopTime = clock.nowMs();
  stats.limitsAtStop = dirtyLimits(vmm);
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
  const deviceStatePages = p.noncoherent === 'device-state' ? yield* sendDeviceState() : 0;
  // A confidential guest's shared/private state, as the RamDiscardManager has it, once the VM is stopped.
  for (const slot of mem.slots) if (slot.rdmBitmap !== null) send(encodeAttributes(slot.slotField, slot.rdmBitmap));
  send(encodeComplete(stats.normal, stats.zero, crc));
  const sentAt = clock.nowMs();
  yield undefined;
  for (;;) {
    const st = Atomics.load(destWords, DestWord.STATE);
    if (st === DestState.COMPLETE) break;
    if (st === DestState.FAILED) {
      end({ kind: 'failed', reason: DESTINATION_FAILED, info: info('failed', 0) });
      return;
    }
    yield waitFor(WaitCode.DESTINATION, 1, 0, { array: destWords, index: DestWord.STATE, value: st });
  }
  const doneAt = clock.nowMs();
  stats.completion = {
    estimatedPages, finalSync, pagesSent: pagesLeft, ...(deviceStatePages > 0 ? { deviceStatePages } : {}),
    stopMs: stoppedAt - stoppingAt, syncMs: syncedAt - stoppedAt, sendMs: sentAt - syncedAt, destinationMs: doneAt - sentAt,
  };
  end({ kind: 'completed', info: info('completed', doneAt - stoppingAt) });
}

/** What clflush-before-read does about pages the migration thread is about to read. */
export type MigrationFlush = 'flush' | 'skipped' | 'not due';

/**
 * clflush-before-read's decision for `pages` pages of `slot` the migration thread is about
 * to read: flush them while the policy asks (`policy`) and memory may change behind the
 * cache there: non-coherent DMA registered (any page: the guest may map any page WC and
 * the device reach it), or a KVM_MEM_DMA slot (that slot alone, as the flag was meant to
 * let KVM flush only it: a device's no-snoop DMA goes there, even while logging forces the
 * guest's side WB); migrate-noncoherent-without-flush (`withoutFlush`) skips the flush,
 * counted as acted.
 */
export function flushBeforeRead(vm: Vm, slot: Memslot, policy: boolean, withoutFlush: boolean, pages: number): MigrationFlush {
  if (!policy || !(vm.noncoherentDma() || vm.isDmaSlot(slot))) return 'not due';
  if (!withoutFlush) return 'flush';
  vm.acts.acted(Acted.MIGRATE_NONCOHERENT_WITHOUT_FLUSH, pages);
  return 'skipped';
}

/**
 * A slot's guest memory read through the CPU cache model (VmConfig.cpuCache), as the
 * migration thread's memcpy reads it: write-back, so a line cached from before a UC or WC
 * write is what it sends (page aliasing), and a dirty line is read from the cache.
 */
export function cachedPagesOf(slot: Memslot, cache: CpuCache, flush: boolean): PageSource {
  const scratch = new Uint8Array(PAGE_SIZE);
  const read = (frame: number, into: Uint8Array, at: number): void => {
    // clflush-before-read: nothing cached from before a UC/WC store or a no-snoop DMA is left to hit.
    if (flush) cache.clflushPage(frame, true);
    cache.readPage(frame, into, at);
  };
  return {
    isZero: (page) => {
      read(slot.firstPage + page, scratch, 0);
      return Buffer.from(scratch.buffer).equals(ZERO_PAGE_BYTES);
    },
    copy: (page, count, into, at) => {
      for (let i = 0; i < count; i++) read(slot.firstPage + page + i, into, at + i * PAGE_SIZE);
    },
  };
}

const ZERO_PAGE_BYTES = Buffer.alloc(PAGE_SIZE);

/**
 * A slot's guest memory as encodePages reads it. A guest_memfd slot's reads are watched:
 * one of a page the RamDiscardManager has discarded (private) is counted, as the kernel
 * would fault it in again (the private memory oracle's probe, independent of the skip),
 * unless a conversion was under way or began since `doneAtCheck` conversions had
 * finished (when the migration thread checked the batch's pages): such a read races the
 * conversion, and reading memory as it is discarded is harmless in this design.
 */
function pagesOf(slot: Memslot, g: Int32Array, doneAtCheck: number): PageSource {
  const rdm = slot.rdmBitmap;
  if (rdm === null) return { isZero: (page) => slot.isZeroPage(page), copy: (page, count, into, at) => slot.copyPages(page, count, into, at) };
  return {
    isZero: (page) => {
      if ((rdm[page >>> 5]! & (1 << (page & 31))) === 0 && Atomics.load(g, GlobalWord.CONVERSIONS_STARTED) <= doneAtCheck) {
        Atomics.add(g, GlobalWord.PRIVATE_TOUCHES, 1);
        Atomics.compareExchange(g, GlobalWord.PRIVATE_TOUCH_FIRST_GFN, 0, slot.baseGfn + page + 1);
      }
      return slot.isZeroPage(page);
    },
    copy: (page, count, into, at) => slot.copyPages(page, count, into, at),
  };
}
