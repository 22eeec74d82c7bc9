import { KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO, PAGE_SIZE } from './constants.ts';
import {
  GlobalWord, IN_GUEST_MODE, OUTSIDE_GUEST_MODE, VcpuRequest, VcpuRunState, VcpuWord, slotIsReadonly,
} from './layout.ts';
import type { Memslot } from './memslot.ts';
import { SPTE_WRITABLE } from './spte.ts';
import type { Vm } from './vm.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload } from '../guest/workload.ts';
import { NOT_WAITING, type Role, Step, type Wait, WaitCode, waitFor } from '../drivers/role.ts';

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

const enum Advance { PROGRESS, RETIRED, BOUNDARY }
/** What the step boundary decided: run guest code, nothing to do, or a state change (an exit or a stop) that is this step's work. */
const enum Boundary { RUN, BLOCKED, TRANSITION }

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

  constructor(readonly vm: Vm, readonly index: number, private readonly workload: Workload) {
    this.name = `vcpu${index}`;
    this.words = vm.vcpuWords;
    this.global = vm.global;
    this.base = vm.vcpuBase(index);
    this.tlb = new Int32Array(vm.memory.totalPages);
    this.runSeq = Atomics.load(this.words, this.base + VcpuRequest.RUN_SEQ);
  }

  get runState(): VcpuRunState { return this.state; }
  get retired(): number { return this.ops; }

  step(): Step {
    if (this.state === VcpuRunState.DONE) return Step.DONE;
    const b = this.boundary();
    if (b === Boundary.BLOCKED) return Step.BLOCKED;
    if (b === Boundary.RUN && this.advance() === Advance.RETIRED) Atomics.store(this.words, this.base + VcpuWord.OPS, this.ops);
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
    let retired = 0;
    while (retired < maxOps) {
      const r = this.advance();
      if (r === Advance.RETIRED) retired++;
      else if (r === Advance.BOUNDARY) break;
    }
    Atomics.store(this.words, this.base + VcpuWord.OPS, this.ops);
    return Step.PROGRESS;
  }

  /** Ends the vCPU for good (the VM is torn down). */
  finish(): void {
    this.leaveGuest(VcpuRunState.DONE);
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
    if (!this.opPending && Atomics.load(w, b + VcpuRequest.STOP) !== 0) {
      this.publish();
      Atomics.store(w, b + VcpuWord.PENDING_PAGE, -1);
      this.leaveGuest(VcpuRunState.STOPPED);
      this.wait = waitFor(WaitCode.VCPU_RELEASE);
      return Boundary.TRANSITION;
    }
    this.ctx.iteration = Atomics.load(this.global, GlobalWord.ITERATION);
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
      case Phase.TRANSLATE: {
        if (!this.opPending) {
          this.workload.next(this.op, this.ctx);
          this.opIteration = this.ctx.iteration;
          this.opPending = true;
        }
        const slot = this.vm.memory.findSlot(this.op.gfn);
        if (slot === undefined) return this.mmioExit();
        this.slot = slot;
        this.page = this.op.gfn - slot.baseGfn;
        if (this.op.kind === OpKind.READ) {
          slot.readU64(this.page);
          return this.retire();
        }
        if (this.tlb[slot.firstPage + this.page] === this.tlbGen + 1) {
          this.phase = Phase.STORE;
          return Advance.PROGRESS;
        }
        this.phase = Phase.WALK;
        return Advance.PROGRESS;
      }
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
      case Phase.STORE: {
        const slot = this.slot!;
        const page = this.page;
        const op = this.op;
        if (op.kind === OpKind.WRITE64) {
          slot.writeU64(page, op.value);
        } else {
          const bytes = slot.bytes(page);
          const at = slot.byteOffset(page);
          bytes[at] = op.kind === OpKind.INC8 ? (bytes[at]! + 1) & 0xff : op.value;
        }
        slot.stamp(page, this.index + 1, ++this.seq, this.opIteration);
        return this.retire();
      }
    }
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
