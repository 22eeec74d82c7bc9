import { GlobalWord, VcpuRequest, VcpuRunState, VcpuWord } from '../layout.ts';
import { KVM_EXIT_DIRTY_RING_FULL } from '../constants.ts';
import { Acted } from '../injections.ts';
import type { Vm } from '../vm.ts';

/**
 * What the VMM (userspace) does to its vCPUs and host actors through shared words: ask
 * them to stop, let them run, re-enter KVM_RUN after an exit. Every hand-off is a
 * Dekker pair of seq-cst Atomics, so a stale state word can never be mistaken for an
 * acknowledgement (see vcpu.ts boundary()).
 */
export class VmmControl {
  private readonly w: Int32Array;
  private readonly g: Int32Array;

  constructor(readonly vm: Vm) {
    this.w = vm.vcpuWords;
    this.g = vm.global;
  }

  get vcpus(): number { return this.vm.layout.config.vcpus; }

  requestStop(v: number): void {
    Atomics.store(this.w, this.vm.vcpuBase(v) + VcpuRequest.STOP, 1);
  }

  release(v: number): void {
    const at = this.vm.vcpuBase(v) + VcpuRequest.STOP;
    Atomics.store(this.w, at, 0);
    Atomics.notify(this.w, at);
  }

  /** Re-enters KVM_RUN for a vCPU parked in an exit. */
  reenter(v: number): void {
    const at = this.vm.vcpuBase(v) + VcpuRequest.RUN_SEQ;
    Atomics.add(this.w, at, 1);
    Atomics.notify(this.w, at);
  }

  runState(v: number): VcpuRunState {
    return Atomics.load(this.w, this.vm.vcpuBase(v) + VcpuWord.RUN_STATE);
  }

  /** The exit reason if the vCPU sits in an exit the VMM has not answered yet, else -1. */
  parkedExit(v: number): number {
    const b = this.vm.vcpuBase(v);
    if (Atomics.load(this.w, b + VcpuWord.RUN_STATE) !== VcpuRunState.EXITED) return -1;
    if (Atomics.load(this.w, b + VcpuRequest.RUN_SEQ) !== Atomics.load(this.w, b + VcpuWord.EXIT_RUN_SEQ)) return -1;
    return Atomics.load(this.w, b + VcpuWord.EXIT_REASON);
  }

  /** Not running guest code, and will not without the VMM: stopped, or parked in an exit. */
  isQuiescent(v: number): boolean {
    const s = this.runState(v);
    return s === VcpuRunState.STOPPED || s === VcpuRunState.DONE || this.parkedExit(v) >= 0;
  }

  /** The GPA in kvm_run's exit union (MMIO and memory faults). The words are Int32: the low one reads back negative from bit 31 up. */
  exitGpa(v: number): number {
    return (this.word(v, VcpuWord.MMIO_GPA_LO) >>> 0) + (this.word(v, VcpuWord.MMIO_GPA_HI) >>> 0) * 4294967296;
  }

  word(v: number, w: number): number {
    return Atomics.load(this.w, this.vm.vcpuBase(v) + w);
  }

  /** Guest operations retired by all vCPUs (published at each vCPU's step boundary). */
  totalOps(): number {
    return this.vm.guestOps();
  }

  pauseHost(): void { Atomics.store(this.g, GlobalWord.HOST_PAUSE, 1); }
  resumeHost(): void { Atomics.store(this.g, GlobalWord.HOST_PAUSE, 0); Atomics.notify(this.g, GlobalWord.HOST_PAUSE); }

  /**
   * After pauseHost(): true once no host actor can write any more. An actor that
   * registers later sees the pause before its first write.
   */
  hostPaused(): boolean {
    return Atomics.load(this.g, GlobalWord.HOST_PAUSED) >= Atomics.load(this.g, GlobalWord.HOST_ACTORS);
  }

  /** Auto-converge: throttle every vCPU to `percent` (0 to 99). */
  setThrottle(percent: number): void {
    for (let v = 0; v < this.vcpus; v++) Atomics.store(this.w, this.vm.vcpuBase(v) + VcpuRequest.THROTTLE, percent);
  }

  /**
   * QEMU's set-vcpu-dirty-limit (system/dirtylimit.c): vCPU `v` (or every vCPU) may
   * dirty at most `pagesPerSecond` pages per second; 0 cancels the limit. The vCPU
   * sleeps outside guest mode whenever it is ahead, as QEMU's vCPU thread does after a
   * KVM_EXIT_DIRTY_RING_FULL.
   */
  setDirtyLimit(pagesPerSecond: number, v = -1): void {
    for (let i = 0; i < this.vcpus; i++) {
      if (v < 0 || i === v) Atomics.store(this.w, this.vm.vcpuBase(i) + VcpuRequest.DIRTY_LIMIT, Math.round(pagesPerSecond));
    }
  }

  /**
   * ring-full-exit-unhandled: the VMM leaves every KVM_EXIT_DIRTY_RING_FULL unanswered;
   * each such exit counts once as the bug acting (`seen`: per vCPU, the exit count last
   * counted).
   */
  ignoreRingFullExits(seen: number[]): void {
    for (let v = 0; v < this.vcpus; v++) {
      if (this.parkedExit(v) !== KVM_EXIT_DIRTY_RING_FULL) continue;
      const exits = this.word(v, VcpuWord.EXITS);
      if (seen[v] === exits) continue;
      seen[v] = exits;
      this.vm.acts.acted(Acted.RING_FULL_EXIT_UNHANDLED);
    }
  }

  /** vm_stop(RUN_STATE_INTERNAL_ERROR): every vCPU is asked to stop, and the VM is marked stopped for good. */
  stopOnInternalError(): void {
    Atomics.store(this.g, GlobalWord.VM_INTERNAL_ERROR, 1);
    for (let v = 0; v < this.vcpus; v++) this.requestStop(v);
  }

  /** The VM was stopped on an internal error: no guest progress will come. */
  stoppedOnError(): boolean { return Atomics.load(this.g, GlobalWord.VM_INTERNAL_ERROR) !== 0; }

  setIteration(it: number): void { Atomics.store(this.g, GlobalWord.ITERATION, it); }
}
