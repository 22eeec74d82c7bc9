import { Acted } from './injections.ts';
import type { Vm } from './vm.ts';
import type { Steps } from '../roles/role.ts';

/**
 * KVM's VFIO pseudo device (virt/kvm/vfio.c): the VMM adds each VFIO group or device file
 * to it (KVM_DEV_VFIO_FILE_ADD), and after every add or delete kvm_vfio_update_coherency
 * looks at all of them: if any cannot enforce cache coherency (an IOMMU without snoop
 * control, a device doing No Snoop), KVM counts non-coherent DMA once for the whole device
 * (kvm_arch_register_noncoherent_dma), and unregisters when none is left.
 *
 * noncoherent-unbalanced decides from the file just added or deleted instead of all of
 * them: a coherent file added after a non-coherent one unregisters although the
 * non-coherent one is still there, and KVM stops honouring the guest's PAT under it.
 */
export class KvmVfio {
  /** Per file: whether it enforces coherency (kvm_vfio_file_enforced_coherent). */
  private readonly files: boolean[] = [];
  /** kv->noncoherent: what this device registered. */
  private noncoherent = false;

  constructor(private readonly vm: Vm, private readonly unbalanced = false) {}

  /** KVM_DEV_VFIO_FILE_ADD of a file that enforces coherency or not. Returns the SPTEs zapped. */
  *fileAdd(enforcedCoherent: boolean): Steps<number> {
    this.files.push(enforcedCoherent);
    return yield* this.updateCoherency(enforcedCoherent);
  }

  /** Whether KVM was told of non-coherent DMA for this device's files. */
  get registered(): boolean { return this.noncoherent; }

  private *updateCoherency(changed: boolean): Steps<number> {
    const all = this.files.some((coherent) => !coherent);
    const noncoherent = this.unbalanced ? !changed : all;
    if (noncoherent !== all) this.vm.acts.acted(Acted.NONCOHERENT_UNBALANCED);
    if (noncoherent === this.noncoherent) return 0;
    this.noncoherent = noncoherent;
    if (noncoherent) return yield* this.vm.registerNoncoherentDma();
    const r = yield* this.vm.unregisterNoncoherentDma();
    if (!r.ok) throw new Error(`kvm_vfio_update_coherency: ${r.error}`);
    return r.zapped;
  }
}
