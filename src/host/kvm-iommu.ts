import { EINVAL, KVM_MEMORY_ATTRIBUTE_PRIVATE } from './constants.ts';
import { LockHolder } from './iommu/domain-lock.ts';
import { IOPTE_HEAD } from './iommu/io-page-table.ts';
import { IoPte, IommuWord } from './iommu/iommu-layout.ts';
import type { Iommu } from './iommu/iommu.ts';
import { type KvmMemoryAttributes, gfnRange, invalidMemoryAttributes, slotRanges } from './memory-attributes.ts';
import type { Vm } from './vm.ts';
import type { Steps } from '../roles/role.ts';
import { KvmError } from '../util/errors.ts';

/** The IOMMU code of the kernel takes the domain lock as the service does. */
const KERNEL = LockHolder.SERVICE;

/**
 * Design (d): KVM keeps the assigned device's I/O page table itself, as the RFC "Sharing
 * KVM TDP to IOMMU" (Yan Zhao, 2023: an iommufd HWPT whose page table KVM owns) and the
 * TDX Connect proposals have it: the page table follows KVM's memory attributes inside
 * KVM_SET_MEMORY_ATTRIBUTES, so userspace issues no map or unmap ioctl, and there is no
 * entry to count against a limit (one IOPTE per shared page, as one SPTE).
 *
 * Only guest_memfd memory is followed (ordinary RAM keeps VFIO's own mappings). IOVA =
 * GPA. In KVM the two halves would run inside kvm_vm_set_mem_attributes, as the arch
 * hooks kvm_arch_pre_set_memory_attributes (under the invalidation, with the SPTE zap)
 * and kvm_arch_post_set_memory_attributes (after the store); Vm.setMemoryAttributes has
 * no such hooks, so `setMemoryAttributes` here runs pre, the ioctl, post: a page turning
 * private leaves the device's table (and its IOTLBs) before the attribute says private,
 * and a page turning shared enters it only after the attribute says shared.
 */
export class KvmIommu {
  constructor(readonly vm: Vm, readonly iommu: Iommu) {}

  /** IOPTEs KVM has installed. */
  get ptes(): number { return Atomics.load(this.iommu.words, IommuWord.PAGES_MAPPED); }

  /** Binding the table to the VM: every shared guest_memfd page gets its IOPTE. */
  *bind(): Steps {
    yield* this.iommu.lock.acquire(KERNEL);
    for (const slot of this.vm.memory.slots) {
      if (slot.gmem === null) continue;
      for (let p = 0; p < slot.pages; p++) if (!this.vm.attributes!.isPrivate(slot, p)) this.install(slot.baseGfn + p);
    }
    this.iommu.lock.release();
  }

  /** KVM_SET_MEMORY_ATTRIBUTES with the IOMMU table following it; throws KvmError as the ioctl does. */
  *setMemoryAttributes(a: KvmMemoryAttributes): Steps {
    const why = invalidMemoryAttributes(a, this.vm.supportedMemoryAttributes);
    if (why !== null) throw new KvmError(EINVAL, 'KVM_SET_MEMORY_ATTRIBUTES', why);
    const { start, end } = gfnRange(a.address, a.size);
    const toPrivate = (a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE) !== 0;
    if (toPrivate) yield* this.preSetMemoryAttributes(start, end);
    yield* this.vm.setMemoryAttributes(a);
    if (!toPrivate) yield* this.postSetMemoryAttributes(start, end);
  }

  /**
   * kvm_arch_pre_set_memory_attributes' IOMMU half: revoke the IOPTEs of [start, end),
   * flush every device IOTLB and wait for it, then free the entries (the order an
   * unmap keeps, so no device keeps a translation of a page that turns private).
   */
  *preSetMemoryAttributes(start: number, end: number): Steps {
    const t = this.iommu.table;
    const revoked: number[] = [];
    yield* this.iommu.lock.acquire(KERNEL);
    for (const r of slotRanges(this.vm.memory, start, end)) {
      if (r.slot.gmem === null) continue;
      for (let gfn = r.slot.baseGfn + r.page; gfn < r.slot.baseGfn + r.page + r.count; gfn++) {
        if (gfn < t.pages && t.present(gfn)) { t.revoke(gfn); revoked.push(gfn); }
      }
    }
    this.iommu.lock.release();
    if (revoked.length === 0) return;
    yield undefined;
    yield* this.iommu.invalidation.invalidateAll();
    yield* this.iommu.lock.acquire(KERNEL);
    for (const gfn of revoked) t.clear(gfn);
    Atomics.sub(this.iommu.words, IommuWord.PAGES_MAPPED, revoked.length);
    this.iommu.lock.release();
  }

  /** kvm_arch_post_set_memory_attributes' IOMMU half: the pages of [start, end) now shared get their IOPTEs. */
  *postSetMemoryAttributes(start: number, end: number): Steps {
    yield* this.iommu.lock.acquire(KERNEL);
    for (const r of slotRanges(this.vm.memory, start, end)) {
      if (r.slot.gmem === null) continue;
      for (let p = r.page; p < r.page + r.count; p++) if (!this.vm.attributes!.isPrivate(r.slot, p)) this.install(r.slot.baseGfn + p);
    }
    this.iommu.lock.release();
  }

  /** One IOPTE, its own head (each page stands alone, as each SPTE does). */
  private install(gfn: number): void {
    const t = this.iommu.table;
    if (gfn >= t.pages) throw new RangeError(`KvmIommu: gfn ${gfn} is past the IOVA space (${t.pages} pages)`);
    if (t.present(gfn)) return;
    t.set(gfn, gfn, IoPte.READ | IoPte.WRITE | IOPTE_HEAD);
    Atomics.add(this.iommu.words, IommuWord.PAGES_MAPPED, 1);
  }
}
