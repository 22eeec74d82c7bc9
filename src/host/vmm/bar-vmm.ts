import { EXIT_REASON_NAMES, KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO, KVM_RUN_EIO, PAGE_SIZE } from '../constants.ts';
import { BAR_REFUSAL_NAMES, type BarRefusal } from '../bar-layouts.ts';
import { GlobalWord } from '../layout.ts';
import type { Vm } from '../vm.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';
import { VmmControl } from './vmm-control.ts';

/** A VM stopped because of an access to its mediated device's BAR: which VM and vCPU, where, why, and who stopped it. */
export interface BarVmStop {
  kind: 'vm-stopped';
  vm: number;
  vcpu: number;
  gpa: number;
  /** The BAR page (null: the access was outside every BAR: plain MMIO nobody emulates). */
  barPage: number | null;
  reason: (typeof BAR_REFUSAL_NAMES)[number];
  errno: number;
  write: boolean;
  /** The path: KVM killed the VM, or the VMM stopped it on KVM_RUN's EFAULT. */
  how: string;
}

/**
 * The VMM of one VM that shares a mediated device (QEMU's kvm_cpu_exec for its vCPUs): a
 * vCPU whose BAR access was refused comes back from KVM_RUN with EFAULT
 * (KVM_EXIT_MEMORY_FAULT: QEMU reports "error: kvm run failed Bad address" and stops the
 * VM, RUN_STATE_INTERNAL_ERROR), or, when KVM killed the VM (kvm_vm_dead), with EIO. Either
 * way the VM stops, and the report says which VM and vCPU, the address and the vendor's
 * reason; the other VMs run on. It sleeps on the exit doorbell in between.
 */
export function* barVmm(vm: Vm, id: number, report: (e: BarVmStop) => void): Steps {
  const vmm = new VmmControl(vm);
  const mmu = vm.bars[0]!.mmu;
  for (;;) {
    const seen = Atomics.load(vm.global, GlobalWord.EXIT_DOORBELL);
    for (let v = 0; v < vmm.vcpus; v++) {
      const exit = vmm.parkedExit(v);
      if (exit !== KVM_EXIT_MEMORY_FAULT && exit !== KVM_RUN_EIO && exit !== KVM_EXIT_MMIO) continue;
      const gpa = vmm.exitGpa(v);
      const page = gpa / PAGE_SIZE - mmu.baseGfn;
      const inBar = page >= 0 && page < mmu.barPages;
      const r = mmu.lastRefusal();
      vmm.stopOnInternalError();
      report({
        kind: 'vm-stopped', vm: id, vcpu: v, gpa, barPage: inBar ? page : null,
        reason: BAR_REFUSAL_NAMES[(inBar && r !== null ? r.reason : 0) as BarRefusal], errno: inBar && r !== null ? r.errno : 0, write: r?.write ?? false,
        how: exit === KVM_RUN_EIO
          ? 'KVM killed the VM (kvm_vm_dead): KVM_RUN failed with EIO'
          : `KVM_RUN failed (${EXIT_REASON_NAMES[exit]}); the VMM stopped the VM with an internal error`,
      });
      return;
    }
    yield waitFor(WaitCode.VCPU_EXITS, 0, 0, { array: vm.global, index: GlobalWord.EXIT_DOORBELL, value: seen });
  }
}
