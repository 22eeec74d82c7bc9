import {
  KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED,
  KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SIZE,
} from '../constants.ts';
import { VcpuWord } from '../layout.ts';
import type { Steps } from '../../roles/role.ts';
import { type ConvertResult, GuestMemfdRam, kvmConvertMemory } from './kvm-convert-memory.ts';
import type { VmmControl } from './vmm-control.ts';

/** kvm_run.memory_fault of a vCPU parked in KVM_EXIT_MEMORY_FAULT. */
export interface MemoryFault { vcpu: number; gpa: number; size: number; flags: number }

/** kvm_run.hypercall of a vCPU parked in KVM_EXIT_HYPERCALL. */
export interface Hypercall { vcpu: number; nr: number; args: [number, number, number] }

/**
 * What converts guest memory for the exits: QEMU's kvm_convert_memory over the RAM
 * blocks' RamDiscardManagers, or a conversion design's convert (conversion-design.ts).
 */
export type MemoryConverter = GuestMemfdRam | { readonly name: string; convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult> };

/** Why the VMM stops the VM (QEMU: vm_stop(RUN_STATE_INTERNAL_ERROR)); the vCPU stays in its exit. */
export interface ExitError { vcpu: number; error: string }

/**
 * What the VMM does with its vCPUs' exits (QEMU's kvm_cpu_exec), for every program that
 * runs a guest: the migration thread, the dirty_log_test collector and the litmus host.
 * - KVM_EXIT_DIRTY_RING_FULL: reap the rings (kvm_dirty_ring_reap: harvest and
 *   KVM_RESET_DIRTY_RINGS, which the caller supplies as its own sync), then re-enter
 *   KVM_RUN; with ring-full-exit-unhandled injected, never (each such exit counts as the
 *   bug acting).
 * - KVM_EXIT_MMIO: nothing is emulated there; the caller reports it.
 * - KVM_EXIT_MEMORY_FAULT and KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE):
 *   kvm_convert_memory, then re-enter; a conversion that fails stops the VM (the caller
 *   reports the error).
 * - The guest-progress check: a vCPU found in the same ring-full exit at two checks was
 *   never answered: the guest stalled.
 */
export class ExitHandler {
  /** Per vCPU: its exit count when it sat in a ring-full exit at the last progress check, else -1. */
  private readonly parkedAtCheck: number[];
  /** ring-full-exit-unhandled: per vCPU, the exit count last counted as ignored. */
  private readonly ignored: number[] = [];
  /** vCPUs the progress check found stalled. */
  readonly stalled = new Set<number>();

  /** Called before each conversion and after it, failed or not (the VMM marks what it changed for migration). */
  onConvert: { before(): void; after(gpa: number, size: number, ok: boolean): void } | null = null;

  constructor(readonly vmm: VmmControl, private readonly ringFullUnhandled = false) {
    this.parkedAtCheck = new Array<number>(vmm.vcpus).fill(-1);
  }

  /** The first vCPU parked in KVM_EXIT_MMIO and the GPA it accessed, or null. */
  mmio(): { vcpu: number; gpa: number } | null {
    const vmm = this.vmm;
    for (let v = 0; v < vmm.vcpus; v++) {
      if (vmm.parkedExit(v) !== KVM_EXIT_MMIO) continue;
      return { vcpu: v, gpa: this.exitGpa(v) };
    }
    return null;
  }

  private exitGpa(v: number): number {
    return this.vmm.exitGpa(v);
  }

  /** The first vCPU parked in KVM_EXIT_MEMORY_FAULT, with kvm_run.memory_fault, or null. */
  memoryFault(): MemoryFault | null {
    const vmm = this.vmm;
    for (let v = 0; v < vmm.vcpus; v++) {
      if (vmm.parkedExit(v) !== KVM_EXIT_MEMORY_FAULT) continue;
      return { vcpu: v, gpa: this.exitGpa(v), size: vmm.word(v, VcpuWord.MEMORY_FAULT_SIZE) >>> 0, flags: vmm.word(v, VcpuWord.MEMORY_FAULT_FLAGS) >>> 0 };
    }
    return null;
  }

  /**
   * Answers KVM_EXIT_MEMORY_FAULT as kvm_cpu_exec does: a flag other than PRIVATE is an
   * error; otherwise the range is converted to the faulting access's kind and the vCPU
   * re-enters. Returns null when every such exit was answered, else the first error: QEMU
   * then stops the VM (vm_stop(RUN_STATE_INTERNAL_ERROR)) and the vCPU stays in its exit.
   */
  *serviceMemoryFaults(ram: MemoryConverter): Steps<ExitError | null> {
    for (let f = this.memoryFault(); f !== null; f = this.memoryFault()) {
      if ((f.flags & ~KVM_MEMORY_EXIT_FLAG_PRIVATE) !== 0) {
        return { vcpu: f.vcpu, error: `KVM_EXIT_MEMORY_FAULT: Unknown flag 0x${f.flags.toString(16)}` };
      }
      const failed = yield* this.convert(ram, f.vcpu, f.gpa, f.size, (f.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE) !== 0);
      if (failed !== null) return failed;
    }
    return null;
  }

  /** The first vCPU parked in KVM_EXIT_HYPERCALL, with kvm_run.hypercall, or null. */
  hypercall(): Hypercall | null {
    const vmm = this.vmm;
    for (let v = 0; v < vmm.vcpus; v++) {
      if (vmm.parkedExit(v) !== KVM_EXIT_HYPERCALL) continue;
      const a0 = (vmm.word(v, VcpuWord.HYPERCALL_ARG0_LO) >>> 0) + (vmm.word(v, VcpuWord.HYPERCALL_ARG0_HI) >>> 0) * 4294967296;
      return { vcpu: v, nr: vmm.word(v, VcpuWord.HYPERCALL_NR), args: [a0, vmm.word(v, VcpuWord.HYPERCALL_ARG1) >>> 0, vmm.word(v, VcpuWord.HYPERCALL_ARG2) >>> 0] };
    }
    return null;
  }

  /**
   * Answers KVM_EXIT_HYPERCALL as QEMU's kvm_handle_hypercall does: KVM_HC_MAP_GPA_RANGE
   * converts a1 pages from GPA a0 to private (a2 has KVM_MAP_GPA_RANGE_ENCRYPTED) or
   * shared and re-enters with hypercall.ret left at 0; any other hypercall, or a failed
   * conversion, is the error that stops the VM.
   */
  *serviceHypercalls(ram: MemoryConverter): Steps<ExitError | null> {
    for (let h = this.hypercall(); h !== null; h = this.hypercall()) {
      if (h.nr !== KVM_HC_MAP_GPA_RANGE) return { vcpu: h.vcpu, error: `KVM_EXIT_HYPERCALL: unknown hypercall ${h.nr}` };
      const [gpa, npages, attrs] = h.args;
      const failed = yield* this.convert(ram, h.vcpu, gpa, npages * PAGE_SIZE, (attrs & KVM_MAP_GPA_RANGE_ENCRYPTED) !== 0);
      if (failed !== null) return failed;
    }
    return null;
  }

  private *convert(ram: MemoryConverter, vcpu: number, gpa: number, size: number, toPrivate: boolean): Steps<ExitError | null> {
    this.onConvert?.before();
    const r = ram instanceof GuestMemfdRam ? yield* kvmConvertMemory(ram, gpa, size, toPrivate) : yield* ram.convert(gpa, size, toPrivate);
    this.onConvert?.after(gpa, size, r.ret >= 0);
    const what = ram instanceof GuestMemfdRam ? 'kvm_convert_memory' : `the ${ram.name} design's conversion`;
    if (r.ret < 0) return { vcpu, error: `${what}(0x${gpa.toString(16)}, 0x${size.toString(16)}) failed: ${r.error || `ret ${r.ret}`}` };
    this.vmm.reenter(vcpu);
    return null;
  }

  /**
   * Answers KVM_EXIT_DIRTY_RING_FULL: the vCPUs in one now make the VMM `reap` (all rings
   * at once), then they re-enter, each after a reap that began after its exit (a vCPU
   * that exits during the reap waits for the next). Returns whether any did (the caller's
   * step ends there).
   */
  *serviceRingFull(reap: () => Steps): Steps<boolean> {
    const vmm = this.vmm;
    if (this.ringFullUnhandled) { vmm.ignoreRingFullExits(this.ignored); return false; }
    const full: number[] = [];
    for (let v = 0; v < vmm.vcpus; v++) if (vmm.parkedExit(v) === KVM_EXIT_DIRTY_RING_FULL) full.push(v);
    if (full.length === 0) return false;
    yield* reap();
    for (const v of full) vmm.reenter(v);
    return true;
  }

  /** Re-enters KVM_RUN for vCPU `v` (the litmus host's `reenter`); returns the exit it answered, or -1. */
  reenter(v: number): number {
    const exit = this.vmm.parkedExit(v);
    this.vmm.reenter(v);
    return exit;
  }

  /** The guest-progress check: still in the same ring-full exit as at the last check means never answered. */
  checkProgress(): void {
    const vmm = this.vmm;
    for (let v = 0; v < vmm.vcpus; v++) {
      const parked = vmm.parkedExit(v) === KVM_EXIT_DIRTY_RING_FULL;
      const exits = parked ? vmm.word(v, VcpuWord.EXITS) : -1;
      if (parked && this.parkedAtCheck[v] === exits) this.stalled.add(v);
      this.parkedAtCheck[v] = exits;
    }
  }
}
