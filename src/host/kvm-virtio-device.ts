import { ENXIO } from './constants.ts';
import type { Vm } from './vm.ts';
import type { Steps } from '../roles/role.ts';
import { KvmError } from '../util/errors.ts';

/**
 * The KVM "virtio device" of the 2023 RFC "KVM: Introduce KVM VIRTIO device": a VMM whose
 * own virtio backend does non-coherent DMA (a virtio-gpu backend's host GPU, which VFIO
 * never sees, so kvm_vfio_update_coherency cannot tell KVM) creates it with
 * KVM_CREATE_DEVICE(KVM_DEV_TYPE_VIRTIO) and sets KVM_DEV_VIRTIO_NONCOHERENT_SET, which
 * registers non-coherent DMA with KVM (kvm_arch_register_noncoherent_dma): KVM then honours
 * the guest's PAT. The attribute is set-only (nothing clears it: a second set changes
 * nothing), and releasing the device (closing its fd) unregisters what it registered. The
 * RFC was not merged: its names are kept, and its numbers, which mainline never assigned,
 * are not modelled.
 */
export const KVM_DEV_TYPE_VIRTIO = 'KVM_DEV_TYPE_VIRTIO';
export const KVM_DEV_VIRTIO_NONCOHERENT = 'KVM_DEV_VIRTIO_NONCOHERENT';
export const KVM_DEV_VIRTIO_NONCOHERENT_SET = 'KVM_DEV_VIRTIO_NONCOHERENT_SET';

export class KvmVirtioDevice {
  private noncoherent = false;
  private released = false;

  constructor(readonly vm: Vm) {}

  /** Whether KVM_DEV_VIRTIO_NONCOHERENT_SET was set (and not released). */
  get isNoncoherent(): boolean { return this.noncoherent && !this.released; }

  /**
   * KVM_SET_DEVICE_ATTR: only (KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET)
   * exists; anything else is ENXIO, as kvm_device_ops' set_attr answers an attribute it does
   * not know. Returns the SPTEs the registration zapped.
   */
  *setAttr(group: string, attr: string): Steps<number> {
    if (this.released) throw new KvmError(ENXIO, 'KVM_SET_DEVICE_ATTR', 'the KVM virtio device was released');
    if (group !== KVM_DEV_VIRTIO_NONCOHERENT || attr !== KVM_DEV_VIRTIO_NONCOHERENT_SET) {
      throw new KvmError(ENXIO, 'KVM_SET_DEVICE_ATTR', `no attribute ${attr} in group ${group} of ${KVM_DEV_TYPE_VIRTIO} (only ${KVM_DEV_VIRTIO_NONCOHERENT_SET}: set-only)`);
    }
    if (this.noncoherent) return 0;
    this.noncoherent = true;
    return yield* this.vm.registerNoncoherentDma();
  }

  /** The device's release (its fd closed): what it registered is unregistered. Returns the SPTEs zapped. */
  *release(): Steps<number> {
    if (this.released) return 0;
    this.released = true;
    if (!this.noncoherent) return 0;
    const r = yield* this.vm.unregisterNoncoherentDma();
    if (!r.ok) throw new Error(`KvmVirtioDevice.release: ${r.error}`);
    return r.zapped;
  }
}
