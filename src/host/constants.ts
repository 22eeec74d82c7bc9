// Names and numbers as in Linux's include/uapi/linux/kvm.h and errno.h (docs/reference.md §1-3).

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 1 << PAGE_SHIFT;

/** Memslots userspace may create on x86: KVM_MEM_SLOTS_NUM (SHRT_MAX) less KVM_INTERNAL_MEM_SLOTS (3). */
export const KVM_USER_MEM_SLOTS = 32764;

// Memslot flags.
export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0;
export const KVM_MEM_READONLY = 1 << 1;
export const KVM_MEM_GUEST_MEMFD = 1 << 2;
/**
 * Proposals, not merged (their values are vmemlab's): KVM_MEM_DMA, the 2020 RFC "KVM: x86:
 * honor guest memory type": KVM honours the guest's PAT in this slot alone (a device does
 * non-coherent DMA to it); Sean Christopherson asked that it exclude
 * KVM_MEM_LOG_DIRTY_PAGES. KVM_MEM_KVM_ONLY, Yan Zhao's slot that only KVM maps: the VMM
 * must never read or write it (a virgl GPU buffer is GPU state, saved by the device).
 */
export const KVM_MEM_DMA = 1 << 3;
export const KVM_MEM_KVM_ONLY = 1 << 4;

// Capabilities.
export const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168;
export const KVM_CAP_DIRTY_LOG_RING = 192;
export const KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223;
export const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225;
export const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0;
export const KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1;

// struct kvm_dirty_gfn: u32 flags; u32 slot; u64 offset. 16 bytes.
export const KVM_DIRTY_GFN_F_DIRTY = 1 << 0;
export const KVM_DIRTY_GFN_F_RESET = 1 << 1;
export const KVM_DIRTY_GFN_SIZE = 16;
/** Reserved entries without PML (KVM_DIRTY_RING_RSVD_ENTRIES); PML adds 512. */
export const KVM_DIRTY_RING_RSVD_ENTRIES = 64;
export const KVM_DIRTY_RING_MIN_ENTRIES = PAGE_SIZE / KVM_DIRTY_GFN_SIZE; // 256
export const KVM_DIRTY_RING_MAX_ENTRIES = 65536;
/** CLEAR_DIRTY_LOG ranges are aligned to one u64 of the bitmap. */
export const KVM_CLEAR_LOG_ALIGN = 64;

// Exit reasons (struct kvm_run::exit_reason).
export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_DIRTY_RING_FULL = 31;
export const KVM_EXIT_HYPERCALL = 3;
export const KVM_EXIT_MEMORY_FAULT = 39;
/**
 * vmemlab's mark, not an exit reason: KVM_RUN failed with EIO because the VM is dead
 * (kvm_vm_dead; kvm_run's exit_reason means nothing then). Outside the u32 reasons KVM uses.
 */
export const KVM_RUN_EIO = 0x7fff0005;

export const EXIT_REASON_NAMES: Record<number, string> = {
  [KVM_EXIT_UNKNOWN]: 'KVM_EXIT_UNKNOWN',
  [KVM_EXIT_MMIO]: 'KVM_EXIT_MMIO',
  [KVM_EXIT_INTR]: 'KVM_EXIT_INTR',
  [KVM_EXIT_DIRTY_RING_FULL]: 'KVM_EXIT_DIRTY_RING_FULL',
  [KVM_EXIT_HYPERCALL]: 'KVM_EXIT_HYPERCALL',
  [KVM_EXIT_MEMORY_FAULT]: 'KVM_EXIT_MEMORY_FAULT',
  [KVM_RUN_EIO]: 'KVM_RUN: EIO (the VM is dead)',
};

// Private memory (KVM_SET_MEMORY_ATTRIBUTES, guest_memfd; Documentation/virt/kvm/api.rst).
/** struct kvm_memory_attributes.attributes: the page is private (bits 0-2 are reserved). */
export const KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3;
/** kvm_run.memory_fault.flags: the faulting access was private. */
export const KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3;
/** Hypercalls (include/uapi/linux/kvm_para.h, Documentation/virt/kvm/x86/hypercalls.rst). */
export const KVM_HC_MAP_GPA_RANGE = 12;
/** MAP_GPA_RANGE's a2: bits 3:0 a page-size hint, bit 4 to private (encrypted). */
export const KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0;
export const KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1;
export const KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2;
export const KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4;
/** a2 for a conversion to shared (include/uapi/linux/kvm_para.h); TDX's chunks carry this or ENCRYPTED, never a page-size hint. */
export const KVM_MAP_GPA_RANGE_DECRYPTED = 0 << 4;
/** What the guest's RAX gets for an unknown or refused hypercall (KVM_ENOSYS is 1000, KVM_EINVAL is EINVAL). */
export const KVM_ENOSYS = 1000;
export const KVM_EINVAL = 22;
/** KVM_CAP_EXIT_HYPERCALL: args[0] is the mask of hypercalls that exit to userspace (1 << KVM_HC_MAP_GPA_RANGE). */
export const KVM_CAP_EXIT_HYPERCALL = 201;
/** KVM_CAP_DISABLE_QUIRKS2: args[0] is the mask of KVM_X86_QUIRK_* to disable; a bit KVM does not support: EINVAL. */
export const KVM_CAP_DISABLE_QUIRKS2 = 213;
/**
 * arch/x86/include/uapi/asm/kvm.h. On (the default): on Intel, KVM ignores the guest's PAT
 * (EPT WB + IPAT) unless non-coherent DMA is registered. Not disableable on a CPU without
 * self-snoop; TDX disables it for every TD (tdx_vm_init). See host/memory-type.ts.
 */
export const KVM_X86_QUIRK_IGNORE_GUEST_PAT = 1 << 9;
/**
 * TDX's MapGPA (arch/x86/include/asm/shared/tdx.h; arch/x86/kvm/vmx/tdx.c): the leaf a TD
 * puts in R11 for TDG.VP.VMCALL<MapGPA>, and the TDVMCALL status codes KVM returns in R10.
 * u64 values (bit 63 marks an error), hence bigint: 2^63 + 2 is not a double.
 */
export const TDVMCALL_MAP_GPA = 0x10001;
export const TDVMCALL_STATUS_SUCCESS = 0x0000000000000000n;
export const TDVMCALL_STATUS_RETRY = 0x0000000000000001n;
export const TDVMCALL_STATUS_INVALID_OPERAND = 0x8000000000000000n;
export const TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002n;
export const TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED = 0x8000000000000003n;
/** KVM serves a MapGPA at most this much at a time, checking for a pending interrupt between chunks (tdx.c). */
export const TDX_MAP_GPA_MAX_LEN = 2 * 1024 * 1024;
/** fallocate(2) modes guest_memfd takes (kvm_gmem_fallocate). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;

// errno values the ioctls return (negated, as the kernel does).
export const ENOENT = 2;
export const ENXIO = 6;
export const EAGAIN = 11;
export const EFAULT = 14;
export const EIO = 5;
export const EINVAL = 22;
export const EOPNOTSUPP = 95;
export const EBUSY = 16;
export const EEXIST = 17;
export const ENOSPC = 28;
