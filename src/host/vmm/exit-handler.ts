import { KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO } from '../constants.ts';
import { VcpuWord } from '../layout.ts';
import type { Steps } from '../../roles/role.ts';
import type { VmmControl } from './vmm-control.ts';

/**
 * What the VMM does with its vCPUs' exits (QEMU's kvm_cpu_exec), for every program that
 * runs a guest: the migration thread, the dirty_log_test collector and the litmus host.
 * - KVM_EXIT_DIRTY_RING_FULL: reap the rings (kvm_dirty_ring_reap: harvest and
 *   KVM_RESET_DIRTY_RINGS, which the caller supplies as its own sync), then re-enter
 *   KVM_RUN; with ring-full-exit-unhandled injected, never (each such exit counts as the
 *   bug acting).
 * - KVM_EXIT_MMIO: nothing is emulated there; the caller reports it.
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

  constructor(readonly vmm: VmmControl, private readonly ringFullUnhandled = false) {
    this.parkedAtCheck = new Array<number>(vmm.vcpus).fill(-1);
  }

  /** The first vCPU parked in KVM_EXIT_MMIO and the GPA it accessed, or null. */
  mmio(): { vcpu: number; gpa: number } | null {
    const vmm = this.vmm;
    for (let v = 0; v < vmm.vcpus; v++) {
      if (vmm.parkedExit(v) !== KVM_EXIT_MMIO) continue;
      // The words are Int32: the low one reads back negative from bit 31 up.
      return { vcpu: v, gpa: (vmm.word(v, VcpuWord.MMIO_GPA_LO) >>> 0) + (vmm.word(v, VcpuWord.MMIO_GPA_HI) >>> 0) * 4294967296 };
    }
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
