import { PAGE_SIZE } from '../constants.ts';
import type { Vm } from '../vm.ts';
import {
  CONVERT_OK, type ConversionDesign, type DesignOptions, type ConversionStats, Ioctl, IoctlCounts, bitmapBytes, conversionTarget,
} from './conversion-design.ts';
import { CountingIommu } from './counting-iommu.ts';
import { type ConvertResult, GuestMemfdRam, kvmConvertMemory } from './kvm-convert-memory.ts';
import { wholeSection } from './ram-block-attributes.ts';
import { type VfioContainer, vfioContainer, vfioRamDiscardRegisterListener } from './vfio-ram-discard-listener.ts';
import type { Steps } from '../../roles/role.ts';

/**
 * Design (a), what QEMU merged: private memory is "discarded" memory of the guest_memfd
 * RAM block's RamDiscardManager (system/ram-block-attributes.c), and the assigned device
 * follows it through VFIO's RamDiscardListener (hw/vfio/listener.c): one type1 mapping
 * per 4 KiB shared block, the whole section rolled back when a map fails. The
 * conversion is kvm_convert_memory as it is: attributes, listeners, discard.
 */
export class RdmConversion implements ConversionDesign {
  readonly name = 'rdm' as const;
  readonly ram: GuestMemfdRam;
  readonly iommu: CountingIommu;
  private readonly counts = new IoctlCounts();
  private conversions = 0;
  private container: VfioContainer | null = null;

  constructor(readonly vm: Vm, private readonly o: DesignOptions = {}) {
    this.ram = new GuestMemfdRam(vm);
    this.iommu = new CountingIommu(vm, this.counts);
  }

  *setup(): Steps<ConvertResult> {
    yield* this.ram.setupPrivate();
    this.counts.add(Ioctl.SET_MEMORY_ATTRIBUTES, this.ram.blocks.size);
    const base = vfioContainer(this.iommu, this.o.report ? { report: this.o.report } : {});
    this.container = this.o.registrationCheck === false ? { ...base, dmaMaxMappings: 0 } : base;
    for (const [slot, rdm] of this.ram.blocks) {
      const r = yield* vfioRamDiscardRegisterListener(this.container, rdm, wholeSection(slot));
      if (!r.ok) return { ret: r.ret, error: r.error };
    }
    return CONVERT_OK;
  }

  *convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult> {
    this.conversions++;
    // kvm_convert_memory issues its ioctls only past these checks; after them, the
    // attribute ioctl always, and the discard only when the listeners agreed.
    const issues = !('result' in conversionTarget(this.vm, start, size, toPrivate));
    if (issues) this.counts.add(Ioctl.SET_MEMORY_ATTRIBUTES);
    const r = yield* kvmConvertMemory(this.ram, start, size, toPrivate);
    if (issues && r.ret === 0) this.counts.add(toPrivate ? Ioctl.DISCARD_SHARED : Ioctl.PUNCH_HOLE);
    return r;
  }

  sharedInBookkeeping(gfn: number): boolean | undefined {
    const slot = this.vm.memory.findSlot(gfn);
    const rdm = slot === undefined ? undefined : this.ram.rdmOf(slot);
    if (slot === undefined || rdm === undefined) return undefined;
    return rdm.isPopulated((gfn - slot.baseGfn) * PAGE_SIZE, PAGE_SIZE);
  }

  stats(): ConversionStats {
    const s = this.iommu.stats();
    let bits = 0;
    for (const rdm of this.ram.blocks.values()) bits += bitmapBytes(rdm.blocks);
    return {
      iommuEntries: s.entries, pagesMapped: s.pagesMapped, ioctls: { ...this.counts.byName }, conversions: this.conversions,
      bookkeeping: { 'RamBlockAttributes bitmap (1 bit per 4 KiB)': bits },
    };
  }
}
