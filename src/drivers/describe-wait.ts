import { EXIT_REASON_NAMES } from '../host/constants.ts';
import { lockHolderName } from '../host/iommu/domain-lock.ts';
import { WaitCode } from '../roles/role.ts';

function exitName(reason: number): string {
  return EXIT_REASON_NAMES[reason] ?? `exit ${reason}`;
}

const VCPU_PHASES = ['', 'translate', 'walk', 'fault', 'store'];

/** Where a wedged actor is stuck, from the stepCode it published as its step began. */
export function describeStep(roleName: string, code: number): string {
  if (/^(vm\d+\.)?vcpu\d+$/.test(roleName) && code > 0) return `inside KVM_RUN (its guest operation was in the ${VCPU_PHASES[code] ?? code} phase when the step began)`;
  return 'inside a step';
}

/** Words the watchdog reads: "<role> waits for ...". Names come from `roleNames`. */
export function describeWait(code: number, arg: number, arg2: number, roleNames: string[]): string {
  switch (code as WaitCode) {
    case WaitCode.FLUSH_ACK: return `waits for vcpu${arg} to acknowledge TLB flush generation ${arg2}`;
    case WaitCode.VCPU_STOPPED: return `waits for vcpu${arg} to stop`;
    case WaitCode.GUEST_OPS: return `waits for the guest to retire ${arg} operations (retired so far: ${arg2})`;
    case WaitCode.VCPU_RELEASE: return 'is stopped and waits for the VMM to let it run';
    case WaitCode.VCPU_EXIT: return `sits in exit ${exitName(arg)} and waits for the VMM to re-enter KVM_RUN`;
    case WaitCode.PAUSED: return 'is paused by the VMM';
    case WaitCode.DESTINATION: return arg === 0 ? 'waits for the destination to apply what was sent (flow control)' : 'waits for the destination to complete';
    case WaitCode.BANDWIDTH: return `waits ${arg} ms for the next bandwidth window`;
    case WaitCode.SOURCE: return 'waits for the migration stream';
    case WaitCode.HOST_PAUSED: return 'waits for host actors to pause';
    case WaitCode.IOTLB_ACK: return `waits for device ${arg} to acknowledge IOTLB invalidation generation ${arg2}`;
    case WaitCode.IOMMU_LOCK: return `waits for the IOMMU domain lock${arg > 0 ? ` (held by ${lockHolderName(arg - 1)})` : ''}`;
    case WaitCode.IOMMU_REPLY: return `waits for the IOMMU service to answer its ${arg === 1 ? 'map' : 'unmap'} request`;
    case WaitCode.IOMMU_REQUEST: return 'waits for map/unmap requests';
    case WaitCode.VCPU_EXITS: return 'waits for a vCPU to exit (KVM_EXIT_HYPERCALL or KVM_EXIT_MEMORY_FAULT to serve)';
    case WaitCode.DMA_BUFFERS: return 'waits for the VMM to map its DMA buffers (shared memory VFIO maps as it registers)';
    case WaitCode.GUEST_COHERENT: return 'waits for the guest\'s driver to map its buffers WB again (switch-to-coherent)';
    case WaitCode.VM_START: return 'waits for the VMM to boot the guest (its conversion design\'s set-up and the boot\'s conversions)';
    case WaitCode.GUEST_ACK: return `waits for vm${arg}'s vCPUs to acknowledge its change to resource ${arg2} (their doorbells)`;
    case WaitCode.NONE: return 'is not waiting (busy or finished)';
  }
  return `waits for code ${code} (${arg}, ${arg2}); roles: ${roleNames.join(', ')}`;
}
