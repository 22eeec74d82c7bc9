import { describe, expect, it } from 'vitest';
import { DeadlockError, DeterministicDriver, RandomScheduler, type Scheduler } from '../src/drivers/deterministic.ts';
import { DEFAULT_WORKLOAD, type WorkloadOptions, createWorkload } from '../src/guest/workload.ts';
import { KVM_EXIT_DIRTY_RING_FULL, PAGE_SIZE } from '../src/host/constants.ts';
import { type GuestOp, OpKind, type Workload } from '../src/host/guest-op.ts';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { type DirtyTracking, GlobalWord, type MemslotConfig, VcpuRequest, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import type { Memslot } from '../src/host/memslot.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import type { Vm } from '../src/host/vm.ts';
import { KVM_DIRTY_BITMAP } from '../src/host/vmm/kvm-bitmap-source.ts';
import { KVM_BACKUP_BITMAP, KVM_RINGS } from '../src/host/vmm/kvm-ring-source.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';
import { DEST_WORDS, DestState, DestWord, type MigrationChannel, QueueChannel } from '../src/migration/channel.ts';
import { NO_THROTTLE, notConverged } from '../src/migration/convergence.ts';
import { Destination } from '../src/migration/destination.ts';
import { DestinationRole, QueueSource } from '../src/migration/destination-role.ts';
import { explainDowntime } from '../src/migration/downtime.ts';
import { MigrationStats, PAGE_OVERHEAD } from '../src/migration/migration-stats.ts';
import {
  DESTINATION_FAILED, type MigrationBugs, type MigrationEvent, type MigrationInfo, type MigrationParams, type PassStats, precopy,
} from '../src/migration/precopy.ts';
import { PAGE_ZERO, type PageBatch, type StreamRecord, StreamDecoder } from '../src/migration/stream.ts';
import { compareMemory } from '../src/oracles/stamp-oracle.ts';
import { type Clock, StepClock } from '../src/roles/clock.ts';
import { GeneratorRole, type Role, Step, type Wait, WaitCode } from '../src/roles/role.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { vmFor } from '../src/scenarios/roles.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';

/**
 * QEMU's pre-copy migration thread (src/migration/precopy.ts) run directly, every role on
 * this thread under the deterministic driver: the vCPUs, the migration generator with a
 * channel that decodes each frame and notes the step it went out at, and the in-process
 * destination. Same seed, same run: the figures of `info migrate` are checked exactly
 * against what the stream carried and when.
 */

type Rec = StreamRecord | PageBatch;
interface Frame { at: number; seq: number; rec: Rec; bytes: Uint8Array }
type PageFrame = Frame & { rec: PageBatch };
interface Ioctl { ioctl: 'get' | 'clear' | 'reset'; at: number; seq: number; slot?: Memslot; first?: number; num?: number }

const isPages = (r: Rec): r is PageBatch => !('t' in r);

interface RigOptions {
  tracking: DirtyTracking;
  slots?: MemslotConfig[];
  vcpus?: number;
  seed?: number;
  workload?: Partial<WorkloadOptions>;
  /** Per vCPU, a workload of its own (else createWorkload from `workload`). */
  workloadOf?: (v: number, vm: Vm) => Workload;
  params?: Partial<MigrationParams>;
  bugs?: Partial<MigrationBugs>;
  /** Called after each frame went out (decoded), within the migration's step. */
  onFrame?: (f: Frame, rig: Rig) => void;
  /** Called on each report, within the migration's step. */
  onEvent?: (e: MigrationEvent, rig: Rig) => void;
  /** The scheduler picks the migration whenever it can run, until it sent its header. */
  migrationFirst?: boolean;
  /** The channel builds frames in space it hands out. */
  alloc?: (n: number) => Uint8Array | null;
  /** Each vCPU's dirty limit from the start (set-vcpu-dirty-limit), pages/s. */
  dirtyLimit?: number;
}

const SLOT = (id: number, baseGfn: number, pages: number): MemslotConfig => ({ id, asId: 0, baseGfn, pages, flags: 0 });
const LEGACY: DirtyTracking = { kind: 'bitmap', manualProtect: false, initiallySet: false };
const MANUAL: DirtyTracking = { kind: 'bitmap', manualProtect: true, initiallySet: false };
const RING = (withBitmap = false): DirtyTracking => ({ kind: 'ring', entries: 256, withBitmap });

const BASE_PARAMS: MigrationParams = {
  bandwidth: 0, downtimeLimitMs: 0, maxIterations: 4, timeoutMs: 1e9, policy: 'force', batchPages: 32, warmupOps: 600,
};

class Rig {
  readonly vm: Vm;
  readonly vmm: VmmControl;
  readonly target: GuestMemory;
  readonly dest: Destination;
  readonly destWords: Int32Array;
  readonly frames: Frame[] = [];
  readonly ioctls: Ioctl[] = [];
  readonly events: (MigrationEvent & { at: number })[] = [];
  readonly vcpus: Vcpu[] = [];
  readonly driver: DeterministicDriver;
  readonly clock: Clock;
  readonly migration: GeneratorRole;
  /** What the migration waited on, each time it could not go on. */
  readonly waits: Wait[] = [];
  readonly channel: MigrationChannel;
  readonly params: MigrationParams;
  /** Each vCPU's operations when the migration began (read at the step that sent the header). */
  opsAtHeader: number[] = [];
  /** Out of credit while set (as if the destination consumed nothing). */
  blockCredit = false;
  deadlock: string | null = null;
  private seq = 0;
  private readonly decoder = new StreamDecoder();

  constructor(readonly o: RigOptions) {
    const slots = o.slots ?? [SLOT(1, 0x100, 500), SLOT(2, 0x400, 520)];
    const vcpus = o.vcpus ?? 1;
    const config = { slots, vcpus, tracking: o.tracking };
    const source = createVmLayout(config);
    const target = createVmLayout(config);
    this.vm = vmFor(source, []);
    this.vm.populate();
    vmFor(target, []).populate();
    Atomics.store(this.vm.global, GlobalWord.ITERATION, 1);
    this.vmm = new VmmControl(this.vm);
    this.vmm.resumeHost();
    if (o.dirtyLimit) this.vmm.setDirtyLimit(o.dirtyLimit);
    this.destWords = new Int32Array(new SharedArrayBuffer(DEST_WORDS * 4));
    this.target = new GuestMemory(target);
    this.dest = new Destination(this.target, this.destWords, undefined, true);
    const queue: Uint8Array[] = [];
    const inner = new QueueChannel(this.destWords, queue);
    const self = this;
    this.channel = {
      get creditWord() { return inner.creditWord; },
      get bytesSent() { return inner.bytesSent; },
      canSend: () => !self.blockCredit && inner.canSend(),
      send(frame: Uint8Array): void {
        for (const rec of self.decoder.push(frame.slice())) {
          const f = { at: self.clock.nowMs(), seq: self.seq++, rec, bytes: frame };
          if (!isPages(rec) && rec.t === 'header') self.opsAtHeader = self.vcpus.map((_, v) => self.vmm.word(v, VcpuWord.OPS));
          self.frames.push(f);
          o.onFrame?.(f, self);
        }
        inner.send(frame);
      },
      ...(o.alloc ? { alloc: o.alloc } : {}),
    };
    this.watchIoctls();
    const seed = o.seed ?? 1;
    const ranges = slots.map((s) => ({ baseGfn: s.baseGfn, pages: s.pages }));
    const roles: Role[] = [];
    let driver: DeterministicDriver | null = null;
    const steps = (): number => driver?.stepCount ?? 0;
    this.clock = new StepClock(steps);
    for (let v = 0; v < vcpus; v++) {
      const w = o.workloadOf ? o.workloadOf(v, this.vm) : createWorkload({ ...DEFAULT_WORKLOAD, ...o.workload }, ranges, v, vcpus, seed);
      const vcpu = new Vcpu(this.vm, v, w, { clock: this.clock });
      this.vcpus.push(vcpu);
      roles.push(vcpu);
    }
    this.params = { ...BASE_PARAMS, ...o.params };
    const bugs: MigrationBugs = { copyBeforeReset: false, copyBeforeClear: false, skipFinalSync: false, ...o.bugs };
    this.migration = new GeneratorRole('migration', precopy(this.vm, this.channel, this.destWords, this.clock, this.params, bugs, (e) => {
      this.events.push({ ...e, at: this.clock.nowMs() });
      o.onEvent?.(e, this);
    }));
    const mig = this.migration;
    roles.push({
      name: 'migration',
      get wait() { return mig.wait; },
      get progress() { return mig.progress; },
      step: () => {
        const s = mig.step();
        if (s === Step.BLOCKED) this.waits.push(mig.wait);
        return s;
      },
    });
    roles.push(new DestinationRole(this.dest, new QueueSource(queue)));
    const random = new RandomScheduler(seed);
    const MIG = vcpus;
    const scheduler: Scheduler = o.migrationFirst
      ? { pick: (runnable) => (this.frames.length === 0 && runnable.includes(MIG) ? MIG : random.pick(runnable)) }
      : random;
    driver = new DeterministicDriver(roles, scheduler);
    this.driver = driver;
  }

  /** KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG and KVM_RESET_DIRTY_RINGS as the migration calls them, in order with the frames. */
  private watchIoctls(): void {
    const vm = this.vm;
    const get = vm.getDirtyLog.bind(vm);
    const clear = vm.clearDirtyLog.bind(vm);
    const reset = vm.resetDirtyRings.bind(vm);
    vm.getDirtyLog = (slot, out) => { this.ioctls.push({ ioctl: 'get', at: this.clock.nowMs(), seq: this.seq++, slot }); return get(slot, out); };
    vm.clearDirtyLog = (slot, first, num, bits) => { this.ioctls.push({ ioctl: 'clear', at: this.clock.nowMs(), seq: this.seq++, slot, first, num }); return clear(slot, first, num, bits); };
    vm.resetDirtyRings = () => { this.ioctls.push({ ioctl: 'reset', at: this.clock.nowMs(), seq: this.seq++ }); return reset(); };
  }

  get ended(): (MigrationEvent & { at: number }) | undefined {
    return this.events.find((e) => e.kind !== 'pass');
  }

  /** Runs until the migration ended (or `until`), at most `maxSteps` more steps; a deadlock is noted. */
  run(maxSteps = 2_000_000, until?: () => boolean): this {
    try {
      this.driver.run(() => this.migration.finished || (until?.() ?? false), this.driver.stepCount + maxSteps);
    } catch (e) {
      if (!(e instanceof DeadlockError)) throw e;
      this.deadlock = e.message;
    }
    return this;
  }

  get passes(): PassStats[] { return this.events.flatMap((e) => (e.kind === 'pass' ? [e.stats] : [])); }
  /** When pass `n` was reported (1-based). */
  reportAt(n: number): number { return this.events.filter((e) => e.kind === 'pass')[n - 1]!.at; }
  get info(): MigrationInfo { return (this.ended as { info: MigrationInfo }).info; }
  get t0(): number { return this.frameOf('header')!.at; }
  pageFrames(): PageFrame[] { return this.frames.filter((f): f is PageFrame => isPages(f.rec)); }
  /** The page frames of pass `n` (1-based), or of the completion (0): the sync records close the passes. */
  framesOfPass(n: number): PageFrame[] {
    let pass = 1;
    const out: PageFrame[] = [];
    for (const f of this.frames) {
      if (!isPages(f.rec)) { if (f.rec.t === 'sync') pass++; continue; }
      const completion = pass > this.passes.length;
      if ((n === 0 && completion) || (!completion && pass === n)) out.push(f as PageFrame);
    }
    return out;
  }
  frameOf(t: 'header' | 'sync' | 'complete', pass?: number): Frame | undefined {
    return this.frames.find((f) => !isPages(f.rec) && f.rec.t === t && (pass === undefined || (f.rec as { pass: number }).pass === pass));
  }
  throttleWord(v: number): number { return this.vmm.word(v, VcpuRequest.THROTTLE); }
  limitWord(v: number): number { return this.vmm.word(v, VcpuRequest.DIRTY_LIMIT); }
  mismatches(): number { return compareMemory(new GuestMemory(this.vm.layout), this.target).count; }
}

const pagesIn = (frames: { rec: PageBatch }[]): { normal: number; zero: number; all: number } => {
  let normal = 0;
  let zero = 0;
  for (const f of frames) for (const k of f.rec.kinds) { if (k === PAGE_ZERO) zero++; else normal++; }
  return { normal, zero, all: normal + zero };
};
/** A guest writing only its hot set (5 % of the pages): every pass finds some of it dirty again. */
const HOT: Partial<WorkloadOptions> = { name: 'hotset', hotFraction: 0.05, hotShare: 1 };
const bytesOf = (normal: number, zero: number): number => normal * (PAGE_SIZE + PAGE_OVERHEAD) + zero * (PAGE_OVERHEAD + 1);
const bytesOfPass = (p: PassStats): number => bytesOf(p.pagesSent - p.zeroPages, p.zeroPages);
/** The pages still dirty after a pass: what its expected downtime was computed from (at the bandwidth it counted). */
function leftAfter(p: PassStats, params: MigrationParams): number {
  const bw = params.bandwidth > 0 ? Math.min(p.bandwidth, params.bandwidth) : p.bandwidth;
  const pages = (p.expectedDowntimeMs * bw) / 1000 / PAGE_SIZE;
  expect(pages).toBeCloseTo(Math.round(pages), 6);
  return Math.round(pages);
}
/** What every pass found is what was left after it, less what was left before it, plus what it sent. */
function checkFound(r: Rig): void {
  let before = r.vm.memory.slots.reduce((n, s) => n + s.pages, 0);
  for (const p of r.passes) {
    const left = leftAfter(p, r.params);
    expect(p.dirtyFound, `pass ${p.pass}`).toBe(left - before + p.pagesSent);
    before = left;
  }
  if (r.info.completion) expect(r.info.completion.estimatedPages).toBe(before);
}

/** A guest writing `gfns` in order, one write each (a negative one: a read), then idling on a read. */
class Writes implements Workload {
  private i = 0;
  constructor(private readonly gfns: number[]) {}
  next(op: GuestOp): void {
    const g = this.gfns[this.i];
    this.i++;
    op.kind = g === undefined || g < 0 ? OpKind.READ : OpKind.WRITE64;
    op.gfn = g === undefined || g < 0 ? this.gfns.find((x) => x >= 0)! : g;
    op.value = 1;
    op.offset = 0;
  }
}

describe("MigrationStats: QEMU's info migrate figures", () => {
  const counters = (ops: number, dirtied: number, pacedUs: number) => ({ ops, dirtied, pacedUs });
  const live = (o: Partial<Parameters<MigrationStats['info']>[3]> = {}) => ({
    remainingPages: 7, syncs: 4, throttle: 30, dirtyLimit: 0, counters: [counters(50, 20, 3000), counters(60, 0, 0)], limits: [99, 0],
    dmaSources: [], stalledVcpus: [1], ...o,
  });

  it('counts each normal page with its 8-byte header and each zero page as 9 bytes', () => {
    const s = new MigrationStats(10, 100 * PAGE_SIZE, 5);
    expect(s.sent(3, 2)).toBe(3 * 4104 + 2 * 9);
    expect(s.sent(0, 5)).toBe(45);
    expect(s.sent(1, 0)).toBe(4104);
    expect(s).toMatchObject({ transferred: 4 * 4104 + 7 * 9, normal: 4, zero: 7 });
  });

  it('a migration that failed reports the live figures: counters, limits, remaining pages', () => {
    const s = new MigrationStats(10, 100 * PAGE_SIZE, 5);
    expect(s.info('failed', 0, 10, live({ counters: [], limits: [] })).guestOps, 'no start counters yet: no per-vCPU figures').toEqual([]);
    s.countersAtStart = [counters(10, 5, 1000), counters(20, 0, 0)];
    s.sent(3, 2);
    s.lastDirtyRate = 123;
    s.expectedDowntimeMs = 9;
    s.setupTimeMs = 2;
    const i = s.info('failed', 0, 30, live());
    expect(i).toMatchObject({
      status: 'failed', totalTimeMs: 20, setupTimeMs: 2, expectedDowntimeMs: 9, downtimeMs: 0, transferredBytes: 3 * 4104 + 18,
      remainingBytes: 7 * PAGE_SIZE, totalBytes: 100 * PAGE_SIZE, normalPages: 3, zeroPages: 2, dirtyPagesRate: 123, dirtySyncCount: 4,
      throttlePercent: 30, dirtyLimit: 0, downtimeLimitMs: 5, completion: null, downtimeExceeded: null, passes: [], dmaSources: [],
      guestOps: [40, 40], stalledVcpus: [1],
    });
    expect(i.throughputMbps).toBeCloseTo(((3 * 4104 + 18) * 8) / 1e6 / 0.02, 9);
    expect(i.pagesPerSecond).toBeCloseTo((5 * 1000) / 20, 9);
    expect(i.vcpus).toEqual([
      { vcpu: 0, ops: 40, dirtied: 15, opsPerSecond: 2000, dirtyPagesPerSecond: 750, pacedMs: 2, dirtyLimit: 99 },
      { vcpu: 1, ops: 40, dirtied: 0, opsPerSecond: 2000, dirtyPagesPerSecond: 0, pacedMs: 0, dirtyLimit: 0 },
    ]);
  });

  it('after the stop, the figures at the stop; only a completed migration explains an exceeded downtime', () => {
    const s = new MigrationStats(10, 100 * PAGE_SIZE, 5);
    s.countersAtStart = [counters(10, 5, 0)];
    s.countersAtStop = [counters(30, 9, 0)];
    s.stopTime = 20;
    s.limitsAtStop = [77];
    s.expectedDowntimeMs = 1;
    s.completion = { estimatedPages: 3, finalSync: [{ source: KVM_DIRTY_BITMAP, pages: 2 }], pagesSent: 5, stopMs: 1, syncMs: 2, sendMs: 3, destinationMs: 4 };
    const l = live({ counters: [counters(50, 20, 0)], limits: [0] });
    const done = s.info('completed', 10, 40, l);
    expect(done.guestOps, 'the counters at the stop, not now').toEqual([20]);
    expect(done.vcpus).toEqual([{ vcpu: 0, ops: 20, dirtied: 4, opsPerSecond: 2000, dirtyPagesPerSecond: 400, pacedMs: 0, dirtyLimit: 77 }]);
    expect(done.downtimeExceeded).toBe(explainDowntime(10, 5, 1, s.completion));
    expect(done.downtimeExceeded).toMatch(/^downtime 10 ms exceeded the 5 ms limit/);
    expect(s.info('completed', 5, 40, l).downtimeExceeded, 'at the limit').toBeNull();
    expect(s.info('failed', 10, 40, l).downtimeExceeded, 'a failed migration has no downtime to explain').toBeNull();
  });

  it('no time elapsed: no throughput and no page rate (not a division by zero)', () => {
    const s = new MigrationStats(10, PAGE_SIZE, 5);
    s.sent(1, 1);
    const i = s.info('failed', 0, 10, live({ counters: [], limits: [] }));
    expect(i.totalTimeMs).toBe(0);
    expect(i.throughputMbps).toBe(0);
    expect(i.pagesPerSecond).toBe(0);
  });
});

/** Checks every figure of a completed legacy-bitmap migration against the stream it sent. */
function checkCompleted(r: Rig): void {
  const info = r.info;
  const passes = r.passes;
  const n = passes.length;
  expect(r.ended!.kind).toBe('completed');
  expect(info.status).toBe('completed');
  expect(info.passes).toEqual(passes);
  expect(r.mismatches(), 'every destination page equals its source page').toBe(0);
  // The stream: what each pass reported is what it sent, and what the destination received.
  for (let p = 1; p <= n; p++) {
    const got = pagesIn(r.framesOfPass(p));
    expect(passes[p - 1]!.pass).toBe(p);
    expect(passes[p - 1]!.pagesSent, `pass ${p}`).toBe(got.all);
    expect(passes[p - 1]!.zeroPages, `pass ${p}`).toBe(got.zero);
  }
  const last = pagesIn(r.framesOfPass(0));
  const all = pagesIn(r.pageFrames());
  expect(info.completion!.pagesSent).toBe(last.all);
  expect(info.normalPages).toBe(all.normal);
  expect(info.zeroPages).toBe(all.zero);
  expect(r.dest.stats).toMatchObject({ normal: all.normal, zero: all.zero, syncs: n });
  expect(info.transferredBytes).toBe(bytesOf(all.normal, all.zero));
  const complete = r.frameOf('complete')!.rec as { normal: number; zero: number };
  expect(complete).toMatchObject({ normal: all.normal, zero: all.zero });
  expect(info.remainingBytes).toBe(0);
  // Time: the header went out at t0; pass 1 began after the setup, each later pass at the report of the one before.
  const t0 = r.t0;
  const end = r.ended!.at;
  expect(info.totalTimeMs).toBeCloseTo(end - t0, 9);
  expect(info.setupTimeMs).toBeGreaterThan(0);
  for (let p = 1; p <= n; p++) {
    const s = passes[p - 1]!;
    const start = p === 1 ? t0 + info.setupTimeMs : r.reportAt(p - 1);
    expect(s.ms, `pass ${p}`).toBeCloseTo(r.reportAt(p) - start, 9);
    expect(s.syncMs, `pass ${p}`).toBeCloseTo(r.reportAt(p) - r.frameOf('sync', p)!.at, 9);
    expect(s.bandwidth, `pass ${p}`).toBeCloseTo((bytesOfPass(s) * 1000) / s.ms, 3);
  }
  expect(info.downtimeMs).toBeCloseTo(end - r.reportAt(n), 9);
  const c = info.completion!;
  expect(c.stopMs).toBeGreaterThanOrEqual(0);
  expect(c.syncMs).toBeGreaterThan(0);
  expect(c.sendMs).toBeGreaterThanOrEqual(0);
  expect(c.destinationMs).toBeCloseTo(end - r.frameOf('complete')!.at, 9);
  expect(c.stopMs + c.syncMs + c.sendMs + c.destinationMs).toBeCloseTo(info.downtimeMs, 9);
  expect(info.throughputMbps).toBeCloseTo((info.transferredBytes * 8) / 1e6 / (info.totalTimeMs / 1000), 6);
  expect(info.pagesPerSecond).toBeCloseTo(((all.normal + all.zero) * 1000) / info.totalTimeMs, 6);
  expect(info.throughputMbps).toBeGreaterThan(0);
  expect(info.dirtyPagesRate).toBeCloseTo((passes[n - 1]!.dirtyFound * 1000) / passes[n - 1]!.ms, 6);
  expect(info.expectedDowntimeMs).toBe(passes[n - 1]!.expectedDowntimeMs);
  expect(info.downtimeExceeded).toBe(explainDowntime(info.downtimeMs, info.downtimeLimitMs, info.expectedDowntimeMs, c));
  // The guest: what each vCPU retired between the header and the stop, and nothing after the stop.
  const stopTime = r.reportAt(n) + c.stopMs;
  r.vcpus.forEach((vcpu, v) => {
    expect(info.guestOps[v], `vcpu${v}`).toBe(vcpu.retired - r.opsAtHeader[v]!);
    expect(info.vcpus[v]!.ops).toBe(info.guestOps[v]);
    expect(info.vcpus[v]!.opsPerSecond).toBeCloseTo((info.guestOps[v]! * 1000) / (stopTime - t0), 3);
  });
  expect(info.stalledVcpus).toEqual([]);
  checkFound(r);
}

describe('pre-copy, legacy dirty log: every figure is what the stream carried', () => {
  it('each pass sends exactly the pages the last sync found; the figures add up', () => {
    const r = new Rig({ tracking: LEGACY, vcpus: 2, params: { batchPages: 96 } }).run();
    checkCompleted(r);
    const { passes, info } = r;
    expect(passes).toHaveLength(4);
    expect(info.totalBytes).toBe(1020 * PAGE_SIZE);
    // Pass 1 sends every page of both slots once, in ascending order.
    const first = r.framesOfPass(1);
    const sent = first.flatMap((f) => [...f.rec.offsets].map((o) => `${f.rec.slot}:${o}`));
    expect(new Set(sent).size).toBe(1020);
    expect(sent).toHaveLength(1020);
    expect(passes[0]!.pagesSent).toBe(1020);
    expect(passes[0]!.zeroPages).toBeGreaterThan(0);
    expect(passes[0]!.zeroPages).toBeLessThan(1020);
    // Without a ring nothing is reaped during a pass: what a pass's sync found is what the next pass sends.
    for (let p = 1; p < passes.length; p++) expect(passes[p - 1]!.dirtyFound, `pass ${p}`).toBe(passes[p]!.pagesSent);
    expect(info.completion!.estimatedPages).toBe(passes.at(-1)!.dirtyFound);
    expect(passes.at(-1)!.dirtyFound).toBeGreaterThan(0);
    // The expected downtime: what was left (the pages found) over the pass's bandwidth.
    for (const p of passes) expect(p.expectedDowntimeMs).toBeCloseTo((p.dirtyFound * PAGE_SIZE * 1000) / p.bandwidth, 6);
    expect(info.dirtySyncCount, 'setup, one per pass, the final sync').toBe(passes.length + 2);
    expect(info.completion!.finalSync).toEqual([{ source: KVM_DIRTY_BITMAP, pages: info.completion!.pagesSent - info.completion!.estimatedPages }]);
    expect(info.downtimeExceeded, 'a 0 ms limit is always exceeded').toMatch(/^downtime \d+ ms exceeded the 0 ms limit/);
    expect(info.vcpus.map((v) => v.dirtyLimit)).toEqual([0, 0]);
  });

  it('frames hold at most batchPages pages of one slot, ascending, and none is empty', () => {
    for (const batchPages of [96, 7]) {
      const r = new Rig({ tracking: LEGACY, params: { batchPages, maxIterations: 2 } }).run();
      checkCompleted(r);
      const frames = r.pageFrames();
      for (const f of frames) {
        expect(f.rec.offsets.length).toBeGreaterThan(0);
        expect(f.rec.offsets.length).toBeLessThanOrEqual(batchPages);
        for (let i = 1; i < f.rec.offsets.length; i++) expect(f.rec.offsets[i]!).toBeGreaterThan(f.rec.offsets[i - 1]!);
      }
      // Pass 1: every page dirty, so full frames, split only where a slot ends.
      const sizes = r.framesOfPass(1).map((f) => `${f.rec.slot}:${f.rec.offsets.length}`);
      const expected = [[1, 500], [2, 520]].flatMap(([slot, pages]) => [
        ...Array.from({ length: Math.floor(pages! / batchPages) }, () => `${slot}:${batchPages}`),
        ...(pages! % batchPages ? [`${slot}:${pages! % batchPages}`] : []),
      ]);
      expect(sizes).toEqual(expected);
    }
  });

  it('the migration starts once the guest retired warmupOps operations, not before, not after', () => {
    const r = new Rig({ tracking: LEGACY, migrationFirst: true, params: { warmupOps: 777, maxIterations: 2 } }).run();
    expect(r.opsAtHeader).toEqual([777]);
    checkCompleted(r);
  });

  it('a frame goes out only with credit; while out of credit the thread parks on the credit word', () => {
    let blockedAt = -1;
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 3 },
      onEvent: (e, rig) => { if (e.kind === 'pass' && e.stats.pass === 1) { rig.blockCredit = true; blockedAt = rig.frames.length; } },
    });
    r.run(20_000);
    expect(r.migration.finished).toBe(false);
    expect(r.frames.length, 'nothing went out without credit').toBe(blockedAt);
    const w = r.waits.at(-1)!;
    expect(w.code).toBe(WaitCode.DESTINATION);
    expect(w.arg).toBe(0);
    expect(w.park).toEqual({ array: r.destWords, index: DestWord.APPLIED_KIB, value: Atomics.load(r.destWords, DestWord.APPLIED_KIB) });
    r.blockCredit = false;
    r.run();
    checkCompleted(r);
  });

  it('frames are built where the channel delivers them from, when it has the space', () => {
    const handed = new Set<ArrayBufferLike>();
    let calls = 0;
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 2 },
      alloc: (n) => {
        if (calls++ % 2 === 1) return null;
        const b = new Uint8Array(n);
        handed.add(b.buffer);
        return b;
      },
    }).run();
    checkCompleted(r);
    const frames = r.pageFrames();
    const inPlace = frames.filter((f) => handed.has(f.bytes.buffer));
    expect(inPlace.length).toBe(handed.size);
    expect(inPlace.length).toBeGreaterThan(0);
    expect(frames.length - inPlace.length, 'when the channel had no space, a frame of its own').toBe(calls - handed.size);
  });

  it('slots that end mid-word: nothing past a slot is ever counted as dirty', () => {
    const r = new Rig({ tracking: LEGACY, slots: [SLOT(1, 0x100, 40), SLOT(2, 0x200, 40)], params: { maxIterations: 3, warmupOps: 50 } }).run();
    checkCompleted(r);
    expect(r.info.totalBytes).toBe(80 * PAGE_SIZE);
    expect(r.passes[0]!.pagesSent).toBe(80);
  });
});

describe('pre-copy with manual protect (clear-log)', () => {
  it('clears each dirty 64-page chunk once per pass, just before its first page is copied', () => {
    const r = new Rig({ tracking: MANUAL, vcpus: 2, params: { batchPages: 96 } }).run();
    expect(r.ended!.kind).toBe('completed');
    expect(r.mismatches()).toBe(0);
    const passOf = (seq: number): number => 1 + r.frames.filter((f) => !isPages(f.rec) && f.rec.t === 'sync' && f.seq < seq).length;
    const clears = r.ioctls.filter((c) => c.ioctl === 'clear');
    expect(clears.length).toBeGreaterThan(0);
    for (const c of clears) {
      expect(c.first! % 64).toBe(0);
      expect(c.num).toBe(Math.min(64, c.slot!.pages - c.first!));
    }
    const key = (c: Ioctl): string => `${passOf(c.seq)}:${c.slot!.id}:${c.first}`;
    expect(new Set(clears.map(key)).size, 'no chunk cleared twice in a pass').toBe(clears.length);
    for (const f of r.pageFrames()) {
      const first = f.rec.offsets[0]! - (f.rec.offsets[0]! % 64);
      expect(f.rec.offsets.at(-1)! - first, 'a frame never spans two chunks').toBeLessThan(64);
      const c = clears.find((x) => x.slot!.slotField === f.rec.slot && x.first === first && passOf(x.seq) === passOf(f.seq) && x.seq < f.seq);
      expect(c, `pass ${passOf(f.seq)} slot ${f.rec.slot} chunk ${first}: cleared before the copy`).toBeDefined();
    }
    // Pass 1 copies every chunk of both slots: 8 + 9 of them.
    expect(clears.filter((c) => passOf(c.seq) === 1)).toHaveLength(17);
  });
});

describe('pre-copy with the dirty ring', () => {
  const ringRun = (o: Partial<RigOptions> = {}): Rig => new Rig({
    tracking: RING(true), vcpus: 2, seed: 3, workload: { name: 'sweep' }, params: { batchPages: 1, maxIterations: 3 }, ...o,
  }).run();

  it('answers ring-full exits by reaping (a sync of its own); the backup bitmap is read only after the stop', () => {
    const r = ringRun();
    expect(r.ended!.kind).toBe('completed');
    expect(r.mismatches()).toBe(0);
    const { info, passes } = r;
    const resets = r.ioctls.filter((c) => c.ioctl === 'reset').length;
    expect(info.dirtySyncCount, 'each sync resets the rings once').toBe(resets);
    expect(info.dirtySyncCount, 'ring-full exits were reaped during the passes').toBeGreaterThan(passes.length + 2);
    expect(info.stalledVcpus).toEqual([]);
    const gets = r.ioctls.filter((c) => c.ioctl === 'get');
    expect(gets.map((g) => g.slot!.id), 'KVM_GET_DIRTY_LOG on the backup bitmap: once per slot').toEqual([1, 2]);
    for (const g of gets) expect(g.at).toBeGreaterThan(r.reportAt(passes.length));
    const c = info.completion!;
    expect(c.finalSync.map((s) => s.source)).toEqual([KVM_RINGS, KVM_BACKUP_BITMAP]);
    expect(c.finalSync.reduce((n, s) => n + s.pages, 0)).toBe(c.pagesSent - c.estimatedPages);
    expect(c.pagesSent).toBe(pagesIn(r.framesOfPass(0)).all);
    // Reaped pages may be sent in the pass that reaped them: the found pages balance what was left and sent.
    checkFound(r);
  });

  it('copy-before-reset acts in pass 1, where every page, zero pages too, is copied before the pending reset', () => {
    let actedAtPass1 = -1;
    const r = ringRun({
      bugs: { copyBeforeReset: true }, workload: { name: 'random' }, params: { batchPages: 2, maxIterations: 3, warmupOps: 100 },
      onEvent: (e, rig) => { if (e.kind === 'pass' && e.stats.pass === 1) actedAtPass1 = rig.vm.acts.count('copy-before-reset'); },
    });
    expect(r.passes[0]!.zeroPages).toBeGreaterThan(r.passes[0]!.pagesSent / 2);
    expect(actedAtPass1).toBe(1);
  });
});

describe('how a migration ends early', () => {
  /** A failed migration's figures: status, no completion, the live counters, what is left. */
  const checkFailed = (r: Rig, reason: string, passes: number): void => {
    expect(r.ended).toMatchObject({ kind: 'failed', reason });
    const info = r.info;
    expect(info.status).toBe('failed');
    expect(r.passes).toHaveLength(passes);
    expect(info.passes).toEqual(r.passes);
    expect(info.completion).toBeNull();
    expect(info.downtimeMs).toBe(0);
    expect(info.downtimeExceeded).toBeNull();
    expect(r.frameOf('complete'), 'no completion record').toBeUndefined();
    expect(info.totalTimeMs).toBeCloseTo(r.ended!.at - r.t0, 9);
    const all = pagesIn(r.pageFrames());
    expect(info.transferredBytes).toBe(bytesOf(all.normal, all.zero));
    r.vcpus.forEach((vcpu, v) => {
      expect(info.guestOps[v], 'the guest keeps running: its ops until now').toBe(vcpu.retired - r.opsAtHeader[v]!);
      expect(r.throttleWord(v), 'unthrottled').toBe(0);
    });
    expect(r.vm.memory.slots.every((s) => (r.vm.flags(s) & 1) === 0), 'dirty logging stopped').toBe(true);
  };

  it('migrate_cancel after a pass: failed, "cancelled", the rest still dirty', () => {
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 6 },
      onEvent: (e, rig) => { if (e.kind === 'pass' && e.stats.pass === 2) Atomics.store(rig.destWords, DestWord.CANCEL, 1); },
    }).run();
    checkFailed(r, 'cancelled', 2);
    expect(r.info.remainingBytes, 'what the last sync found').toBe(r.passes[1]!.dirtyFound * PAGE_SIZE);
    expect(r.info.remainingBytes).toBeGreaterThan(0);
  });

  it('migrate_cancel in the middle of a pass: nothing more goes out, the pass ends and the migration with it', () => {
    let cancelledAt = -1;
    const r = new Rig({
      tracking: LEGACY, params: { batchPages: 8 },
      onFrame: (f, rig) => {
        if (isPages(f.rec) && rig.passes.length === 0 && rig.pageFrames().length === 20) {
          Atomics.store(rig.destWords, DestWord.CANCEL, 1);
          cancelledAt = rig.frames.length;
        }
      },
    }).run();
    checkFailed(r, 'cancelled', 1);
    expect(r.frames.slice(cancelledAt).map((f) => (isPages(f.rec) ? 'pages' : f.rec.t))).toEqual(['sync']);
    expect(r.passes[0]!.pagesSent).toBe(160);
  });

  it('migrate_cancel while out of credit ends the wait', () => {
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 6 },
      onEvent: (e, rig) => { if (e.kind === 'pass' && e.stats.pass === 1) rig.blockCredit = true; },
    });
    r.run(20_000);
    expect(r.migration.finished).toBe(false);
    const before = r.frames.length;
    Atomics.store(r.destWords, DestWord.CANCEL, 1);
    r.run(20_000);
    checkFailed(r, 'cancelled', 2);
    // The batch that waited for credit is dropped, not sent past the window.
    expect(r.frames.slice(before).filter((f) => isPages(f.rec))).toEqual([]);
  });

  it('the destination fails after a pass: the migration fails with it', () => {
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 6 },
      onEvent: (e, rig) => { if (e.kind === 'pass' && e.stats.pass === 2) rig.dest.fail('gone'); },
    }).run();
    checkFailed(r, DESTINATION_FAILED, 2);
  });

  it('the destination fails in the middle of a pass: nothing more goes out', () => {
    let failedAt = -1;
    const r = new Rig({
      tracking: LEGACY, params: { batchPages: 8 },
      onFrame: (f, rig) => {
        if (isPages(f.rec) && rig.passes.length === 0 && rig.pageFrames().length === 20) { rig.dest.fail('gone'); failedAt = rig.frames.length; }
      },
    }).run();
    checkFailed(r, DESTINATION_FAILED, 1);
    expect(r.frames.slice(failedAt).map((f) => (isPages(f.rec) ? 'pages' : f.rec.t))).toEqual(['sync']);
  });

  it('the destination fails while the source waits for credit', () => {
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 6 },
      onEvent: (e, rig) => { if (e.kind === 'pass' && e.stats.pass === 1) rig.blockCredit = true; },
    });
    r.run(20_000);
    const before = r.frames.length;
    r.dest.fail('gone');
    r.run(20_000);
    checkFailed(r, DESTINATION_FAILED, 2);
    expect(r.frames.length - before, 'at most the frame that waited, then the sync').toBeLessThanOrEqual(2);
  });

  it('the destination fails after the completion record: failed, not completed', () => {
    const r = new Rig({
      tracking: LEGACY, params: { maxIterations: 2 },
      onFrame: (f, rig) => { if (!isPages(f.rec) && f.rec.t === 'complete') rig.dest.fail('checksum'); },
    }).run();
    expect(r.deadlock).toBeNull();
    expect(r.ended).toMatchObject({ kind: 'failed', reason: DESTINATION_FAILED });
    expect(r.info).toMatchObject({ status: 'failed', completion: null, downtimeExceeded: null });
    expect(r.passes).toHaveLength(2);
  });

  it('waits for the destination to apply the completion record, parked on its state word', () => {
    const r = new Rig({ tracking: LEGACY, params: { maxIterations: 2 } });
    r.run(200_000, () => r.frameOf('complete') !== undefined);
    r.dest.receive = () => true; // applies nothing more: the state stays RECEIVING
    r.run(5_000);
    expect(r.migration.finished).toBe(false);
    expect(r.waits.at(-1)).toEqual({ code: WaitCode.DESTINATION, arg: 1, arg2: 0, park: { array: r.destWords, index: DestWord.STATE, value: DestState.RECEIVING } });
    Atomics.store(r.destWords, DestWord.STATE, DestState.COMPLETE);
    r.run();
    expect(r.ended!.kind).toBe('completed');
  });

  it('policy fail: gives up at max-iterations with the reason', () => {
    const r = new Rig({ tracking: LEGACY, vcpus: 2, params: { policy: 'fail', maxIterations: 3 } }).run();
    const last = r.passes.at(-1)!;
    checkFailed(r, notConverged(3, last.expectedDowntimeMs, r.params, NO_THROTTLE), 3);
    expect(r.ended).toMatchObject({ reason: expect.stringMatching(/^did not converge in 3 passes \(expected downtime [\d.]+ ms > limit 0 ms\)$/) });
    expect(r.info.remainingBytes).toBe(last.dirtyFound * PAGE_SIZE);
  });

  it('policy fail: gives up at the first pass that ends past the time limit', () => {
    const r = new Rig({
      tracking: LEGACY, vcpus: 2, workload: HOT, params: { policy: 'fail', maxIterations: 1000, timeoutMs: 5, warmupOps: 3000, batchPages: 1 },
    }).run();
    const n = r.passes.length;
    expect(n).toBeGreaterThan(2);
    checkFailed(r, notConverged(n, r.passes.at(-1)!.expectedDowntimeMs, r.params, NO_THROTTLE), n);
    expect(r.reportAt(n) - r.t0).toBeGreaterThanOrEqual(5);
    expect(r.reportAt(n - 1) - r.t0).toBeLessThan(5);
    expect(r.t0, 'the limit counts from the start of the migration, not of the run').toBeGreaterThan(5);
  });
});

describe('the throttling policies hold the guest while the migration runs, and let go at its end', () => {
  it('auto-converge: each vCPU runs at the throttle the pass reports; unthrottled at the stop', () => {
    const seen: number[][] = [];
    let atComplete: number[] = [];
    const r = new Rig({
      tracking: LEGACY, vcpus: 2, workload: HOT, params: { policy: 'auto-converge', timeoutMs: 1e6, batchPages: 1, warmupOps: 1000 },
      onEvent: (e, rig) => { if (e.kind === 'pass') seen.push([e.stats.throttle, rig.throttleWord(0), rig.throttleWord(1)]); },
      onFrame: (f, rig) => { if (!isPages(f.rec) && f.rec.t === 'complete') atComplete = [rig.throttleWord(0), rig.throttleWord(1)]; },
    }).run();
    for (const [t, a, b] of seen) expect([a, b]).toEqual([t, t]);
    expect(seen.map(([t]) => t)).toContain(20);
    expect(r.ended!.kind).toBe('completed');
    expect(r.info.throttlePercent).toBe(r.passes.at(-1)!.throttle);
    expect(atComplete).toEqual([0, 0]);
    expect([r.throttleWord(0), r.throttleWord(1)]).toEqual([0, 0]);
  });

  it('dirty-limit: the quota replaces the standing limit while engaged; the standing limit is back at the stop', () => {
    const seen: number[][] = [];
    let atComplete: number[] = [];
    const r = new Rig({
      tracking: RING(), vcpus: 2, workload: HOT, dirtyLimit: 5000,
      params: { policy: 'dirty-limit', vcpuDirtyLimit: 300, timeoutMs: 1e6, batchPages: 1, warmupOps: 1000 },
      onEvent: (e, rig) => { if (e.kind === 'pass') seen.push([e.stats.dirtyLimit, rig.limitWord(0), rig.limitWord(1)]); },
      onFrame: (f, rig) => { if (!isPages(f.rec) && f.rec.t === 'complete') atComplete = [rig.limitWord(0), rig.limitWord(1)]; },
    }).run();
    expect(seen[0]).toEqual([0, 5000, 5000]);
    expect(seen[1]).toEqual([0, 5000, 5000]);
    for (const [l, a, b] of seen) expect([a, b]).toEqual(l ? [l, l] : [5000, 5000]);
    expect(seen.map(([l]) => l)).toContain(300);
    expect(r.ended!.kind).toBe('completed');
    expect(r.info.dirtyLimit).toBe(300);
    expect(r.info.vcpus.map((v) => v.dirtyLimit), 'the limits in force at the stop').toEqual([300, 300]);
    expect(atComplete).toEqual([5000, 5000]);
    expect([r.limitWord(0), r.limitWord(1)]).toEqual([5000, 5000]);
  });
});

describe('ring-full exits the VMM never answers (ring-full-exit-unhandled)', () => {
  const range = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => from + i);
  /** vCPU 1 writes distinct pages at once; vCPU 0 writes one page `delay` times first: vCPU 1 fills its ring first. */
  const stalling = (delay: number, o: Partial<RigOptions> = {}): Rig => new Rig({
    tracking: RING(), vcpus: 2, slots: [SLOT(1, 0x100, 512), SLOT(2, 0x400, 512)], bugs: { ringFullExitUnhandled: true },
    params: { batchPages: 1, warmupOps: 4, maxIterations: 3 },
    workloadOf: (v) => new Writes(v === 1 ? range(0x100, 400) : [...Array.from({ length: delay }, () => 0x400), ...range(0x400, 400)]),
    ...o,
  });
  const parkedAt = (r: Rig, v: number): number => r.vmm.parkedExit(v) === KVM_EXIT_DIRTY_RING_FULL ? 1 : 0;

  it('a vCPU left in its exit is reported stalled; the list is in vCPU order, whichever stalled first', () => {
    const park = [-1, -1];
    const r = stalling(20, { onFrame: (f, rig) => { for (const v of [0, 1]) if (park[v]! < 0 && parkedAt(rig, v)) park[v] = rig.pageFrames().length; } }).run();
    expect(park[1]!, 'vCPU 1 stalled first').toBeLessThan(park[0]! - 16);
    expect(r.ended!.kind, 'the migration itself completes: the stalled guest dirties nothing').toBe('completed');
    expect(r.info.stalledVcpus).toEqual([0, 1]);
    expect(r.vm.acts.count('ring-full-exit-unhandled')).toBe(2);
  });

  it('stalled means found in the same exit at two progress checks, 16 frames apart', () => {
    const cancelledRun = (extra: number): { rig: Rig; parked: number } => {
      let parked = -1;
      let cancelAt = -1;
      const rig = stalling(20, {
        onFrame: (f, g) => {
          if (!isPages(f.rec)) return;
          const n = g.pageFrames().length;
          if (parked < 0 && parkedAt(g, 1)) { parked = n; cancelAt = Math.ceil(n / 16) * 16 + extra; }
          if (n === cancelAt) Atomics.store(g.destWords, DestWord.CANCEL, 1);
        },
      }).run();
      return { rig, parked };
    };
    const early = cancelledRun(15);
    expect(early.parked % 16, 'not just after a check').not.toBe(1);
    expect(early.rig.ended).toMatchObject({ kind: 'failed', reason: 'cancelled' });
    expect(early.rig.info.stalledVcpus, 'one check saw it parked: not yet stalled').toEqual([]);
    const late = cancelledRun(16);
    expect(late.rig.ended).toMatchObject({ kind: 'failed', reason: 'cancelled' });
    expect(late.rig.info.stalledVcpus).toEqual([1]);
  });

  it('the progress check belongs to the passes: a vCPU seen in its exit only at the last check is not called stalled', () => {
    let park = -1;
    const r = new Rig({
      tracking: RING(), vcpus: 2, slots: [SLOT(1, 0x100, 512), SLOT(2, 0x400, 512)], bugs: { ringFullExitUnhandled: true },
      params: { batchPages: 1, warmupOps: 2, maxIterations: 1 },
      // vCPU 1 fills its ring late in pass 1 (after 52 reads); vCPU 0 dirties 100 pages for the completion.
      workloadOf: (v) => new Writes(v === 1 ? [...Array.from({ length: 52 }, () => -1), ...range(0x100, 300)] : range(0x500, 100)),
      onFrame: (f, rig) => { if (park < 0 && parkedAt(rig, 1)) park = rig.pageFrames().length; },
    }).run();
    const passFrames = r.framesOfPass(1).length;
    expect(passFrames).toBe(1024);
    expect(park, 'parked after the check at frame 1008').toBeGreaterThan(1009);
    expect(park).toBeLessThanOrEqual(passFrames);
    expect(r.framesOfPass(0).length, 'the completion sends many frames, one page each').toBeGreaterThan(32);
    expect(r.ended!.kind).toBe('completed');
    expect(r.info.stalledVcpus).toEqual([]);
  });

  it('answered exits never stall the guest', () => {
    const r = stalling(20, { bugs: {} }).run();
    expect(r.ended!.kind).toBe('completed');
    expect(r.info.stalledVcpus).toEqual([]);
    expect(r.mismatches()).toBe(0);
    expect(r.vmm.word(0, VcpuWord.EXITS) + r.vmm.word(1, VcpuWord.EXITS), 'ring-full exits were taken, and answered').toBeGreaterThan(0);
    expect(r.info.dirtySyncCount, 'each answer reaped the rings').toBeGreaterThan(r.passes.length + 2);
  });
});

describe('completion', () => {
  it('waits for the host actors to pause before the final sync', () => {
    const r = new Rig({ tracking: LEGACY, params: { maxIterations: 2 } });
    Atomics.store(r.vm.global, GlobalWord.HOST_ACTORS, 1); // registered, and not paused yet
    r.run();
    expect(r.deadlock).toMatch(/deadlock/);
    expect(r.waits.at(-1)!.code).toBe(WaitCode.HOST_PAUSED);
    expect(r.passes).toHaveLength(2);
    expect(r.ioctls.filter((c) => c.at > r.reportAt(2)), 'no final sync yet').toEqual([]);
    expect(r.frameOf('complete')).toBeUndefined();
    expect(r.vcpus.every((_, v) => r.vmm.isQuiescent(v)), 'the vCPUs are stopped').toBe(true);
    Atomics.store(r.vm.global, GlobalWord.HOST_PAUSED, 1);
    r.deadlock = null;
    r.run();
    expect(r.ended!.kind).toBe('completed');
    expect(r.mismatches()).toBe(0);
    expect(r.ioctls.filter((c) => c.at > r.reportAt(2)).map((c) => c.ioctl)).toEqual(['get', 'get']);
  });

  it('a device fault stops the run when the scenario says so', async () => {
    const { scenario } = migrationSetup({ inject: ['gpa-as-iova'], onDeviceFault: 'stop', driver: 'deterministic', memoryBytes: '4MiB', seed: '1' });
    const r = await runMigration(scenario, { driver: 'deterministic', watchdogMs: 5000, burst: 256 });
    expect(r.status).toBe('failed');
    expect(r.reason).toBe('a device faulted and the run stops on device faults');
    expect(r.info).toMatchObject({ status: 'failed', completion: null, downtimeExceeded: null });
    expect(r.passes).toHaveLength(1);
    expect(r.dma!.faults).toBeGreaterThan(0);
  });
});

describe('max-bandwidth', () => {
  /** 160 pages (with their headers) per 100 ms window; 16-page frames. */
  const B = 160 * 4104 * 10;
  const limited = (o: Partial<RigOptions> = {}): Rig => new Rig({
    tracking: LEGACY, slots: [SLOT(1, 0x100, 128), SLOT(2, 0x200, 128)], params: { bandwidth: B, maxIterations: 2, batchPages: 16 }, ...o,
  });

  it("a pass sends at most a window's budget per 100 ms window; the completion (the VM stopped) is not held to it", () => {
    const r = limited().run();
    checkCompleted(r);
    // Windows are 100 ms of the migration clock; a window's last frame may overdraw it (the next ones owe that).
    const perWindow = new Map<number, number>();
    for (const f of [1, 2].flatMap((p) => r.framesOfPass(p))) {
      const w = Math.floor(f.at / 100);
      const c = pagesIn([f]);
      perWindow.set(w, (perWindow.get(w) ?? 0) + bytesOf(c.normal, c.zero));
    }
    expect(perWindow.size).toBeGreaterThan(1);
    for (const bytes of perWindow.values()) expect(bytes).toBeLessThan(B / 10 + 16 * 4104);
    expect(r.passes[1]!.ms, 'pass 2 waited for windows').toBeGreaterThan(100);
    const c = r.info.completion!;
    expect(c.pagesSent).toBeGreaterThan(160);
    const last = pagesIn(r.framesOfPass(0));
    expect((bytesOf(last.normal, last.zero) * 1000) / c.sendMs, 'the completion sends far faster than max-bandwidth').toBeGreaterThan(10 * B);
  });

  it('migrate_cancel while waiting for the next window ends the migration without waiting for it', () => {
    const r = limited();
    r.run(200_000, () => r.clock.nowMs() >= 40);
    const sent = r.pageFrames().length;
    r.run(200_000, () => r.clock.nowMs() >= 50);
    expect(r.pageFrames().length, 'waiting for the window that begins at 100 ms').toBe(sent);
    expect(r.passes).toHaveLength(0);
    expect(r.waits.filter((w) => w.code !== WaitCode.GUEST_OPS), 'no wait: under the step clock idling takes steps').toEqual([]);
    const cancelledAt = r.clock.nowMs();
    Atomics.store(r.destWords, DestWord.CANCEL, 1);
    r.run();
    expect(r.ended).toMatchObject({ kind: 'failed', reason: 'cancelled' });
    expect(r.ended!.at - cancelledAt).toBeLessThan(5);
  });
});
