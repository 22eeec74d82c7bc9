import { KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE } from '../constants.ts';
import { KvmIommu } from '../kvm-iommu.ts';
import type { Vm } from '../vm.ts';
import {
  CONVERT_OK, type ConversionDesign, type ConversionStats, Ioctl, IoctlCounts, conversionTarget, discardUnusedBacking,
} from './conversion-design.ts';
import type { ConvertResult } from './kvm-convert-memory.ts';
import type { Steps } from '../../roles/role.ts';
import { KvmError, errnoName } from '../../util/errors.ts';
import { hex } from '../../util/hex.ts';

/**
 * Design (d) from the VMM's side: kvm_convert_memory without listeners. The one ioctl,
 * KVM_SET_MEMORY_ATTRIBUTES, also updates the device's I/O page table (KvmIommu), and
 * the unused backing is discarded afterwards as QEMU does. The container's mappings and
 * dma_entry_limit play no part; the VMM keeps no bitmap (KVM's attributes are the record).
 */
export class KvmIommuConversion implements ConversionDesign {
  readonly name = 'kvm-iommu' as const;
  readonly kvmIommu: KvmIommu;
  private readonly counts = new IoctlCounts();
  private conversions = 0;

  constructor(readonly vm: Vm) {
    if (vm.iommu === null) throw new Error('KvmIommuConversion: the VM has no IOMMU (VmConfig.iommu)');
    this.kvmIommu = new KvmIommu(vm, vm.iommu);
  }

  *setup(): Steps<ConvertResult> {
    for (const slot of this.vm.memory.slots) {
      if (slot.gmem === null) continue;
      this.counts.add(Ioctl.SET_MEMORY_ATTRIBUTES);
      yield* this.kvmIommu.setMemoryAttributes({ address: slot.baseGfn * PAGE_SIZE, size: slot.pages * PAGE_SIZE, attributes: KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0 });
    }
    yield* this.kvmIommu.bind();
    return CONVERT_OK;
  }

  *convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult> {
    this.conversions++;
    const t = conversionTarget(this.vm, start, size, toPrivate);
    if ('result' in t) return t.result;
    const { slot, page, pages } = t;
    const address = (slot.baseGfn + page) * PAGE_SIZE;
    const attributes = toPrivate ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0;
    this.counts.add(Ioctl.SET_MEMORY_ATTRIBUTES);
    try {
      yield* this.kvmIommu.setMemoryAttributes({ address, size: pages * PAGE_SIZE, attributes, flags: 0 });
    } catch (e) {
      if (!(e instanceof KvmError)) throw e;
      return { ret: -e.errno, error: `failed to set memory (${hex(address)}+${hex(pages * PAGE_SIZE)}) with attr ${hex(attributes)} error '${errnoName(e.errno)}'` };
    }
    yield* discardUnusedBacking(this.vm, slot, page, pages, toPrivate, this.counts);
    return CONVERT_OK;
  }

  sharedInBookkeeping(): boolean | undefined {
    return undefined;
  }

  stats(): ConversionStats {
    return { iommuEntries: 0, pagesMapped: this.kvmIommu.ptes, ioctls: { ...this.counts.byName }, conversions: this.conversions, bookkeeping: {} };
  }
}
