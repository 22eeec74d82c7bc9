import type { VmConfig } from '../host/layout.ts';
import type { MemoryType } from '../host/memory-type.ts';
import type { ConversionDesignName } from '../host/vmm/conversion-design.ts';
import type { BarFindingName } from '../host/mmio/kvm-bar-mmu.ts';
import type { BarSpec } from './bar.ts';
import type { LineState, StaleReader } from './cache.ts';

/**
 * A litmus test as loaded from its file (load.ts): a small VM, the operations each actor
 * runs, an explicit interleaving of those actors, and what must be observed. Every
 * element remembers where it came from (`where`, a field path such as `actors.host[2]`)
 * so that failures and errors can point back into the file.
 */
export interface LitmusSpec {
  /** The file the spec was read from, as given (used in every message). */
  file: string;
  name: string;
  description: string;
  /** Bugs from the catalog (src/bugs/catalog.ts) the file itself injects. */
  bugs: string[];
  vm: VmConfig;
  /**
   * How `convert` and `serve-exits` convert (vm.conversion_design): rdm is QEMU's
   * kvm_convert_memory over the RamDiscardManager, with VFIO's listener registered by
   * the file (vfio-register); another design attaches the device in its own set-up.
   */
  design: ConversionDesignName;
  /**
   * vm.bar: a mediated device's virtual BAR mapped on fault (vm.bars holds its layout as
   * the loader built it; each run builds its own from this description).
   */
  bar?: BarSpec;
  /** Actor names in file order: `host` and `vcpuN`. */
  actors: string[];
  /** Scripted guest operations of each vCPU, indexed by vCPU number (empty when it has none). */
  vcpuOps: LitmusOp<VcpuOp>[][];
  hostOps: LitmusOp<HostOp>[];
  interleaving: InterleavingEntry[];
  expect: FinalExpect;
}

export interface LitmusOp<T extends VcpuOp | HostOp = VcpuOp | HostOp> {
  /** `host` or `vcpuN`. */
  actor: string;
  /** Position in the actor's list. */
  index: number;
  /** Field path in the file, e.g. `actors.vcpu0[2]`. */
  where: string;
  /** The operation as written, e.g. `write 0x100 1`. */
  text: string;
  op: T;
  expect: OpExpect;
  /** Free text from the file, shown in the trace. */
  note?: string;
}

/** Guest operations a vCPU runs (through its Workload). */
export type VcpuOp =
  /**
   * `write GFN VALUE` (count 1) and `write-pages GFN COUNT VALUE`: VALUE into the first 8
   * bytes of COUNT consecutive pages; `private` (a trailing word) for a confidential guest's
   * private access, else shared.
   */
  | { kind: 'write'; gfn: number; value: number; count: number; private: boolean }
  /** `read GFN [private|shared]`: the page's first 8 bytes. */
  | { kind: 'read'; gfn: number; private: boolean }
  /** `map-gpa GFN COUNT private|shared`: KVM_HC_MAP_GPA_RANGE (an exit to the VMM, which converts). */
  | { kind: 'map-gpa'; gfn: number; count: number; private: boolean }
  /**
   * `set-pat GFN COUNT TYPE [no-clflush]`: the guest's PAT gives the pages another memory
   * type, and cpa_flush flushes their lines (CLFLUSH), or with no-clflush leaves it to a WBINVD.
   */
  | { kind: 'set-pat'; gfn: number; count: number; type: MemoryType; clflush: boolean }
  /** `wbinvd`: the guest's WBINVD, which KVM really executes only while non-coherent DMA is registered. */
  | { kind: 'wbinvd' };

/** The VMM/KVM side. `slot` is an index into `vm.slots`. */
export type HostOp =
  | { kind: 'enable-logging'; slot: number | null }
  | { kind: 'disable-logging'; slot: number | null }
  | { kind: 'harvest'; vcpu: number | null }
  | { kind: 'reset' }
  | { kind: 'get-log'; slot: number }
  | { kind: 'clear-log'; slot: number; first: number; num: number; allOnes: boolean }
  | { kind: 'write-guest'; gfn: number; value: number }
  | { kind: 'copy'; gfn: number }
  | { kind: 'forge-entry'; vcpu: number; index: number; slotField: number; offset: number; flags: number }
  | { kind: 'reenter'; vcpu: number }
  | { kind: 'stop'; vcpu: number }
  | { kind: 'release'; vcpu: number }
  /** KVM_SET_MEMORY_ATTRIBUTES alone (no VMM bookkeeping), each step interleavable. */
  | { kind: 'set-attributes'; gfn: number; count: number; private: boolean }
  /** QEMU's kvm_convert_memory: attributes, RamDiscardManager listeners, discard of the unused backing (or the design's conversion). */
  | { kind: 'convert'; gfn: number; count: number; private: boolean }
  /** fallocate(PUNCH_HOLE | KEEP_SIZE) on the guest_memfd of the pages' slot. */
  | { kind: 'punch-hole'; gfn: number; count: number }
  /** vfio_ram_discard_register_listener for a slot's RAM block (the replay maps what is shared); design rdm only. */
  | { kind: 'vfio-register'; slot: number }
  /** The assigned device's DMA write (or read) at an IOVA page (VFIO maps IOVA = GPA); `snoop` false: PCIe No Snoop (vm.cpu_cache). */
  | { kind: 'dma'; iova: number; value: number; snoop: boolean }
  | { kind: 'dma-read'; iova: number; snoop: boolean }
  /** kvm_arch_register_noncoherent_dma / kvm_arch_unregister_noncoherent_dma, as VFIO calls them (kvm_vfio_update_coherency). */
  | { kind: 'register-noncoherent-dma' }
  | { kind: 'unregister-noncoherent-dma' }
  /** `vfio-file-add coherent|noncoherent`: KVM_DEV_VFIO_FILE_ADD of a device file; kvm_vfio_update_coherency then (un)registers. */
  | { kind: 'vfio-file-add'; coherent: boolean }
  /** CLFLUSH of every line of a page, and WBINVD (vm.cpu_cache). */
  | { kind: 'clflush'; gfn: number }
  | { kind: 'wbinvd' }
  /** The migration thread's write-back read of a page through the cache; `flushFirst`: clflush-before-read. */
  | { kind: 'migration-read'; gfn: number; flushFirst: boolean }
  /** kvm_cpu_exec answering KVM_EXIT_MEMORY_FAULT and KVM_EXIT_HYPERCALL: convert, then re-enter. */
  | { kind: 'serve-exits' }
  /** vm.bar: the vendor driver gives VM `vm` a slice of `pages` pages of resource `resource` (an index into its resources). */
  | { kind: 'bar-grant'; resource: number; pages: number; vm: number }
  /** vm.bar: the vendor driver takes resource `resource` back from VM `vm` (vm0: reclaimResource, step by step). */
  | { kind: 'bar-revoke'; resource: number; vm: number }
  /** vm.bar: memory decode off (vfio_pci_zap_bars: the whole BAR zapped, faults refused) or on again. */
  | { kind: 'bar-decode'; on: boolean };

/** A dirty ring entry as an expectation: a page of a slot, or a raw slot field and offset. */
export type EntryMatcher =
  | { slot: number; asId: number | null; gfn: number }
  | { slotField: number; offset: number };

/** Pages: an exact ordered list of GFNs, or only how many. */
export type GfnsMatcher = number | number[];

/** Expectations on one operation, checked when it finishes (or at the end if it never does). */
export interface OpExpect {
  /** errno the ioctl fails with; 0 = must succeed. */
  error?: number;
  /** The first exit the operation took; 0 = none (KVM_EXIT_UNKNOWN is never used for that). */
  exit?: number | 'none';
  /** Guest operations of this operation retired before its first exit. */
  retiredBeforeExit?: number;
  /** Write-protect faults taken. */
  faults?: number;
  /** Pages logged dirty (ring push or bitmap bit) by this operation, in order. */
  logged?: GfnsMatcher;
  /** Host writes that could not be logged (no running vCPU, no backup bitmap). */
  lost?: number;
  /** read / copy / dma-read: the value seen. */
  value?: number;
  /** dma / dma-read: the IOMMU faulted (nothing mapped the IOVA). */
  faulted?: boolean;
  harvested?: number | EntryMatcher[];
  reset?: number;
  /** get-log: the pages set in the returned bitmap, ascending. */
  dirty?: GfnsMatcher;
  cleared?: number;
  /** register- / unregister-noncoherent-dma, vfio-file-add, enable-logging (a KVM_MEM_DMA slot forced to WB), bar-revoke, bar-decode: SPTEs zapped. */
  zapped?: number;
  /** clflush / wbinvd: dirty lines written back to memory. */
  writtenBack?: number;
  /** bar-revoke / bar-decode: the VMA's entries unmap_mapping_range removed. */
  unmapped?: number;
  /** bar-grant: the first pfn of the slice granted. */
  pfn?: number;
}

export type OpExpectKey = keyof OpExpect;

export interface InterleavingEntry {
  index: number;
  /** `interleaving[i]` */
  where: string;
  text: string;
  actor: string;
  /** vCPU number, or null for the host. */
  vcpu: number | null;
  /** `op`: run the actor's current operation to completion; `step`: exactly one step. */
  mode: 'op' | 'step';
  /** `host with vcpu0, vcpu1`: vCPUs the runner may step when the host waits for them. */
  assist: number[];
  /** Expected to block: true, or waiting for this vCPU's flush acknowledgement; false: must not block. */
  blocked?: boolean | number;
  /** Free text from the file, shown in the trace. */
  note?: string;
}

export interface FinalExpect {
  /** Page values (first 8 bytes) at the end; with vm.cpu_cache, what memory holds (a dirty line's newer data is in the cache). */
  pages?: { gfn: number; value: number }[];
  /** Every page harvested or reported by get-log during the run, ascending. */
  collected?: number[];
  /** The last copy (copy, or migration-read) of each page. */
  copies?: { gfn: number; value: number }[];
  /** Copied pages whose last copy differs from the page's latest value at the end (lost writes; with vm.cpu_cache a dirty line's data). */
  staleCopies?: number[];
  sptes?: { gfn: number; writable: boolean }[];
  /** KVM's warning counter for host writes it could not log. */
  lostHostWrites?: number;
  /** Remote TLB flushes performed. */
  flushes?: number;
  /** KVM's memory attribute of each page. */
  attributes?: { gfn: number; private: boolean }[];
  /** The RamDiscardManager's bit of each page (populated = shared). */
  rdm?: { gfn: number; shared: boolean }[];
  /** The IOMMU at each IOVA page: the GFN mapped there, or null for nothing. */
  iommu?: { iova: number; gfn: number | null }[];
  /** guest_memfd's contents (the private page's first 8 bytes). */
  privatePages?: { gfn: number; value: number }[];
  /** The private memory oracle's finding kinds over the run, sorted (`[]`: none). */
  findings?: string[];
  /** vm.cpu_cache: the state of each page's first line in the CPU cache. */
  cache?: { gfn: number; state: LineState }[];
  /** vm.cpu_cache: the stale read oracle's count of each reader given. */
  stale?: Partial<Record<StaleReader, number>>;
  /** vm.cpu_cache: the machine check oracle's count (cacheable accesses to device memory, Vm.machineCheck). */
  machineChecks?: number;
  /** vm.bar: vm0's BAR at the end (after the isolation oracles' sweep). */
  bar?: BarExpect;
}

/** The final expectations on vm0's BAR. */
export interface BarExpect {
  /** KVM's SPTE of each BAR page: the pfn it maps, or null for none. */
  sptes?: { page: number; pfn: number | null }[];
  /** The VMM's VMA entry of each BAR page: the pfn it maps, or null for none. */
  ptes?: { page: number; pfn: number | null }[];
  /** The device's MMIO: the first 32-bit word of each physical page. */
  mmio?: { pfn: number; value: number }[];
  /** The isolation oracles' count of every finding kind (kinds not written: 0). */
  findings?: Record<BarFindingName, number>;
  /** KVM killed the VM (kvm_vm_dead). */
  dead?: boolean;
}
