import { KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO, PAGE_SIZE } from './constants.ts';
import {
  GlobalWord, IN_GUEST_MODE, OUTSIDE_GUEST_MODE, REGION_PAGES_SHIFT, VcpuRequest, VcpuRunState, VcpuWord, slotIsReadonly,
} from './layout.ts';
import { type Memslot, PAGE_WORDS, REGION_PAGE_MASK, stampWord } from './memslot.ts';
import { SPTE_WRITABLE } from './spte.ts';
import type { Vm } from './vm.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload, type Write64Workload, isWrite64Workload } from './guest-op.ts';
import { NOT_WAITING, type Role, Step, type Wait, WaitCode, waitFor } from '../roles/role.ts';
import { type Clock, WALL_CLOCK } from '../roles/clock.ts';
import { type TokenBucket, bucketFor } from '../util/token-bucket.ts';

/** Where a vCPU is inside one guest operation. Each phase is one step (a preemption point). */
export const enum Phase {
  /** Fetch the next operation if none is pending, translate GPA -> slot, check the TLB. */
  TRANSLATE = 0,
  /** Walk the SPTE: writable fills the TLB, otherwise a write-protect fault. */
  WALK = 1,
  /** The write-protect fault, in KVM on the vCPU's thread: log the page, make it writable. */
  FAULT = 2,
  /** Store the data and the stamp; the operation retires. */
  STORE = 3,
}

/** runWriteHits' RAM view before it has found a region (never written: the gfn range is empty). */
const NO_RAM: Uint32Array = new Uint32Array(0);

/** PACED: a write-protect fault waits for the dirty limit (nothing was done). */
const enum Advance { PROGRESS, RETIRED, BOUNDARY, PACED }
/** What the step boundary decided: run guest code, nothing to do, or a state change (an exit or a stop) that is this step's work. */
const enum Boundary { RUN, BLOCKED, TRANSITION }

/**
 * OpKind and the memslot region geometry as constants of this file, so that the hot
 * paths compare with and shift by immediates whatever the compiler (a const enum or a
 * constant imported from another module is a property or binding load when each file is
 * compiled on its own, as tsx does). Checked against the originals when the module loads.
 */
const enum K { WRITE64 = 1, STORE8 = 2, INC8 = 3, READ = 4, REGION_SHIFT = 19, REGION_MASK = (1 << 19) - 1, PAGE_WORDS = 1024 }
if (
  (K.WRITE64 as number) !== OpKind.WRITE64 || (K.STORE8 as number) !== OpKind.STORE8 || (K.INC8 as number) !== OpKind.INC8
  || (K.READ as number) !== OpKind.READ || (K.REGION_SHIFT as number) !== REGION_PAGES_SHIFT
  || (K.REGION_MASK as number) !== REGION_PAGE_MASK || (K.PAGE_WORDS as number) !== PAGE_WORDS
) throw new Error('vcpu.ts: constants out of step with workload.ts / layout.ts');

/** Pacing of a vCPU: the clock it paces by, and the guest's own operation rate. */
export interface VcpuPacing {
  /** The wall clock under free-run, the step clock under the deterministic driver. */
  clock?: Clock;
  /** Guest operations per second (the guest is that busy); 0 or unset: as fast as it can. */
  opRate?: number;
}

/** A paced vCPU sleeps at most this long at a time, so it sees stop requests soon. */
const MAX_PACE_MS = 5;
/**
 * ... and at least this long: a sleep costs a system call and a wake-up, so the vCPU
 * sleeps until a batch of tokens is there (200 at 1 M pages/s) rather than one.
 */
const MIN_PACE_MS = 0.2;

/**
 * A vCPU: the thread that loops in KVM_RUN, running a guest workload through the
 * emulated MMU (ARCHITECTURE.md, the write path). It owns its software TLB, its dirty
 * ring (kernel side) and its run/exit state. TLB entries are tagged with the flush
 * generation they were filled in, so dropping the TLB on a flush is O(1).
 */
export class Vcpu implements Role {
  readonly name: string;
  wait: Wait = NOT_WAITING;
  progress = 0;

  phase: Phase = Phase.TRANSLATE;
  opPending = false;
  readonly op: GuestOp = { kind: OpKind.WRITE64, gfn: 0, value: 0 };
  opIteration = 0;
  slot: Memslot | undefined;
  page = 0;

  private readonly words: Int32Array;
  private readonly global: Int32Array;
  private readonly base: number;
  private readonly tlb: Int32Array;
  private tlbGen = 0;
  private state: VcpuRunState = VcpuRunState.CREATED;
  private runSeq = 0;
  private ringFullRequest = false;
  private seq = 0;
  private ops = 0;
  private faults = 0;
  private exits = 0;
  private ringFullExits = 0;
  private readonly ctx: GuestContext = { iteration: 0 };
  /** Auto-converge throttle, percent (VcpuRequest.THROTTLE, read at each boundary). */
  private throttle = 0;
  private throttleDebt = 0;
  private readonly sleepWord = new Int32Array(new SharedArrayBuffer(4));
  private readonly clock: Clock;
  /** The guest's operation rate (VcpuPacing.opRate), or null. */
  private readonly opBucket: TokenBucket | null;
  /** The dirty limit in force (VcpuRequest.DIRTY_LIMIT, read at each boundary) and its bucket. */
  private dirtyLimit = 0;
  private dirtyBucket: TokenBucket | null = null;
  /** Free-run: how long the last PACED result asks the vCPU to sleep. */
  private paceMs = 0;
  /** The pending write waits at its fault for the dirty limit. */
  private pacedAtFault = false;
  private pacedUs = 0;
  /** The workload again when it only writes WRITE64 of the iteration (runWriteHits), else undefined. */
  private readonly writes: Write64Workload | undefined;

  constructor(readonly vm: Vm, readonly index: number, private readonly workload: Workload, pacing: VcpuPacing = {}) {
    this.name = `vcpu${index}`;
    this.words = vm.vcpuWords;
    this.global = vm.global;
    this.base = vm.vcpuBase(index);
    this.tlb = new Int32Array(vm.memory.totalPages);
    this.runSeq = Atomics.load(this.words, this.base + VcpuRequest.RUN_SEQ);
    this.writes = isWrite64Workload(workload) ? workload : undefined;
    this.clock = pacing.clock ?? WALL_CLOCK;
    this.opBucket = pacing.opRate !== undefined && pacing.opRate > 0 ? bucketFor(pacing.opRate, this.clock.nowMs()) : null;
  }

  get runState(): VcpuRunState { return this.state; }
  get retired(): number { return this.ops; }

  step(): Step {
    if (this.state === VcpuRunState.DONE) return Step.DONE;
    const b = this.boundary();
    if (b === Boundary.BLOCKED) return Step.BLOCKED;
    if (b !== Boundary.RUN) return Step.PROGRESS;
    if (this.throttle > 0) {
      // Auto-converge: a throttled vCPU spends `throttle` percent of its steps asleep.
      this.throttleDebt += this.throttle;
      if (this.throttleDebt >= 100) { this.throttleDebt -= 100; return Step.PROGRESS; }
    }
    // Paced: an idle step, as time passes only with steps (the step clock).
    if (this.opBucket !== null && !this.opPending && this.opBucket.available(this.clock.nowMs()) < 1) return Step.PROGRESS;
    const faults = this.faults;
    const r = this.advance();
    if (r === Advance.RETIRED) {
      this.opBucket?.take(1);
      Atomics.store(this.words, this.base + VcpuWord.OPS, this.ops);
    } else if (this.faults !== faults) Atomics.store(this.words, this.base + VcpuWord.FAULTS, this.faults);
    return Step.PROGRESS;
  }

  /**
   * Free-run: the same phases, with the boundary (flush acknowledgement, stop and exit
   * checks) once per burst. Equivalent, because a write through a TLB entry that a
   * flush is about to drop happens before this vCPU acknowledges it, and the flusher
   * reads memory only after every acknowledgement: hardware IPIs arrive late too.
   */
  runBurst(maxOps: number): Step {
    if (this.state === VcpuRunState.DONE) return Step.DONE;
    const b = this.boundary();
    if (b !== Boundary.RUN) return b === Boundary.BLOCKED ? Step.BLOCKED : Step.PROGRESS;
    const throttled = this.throttle > 0 ? performance.now() : 0;
    const ops = this.opBucket;
    if (ops !== null) {
      // The guest's operation rate: as many operations as the bucket holds, else sleep.
      const avail = Math.floor(ops.available(this.clock.nowMs()));
      if (avail < 1) { this.pause(Math.max(ops.msUntil(1), MIN_PACE_MS)); return Step.PROGRESS; }
      if (avail < maxOps) maxOps = avail;
    }
    let retired = 0;
    this.paceMs = 0;
    while (retired < maxOps) {
      // Between operations, TLB hits take the fast path; anything else, one phase at a time.
      if (this.phase === Phase.TRANSLATE && !this.opPending) {
        retired += this.writes !== undefined ? this.runWriteHits(maxOps - retired) : this.runTlbHits(maxOps - retired);
        if (retired >= maxOps) break;
      }
      const r = this.advance();
      if (r === Advance.RETIRED) retired++;
      else if (r === Advance.BOUNDARY || r === Advance.PACED) break;
    }
    ops?.take(retired);
    Atomics.store(this.words, this.base + VcpuWord.OPS, this.ops);
    Atomics.store(this.words, this.base + VcpuWord.FAULTS, this.faults);
    if (throttled > 0) {
      // Auto-converge, as QEMU's cpu_throttle_thread: sleep so that running is (100 - p) % of the time.
      const ran = performance.now() - throttled;
      this.pause((ran * this.throttle) / (100 - this.throttle));
    }
    if (this.paceMs > 0) this.pause(this.paceMs);
    return Step.PROGRESS;
  }

  /**
   * Free-run: the vCPU thread sleeps outside guest mode (QEMU's dirty limit and
   * cpu_throttle sleep in the vCPU thread, out of KVM_RUN), so remote TLB flushes do not
   * wait for it. The next boundary re-enters: mode first, then the flush generation.
   */
  private pause(ms: number): void {
    const t = Math.min(ms, MAX_PACE_MS);
    if (!(t > 0)) return;
    Atomics.store(this.words, this.base + VcpuWord.MODE, OUTSIDE_GUEST_MODE);
    const start = performance.now();
    Atomics.wait(this.sleepWord, 0, 0, t);
    this.pacedUs += (performance.now() - start) * 1000;
    Atomics.store(this.words, this.base + VcpuWord.PACED_US, this.pacedUs | 0);
    Atomics.store(this.words, this.base + VcpuWord.MODE, IN_GUEST_MODE);
  }

  /** The step boundary: resume after exits and stops, acknowledge flushes, take exits. */
  private boundary(): Boundary {
    const w = this.words;
    const b = this.base;
    if (this.state === VcpuRunState.EXITED) {
      const seq = Atomics.load(w, b + VcpuRequest.RUN_SEQ);
      if (seq === this.runSeq) {
        this.wait = waitFor(WaitCode.VCPU_EXIT, Atomics.load(w, b + VcpuWord.EXIT_REASON), 0, { array: w, index: b + VcpuRequest.RUN_SEQ, value: seq });
        return Boundary.BLOCKED;
      }
      this.runSeq = seq;
      if (!this.enterGuest()) return Boundary.TRANSITION;
    } else if (this.state === VcpuRunState.STOPPED) {
      const stop = Atomics.load(w, b + VcpuRequest.STOP);
      if (stop !== 0) {
        this.wait = waitFor(WaitCode.VCPU_RELEASE, 0, 0, { array: w, index: b + VcpuRequest.STOP, value: stop });
        return Boundary.BLOCKED;
      }
      if (!this.enterGuest()) return Boundary.TRANSITION;
    } else if (this.state === VcpuRunState.CREATED) {
      if (!this.enterGuest()) return Boundary.TRANSITION;
    }
    const gen = Atomics.load(this.global, GlobalWord.FLUSH_GEN);
    if (gen !== this.tlbGen) {
      // The IPI: drop every cached translation, acknowledge, restart the instruction.
      this.tlbGen = gen;
      Atomics.store(w, b + VcpuWord.FLUSH_ACK, gen);
      Atomics.notify(w, b + VcpuWord.FLUSH_ACK);
      if (this.opPending) this.phase = Phase.TRANSLATE;
    }
    if (this.ringFullRequest) {
      this.ringFullRequest = false;
      this.exitToVmm(KVM_EXIT_DIRTY_RING_FULL);
      return Boundary.TRANSITION;
    }
    // A vCPU paced at a write-protect fault is out of KVM_RUN (QEMU's vCPU thread sleeps
    // there), so it stops like one in an exit: its write has not retired.
    if ((!this.opPending || this.pacedAtFault) && Atomics.load(w, b + VcpuRequest.STOP) !== 0) {
      this.publish();
      const pending = this.opPending && this.slot !== undefined;
      Atomics.store(w, b + VcpuWord.PENDING_PAGE, pending ? this.slot!.firstPage + this.page : -1);
      Atomics.store(w, b + VcpuWord.PENDING_ITERATION, this.opIteration);
      this.leaveGuest(VcpuRunState.STOPPED);
      this.wait = waitFor(WaitCode.VCPU_RELEASE);
      return Boundary.TRANSITION;
    }
    this.ctx.iteration = Atomics.load(this.global, GlobalWord.ITERATION);
    this.throttle = Math.min(99, Atomics.load(w, b + VcpuRequest.THROTTLE));
    const limit = Atomics.load(w, b + VcpuRequest.DIRTY_LIMIT);
    if (limit !== this.dirtyLimit) {
      this.dirtyLimit = limit;
      this.dirtyBucket = limit > 0 ? bucketFor(limit, this.clock.nowMs()) : null;
    }
    return Boundary.RUN;
  }

  /** Guest entry: mode first, then requests (the Dekker half of the flush protocol). */
  private enterGuest(): boolean {
    Atomics.store(this.words, this.base + VcpuWord.MODE, IN_GUEST_MODE);
    this.state = VcpuRunState.RUNNING;
    Atomics.store(this.words, this.base + VcpuWord.RUN_STATE, VcpuRunState.RUNNING);
    // kvm_dirty_ring_check_request: keep exiting while the ring is still soft-full.
    const ring = this.vm.rings?.[this.index];
    if (ring !== undefined && !this.vm.bugs.ringFullIgnored && ring.softFull()) {
      this.exitToVmm(KVM_EXIT_DIRTY_RING_FULL);
      return false;
    }
    return true;
  }

  private leaveGuest(state: VcpuRunState): void {
    this.state = state;
    Atomics.store(this.words, this.base + VcpuWord.RUN_STATE, state);
    Atomics.store(this.words, this.base + VcpuWord.MODE, OUTSIDE_GUEST_MODE);
    Atomics.notify(this.words, this.base + VcpuWord.RUN_STATE);
  }

  private exitToVmm(reason: number): void {
    const w = this.words;
    const b = this.base;
    this.exits++;
    if (reason === KVM_EXIT_DIRTY_RING_FULL) this.ringFullExits++;
    this.publish();
    Atomics.store(w, b + VcpuWord.EXIT_REASON, reason);
    const pending = this.opPending && this.slot !== undefined;
    Atomics.store(w, b + VcpuWord.PENDING_PAGE, pending ? this.slot!.firstPage + this.page : -1);
    Atomics.store(w, b + VcpuWord.PENDING_ITERATION, this.opIteration);
    this.runSeq = Atomics.load(w, b + VcpuRequest.RUN_SEQ);
    Atomics.store(w, b + VcpuWord.EXIT_RUN_SEQ, this.runSeq);
    this.phase = Phase.TRANSLATE; // the interrupted instruction is re-executed on entry
    this.leaveGuest(VcpuRunState.EXITED);
    this.wait = waitFor(WaitCode.VCPU_EXIT, reason);
  }

  private publish(): void {
    const w = this.words;
    const b = this.base;
    Atomics.store(w, b + VcpuWord.OPS, this.ops);
    Atomics.store(w, b + VcpuWord.FAULTS, this.faults);
    Atomics.store(w, b + VcpuWord.EXITS, this.exits);
    Atomics.store(w, b + VcpuWord.RING_FULL_EXITS, this.ringFullExits);
  }

  /** One phase of the current operation. */
  private advance(): Advance {
    switch (this.phase) {
      case Phase.TRANSLATE:
        return this.translate();
      case Phase.WALK: {
        const slot = this.slot!;
        if ((slot.spte[this.page]! & SPTE_WRITABLE) !== 0) {
          this.tlb[slot.firstPage + this.page] = this.tlbGen + 1;
          this.phase = Phase.STORE;
        } else if (slotIsReadonly(this.vm.flags(slot))) {
          return this.mmioExit();
        } else {
          this.phase = Phase.FAULT;
        }
        return Advance.PROGRESS;
      }
      case Phase.FAULT: {
        const limit = this.dirtyBucket;
        if (limit !== null && !limit.tryTake(this.clock)) {
          // The dirty limit: this write would dirty a page beyond the quota; wait for it.
          this.paceMs = Math.max(limit.msUntil(1), MIN_PACE_MS);
          this.pacedAtFault = true;
          return Advance.PACED;
        }
        this.pacedAtFault = false;
        this.faults++;
        const slot = this.slot!;
        if (this.vm.handleWriteFault(this.index, slot, this.page)) {
          this.ringFullRequest = true;
          this.phase = Phase.WALK; // retried after the exit, from the top
          return Advance.BOUNDARY;
        }
        this.phase = Phase.WALK; // the fault returns to the guest, which retries the access
        return Advance.PROGRESS;
      }
      case Phase.STORE:
        return this.store();
    }
  }

  /**
   * runBurst's fast path: whole operations, TRANSLATE then STORE back to back, for as
   * long as they are reads or writes that hit the TLB, up to `limit` of them. These are
   * exactly the actions advance() takes for such operations (a burst has no boundary
   * between phases); the per-operation bookkeeping lives in locals and is written back
   * once. The first operation that needs more is left fetched and pending: after a TLB
   * miss, translated and in phase WALK, as TRANSLATE leaves it; at an address outside
   * every slot, in phase TRANSLATE, for advance() to take the exit. Returns the
   * operations retired.
   */
  private runTlbHits(limit: number): number {
    const op = this.op;
    const ctx = this.ctx;
    const workload = this.workload;
    const memory = this.vm.memory;
    const tlb = this.tlb;
    const tag = this.tlbGen + 1;
    const writer = this.index + 1;
    const iteration = ctx.iteration;
    const stamp = stampWord(writer, iteration);
    let seq = this.seq;
    let slot = this.slot;
    let page = this.page;
    let n = 0;
    // The slot of the previous operation, for translating without findSlot while the
    // guest stays in it (findSlot would return it without changing its own cache, which
    // it set on the lookup that found it): its gfn range, TLB offset, and its RAM view
    // when the slot is one region.
    let cur: Memslot | undefined;
    let curBase = 0;
    let curEnd = 0;
    let curTlb = 0;
    let curWords: Uint32Array | undefined;
    let missSlot: Memslot | undefined;
    let missPage = 0;
    while (n < limit) {
      workload.next(op, ctx);
      const gfn = op.gfn;
      if (!(gfn >= curBase && gfn < curEnd)) {
        const found = memory.findSlot(gfn);
        if (found === undefined) { this.opPending = true; break; }
        cur = found;
        curBase = found.baseGfn;
        curEnd = found.endGfn;
        curTlb = found.firstPage - curBase;
        curWords = found.u32.length === 1 ? found.u32[0] : undefined;
      }
      const s = cur!;
      const p = gfn - curBase;
      const kind: number = op.kind;
      if (kind === K.READ) {
        s.readU64(p);
      } else {
        if (tlb[gfn + curTlb] !== tag) {
          // A TLB miss: what TRANSLATE does for it, and on to WALK.
          this.opPending = true;
          missSlot = s;
          missPage = p;
          break;
        }
        if (kind === K.WRITE64) {
          // Memslot.writeU64Stamped, written out so that it is inlined whatever the
          // compiler's inlining budget: the same four stores in the same order.
          const w = curWords ?? s.u32[p >>> K.REGION_SHIFT]!;
          const i = (p & K.REGION_MASK) * K.PAGE_WORDS;
          const value = op.value;
          w[i] = value >>> 0;
          w[i + 1] = value < 4294967296 && value > -4294967296 ? 0 : (value / 4294967296) >>> 0;
          w[i + 2] = stamp;
          w[i + 3] = ++seq;
        } else {
          const bytes = s.bytes(p);
          const at = s.byteOffset(p);
          bytes[at] = kind === K.INC8 ? (bytes[at]! + 1) & 0xff : op.value;
          s.stamp(p, writer, ++seq, iteration);
        }
      }
      slot = s;
      page = p;
      n++;
    }
    if (limit > 0) this.opIteration = iteration;
    this.seq = seq;
    this.ops += n;
    this.progress += n;
    if (missSlot !== undefined) {
      this.slot = missSlot;
      this.page = missPage;
      this.phase = Phase.WALK;
    } else {
      this.slot = slot;
      this.page = page;
    }
    return n;
  }

  /**
   * runTlbHits for a Write64Workload: the same actions, with the operation reduced to its
   * gfn (kind and value are WRITE64 and the iteration for all of them) and the memory
   * reduced to one region of one slot at a time, whose gfn range, TLB offset and RAM
   * view live in locals. Leaves the first operation that needs more fetched and pending
   * exactly as runTlbHits does.
   */
  private runWriteHits(limit: number): number {
    const source = this.writes!;
    const memory = this.vm.memory;
    const tlb = this.tlb;
    const tag = this.tlbGen + 1;
    const iteration = this.ctx.iteration;
    const stamp = stampWord(this.index + 1, iteration);
    const lo = iteration >>> 0;
    const hi = iteration < 4294967296 && iteration > -4294967296 ? 0 : (iteration / 4294967296) >>> 0;
    let seq = this.seq;
    let n = 0;
    // The region of the previous write: gfns [base, end), RAM view w, TLB index offset.
    let slot: Memslot | undefined;
    let base = 0;
    let end = 0;
    let tlbOffset = 0;
    let w = NO_RAM;
    let gfn = 0;
    let pending = false;
    while (n < limit) {
      gfn = source.nextWriteGfn();
      if (!(gfn >= base && gfn < end)) {
        const found = memory.findSlot(gfn);
        if (found === undefined) { pending = true; slot = undefined; break; }
        const region = (gfn - found.baseGfn) >>> K.REGION_SHIFT;
        slot = found;
        base = found.baseGfn + (region << K.REGION_SHIFT);
        end = Math.min(found.endGfn, base + (1 << K.REGION_SHIFT));
        tlbOffset = found.firstPage - found.baseGfn;
        w = found.u32[region]!;
      }
      if (tlb[gfn + tlbOffset] !== tag) { pending = true; break; }
      const i = (gfn - base) * K.PAGE_WORDS;
      w[i] = lo;
      w[i + 1] = hi;
      w[i + 2] = stamp;
      w[i + 3] = ++seq;
      n++;
    }
    if (limit > 0) this.opIteration = iteration;
    this.seq = seq;
    this.ops += n;
    this.progress += n;
    if (n > 0 || pending) {
      const op = this.op;
      op.kind = OpKind.WRITE64;
      op.gfn = gfn;
      op.value = iteration;
    }
    if (pending) {
      this.opPending = true;
      if (slot !== undefined) {
        // A TLB miss: translated, on to WALK (as TRANSLATE leaves it).
        this.slot = slot;
        this.page = gfn - slot.baseGfn;
        this.phase = Phase.WALK;
      }
    } else if (slot !== undefined) {
      this.slot = slot;
      this.page = gfn - slot.baseGfn;
    }
    return n;
  }

  /** Phase TRANSLATE: fetch the next operation if none is pending, translate, check the TLB. */
  private translate(): Advance {
    const op = this.op;
    if (!this.opPending) {
      this.workload.next(op, this.ctx);
      this.opIteration = this.ctx.iteration;
      this.opPending = true;
    }
    const slot = this.vm.memory.findSlot(op.gfn);
    if (slot === undefined) return this.mmioExit();
    const page = op.gfn - slot.baseGfn;
    this.slot = slot;
    this.page = page;
    if ((op.kind as number) === K.READ) {
      slot.readU64(page);
      return this.retire();
    }
    this.phase = this.tlb[slot.firstPage + page] === this.tlbGen + 1 ? Phase.STORE : Phase.WALK;
    return Advance.PROGRESS;
  }

  /** Phase STORE: store the data and the stamp; the operation retires. */
  private store(): Advance {
    const slot = this.slot!;
    const page = this.page;
    const op = this.op;
    if ((op.kind as number) === K.WRITE64) {
      slot.writeU64Stamped(page, op.value, this.index + 1, ++this.seq, this.opIteration);
    } else {
      const bytes = slot.bytes(page);
      const at = slot.byteOffset(page);
      bytes[at] = (op.kind as number) === K.INC8 ? (bytes[at]! + 1) & 0xff : op.value;
      slot.stamp(page, this.index + 1, ++this.seq, this.opIteration);
    }
    return this.retire();
  }

  private retire(): Advance {
    this.opPending = false;
    this.phase = Phase.TRANSLATE;
    this.ops++;
    this.progress++;
    return Advance.RETIRED;
  }

  private mmioExit(): Advance {
    const gpa = this.op.gfn * PAGE_SIZE;
    Atomics.store(this.words, this.base + VcpuWord.MMIO_GPA_LO, gpa >>> 0);
    Atomics.store(this.words, this.base + VcpuWord.MMIO_GPA_HI, (gpa / 4294967296) >>> 0);
    this.opPending = false;
    this.exitToVmm(KVM_EXIT_MMIO);
    return Advance.BOUNDARY;
  }
}
