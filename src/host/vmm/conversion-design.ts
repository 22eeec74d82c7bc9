import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_USER_MEM_SLOTS, PAGE_SIZE } from '../constants.ts';
import { kvmGmemFallocate } from '../guest-memfd.ts';
import type { Iommu } from '../iommu/iommu.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import { type ConvertResult, kvmSetMemoryAttributes, ramBlockDiscardRange } from './kvm-convert-memory.ts';
import { possibleDmaMappings } from './vfio-ram-discard-listener.ts';
import type { Steps } from '../../roles/role.ts';

/**
 * How a VMM converts guest memory between private and shared when a device is assigned
 * to the guest: the designs weighed in the seed discussion "Enable shared device
 * assignment" (docs/architecture.md, "Private memory"), side by side.
 * - `rdm`: what QEMU merged: private memory is "discarded" in a RamDiscardManager
 *   (system/ram-block-attributes.c) that VFIO listens to (hw/vfio/listener.c).
 * - `notifier`: a conversion notifier list of its own that VFIO registers with (the
 *   seed's option 1), so private memory is not "discarded" memory.
 * - `in-place`: guest_memfd holds shared and private memory in one file; a page a pin
 *   holds cannot become private (EAGAIN), so VFIO unmaps before and maps after.
 * - `kvm-iommu`: KVM keeps the device's IOMMU page table itself, in the attribute update:
 *   no userspace IOMMU ioctls, no entry limit.
 */
export type ConversionDesignName = 'rdm' | 'notifier' | 'in-place' | 'kvm-iommu';

export const CONVERSION_DESIGNS: readonly ConversionDesignName[] = ['rdm', 'notifier', 'in-place', 'kvm-iommu'];

/**
 * Whether the design discards a private page's shared memory (the last step of
 * kvm_convert_memory). In place it does not: the page stays in guest_memfd's one file, and
 * its shared view keeps what it held, which is then no finding and not guest memory to compare.
 */
export function discardsSharedMemory(name: ConversionDesignName): boolean {
  return name !== 'in-place';
}

export interface ConversionStats {
  /** Mappings userspace holds in the container (type1 vfio_dma entries, iommufd areas): what dma_entry_limit counts. */
  iommuEntries: number;
  /** IOVA pages the device can reach now (present IOPTEs). */
  pagesMapped: number;
  /** Every ioctl (and discard syscall) the design issued, by name, failed ones included. */
  ioctls: Record<string, number>;
  /** Conversions asked for (convert calls). */
  conversions: number;
  /** Bytes of conversion state kept beside KVM's attribute array, by what keeps them. */
  bookkeeping: Record<string, number>;
}

export interface ConversionDesign {
  readonly name: ConversionDesignName;
  readonly vm: Vm;
  /**
   * The VMM's start: guest_memfd memory private in KVM (kvm_set_phys_mem) and the
   * assigned device attached (VFIO's listener registered, or KVM's IOMMU table bound).
   */
  setup(): Steps<ConvertResult>;
  /** kvm_convert_memory's contract: 0 or -errno with what QEMU would print; any failure stops the VM. */
  convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult>;
  /** What the design's own bookkeeping says of a gfn (shared = true); undefined where it keeps none. */
  sharedInBookkeeping(gfn: number): boolean | undefined;
  stats(): ConversionStats;
}

export interface DesignOptions {
  /** QEMU's error_report for failures it only prints (a failed unmap on discard). */
  report?: (detail: string) => void;
  /**
   * VFIO refuses a layout whose 4 KiB mappings could exceed the container's limit
   * (vfio_ram_discard_register_listener: an error today, a warn_report before the shared
   * device assignment series). false: the old warning, so that a conversion runs into
   * type1's ENOSPC instead.
   */
  registrationCheck?: boolean;
}

export const CONVERT_OK: ConvertResult = Object.freeze({ ret: 0, error: '' });

/** Counts ioctls by name: what a design's stats report. */
export class IoctlCounts {
  readonly byName: Record<string, number> = {};

  add(name: string, n = 1): void {
    this.byName[name] = (this.byName[name] ?? 0) + n;
  }

  total(): number {
    return Object.values(this.byName).reduce((a, b) => a + b, 0);
  }
}

/** The ioctl and syscalls every design with guest_memfd issues, under one spelling. */
export const Ioctl = {
  SET_MEMORY_ATTRIBUTES: 'KVM_SET_MEMORY_ATTRIBUTES',
  /** ram_block_discard_range on shared memory (madvise(MADV_DONTNEED) / a hole in its memfd). */
  DISCARD_SHARED: 'madvise(MADV_DONTNEED)',
  /** The hole in guest_memfd after a conversion to shared. */
  PUNCH_HOLE: 'fallocate(PUNCH_HOLE)',
} as const;

export { type ConversionTarget, conversionTarget } from './kvm-convert-memory.ts';

/** KVM_SET_MEMORY_ATTRIBUTES for a slot run, its failure worded as kvm_set_memory_attributes prints it. */
export function setAttributes(vm: Vm, slot: Memslot, page: number, pages: number, toPrivate: boolean): Steps<ConvertResult> {
  return kvmSetMemoryAttributes(vm, (slot.baseGfn + page) * PAGE_SIZE, pages, toPrivate ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0);
}

/** A bitmap's bytes as QEMU allocates it (bitmap_new: whole unsigned longs). */
export function bitmapBytes(bits: number): number {
  return Math.ceil(bits / 64) * 8;
}

/**
 * The last step of kvm_convert_memory: the backing the page no longer uses goes. To
 * private: ram_block_discard_range on the shared memory; to shared: a hole in guest_memfd.
 */
export function* discardUnusedBacking(vm: Vm, slot: Memslot, page: number, pages: number, toPrivate: boolean, counts: IoctlCounts): Steps {
  if (toPrivate) {
    counts.add(Ioctl.DISCARD_SHARED);
    yield* ramBlockDiscardRange(vm, slot, page, pages);
  } else {
    counts.add(Ioctl.PUNCH_HOLE);
    yield* kvmGmemFallocate(vm, slot, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, page * PAGE_SIZE, pages * PAGE_SIZE);
  }
}

/**
 * vfio_ram_discard_register_listener's sanity check, for a design whose VFIO maps
 * `mappings` 4 KiB pages of guest_memfd memory: with every other memslot KVM could have
 * at one mapping each (kvm_get_max_memslots), more than the container has left fails
 * the device's realize. null when it fits, or when the container has no limit (iommufd).
 */
export function vfioDmaMappingsCheck(iommu: Iommu, mappings: number, sections: number): string | null {
  const s = iommu.stats();
  if (s.dmaEntryLimit === null) return null;
  const max = Math.max(0, s.dmaEntryLimit - s.entries);
  if (possibleDmaMappings(mappings, sections) <= max) return null;
  return `possibly running out of DMA mappings: ${mappings} mappings of ${PAGE_SIZE} bytes for ${sections} section(s) + ${KVM_USER_MEM_SLOTS - sections} other memslots > ${max}. `
    + `Maximum possible DMA mappings: ${max}, Maximum possible memslots: ${KVM_USER_MEM_SLOTS} (raise type1's dma_entry_limit, or use iommufd)`;
}
