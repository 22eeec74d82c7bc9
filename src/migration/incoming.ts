import { type Steps, WaitCode, waitFor } from '../roles/role.ts';
import { VcpuWord } from '../host/layout.ts';
import type { Vm } from '../host/vm.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';

/**
 * The destination's VMM after an incoming migration completed and it resumed the guest
 * (QEMU's vm_start, as a destination started without -S does): it lets the guest run
 * until every vCPU has retired `opsPerVcpu` operations, then stops it (QMP `stop`) and
 * waits until no vCPU runs guest code, so that memory can be checked, as migration-test
 * does on the destination before check_guests_ram.
 */
export function* runResumedGuest(vm: Vm, opsPerVcpu: number): Steps {
  const vmm = new VmmControl(vm);
  for (let v = 0; v < vmm.vcpus; v++) {
    for (;;) {
      const ops = vmm.word(v, VcpuWord.OPS);
      if (ops >= opsPerVcpu) break;
      yield waitFor(WaitCode.GUEST_OPS, opsPerVcpu, ops);
    }
  }
  for (let v = 0; v < vmm.vcpus; v++) vmm.requestStop(v);
  yield undefined;
  for (let v = 0; v < vmm.vcpus; v++) while (!vmm.isQuiescent(v)) yield waitFor(WaitCode.VCPU_STOPPED, v);
}
