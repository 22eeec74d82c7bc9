import { EINVAL, ENOSPC, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE } from '../constants.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import {
  CONVERT_OK, type ConversionDesign, type ConversionStats, type DesignOptions, Ioctl, IoctlCounts, conversionTarget,
  discardUnusedBacking, setAttributes, vfioDmaMappingsCheck,
} from './conversion-design.ts';
import { ConversionNotifierList } from './conversion-notifier.ts';
import { CountingIommu } from './counting-iommu.ts';
import type { ConvertResult } from './kvm-convert-memory.ts';
import { wholeSection } from './ram-block-attributes.ts';
import { VfioConversionListener } from './vfio-conversion-listener.ts';
import type { Steps } from '../../roles/role.ts';
import { hex } from '../../util/hex.ts';

/**
 * Design (b), the seed's option 1: kvm_convert_memory's order (attributes, listeners,
 * discard of the unused backing), with the listeners on a conversion notifier list of
 * each guest_memfd RAM block (conversion-notifier.ts) rather than on a RamDiscardManager.
 * VFIO maps and unmaps per 4 KiB page as its RamDiscardListener does.
 */
export class NotifierConversion implements ConversionDesign {
  readonly name = 'notifier' as const;
  readonly iommu: CountingIommu;
  readonly lists = new Map<Memslot, ConversionNotifierList>();
  private readonly counts = new IoctlCounts();
  private conversions = 0;

  constructor(readonly vm: Vm, private readonly o: DesignOptions = {}) {
    this.iommu = new CountingIommu(vm, this.counts);
    for (const slot of vm.memory.slots) if (slot.gmem !== null) this.lists.set(slot, new ConversionNotifierList(slot));
  }

  *setup(): Steps<ConvertResult> {
    for (const slot of this.lists.keys()) {
      this.counts.add(Ioctl.SET_MEMORY_ATTRIBUTES);
      yield* this.vm.setMemoryAttributes({ address: slot.baseGfn * PAGE_SIZE, size: slot.pages * PAGE_SIZE, attributes: KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0 });
    }
    const pages = [...this.lists.keys()].reduce((n, s) => n + s.pages, 0);
    const refused = this.o.registrationCheck === false ? null : vfioDmaMappingsCheck(this.iommu, pages, this.lists.size);
    if (refused !== null) return { ret: -ENOSPC, error: `vfio conversion listener: ${refused}` };
    for (const [slot, list] of this.lists) {
      const r = yield* list.register(new VfioConversionListener(this.iommu, this.o.report), wholeSection(slot));
      if (r.ret !== 0) return { ret: r.ret, error: r.detail };
    }
    return CONVERT_OK;
  }

  *convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult> {
    this.conversions++;
    const t = conversionTarget(this.vm, start, size, toPrivate);
    if ('result' in t) return t.result;
    const { slot, page, pages } = t;
    const list = this.lists.get(slot);
    if (list === undefined) return { ret: -EINVAL, error: '' };
    this.counts.add(Ioctl.SET_MEMORY_ATTRIBUTES);
    const set = yield* setAttributes(this.vm, slot, page, pages, toPrivate);
    if (set.ret !== 0) return set;
    const told = yield* list.notify(page, pages, toPrivate);
    if (told.ret !== 0) {
      return { ret: told.ret, error: `Failed to notify the conversion listeners of (${hex(start)} + ${hex(size)}) to ${toPrivate ? 'private' : 'shared'}: ${told.detail}` };
    }
    yield* discardUnusedBacking(this.vm, slot, page, pages, toPrivate, this.counts);
    return CONVERT_OK;
  }

  sharedInBookkeeping(gfn: number): boolean | undefined {
    const slot = this.vm.memory.findSlot(gfn);
    const list = slot === undefined ? undefined : this.lists.get(slot);
    return slot === undefined || list === undefined ? undefined : list.isShared(gfn - slot.baseGfn);
  }

  stats(): ConversionStats {
    const s = this.iommu.stats();
    let bytes = 0;
    for (const list of this.lists.values()) bytes += list.bitmapBytes;
    return {
      iommuEntries: s.entries, pagesMapped: s.pagesMapped, ioctls: { ...this.counts.byName }, conversions: this.conversions,
      bookkeeping: { 'conversion notifier bitmap (1 bit per 4 KiB)': bytes },
    };
  }
}
