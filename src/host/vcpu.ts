import {
  KVM_EINVAL, KVM_ENOSYS, KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO, KVM_HC_MAP_GPA_RANGE, KVM_RUN_EIO,
  KVM_MAP_GPA_RANGE_DECRYPTED, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SIZE, TDVMCALL_MAP_GPA,
  TDVMCALL_STATUS_INVALID_OPERAND, TDVMCALL_STATUS_RETRY, TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, TDVMCALL_STATUS_SUCCESS, TDX_MAP_GPA_MAX_LEN,
} from './constants.ts';
import {
  CoherentSwitch, GlobalWord, IN_GUEST_MODE, OUTSIDE_GUEST_MODE, VcpuRequest, VcpuRunState, VcpuWord, slotIsReadonly,
} from './layout.ts';
import { Memslot } from './memslot.ts';
import { CACHE_LINE_SIZE, CacheAccess, type CpuCache, lineKey } from './cpu-cache.ts';
import { X86_MEMTYPE_WB, X86_MEMTYPE_WC, kvmEmulateWbinvd } from './memory-type.ts';
import { slotRanges } from './memory-attributes.ts';
import { FAST_PATH_MISS_PHASE, type VcpuFastState, countStaleStore, runTlbHits, runWriteHits } from './vcpu-fast-path.ts';
import { SPTE_PRIVATE, SPTE_WRITABLE, mapPagePrivate } from './spte.ts';
import type { Vm } from './vm.ts';
import { type GuestContext, type GuestOp, OpKind, SET_PAT_COHERENT_ACK, SET_PAT_NO_CLFLUSH, SET_PAT_TYPE, type Workload, type Write64Workload, isWrite64Workload } from './guest-op.ts';
import { Acted } from './injections.ts';
import type { BarFaultIn, KvmBarMmu } from './mmio/kvm-bar-mmu.ts';
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
if (FAST_PATH_MISS_PHASE !== Phase.WALK) throw new Error('vcpu.ts: Phase.WALK out of step with vcpu-fast-path.ts');

/** TDX_MAP_GPA_MAX_LEN in frames: one MapGPA chunk. */
const TDX_MAP_GPA_MAX_PAGES = TDX_MAP_GPA_MAX_LEN / PAGE_SIZE;

/** PACED: a write-protect fault waits for the dirty limit (nothing was done). */
const enum Advance { PROGRESS, RETIRED, BOUNDARY, PACED }
/** What the step boundary decided: run guest code, nothing to do, or a state change (an exit or a stop) that is this step's work. */
const enum Boundary { RUN, BLOCKED, TRANSITION }


/** Pacing of a vCPU: the clock it paces by, and the guest's own operation rate. */
export interface VcpuPacing {
  /** The wall clock under free-run, the step clock under the deterministic driver. */
  clock?: Clock;
  /** Guest operations per second (the guest is that busy); 0 or unset: as fast as it can. */
  opRate?: number;
  /** The role's name when several VMs run (`vm1.vcpu0`); unset: `vcpu<index>`. */
  name?: string;
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
 * emulated MMU (docs/architecture.md, the write path). It owns its software TLB, its dirty
 * ring (kernel side) and its run/exit state. TLB entries are tagged with the flush
 * generation they were filled in, so dropping the TLB on a flush is O(1).
 */
export class Vcpu implements Role, VcpuFastState {
  readonly name: string;
  wait: Wait = NOT_WAITING;
  progress = 0;

  phase: Phase = Phase.TRANSLATE;
  opPending = false;
  readonly op: GuestOp = { kind: OpKind.WRITE64, gfn: 0, value: 0, offset: 0 };
  opIteration = 0;
  slot: Memslot | undefined;
  page = 0;
  // Also read and advanced by the fast paths (vcpu-fast-path.ts): the TLB (entries are
  // the generation they were filled in + 1), the stamp sequence, operations retired,
  // the guest's context, and the workload.
  readonly tlb: Int32Array;
  tlbGen = 0;
  seq = 0;
  ops = 0;
  readonly ctx: GuestContext = { iteration: 0 };
  /** The workload again when it only writes WRITE64 of the iteration (runWriteHits), else undefined. */
  readonly writes: Write64Workload | undefined;
  /**
   * On a VM with private memory: the TLB of private accesses (a TDX vCPU's secure-EPT
   * translations, apart from the shared ones in `tlb`); private accesses and reads then
   * take the phases, where they are checked against the memory attributes. Else null.
   */
  private readonly tlbPrivate: Int32Array | null;
  /** On a VM with private memory: KVM's attribute byte per page (VM-wide numbering), for the fast path's stale-store probe; else null. */
  readonly attributeBytes: Uint8Array | null;
  /**
   * On a VM with the CPU cache model (VmConfig.cpuCache): the cache every access goes
   * through as its memory type says; no fast path then (it stores to memory directly).
   */
  private readonly cache: CpuCache | null;
  /** Scratch for a store through the cache: the value and the stamp, as writeU64Stamped lays them out. */
  private readonly line32 = new Uint32Array(4);
  private readonly line8 = new Uint8Array(this.line32.buffer);
  /** Views of it: the value's first byte (STORE8, INC8), the value (a read), the stamp. */
  private readonly byte0 = this.line8.subarray(0, 1);
  private readonly value8 = this.line8.subarray(0, 8);
  private readonly stamp8 = this.line8.subarray(8, 16);

  private readonly words: Int32Array;
  private readonly global: Int32Array;
  private readonly base: number;
  private state: VcpuRunState = VcpuRunState.CREATED;
  private runSeq = 0;
  private ringFullRequest = false;
  private faults = 0;
  private exits = 0;
  private ringFullExits = 0;
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
  /** The pending operation is a hypercall that exited to the VMM: on re-entry it completes with hypercall.ret. */
  private hypercallExited = false;
  /** The VM's mediated devices' BARs (KVM's side), whose VM_DEAD word a boundary checks. */
  private readonly barMmus: readonly KvmBarMmu[];
  /** A BAR fault between its halves: what the first looked up (KvmBarMmu.faultin), for the install at the next step. */
  private barFault: Extract<BarFaultIn, { ok: true }> | null = null;
  /** VmConfig.mapGpa 'tdx': the MapGPA in flight, tdx->map_gpa_next and map_gpa_end in frames; else null. */
  private readonly tdxMapGpa: { next: number; end: number } | null;
  private pacedUs = 0;

  constructor(readonly vm: Vm, readonly index: number, readonly workload: Workload, pacing: VcpuPacing = {}) {
    this.name = pacing.name ?? `vcpu${index}`;
    this.barMmus = vm.bars.map((b) => b.mmu);
    this.words = vm.vcpuWords;
    this.global = vm.global;
    this.base = vm.vcpuBase(index);
    this.tlb = new Int32Array(vm.memory.totalPages);
    this.tlbPrivate = vm.attributes !== null ? new Int32Array(vm.memory.totalPages) : null;
    this.tdxMapGpa = vm.layout.config.mapGpa === 'tdx' ? { next: 0, end: 0 } : null;
    this.attributeBytes = vm.layout.attributes !== null ? new Uint8Array(vm.layout.attributes) : null;
    this.runSeq = Atomics.load(this.words, this.base + VcpuRequest.RUN_SEQ);
    this.writes = isWrite64Workload(workload) ? workload : undefined;
    this.cache = vm.cache;
    this.clock = pacing.clock ?? WALL_CLOCK;
    this.opBucket = pacing.opRate !== undefined && pacing.opRate > 0 ? bucketFor(pacing.opRate, this.clock.nowMs()) : null;
  }

  get runState(): VcpuRunState { return this.state; }
  /** The watchdog's view of where a step began: the phase + 1 (describe-wait.ts names it). */
  get stepCode(): number { return this.phase + 1; }
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
      if (this.phase === Phase.TRANSLATE && !this.opPending && this.cache === null) {
        retired += this.writes !== undefined ? runWriteHits(this, maxOps - retired) : runTlbHits(this, maxOps - retired);
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
      const pending = Atomics.load(this.global, GlobalWord.VM_START_PENDING);
      if (pending !== 0) {
        this.wait = waitFor(WaitCode.VM_START, 0, 0, { array: this.global, index: GlobalWord.VM_START_PENDING, value: pending });
        return Boundary.BLOCKED;
      }
      if (!this.enterGuest()) return Boundary.TRANSITION;
    }
    // KVM_REQ_VM_DEAD: a VM KVM killed (a refused BAR access with 'kill-vm') leaves the guest for good.
    if (this.barMmus.length !== 0 && this.vmDead()) {
      this.exitToVmm(KVM_RUN_EIO);
      return Boundary.TRANSITION;
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
    if (this.cache !== null) this.ctx.coherentSwitch = Atomics.load(this.global, GlobalWord.COHERENT_SWITCH) === CoherentSwitch.REQUESTED;
    this.throttle = Math.min(99, Atomics.load(w, b + VcpuRequest.THROTTLE));
    const limit = Atomics.load(w, b + VcpuRequest.DIRTY_LIMIT);
    if (limit !== this.dirtyLimit) {
      this.dirtyLimit = limit;
      this.dirtyBucket = limit > 0 ? bucketFor(limit, this.clock.nowMs()) : null;
    }
    return Boundary.RUN;
  }

  /** Guest entry: mode first, then requests (the Dekker half of the flush protocol). */
  /** kvm->vm_dead (kvm_vm_dead): every KVM_RUN of the VM fails with EIO. */
  private vmDead(): boolean {
    for (const m of this.barMmus) if (m.dead) return true;
    return false;
  }

  private enterGuest(): boolean {
    if (this.barMmus.length !== 0 && this.vmDead()) {
      this.exitToVmm(KVM_RUN_EIO);
      return false;
    }
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
    Atomics.add(this.global, GlobalWord.EXIT_DOORBELL, 1);
    Atomics.notify(this.global, GlobalWord.EXIT_DOORBELL);
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
        if (this.privateAccess()) {
          // The private translation: present (mapped to guest_memfd) or a fault.
          if ((slot.spte[this.page]! & SPTE_PRIVATE) !== 0) {
            this.tlbPrivate![slot.firstPage + this.page] = this.tlbGen + 1;
            this.phase = Phase.STORE;
          } else this.phase = Phase.FAULT;
          return Advance.PROGRESS;
        }
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
        if (this.tlbPrivate !== null) return this.attributeCheckedFault();
        if (this.pacedByDirtyLimit()) return Advance.PACED;
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

  /** The dirty limit: this write would dirty a page beyond the quota; it waits at its fault. */
  private pacedByDirtyLimit(): boolean {
    const limit = this.dirtyBucket;
    if (limit !== null && !limit.tryTake(this.clock)) {
      this.paceMs = Math.max(limit.msUntil(1), MIN_PACE_MS);
      this.pacedAtFault = true;
      return true;
    }
    this.pacedAtFault = false;
    return false;
  }

  /**
   * Phase FAULT on a VM with private memory (arch/x86/kvm/mmu/mmu.c, kvm_mmu_faultin_pfn
   * then the install under mmu_lock): read the invalidation sequence; an access whose
   * kind (private or shared) is not the page's attribute, or a private access to a slot
   * without guest_memfd, exits with KVM_EXIT_MEMORY_FAULT (KVM_RUN returns -1, EFAULT)
   * and is re-executed after the VMM converted the page. Then, under mmu_lock, a fault
   * that an invalidation overtook retries (RET_PF_RETRY); else the SPTE is installed:
   * private, or shared and writable with the page logged, as the write-protect fault.
   */
  private attributeCheckedFault(): Advance {
    const vm = this.vm;
    const inv = vm.mmuInvalidate;
    const slot = this.slot!;
    const page = this.page;
    const priv = this.op.private === true;
    const seq = inv.seq();
    if (this.kindMismatch(slot, page, priv)) return this.memoryFaultExit(priv);
    if (!priv && this.pacedByDirtyLimit()) return Advance.PACED;
    // mmu_lock is never waited for: the vCPU re-enters the guest and faults again, so it
    // acknowledges the flush the holder may be waiting on.
    if (!inv.tryLock(this.index + 1)) return Advance.BOUNDARY;
    if (inv.retry(seq, slot.baseGfn + page)) {
      inv.unlock();
      this.phase = Phase.WALK;
      return Advance.BOUNDARY;
    }
    let ringFull = false;
    if (priv) mapPagePrivate(slot, page);
    else {
      this.faults++;
      ringFull = vm.handleWriteFault(this.index, slot, page);
    }
    inv.unlock();
    this.phase = Phase.WALK;
    if (ringFull) {
      this.ringFullRequest = true;
      return Advance.BOUNDARY;
    }
    return Advance.PROGRESS;
  }

  /** The pending access is private (on a VM with private memory; elsewhere every access is shared). */
  private privateAccess(): boolean {
    return this.tlbPrivate !== null && this.op.private === true;
  }

  /**
   * kvm_mmu_faultin_pfn's check: the access's kind is not the page's attribute, or it is
   * private and the slot has no guest_memfd to map (KVM_EXIT_MEMORY_FAULT either way).
   */
  private kindMismatch(slot: Memslot, page: number, priv: boolean): boolean {
    return priv !== this.vm.attributes!.isPrivate(slot, page) || (priv && slot.gmem === null);
  }

  /** The GPA of the pending access in kvm_run's exit union (MMIO and memory faults share it). */
  private storeExitGpa(): void {
    const gpa = this.op.gfn * PAGE_SIZE;
    Atomics.store(this.words, this.base + VcpuWord.MMIO_GPA_LO, gpa >>> 0);
    Atomics.store(this.words, this.base + VcpuWord.MMIO_GPA_HI, (gpa / 4294967296) >>> 0);
  }

  /** KVM_EXIT_MEMORY_FAULT for the pending access: flags, gpa, size; the access stays pending. */
  private memoryFaultExit(priv: boolean): Advance {
    const w = this.words;
    const b = this.base;
    this.storeExitGpa();
    Atomics.store(w, b + VcpuWord.MEMORY_FAULT_FLAGS, priv ? KVM_MEMORY_EXIT_FLAG_PRIVATE : 0);
    Atomics.store(w, b + VcpuWord.MEMORY_FAULT_SIZE, PAGE_SIZE);
    this.exitToVmm(KVM_EXIT_MEMORY_FAULT);
    return Advance.BOUNDARY;
  }

  /**
   * KVM_HC_MAP_GPA_RANGE (arch/x86/kvm/x86.c, __kvm_emulate_hypercall): unless
   * KVM_CAP_EXIT_HYPERCALL enabled it, the guest gets -KVM_ENOSYS; no pages or a range
   * that wraps, -KVM_EINVAL; otherwise the vCPU exits with KVM_EXIT_HYPERCALL (ret preset
   * to 0) and, when the VMM re-enters it, complete_hypercall_exit puts hypercall.ret in
   * the guest's RAX and the instruction retires. A TD's MapGPA is tdvmcallMapGpa.
   */
  private mapGpaRange(): Advance {
    if (this.tdxMapGpa !== null) return this.tdvmcallMapGpa(this.tdxMapGpa);
    const ctx = this.ctx;
    if (this.hypercallExited) {
      this.hypercallExited = false;
      ctx.hypercallRet = Atomics.load(this.words, this.base + VcpuWord.HYPERCALL_RET);
      return this.retire();
    }
    if (((this.vm.layout.config.exitHypercalls ?? 0) & (1 << KVM_HC_MAP_GPA_RANGE)) === 0) {
      ctx.hypercallRet = -KVM_ENOSYS;
      return this.retire();
    }
    const op = this.op;
    // a0 is a GFN here, so always page aligned; gpa_to_gfn(gpa) + npages must not wrap a u64 of GPA bits.
    if (!(op.value > 0) || op.gfn + op.value > 2 ** 52) {
      ctx.hypercallRet = -KVM_EINVAL;
      return this.retire();
    }
    return this.mapGpaExit(op.gfn, op.value, (op.private === true ? KVM_MAP_GPA_RANGE_ENCRYPTED : 0) | (op.offset & 0xf));
  }

  /** KVM_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE: a0 the GPA, a1 the pages, a2 the attributes, ret preset to 0. */
  private mapGpaExit(gfn: number, pages: number, attributes: number): Advance {
    const w = this.words;
    const b = this.base;
    const gpa = gfn * PAGE_SIZE;
    Atomics.store(w, b + VcpuWord.HYPERCALL_NR, KVM_HC_MAP_GPA_RANGE);
    Atomics.store(w, b + VcpuWord.HYPERCALL_ARG0_LO, gpa >>> 0);
    Atomics.store(w, b + VcpuWord.HYPERCALL_ARG0_HI, (gpa / 4294967296) >>> 0);
    Atomics.store(w, b + VcpuWord.HYPERCALL_ARG1, pages);
    Atomics.store(w, b + VcpuWord.HYPERCALL_ARG2, attributes);
    Atomics.store(w, b + VcpuWord.HYPERCALL_RET, 0);
    this.hypercallExited = true;
    this.slot = undefined; // no write is interrupted: nothing pending for the oracles
    this.exitToVmm(KVM_EXIT_HYPERCALL);
    return Advance.BOUNDARY;
  }

  /**
   * A TD's TDG.VP.VMCALL<MapGPA> as KVM serves it (arch/x86/kvm/vmx/tdx.c). tdx_map_gpa:
   * without KVM_CAP_EXIT_HYPERCALL's bit, TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED; an empty or
   * wrapping span, TDVMCALL_STATUS_INVALID_OPERAND; R11 the GPA either way (a0 is a frame
   * and the shared bit is the operation's `private`, so ALIGN_ERROR and a span across the
   * shared bit cannot arise). Else __tdx_map_gpa exits for the first chunk: at most
   * TDX_MAP_GPA_MAX_LEN, a2 ENCRYPTED or DECRYPTED (no page-size hint). On re-entry,
   * tdx_complete_vmcall_map_gpa: a non-zero hypercall.ret ends the call with
   * INVALID_OPERAND, R11 the chunk's GPA (as merged; kvm-x86 later mapped EAGAIN to
   * RETRY); else map_gpa_next moves 2 MiB on and, past the end, the call succeeds; else a
   * pending interrupt (kvm_vcpu_has_events; here VcpuRequest.PENDING_INTERRUPT) ends it
   * with TDVMCALL_STATUS_RETRY, R11 the GPA to call again from; else KVM exits for the
   * next chunk without entering the guest (here the instruction stays pending and exits
   * again at once). The chunks exist so that a long conversion does not hold off
   * interrupts ("to prevent issues with guest lockup detection").
   */
  private tdvmcallMapGpa(m: { next: number; end: number }): Advance {
    const op = this.op;
    const attributes = op.private === true ? KVM_MAP_GPA_RANGE_ENCRYPTED : KVM_MAP_GPA_RANGE_DECRYPTED;
    if (this.hypercallExited) {
      this.hypercallExited = false;
      const w = this.words;
      const b = this.base;
      if (Atomics.load(w, b + VcpuWord.HYPERCALL_RET) !== 0) return this.tdvmcallDone(TDVMCALL_STATUS_INVALID_OPERAND, m.next * PAGE_SIZE);
      m.next += TDX_MAP_GPA_MAX_PAGES;
      if (m.next >= m.end) return this.tdvmcallDone(TDVMCALL_STATUS_SUCCESS, TDVMCALL_MAP_GPA);
      // The interrupt is delivered on the entry that returns RETRY: the word is taken.
      if (Atomics.exchange(w, b + VcpuRequest.PENDING_INTERRUPT, 0) !== 0) return this.tdvmcallDone(TDVMCALL_STATUS_RETRY, m.next * PAGE_SIZE);
      return this.mapGpaExit(m.next, Math.min(m.end - m.next, TDX_MAP_GPA_MAX_PAGES), attributes);
    }
    if (((this.vm.layout.config.exitHypercalls ?? 0) & (1 << KVM_HC_MAP_GPA_RANGE)) === 0) {
      return this.tdvmcallDone(TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, op.gfn * PAGE_SIZE);
    }
    if (!(op.value > 0) || op.gfn + op.value > 2 ** 52) return this.tdvmcallDone(TDVMCALL_STATUS_INVALID_OPERAND, op.gfn * PAGE_SIZE);
    m.next = op.gfn;
    m.end = op.gfn + op.value;
    return this.mapGpaExit(m.next, Math.min(op.value, TDX_MAP_GPA_MAX_PAGES), attributes);
  }

  /** The TDVMCALL returns to the TD: R10 the status, R11 as KVM left it; the instruction retires. */
  private tdvmcallDone(status: bigint, r11: number): Advance {
    this.ctx.tdvmcallStatus = status;
    this.ctx.tdvmcallR11 = r11;
    return this.retire();
  }

  /** Phase TRANSLATE: fetch the next operation if none is pending, translate, check the TLB. */
  private translate(): Advance {
    const op = this.op;
    // The instruction runs (again): it no longer waits at a fault, so a stop waits for it to retire.
    this.pacedAtFault = false;
    if (!this.opPending) {
      this.workload.next(op, this.ctx);
      this.opIteration = this.ctx.iteration;
      this.opPending = true;
    }
    if (op.kind >= OpKind.READ) return this.readOrHypercall();
    const slot = this.vm.memory.findSlot(op.gfn);
    if (slot === undefined) return this.barOrMmio();
    const page = op.gfn - slot.baseGfn;
    this.slot = slot;
    this.page = page;
    const tlb = this.privateAccess() ? this.tlbPrivate! : this.tlb;
    this.phase = tlb[slot.firstPage + page] === this.tlbGen + 1 ? Phase.STORE : Phase.WALK;
    return Advance.PROGRESS;
  }

  /** TRANSLATE for what is no write: a hypercall, or a read (which takes no SPTE walk here). */
  private readOrHypercall(): Advance {
    const op = this.op;
    if (op.kind === OpKind.MAP_GPA_RANGE) return this.mapGpaRange();
    if (op.kind === OpKind.SET_PAT) return this.setPat();
    if (op.kind === OpKind.WBINVD) {
      this.emulateWbinvd();
      return this.retire();
    }
    const slot = this.vm.memory.findSlot(op.gfn);
    if (slot === undefined) return this.barOrMmio();
    const page = op.gfn - slot.baseGfn;
    this.slot = slot;
    this.page = page;
    if (this.cache !== null) {
      this.cache.read(this.cacheAccess(slot, page), lineKey(slot.firstPage + page, 0), 0, this.value8);
      return this.retire();
    }
    if (this.tlbPrivate !== null) {
      // On a VM with private memory a read is checked against the attribute all the same.
      const priv = op.private === true;
      if (this.kindMismatch(slot, page, priv)) return this.memoryFaultExit(priv);
      (priv ? slot.gmem! : slot).readU64(page);
      return this.retire();
    }
    slot.readU64(page);
    return this.retire();
  }

  /**
   * The guest's WBINVD exits to KVM (kvm_emulate_wbinvd), which writes back and invalidates
   * (on every CPU the vCPU ran on; here the one shared cache) only with non-coherent DMA.
   * With KVM_MEM_DMA slots and nothing registered VM-wide, KVM flushes those slots alone,
   * line by line (what the 2020 RFC's per-slot flag was to allow).
   */
  private emulateWbinvd(): void {
    const cache = this.cache;
    if (cache === null) return;
    const vmWide = kvmEmulateWbinvd(this.vm);
    const slots = vmWide ? [] : this.vm.dmaSlots();
    if (!vmWide && slots.length === 0) return;
    // wbinvd-noop: KVM skips it all the same, and the guest's dirty lines stay cached.
    if (this.vm.bugs.wbinvdNoop) this.vm.acts.acted(Acted.WBINVD_NOOP);
    else if (vmWide) cache.wbinvd();
    else for (const s of slots) for (let p = 0; p < s.pages; p++) cache.clflushPage(s.firstPage + p);
  }

  /**
   * SET_PAT: the guest's page tables give the pages another memory type, and the guest
   * flushes their cache lines (set_memory_wc and friends end in cpa_flush), with CLFLUSH
   * unless the operation says the guest flushes otherwise (SET_PAT_NO_CLFLUSH: a WBINVD
   * follows). The guest's own TLB entries are not modelled apart: each access reads the
   * type afresh (as after the INVLPG a guest does when it changes a PTE).
   */
  private setPat(): Advance {
    const op = this.op;
    const pat = this.vm.guestPat;
    if (pat !== null) {
      for (const r of slotRanges(this.vm.memory, op.gfn, op.gfn + op.value)) {
        const first = r.slot.firstPage + r.page;
        pat.fill(op.offset & SET_PAT_TYPE, first, first + r.count);
        if ((op.offset & SET_PAT_NO_CLFLUSH) !== 0) continue;
        // Linux's cpa_flush: a cache attribute change flushes the range's lines (CLFLUSH), so no copy of the old type is left cached.
        for (let f = first; f < first + r.count; f++) this.cache!.clflushPage(f);
      }
    }
    if ((op.offset & SET_PAT_COHERENT_ACK) !== 0) {
      Atomics.store(this.global, GlobalWord.COHERENT_SWITCH, CoherentSwitch.DONE);
      Atomics.notify(this.global, GlobalWord.COHERENT_SWITCH);
    }
    return this.retire();
  }

  /**
   * How an access to the page treats the cache: the EPT memory type its SPTE got at the
   * fault (vmx_get_mt_mask), combined with the guest's PAT type unless IPAT is set
   * (effectiveMemoryType). WB goes through the cache, WC is write-combining, and UC, UC-,
   * WT and WP go to memory as UC (simplified: WT and WP would update a cached copy too).
   */
  private cacheAccess(slot: Memslot, page: number): CacheAccess.WB | CacheAccess.UC | CacheAccess.WC {
    const type = this.vm.accessMemoryType(slot, page);
    if (type === X86_MEMTYPE_WB) {
      // A cacheable access to device memory: a machine check (why vmx_get_mt_mask forces UC there).
      if (slot.hostMmio) this.vm.machineCheck(slot, page);
      return CacheAccess.WB;
    }
    return type === X86_MEMTYPE_WC ? CacheAccess.WC : CacheAccess.UC;
  }

  /** Phase STORE through the CPU cache: the same bytes as writeU64Stamped (or the byte and the stamp), by the access's memory type. */
  private cachedStore(): Advance {
    const cache = this.cache!;
    const slot = this.slot!;
    const page = this.page;
    const op = this.op;
    const access = this.cacheAccess(slot, page);
    const frame = slot.firstPage + page;
    Memslot.stampedBytes(this.line32, op.value, this.index + 1, ++this.seq, this.opIteration);
    if (op.kind === OpKind.WRITE64) {
      cache.write(access, lineKey(frame, 0), 0, this.line8);
      return this.retire();
    }
    const key = lineKey(frame, op.offset);
    const at = op.offset % CACHE_LINE_SIZE;
    const one = this.byte0;
    if (op.kind === OpKind.INC8) {
      cache.read(access, key, at, one);
      one[0] = (one[0]! + 1) & 0xff;
    } else one[0] = op.value;
    cache.write(access, key, at, one);
    cache.write(access, lineKey(frame, 0), 8, this.stamp8);
    return this.retire();
  }

  /** Phase STORE: store the data and the stamp; the operation retires. */
  private store(): Advance {
    if (this.cache !== null) return this.cachedStore();
    // A private access stores to the slot's guest_memfd page (checked at its fault).
    const slot = this.privateAccess() ? this.slot!.gmem! : this.slot!;
    const page = this.page;
    if (this.tlbPrivate !== null) this.checkKindAtStore();
    const op = this.op;
    if (op.kind === OpKind.WRITE64) {
      slot.writeU64Stamped(page, op.value, this.index + 1, ++this.seq, this.opIteration);
    } else {
      const bytes = slot.bytes(page);
      const at = slot.byteOffset(page) + op.offset;
      bytes[at] = op.kind === OpKind.INC8 ? (bytes[at]! + 1) & 0xff : op.value;
      slot.stamp(page, this.index + 1, ++this.seq, this.opIteration);
    }
    return this.retire();
  }

  /**
   * The private memory oracle's probe on a confidential VM: a store of the kind the page's
   * attribute no longer says went through a translation that should have been zapped (and
   * flushed) before the attribute changed (KVM_SET_MEMORY_ATTRIBUTES zaps first). Counted
   * with the first frame, in shared words.
   */
  private checkKindAtStore(): void {
    const slot = this.slot!;
    if (this.vm.attributes!.isPrivate(slot, this.page) !== this.privateAccess()) countStaleStore(this.global, slot.baseGfn + this.page);
  }

  private retire(): Advance {
    this.opPending = false;
    this.phase = Phase.TRANSLATE;
    this.ops++;
    this.progress++;
    return Advance.RETIRED;
  }

  /**
   * An access outside every memslot: a mediated device's virtual BAR page (mmio/), else
   * KVM_EXIT_MMIO. Through its SPTE the access is done at once; without one the fault
   * runs in two steps, so that a zap can come between the lookup and the install
   * (KvmBarMmu), and the access is tried again after. A refused fault is
   * KVM_EXIT_MEMORY_FAULT (KVM_RUN's EFAULT). BAR pages are walked every time: no TLB entry.
   */
  private barOrMmio(): Advance {
    const op = this.op;
    const bar = this.vm.barAt(op.gfn);
    if (bar === undefined) return this.mmioExit();
    this.slot = undefined; // no memslot page pending: nothing for the oracles of RAM
    const mmu = bar.mmu;
    const page = op.gfn - mmu.baseGfn;
    const write = op.kind < OpKind.READ;
    if (this.barFault !== null) {
      const installed = mmu.install(page, this.barFault, this.index + 1);
      if (installed === 'busy') return Advance.BOUNDARY;
      this.barFault = null;
      // RET_PF_RETRY re-enters the guest, which handles requests (a flush an invalidation waits for) first.
      return installed === 'retry' ? Advance.BOUNDARY : Advance.PROGRESS;
    }
    const a = mmu.access(page, write, op.value);
    if (a.done) {
      if (!write) this.ctx.mmioRead = a.value;
      return this.retire();
    }
    const f = mmu.faultin(page, write, this.index);
    if (!f.ok) return this.barRefused(mmu, page, write);
    this.faults++;
    this.barFault = f;
    return Advance.PROGRESS;
  }

  /**
   * The vendor refused the access: KVM_RUN fails with EFAULT (KVM_EXIT_MEMORY_FAULT), or
   * with EIO once KVM killed the VM ('kill-vm'); the VMM stops the VM either way. With
   * refused-access-reads-zeros the access completes instead: the guest reads zeros.
   */
  private barRefused(mmu: KvmBarMmu, page: number, write: boolean): Advance {
    if (this.vm.bugs.refusedAccessReadsZeros === true) {
      this.vm.acts.acted(Acted.REFUSED_ACCESS_READS_ZEROS);
      mmu.refusedCompleted(page);
      if (!write) this.ctx.mmioRead = 0;
      return this.retire();
    }
    if (mmu.layout.onRefusal === 'kill-vm') {
      mmu.killVm();
      this.storeExitGpa();
      this.exitToVmm(KVM_RUN_EIO);
      return Advance.BOUNDARY;
    }
    return this.memoryFaultExit(false);
  }

  private mmioExit(): Advance {
    this.storeExitGpa();
    this.opPending = false;
    this.exitToVmm(KVM_EXIT_MMIO);
    return Advance.BOUNDARY;
  }
}
