import {
  EINVAL, KVM_DIRTY_GFN_SIZE, KVM_MEM_DMA, KVM_MEM_GUEST_MEMFD, KVM_MEM_KVM_ONLY, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE,
} from './constants.ts';
import { KvmError } from '../util/errors.ts';
import type { VmBarLayout } from './bar-layouts.ts';
import { createPageHistoryBuffer } from './page-history-buffer.ts';
import { type IommuConfig, type IommuLayout, createIommuLayout } from './iommu/iommu-layout.ts';
import { INJECTION_WORDS } from './injections.ts';

/**
 * One layout descriptor for all shared state (docs/architecture.md, principle 1). It holds
 * the SharedArrayBuffers themselves plus sizes; every worker receives the same
 * descriptor in its workerData and builds its typed-array views from it.
 */

import { LINE_WORDS } from './cache-line.ts';
import { type CpuCacheConfig, type CpuCacheLayout, createCpuCacheLayout } from './cpu-cache.ts';
import { X86_MEMTYPE_WB } from './memory-type.ts';
export { LINE_WORDS };
/** Guest RAM is split into regions of at most 2 GiB so guests over 4 GiB work. */
export const REGION_PAGES_SHIFT = 19;
export const REGION_PAGES = 1 << REGION_PAGES_SHIFT; // 2 GiB / 4 KiB

export interface MemslotConfig {
  /** Slot id, bits 0-15 of the kvm_userspace_memory_region slot field. */
  id: number;
  /** Address-space id, bits 16-31. */
  asId: number;
  baseGfn: number;
  pages: number;
  /** KVM_MEM_* flags. KVM_MEM_LOG_DIRTY_PAGES is set when logging starts. */
  flags: number;
  /**
   * The slot's memory is device memory (a GPU's VRAM BAR behind a blob resource), not
   * RAM: kvm_is_mmio_pfn, so vmx_get_mt_mask gives it UC; a cacheable access to it is a
   * machine check. Unset: RAM.
   */
  hostMmio?: boolean;
}

export type DirtyTracking =
  | { kind: 'bitmap'; manualProtect: boolean; initiallySet: boolean }
  | { kind: 'ring'; entries: number; withBitmap: boolean };

/** VmConfig.mapGpa: KVM's hypercall or TDX's MapGPA. */
export type MapGpaAbi = 'kvm' | 'tdx';

export interface VmConfig {
  slots: MemslotConfig[];
  vcpus: number;
  tracking: DirtyTracking;
  /** Keep per-page last-event records for the stamp oracle (host/page-history.ts); off by default. */
  pageHistory?: boolean;
  /** An IOMMU with devices behind it (src/host/iommu). */
  iommu?: IommuConfig;
  /** KVM_CAP_EXIT_HYPERCALL's mask: bit n, hypercall n exits to the VMM (1 << KVM_HC_MAP_GPA_RANGE); 0 or unset: none does. */
  exitHypercalls?: number;
  /**
   * How a guest's explicit conversion (OpKind.MAP_GPA_RANGE) reaches KVM. 'kvm' (the
   * default): the KVM_HC_MAP_GPA_RANGE hypercall as __kvm_emulate_hypercall forwards it
   * (e.g. a KVM_X86_SW_PROTECTED_VM guest), one KVM_EXIT_HYPERCALL for the whole range,
   * the result in RAX.
   * 'tdx': a TD's TDG.VP.VMCALL<MapGPA> (arch/x86/kvm/vmx/tdx.c, tdx_map_gpa), one
   * KVM_EXIT_HYPERCALL per TDX_MAP_GPA_MAX_LEN (2 MiB) chunk; between chunks a pending
   * interrupt (VcpuRequest.PENDING_INTERRUPT) ends the call with TDVMCALL_STATUS_RETRY and
   * the GPA to resume from; the status in R10, that GPA in R11 (GuestContext.tdvmcall*).
   */
  mapGpa?: MapGpaAbi;
  /**
   * The VM type has private memory (kvm_arch_has_private_mem: KVM_X86_SW_PROTECTED_VM,
   * SNP, TDX): KVM_MEMORY_ATTRIBUTE_PRIVATE is supported and slots may take
   * KVM_MEM_GUEST_MEMFD.
   */
  privateMem?: boolean;
  /**
   * Departure from KVM, for studying the migration of a confidential guest's shared half:
   * KVM_MEM_LOG_DIRTY_PAGES is accepted on KVM_MEM_GUEST_MEMFD slots and logs their shared
   * pages (private pages are mapped without write protection and never logged). KVM
   * refuses the flag there (check_memory_region_flags: "Dirty logging private memory is
   * not currently supported"), and so does vmemlab without this option.
   */
  logSharedGuestMemfd?: boolean;
  /**
   * KVM_CAP_DISABLE_QUIRKS2's mask (KVM_X86_QUIRK_*), as kvm->arch.disabled_quirks; 0 or
   * unset: every quirk on. Only KVM_X86_QUIRK_IGNORE_GUEST_PAT acts (host/memory-type.ts).
   */
  disabledQuirks?: number;
  /**
   * A CPU cache in front of guest memory (cpu-cache.ts), where page aliasing can happen:
   * vCPU accesses then take the memory type their SPTE and the guest's PAT give, devices'
   * DMA snoops it, the migration thread reads through it. Unset: no cache model, and the
   * write path as without it. Not with privateMem (guest_memfd memory is not modelled behind it).
   */
  cpuCache?: CpuCacheConfig;
  /**
   * What KVM does when dirty logging starts on a KVM_MEM_DMA slot (the exclusion Sean
   * asked for): 'force-wb' (the default) stops honouring the guest's PAT there, zapping the
   * slot so faults rebuild it WB + IPAT, until logging stops; 'refuse' answers EINVAL.
   */
  dmaSlotLogging?: DmaSlotLogging;
  /**
   * Virtual BARs of mediated devices, mapped on fault (mmio/): guest frames outside every
   * memslot that KVM maps from the VMM's VM_PFNMAP mapping of the device, as its vendor
   * driver allows.
   */
  bars?: VmBarLayout[];
}

export type DmaSlotLogging = 'force-wb' | 'refuse';

export interface MemslotLayout extends MemslotConfig {
  /** Index of this slot's first page in the VM-wide page numbering (TLB, oracles). */
  firstPage: number;
  regions: SharedArrayBuffer[];
  /** One byte per page: SPTE permission bits (spte.ts). */
  spte: SharedArrayBuffer;
  /** One bit per page, 32-bit words: KVM's dirty bitmap (or the ring's backup bitmap). */
  dirtyBitmap: SharedArrayBuffer;
  /**
   * KVM_MEM_GUEST_MEMFD: the guest_memfd's pages (private memory, offset 0 of its own
   * file), regions as `regions`; only vCPUs reach them. Null for other slots.
   */
  gmem: SharedArrayBuffer[] | null;
  /**
   * KVM_MEM_GUEST_MEMFD: the VMM's RamBlockAttributes bitmap for this RAM block (one bit
   * per page, 1 = shared), shared by the VMM's threads as QEMU's are threads of one
   * process (the migration thread reads it). Null for other slots.
   */
  rdmBitmap: SharedArrayBuffer | null;
  /**
   * KVM_MEM_GUEST_MEMFD: pages the VMM changed itself (a conversion's discard left zeros
   * in shared memory), marked for migration as QEMU's cpu_physical_memory_set_dirty_range
   * marks RAM that userspace wrote. Null for other slots.
   */
  vmmDirtyBitmap: SharedArrayBuffer | null;
}

export interface VmLayout {
  config: VmConfig;
  slots: MemslotLayout[];
  totalPages: number;
  /** Global words (flush generation, guest globals, counters): see GlobalWord. */
  global: SharedArrayBuffer;
  /** Two lines per vCPU: one it writes, one the VMM writes: see VcpuWord / VcpuRequest. */
  vcpus: SharedArrayBuffer;
  /** Current KVM_MEM_* flags of each slot, one word per slot (logging toggles them). */
  slotFlags: SharedArrayBuffer;
  /** Per-vCPU rings of struct kvm_dirty_gfn, plus their kernel indexes. */
  rings: { entries: number; gfns: SharedArrayBuffer[]; indexes: SharedArrayBuffer } | null;
  /** Per-page history records, when VmConfig.pageHistory is on. */
  pageHistory: SharedArrayBuffer | null;
  iommu: IommuLayout | null;
  /** How often each injected bug acted (injections.ts). */
  injections: SharedArrayBuffer;
  /** One byte per page (VM-wide numbering): KVM's memory attributes, when VmConfig.privateMem. */
  attributes: SharedArrayBuffer | null;
  /** VmConfig.cpuCache: the cache, and one byte per page (VM-wide numbering) with the memory type the guest's PAT gives its mapping of the page (X86_MEMTYPE_WB at first). */
  cpuCache: { cache: CpuCacheLayout; guestPat: SharedArrayBuffer } | null;
}

/** Words of `global`, each on its own line. */
export const GlobalWord = {
  /** TLB flush generation, bumped by every remote flush (tlb-shootdown.ts). */
  FLUSH_GEN: 0 * LINE_WORDS,
  /** The guest-visible `iteration` global of dirty_log_test. */
  ITERATION: 1 * LINE_WORDS,
  /** Host writes that mark_page_dirty_in_slot could not log (KVM's WARN). */
  LOST_HOST_WRITES: 2 * LINE_WORDS,
  /** Host writes done through writeGuest. */
  HOST_WRITES: 2 * LINE_WORDS + 1,
  /** Remote TLB flushes performed. */
  FLUSHES: 3 * LINE_WORDS,
  /** Non-zero: host-side writers (device emulation) must pause. Written by the VMM. */
  HOST_PAUSE: 4 * LINE_WORDS,
  /** Host actors paused now (host-actor.ts). Written by the host actors. */
  HOST_PAUSED: 5 * LINE_WORDS,
  /** Host actors that honour HOST_PAUSE (each registers when it starts). */
  HOST_ACTORS: 5 * LINE_WORDS + 1,
  /** kvm->mmu_invalidate_in_progress, _seq and the range (gfns) being invalidated (mmu-invalidate.ts). */
  MMU_INVALIDATE_IN_PROGRESS: 6 * LINE_WORDS,
  MMU_INVALIDATE_SEQ: 6 * LINE_WORDS + 1,
  MMU_INVALIDATE_START: 6 * LINE_WORDS + 2,
  MMU_INVALIDATE_END: 6 * LINE_WORDS + 3,
  /** kvm->mmu_lock: held by an invalidation's zap and flush, and by a fault's check and install. */
  MMU_LOCK: 6 * LINE_WORDS + 4,
  /**
   * Bumped (and notified) by every vCPU exit: the VMM's conversion thread sleeps on it
   * between KVM_EXIT_HYPERCALL / KVM_EXIT_MEMORY_FAULT exits (QEMU's vCPU threads return
   * from KVM_RUN themselves; vmemlab serves their userspace half in one role).
   */
  EXIT_DOORBELL: 7 * LINE_WORDS,
  /**
   * Host reads of private memory: a shared page the RamDiscardManager has discarded that
   * the migration thread read all the same (the private memory oracle's probe), and the
   * first such guest frame + 1.
   */
  PRIVATE_TOUCHES: 8 * LINE_WORDS,
  PRIVATE_TOUCH_FIRST_GFN: 8 * LINE_WORDS + 1,
  /** Conversions the VMM began and finished (kvm-cpu-exec.ts): a read racing one is not the probe's business. */
  CONVERSIONS_STARTED: 8 * LINE_WORDS + 2,
  CONVERSIONS_DONE: 8 * LINE_WORDS + 3,
  /** vCPU stores of the kind the page's attribute no longer says (a stale translation), and the first frame + 1. */
  STALE_STORES: 8 * LINE_WORDS + 4,
  STALE_STORE_FIRST_GFN: 8 * LINE_WORDS + 5,
  /** Non-zero: the VMM stopped the VM on an internal error (vm_stop(RUN_STATE_INTERNAL_ERROR)); it will not run again. */
  VM_INTERNAL_ERROR: 8 * LINE_WORDS + 6,
  /**
   * Non-zero until the VMM has booted the guest (QEMU's vm_start after machine init): the
   * vCPUs are created but do not enter the guest, and migration does not begin. Zero from
   * the start unless the VMM boots in its own thread (a conversion design's VMM, kvm-cpu-exec.ts).
   */
  VM_START_PENDING: 8 * LINE_WORDS + 7,
  /** Non-zero once the VM capability asking to honour the guest's PAT was enabled (Vm.enableCapNoncoherentDma): written once. */
  NONCOHERENT_CAP: 8 * LINE_WORDS + 8,
  /** The machine check oracle: cacheable accesses to host MMIO (Vm.machineCheck), and the first gfn + 1. */
  MACHINE_CHECKS: 8 * LINE_WORDS + 11,
  MACHINE_CHECK_FIRST_GFN: 8 * LINE_WORDS + 12,
  /** The KVM-only slot oracle: pages of KVM_MEM_KVM_ONLY slots the VMM's generic paths touched (Vm.kvmOnlyTouched), and the first gfn + 1. */
  KVM_ONLY_TOUCHES: 8 * LINE_WORDS + 13,
  KVM_ONLY_TOUCH_FIRST_GFN: 8 * LINE_WORDS + 14,
  /** Non-zero: every device's DMA snoops now, whatever its DeviceConfig.snoop (the host's half of switch-to-coherent). */
  DEVICES_SNOOP: 8 * LINE_WORDS + 9,
  /** CoherentSwitch: the device asking the guest's driver to map its buffers WB again, and the driver's answer. */
  COHERENT_SWITCH: 8 * LINE_WORDS + 10,
  /** kvm->arch.noncoherent_dma_count: non-coherent DMA registrations (kvm_arch_register_noncoherent_dma; host/memory-type.ts). */
  NONCOHERENT_DMA_COUNT: 9 * LINE_WORDS,

} as const;
export const GLOBAL_WORDS = 10 * LINE_WORDS;

/** GlobalWord.COHERENT_SWITCH's values (switch-to-coherent, migration/switch-to-coherent.ts). */
export const enum CoherentSwitch { NONE = 0, REQUESTED = 1, DONE = 2 }

/** Words a vCPU writes (first line of its block). */
export const VcpuWord = {
  /** Flush generation this vCPU has acknowledged. */
  FLUSH_ACK: 0,
  /** IN_GUEST_MODE or OUTSIDE_GUEST_MODE (kvm_vcpu::mode). */
  MODE: 1,
  /** VcpuRunState. */
  RUN_STATE: 2,
  /** kvm_run::exit_reason of the last exit. */
  EXIT_REASON: 3,
  /** Guest operations retired. */
  OPS: 4,
  /** Faults taken (write-protect faults that logged a page). */
  FAULTS: 5,
  /** Exits taken. */
  EXITS: 6,
  /** Ring-full exits taken. */
  RING_FULL_EXITS: 7,
  /** VM-wide page of the write interrupted by the last exit, or -1 (it has not retired). */
  PENDING_PAGE: 8,
  /** The iteration that interrupted write carries (its value was loaded before the exit). */
  PENDING_ITERATION: 9,
  /** GPA of the last MMIO exit (an access outside every slot, or a write to a read-only slot). */
  MMIO_GPA_LO: 10,
  MMIO_GPA_HI: 11,
  /** The RUN_SEQ value current when the vCPU last exited: it stays parked until RUN_SEQ differs. */
  EXIT_RUN_SEQ: 12,
  /** Microseconds spent paced outside guest mode (dirty limit, guest operation rate, throttle). */
  PACED_US: 13,
  /**
   * KVM_EXIT_MEMORY_FAULT's kvm_run.memory_fault: flags (KVM_MEMORY_EXIT_FLAG_PRIVATE) and
   * size; its gpa is in MMIO_GPA_LO/HI (kvm_run's exit information is one union).
   */
  MEMORY_FAULT_FLAGS: 14,
  MEMORY_FAULT_SIZE: 15,
  /**
   * KVM_EXIT_HYPERCALL's kvm_run.hypercall (third line): nr, args[0..2] (a0 the GPA, a1
   * the pages, a2 the attributes), and ret, which KVM presets to 0 and the VMM may
   * overwrite before it re-enters; the guest's RAX gets it.
   */
  HYPERCALL_NR: 2 * LINE_WORDS + 0,
  HYPERCALL_ARG0_LO: 2 * LINE_WORDS + 1,
  HYPERCALL_ARG0_HI: 2 * LINE_WORDS + 2,
  HYPERCALL_ARG1: 2 * LINE_WORDS + 3,
  HYPERCALL_ARG2: 2 * LINE_WORDS + 4,
  HYPERCALL_RET: 2 * LINE_WORDS + 5,
} as const;

/** Words the VMM writes (second line of the block). */
export const VcpuRequest = {
  /** Non-zero: stop at the next operation boundary (the selftest's `vcpu_stop`). */
  STOP: LINE_WORDS + 0,
  /** Bumped by the VMM to re-enter KVM_RUN after an exit. */
  RUN_SEQ: LINE_WORDS + 1,
  /** Guest throttle (auto-converge), percent. */
  THROTTLE: LINE_WORDS + 2,
  /** Dirty page rate limit, pages per second; 0: none (QEMU's set-vcpu-dirty-limit). */
  DIRTY_LIMIT: LINE_WORDS + 3,
  /**
   * Non-zero: an interrupt is pending for the vCPU (what kvm_vcpu_has_events sees: a
   * posted interrupt's ON bit, a pending NMI), set by whoever raises it (a test, an
   * interrupt source role). vmemlab's guests take no interrupts, so the vCPU looks at it
   * in one place, where KVM's answer changes the guest's result: between two chunks of a
   * TDX MapGPA (tdx_complete_vmcall_map_gpa), where it returns TDVMCALL_STATUS_RETRY and
   * clears the word (the interrupt is delivered on that entry).
   */
  PENDING_INTERRUPT: LINE_WORDS + 4,
} as const;
export const VCPU_BLOCK_WORDS = 3 * LINE_WORDS;

export const OUTSIDE_GUEST_MODE = 0;
export const IN_GUEST_MODE = 1;

export const enum VcpuRunState {
  CREATED = 0,
  RUNNING = 1,
  /** Stopped at an operation boundary on request. */
  STOPPED = 2,
  /** Exited to the VMM (exit reason in EXIT_REASON), waiting for RUN_SEQ. */
  EXITED = 3,
  DONE = 4,
}

/** Ring index words: dirty_index (written by the vCPU) and reset_index (by the resetter). */
export const RingIndex = { DIRTY: 0, RESET: LINE_WORDS } as const;
export const RING_INDEX_WORDS = 2 * LINE_WORDS;

export function slotFieldOf(slot: { id: number; asId: number }): number {
  return ((slot.asId << 16) | slot.id) >>> 0;
}

export function createVmLayout(config: VmConfig): VmLayout {
  if (config.cpuCache && config.privateMem) throw new Error('createVmLayout: a CPU cache model and private memory together are not modelled');
  let firstPage = 0;
  const slots = config.slots.map((s): MemslotLayout => {
    const regions: SharedArrayBuffer[] = [];
    for (let p = 0; p < s.pages; p += REGION_PAGES) {
      regions.push(new SharedArrayBuffer(Math.min(REGION_PAGES, s.pages - p) * PAGE_SIZE));
    }
    const gmem = (s.flags & KVM_MEM_GUEST_MEMFD) !== 0;
    if (gmem) checkGuestMemfdSlot(config, s);
    if (gmem && (s.flags & (KVM_MEM_DMA | KVM_MEM_KVM_ONLY)) !== 0) throw new KvmError(EINVAL, 'KVM_SET_USER_MEMORY_REGION2', `slot ${s.id}: KVM_MEM_DMA or KVM_MEM_KVM_ONLY on a KVM_MEM_GUEST_MEMFD slot`);
    const layout: MemslotLayout = {
      ...s,
      firstPage,
      regions,
      spte: new SharedArrayBuffer(s.pages),
      dirtyBitmap: new SharedArrayBuffer(Math.ceil(s.pages / 32) * 4),
      // Untouched SharedArrayBuffer pages cost no memory: a private backing as large as the slot is free until used.
      gmem: gmem ? regions.map((r) => new SharedArrayBuffer(r.byteLength)) : null,
      rdmBitmap: gmem ? new SharedArrayBuffer(Math.ceil(s.pages / 32) * 4) : null,
      vmmDirtyBitmap: gmem ? new SharedArrayBuffer(Math.ceil(s.pages / 32) * 4) : null,
    };
    // Keep every slot's first page 64-aligned in the VM-wide numbering, so userspace
    // bitmaps can take a slot's GET_DIRTY_LOG words as they are.
    firstPage += Math.ceil(s.pages / 64) * 64;
    return layout;
  });
  const t = config.tracking;
  const rings = t.kind === 'ring'
    ? {
      entries: t.entries,
      gfns: Array.from({ length: config.vcpus }, () => new SharedArrayBuffer(t.entries * KVM_DIRTY_GFN_SIZE)),
      indexes: new SharedArrayBuffer(config.vcpus * RING_INDEX_WORDS * 4),
    }
    : null;
  const slotFlags = new SharedArrayBuffer(Math.max(1, slots.length) * 4);
  const flagsView = new Int32Array(slotFlags);
  slots.forEach((s, i) => { flagsView[i] = s.flags; });
  return {
    config,
    slots,
    totalPages: firstPage,
    slotFlags,
    global: new SharedArrayBuffer(GLOBAL_WORDS * 4),
    vcpus: new SharedArrayBuffer(Math.max(1, config.vcpus) * VCPU_BLOCK_WORDS * 4),
    rings,
    pageHistory: config.pageHistory ? createPageHistoryBuffer(firstPage) : null,
    iommu: config.iommu ? createIommuLayout(config.iommu, firstPage) : null,
    injections: new SharedArrayBuffer(INJECTION_WORDS * 4),
    attributes: config.privateMem ? new SharedArrayBuffer(Math.max(1, firstPage)) : null,
    cpuCache: config.cpuCache ? { cache: createCpuCacheLayout(config.cpuCache), guestPat: guestPatBuffer(firstPage) } : null,
  };
}

/** The guest's PAT type per page, all write-back as a guest's page tables start. */
function guestPatBuffer(pages: number): SharedArrayBuffer {
  const b = new SharedArrayBuffer(Math.max(1, pages));
  new Uint8Array(b).fill(X86_MEMTYPE_WB);
  return b;
}

/** check_memory_region_flags for KVM_MEM_GUEST_MEMFD (virt/kvm/kvm_main.c). */
function checkGuestMemfdSlot(config: VmConfig, s: MemslotConfig): void {
  const ioctl = 'KVM_SET_USER_MEMORY_REGION2';
  if (!config.privateMem) throw new KvmError(EINVAL, ioctl, `slot ${s.id}: KVM_MEM_GUEST_MEMFD on a VM type without private memory`);
  if ((s.flags & KVM_MEM_READONLY) !== 0) throw new KvmError(EINVAL, ioctl, `slot ${s.id}: KVM_MEM_GUEST_MEMFD with KVM_MEM_READONLY`);
}

export function slotLogsDirtyPages(flags: number): boolean {
  return (flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
}

export function slotIsReadonly(flags: number): boolean {
  return (flags & KVM_MEM_READONLY) !== 0;
}
