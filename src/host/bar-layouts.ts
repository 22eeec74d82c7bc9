import { PAGE_SIZE } from './constants.ts';

/**
 * The shared-memory layouts of a mediated device's MMIO mapped on fault, apart from the
 * classes that use them, so that a VM's layout (layout.ts) can carry them without importing
 * KVM's side: the device's MMIO (mmio/device-mmio.ts), the vendor driver's
 * (mmio/vendor-driver.ts), a VM's VFIO BAR mapping's (mmio/vfio-bar-mapping.ts) and KVM's
 * SPTEs for it (mmio/kvm-bar-mmu.ts).
 */

/**
 * A mediated device's physical MMIO as the host sees it (a vGPU's BAR: registers and VRAM):
 * shared memory of `pages` pages that the vendor driver carves into slices for the VMs
 * sharing the device, at run time (vendor-driver.ts). Each page records its owner (the VM
 * whose slice holds it, as VM id + 1; 0 free) and a generation bumped every time it
 * changes hands, so that an access through a mapping made for an earlier owner can be
 * told from one through a current mapping (the isolation oracles). A pfn here is a page
 * index into this region.
 */
export interface DeviceMmioLayout {
  pages: number;
  /** The MMIO's contents. */
  data: SharedArrayBuffer;
  /** Per page: owner (VM id + 1, 0 free), generation. */
  pageWords: SharedArrayBuffer;
}

export const enum MmioPageWord { OWNER = 0, GENERATION = 1, WORDS = 2 }

export function createDeviceMmioLayout(pages: number): DeviceMmioLayout {
  if (!Number.isInteger(pages) || pages < 1) throw new Error(`device MMIO: ${pages} pages`);
  return { pages, data: new SharedArrayBuffer(pages * PAGE_SIZE), pageWords: new SharedArrayBuffer(pages * MmioPageWord.WORDS * 4) };
}

/** The vendor driver's table: the lock word, then per (vm, resource) first pfn + 1, pages, and 1 while it is being reclaimed. */
export const VENDOR_TABLE_BASE = 1;
export const VENDOR_SLOT_WORDS = 3;
/** A BAR mapping's page table: the lock word, the memory-decode-off word, then per BAR page pfn + 1, flags, generation. */
export const MAPPING_DECODE_OFF = 1;
export const MAPPING_PTE_BASE = 2;
export const MAPPING_PTE_WORDS = 3;
/** KVM's BAR SPTEs: per BAR page pfn + 1, flags, generation; the oracles' findings (kvm-bar-mmu.ts BarFinding). */
export const KVM_BAR_SPTE_WORDS = 3;
export const KVM_BAR_FINDINGS = 5;

/**
 * Why a BAR fault was refused (the record KVM's side keeps of the last one, for the
 * VMM's report of the stopped VM).
 */
export const enum BarRefusal {
  NONE = 0,
  /** The BAR page belongs to no resource of the device. */
  NO_RESOURCE,
  /** The resource is not allocated to this VM (now, or yet: the guest touched it before the allocation was communicated). */
  NOT_ALLOCATED,
  /** The page is past the pages of the resource the VM holds. */
  PAST_ALLOCATION,
  /** A write to a page the vendor maps read-only. */
  READ_ONLY,
  /** validate_map_request's answer failed the kernel's checks (EINVAL). */
  BAD_ANSWER,
  /** Memory decode is off (a reset): every fault gets SIGBUS. */
  DECODE_OFF,
}
export const BAR_REFUSAL_NAMES = ['none', 'no-resource', 'not-allocated', 'past-allocation', 'read-only', 'bad-answer', 'decode-off'] as const;

/** KVM's per-VM counters of its BAR side and the record of the last refused fault (KvmBarMmuLayout.words). */
export const enum BarMmuWord {
  FAULTS = 0,
  INSTALLS,
  RETRIES,
  /** SPTEs the MMU notifier zapped. */
  ZAPPED,
  PREFETCHED,
  /** Neighbours a prefetch considered and left (PFNMAP, not mapped, under invalidation). */
  PREFETCH_SKIPPED,
  REFUSED,
  /** The last refused fault: vCPU + 1, BAR page, BarRefusal, errno, 1 if a write. */
  REFUSAL_VCPU,
  REFUSAL_PAGE,
  REFUSAL_REASON,
  REFUSAL_ERRNO,
  REFUSAL_WRITE,
  /** kvm_vm_dead: KVM killed the VM for a refused access (VmConfig.barRefusal 'kill-vm'). */
  VM_DEAD,
  /** SPTEs the end-of-run sweep found breaching isolation (KvmBarMmu.audit). */
  AUDIT_FOUND,
  WORDS,
}

export interface MmioResource {
  name: string;
  /** First BAR page of the resource in every VM's virtual BAR. */
  barOffset: number;
  /** Its most pages. */
  maxPages: number;
  /** Mapped read-only (a status page) or read-write. */
  writable: boolean;
}

export interface VendorDriverLayout {
  vms: number;
  barPages: number;
  resources: MmioResource[];
  mmio: DeviceMmioLayout;
  /** Word 0: the lock; then per (vm, resource): first pfn + 1 (0: not allocated), pages, reclaiming. */
  table: SharedArrayBuffer;
}

export function createVendorDriverLayout(o: { vms: number; mmioPages: number; resources: MmioResource[] }): VendorDriverLayout {
  const barPages = Math.max(0, ...o.resources.map((r) => r.barOffset + r.maxPages));
  const byOffset = [...o.resources].sort((a, b) => a.barOffset - b.barOffset);
  byOffset.forEach((r, i) => {
    const next = byOffset[i + 1];
    if (r.maxPages < 1 || r.barOffset < 0 || (next !== undefined && r.barOffset + r.maxPages > next.barOffset)) {
      throw new Error(`vendor driver: resource ${r.name} at BAR page ${r.barOffset}, ${r.maxPages} pages, overlaps or is empty`);
    }
  });
  return {
    vms: o.vms, barPages, resources: o.resources, mmio: createDeviceMmioLayout(o.mmioPages),
    table: new SharedArrayBuffer((VENDOR_TABLE_BASE + o.vms * o.resources.length * VENDOR_SLOT_WORDS) * 4),
  };
}

export interface VfioBarMappingLayout {
  vm: number;
  barPages: number;
  /** Word 0: the lock (mmap_lock for the entries); word 1: memory decode off; then per page: pfn + 1, flags, generation. */
  ptes: SharedArrayBuffer;
}

export function createVfioBarMappingLayout(vm: number, barPages: number): VfioBarMappingLayout {
  return { vm, barPages, ptes: new SharedArrayBuffer((MAPPING_PTE_BASE + barPages * MAPPING_PTE_WORDS) * 4) };
}

/**
 * KVM's prefetch around a BAR fault: 'off', KVM's rule (PFNMAP pages are never prefetched:
 * kvm_mmu_prefetch_sptes takes only refcounted pages); 'mapped', as the 2016 patch for
 * remap_pfn_range-ed VMAs would allow, neighbours the VMA maps already, never under an
 * invalidation.
 */
export type BarPrefetch = 'off' | 'mapped';
export const BAR_PREFETCH: readonly BarPrefetch[] = ['off', 'mapped'];
/**
 * What a refused BAR access does: 'memory-fault', today's way: the vCPU's KVM_RUN fails
 * with EFAULT (KVM_EXIT_MEMORY_FAULT) and the VMM stops the VM with an internal error;
 * 'kill-vm', the 2016 design ("VM will crash to prevent malicious access"): KVM marks the
 * VM dead (kvm_vm_dead) and every KVM_RUN fails with EIO.
 */
export type BarRefusalAction = 'memory-fault' | 'kill-vm';
export const BAR_REFUSAL_ACTIONS: readonly BarRefusalAction[] = ['memory-fault', 'kill-vm'];

export interface KvmBarMmuLayout {
  /** The VM's id among those sharing the device (VendorDriver's numbering). */
  vm: number;
  prefetch: BarPrefetch;
  onRefusal: BarRefusalAction;
  /** The guest frame of BAR page 0 (the BAR's memslot). */
  baseGfn: number;
  barPages: number;
  sptes: SharedArrayBuffer;
  /** BarFinding counters, then the first finding's BAR page + 1 per kind. */
  findings: SharedArrayBuffer;
  /** BarMmuWord. */
  words: SharedArrayBuffer;
}

export function createKvmBarMmuLayout(vm: number, baseGfn: number, barPages: number, o: { prefetch?: BarPrefetch; onRefusal?: BarRefusalAction } = {}): KvmBarMmuLayout {
  return {
    vm, baseGfn, barPages, prefetch: o.prefetch ?? 'off', onRefusal: o.onRefusal ?? 'memory-fault',
    sptes: new SharedArrayBuffer(barPages * KVM_BAR_SPTE_WORDS * 4),
    findings: new SharedArrayBuffer(KVM_BAR_FINDINGS * 2 * 4),
    words: new SharedArrayBuffer(BarMmuWord.WORDS * 4),
  };
}

/** A mediated device's BAR in a VM: KVM's SPTEs, the VMM's mapping of it, and the device's vendor driver (shared by the VMs). */
export interface VmBarLayout {
  mmu: KvmBarMmuLayout;
  mapping: VfioBarMappingLayout;
  driver: VendorDriverLayout;
}

/** VM `vm`'s BAR of the device `driver` drives, at guest frame `baseGfn`: new SPTEs and mapping, nothing mapped. */
export function createVmBarLayout(vm: number, baseGfn: number, driver: VendorDriverLayout, o: { prefetch?: BarPrefetch; onRefusal?: BarRefusalAction } = {}): VmBarLayout {
  return { mmu: createKvmBarMmuLayout(vm, baseGfn, driver.barPages, o), mapping: createVfioBarMappingLayout(vm, driver.barPages), driver };
}
