import { CoherentSwitch, GlobalWord } from '../host/layout.ts';
import type { Vm } from '../host/vm.ts';
import { type Steps, WaitCode, waitFor } from '../roles/role.ts';

/**
 * switch-to-coherent, the seed discussion's second answer to page aliasing: before the
 * migration reads anything, guest and host go back to the coherent path, so that the
 * migration thread's write-back reads see every write. The host switches its devices to
 * snooped DMA (a virtio-gpu backend stops setting No Snoop; GlobalWord.DEVICES_SNOOP); then,
 * `withGuest`, the device asks the guest's driver to map its buffers WB again (a virtio-gpu
 * configuration change; GlobalWord.COHERENT_SWITCH) and waits until it has: the driver's
 * set_memory_wb flushes the buffers' lines (cpa_flush), and its stores go through the cache
 * from then on. KVM's registration of non-coherent DMA stays (VFIO's follows the IOMMU,
 * which has not changed): KVM still honours the guest's PAT, which now says WB.
 *
 * The host alone (`withGuest` false: switch-host-only) is not enough: the guest still
 * writes its buffers WC, behind the cache, and a line the migration thread cached in one
 * pass is stale in the next. Returns whether anything was switched (false: KVM honours
 * the guest's PAT nowhere, nothing to do).
 */
export function* switchToCoherent(vm: Vm, withGuest: boolean): Steps<boolean> {
  if (vm.cache === null || !vm.honoursGuestPat()) return false;
  Atomics.store(vm.global, GlobalWord.DEVICES_SNOOP, 1);
  if (!withGuest) return true;
  Atomics.store(vm.global, GlobalWord.COHERENT_SWITCH, CoherentSwitch.REQUESTED);
  for (;;) {
    const state = Atomics.load(vm.global, GlobalWord.COHERENT_SWITCH);
    if (state === CoherentSwitch.DONE) return true;
    yield waitFor(WaitCode.GUEST_COHERENT, 0, 0, { array: vm.global, index: GlobalWord.COHERENT_SWITCH, value: state });
  }
}
