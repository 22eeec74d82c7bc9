import { KVM_X86_QUIRK_IGNORE_GUEST_PAT } from './constants.ts';

/**
 * Memory types, and whether KVM on Intel (EPT) lets the guest's PAT choose them.
 *
 * Every EPT leaf entry carries a memory type (bits 5:3) and IPAT (bit 6, "ignore PAT").
 * With IPAT the EPT type is the effective type of every access through the entry; without
 * it the EPT type combines with the type the guest's PAT gives the access, as an MTRR type
 * would (Intel SDM Vol. 3, "Memory Type Used for Translated Guest-Physical Addresses").
 * KVM picks the EPT bits when it builds an SPTE, in vmx_get_mt_mask (arch/x86/kvm/vmx/vmx.c):
 *
 *   host MMIO                                           UC              (guest PAT WC still gives WC)
 *   no non-coherent DMA, KVM_X86_QUIRK_IGNORE_GUEST_PAT WB + IPAT       (guest PAT ignored: WB)
 *   otherwise                                           WB              (guest PAT decides)
 *
 * Non-coherent DMA is a device whose DMA does not snoop CPU caches: VFIO registers it
 * (kvm_vfio_update_coherency, virt/kvm/vfio.c) when a group's IOMMU cannot force snooping.
 * The guest must then be able to map its DMA buffers UC/WC and to flush caches with
 * WBINVD, so KVM honours the guest's PAT and really executes WBINVD (kvmEmulateWbinvd).
 * kvm->arch.noncoherent_dma_count counts registrations (GlobalWord.NONCOHERENT_DMA_COUNT);
 * on its 0 -> 1 and 1 -> 0 transitions KVM zaps every SPTE so that each is rebuilt with
 * the new IPAT (kvm_noncoherent_dma_assignment_start_or_stop, arch/x86/kvm/x86.c; the Vm's
 * registerNoncoherentDma / unregisterNoncoherentDma).
 *
 * History: KVM_X86_QUIRK_IGNORE_GUEST_PAT appeared in 2025 ("KVM: x86: Introduce Intel
 * specific quirk KVM_X86_QUIRK_IGNORE_GUEST_PAT"); before it the quirk's behaviour was the
 * only one (but for a short-lived change that honoured the PAT on CPUs with self-snoop,
 * reverted because UC is slow enough on some Xeons to break old guest drivers). TDX always honours the guest's PAT (tdx_vm_init disables the quirk), and a CPU
 * without self-snoop always ignores it (vmx_hardware_setup drops the quirk from
 * supported_quirks, so it cannot be disabled). On AMD (NPT) KVM always honours it.
 *
 * Left out: vmemlab is Intel-only here (no inapplicable_quirks), has no self-snoop flag
 * (KVM_CAP_DISABLE_QUIRKS2 is taken as given), and SPTEs do not record their memory type
 * (the zap is what rebuilds them). Guest CR0.CD and guest MTRRs play no part: KVM
 * stopped virtualizing guest MTRR memory types in 2024 and vmx_get_mt_mask no longer
 * reads CR0.CD.
 */

// Architectural memory types (arch/x86/include/asm/msr-index.h). vmx_get_mt_mask spells
// UC and WB MTRR_TYPE_UNCACHABLE and MTRR_TYPE_WRBACK (asm/mtrr.h): the same numbers.
export const X86_MEMTYPE_UC = 0;
export const X86_MEMTYPE_WC = 1;
export const X86_MEMTYPE_WT = 4;
export const X86_MEMTYPE_WP = 5;
export const X86_MEMTYPE_WB = 6;
/** UC- ("weak uncacheable"): PAT only; an MTRR or EPT entry cannot hold it. */
export const X86_MEMTYPE_UC_MINUS = 7;

/** A memory type a PAT entry can hold (2 and 3 are reserved). */
export type MemoryType =
  | typeof X86_MEMTYPE_UC | typeof X86_MEMTYPE_WC | typeof X86_MEMTYPE_WT
  | typeof X86_MEMTYPE_WP | typeof X86_MEMTYPE_WB | typeof X86_MEMTYPE_UC_MINUS;
/** A memory type an EPT entry can hold (7 is reserved there: an EPT misconfiguration). */
export type EptMemoryType = Exclude<MemoryType, typeof X86_MEMTYPE_UC_MINUS>;

export const MEMORY_TYPES: readonly MemoryType[] = [
  X86_MEMTYPE_UC, X86_MEMTYPE_WC, X86_MEMTYPE_WT, X86_MEMTYPE_WP, X86_MEMTYPE_WB, X86_MEMTYPE_UC_MINUS,
];
export const MEMORY_TYPE_NAMES: Readonly<Record<MemoryType, string>> = {
  [X86_MEMTYPE_UC]: 'UC', [X86_MEMTYPE_WC]: 'WC', [X86_MEMTYPE_WT]: 'WT',
  [X86_MEMTYPE_WP]: 'WP', [X86_MEMTYPE_WB]: 'WB', [X86_MEMTYPE_UC_MINUS]: 'UC-',
};

// The EPT entry's memory type field (arch/x86/include/asm/vmx.h).
export const VMX_EPT_MT_EPTE_SHIFT = 3;
export const VMX_EPT_MT_MASK = 7 << VMX_EPT_MT_EPTE_SHIFT;
export const VMX_EPT_IPAT_BIT = 1 << 6;

/** kvm_check_has_quirk: a quirk is on unless userspace disabled it (inapplicable_quirks left out: Intel only). */
export function kvmCheckHasQuirk(disabledQuirks: number, quirk: number): boolean {
  return (disabledQuirks & quirk) === 0;
}

/**
 * vmx_ignore_guest_pat: force WB and ignore the guest's PAT. Never with non-coherent DMA,
 * which needs the guest to map its buffers uncached and flush caches itself.
 */
export function vmxIgnoreGuestPat(noncoherentDma: boolean, disabledQuirks: number): boolean {
  return !noncoherentDma && kvmCheckHasQuirk(disabledQuirks, KVM_X86_QUIRK_IGNORE_GUEST_PAT);
}

/** What vmx_get_mt_mask looks at for one SPTE. */
export interface MtMaskInput {
  /** kvm_is_mmio_pfn(pfn): the gfn maps host MMIO (a device BAR), not RAM. */
  isMmio: boolean;
  /** kvm_arch_has_noncoherent_dma(kvm). */
  noncoherentDma: boolean;
  /** kvm->arch.disabled_quirks (KVM_CAP_DISABLE_QUIRKS2). */
  disabledQuirks: number;
}

/** vmx_get_mt_mask: the EPT memory type and IPAT bits of a new SPTE. */
export function vmxGetMtMask(i: MtMaskInput): number {
  // "Force UC for host MMIO regions, as allowing the guest to access MMIO with cacheable
  // accesses will result in Machine Checks." No IPAT: a guest PAT of WC still gives WC.
  if (i.isMmio) return X86_MEMTYPE_UC << VMX_EPT_MT_EPTE_SHIFT;
  if (vmxIgnoreGuestPat(i.noncoherentDma, i.disabledQuirks)) return (X86_MEMTYPE_WB << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT;
  return X86_MEMTYPE_WB << VMX_EPT_MT_EPTE_SHIFT;
}

/** The memory type field of an EPT entry (its bits from vmxGetMtMask). */
export function eptMemoryType(mtMask: number): EptMemoryType {
  const t = (mtMask & VMX_EPT_MT_MASK) >>> VMX_EPT_MT_EPTE_SHIFT;
  if (!(t in EFFECTIVE)) throw new Error(`EPT misconfiguration: memory type ${t} is reserved`);
  return t as EptMemoryType;
}

export function eptIgnoresPat(mtMask: number): boolean {
  return (mtMask & VMX_EPT_IPAT_BIT) !== 0;
}

const UC = X86_MEMTYPE_UC, WC = X86_MEMTYPE_WC, WT = X86_MEMTYPE_WT, WP = X86_MEMTYPE_WP, WB = X86_MEMTYPE_WB;
const UCM = X86_MEMTYPE_UC_MINUS;
/**
 * Intel SDM Vol. 3, "Effective Page-Level Memory Type": row the MTRR type (for a guest
 * access without IPAT, the EPT type stands in for it), column the PAT type.
 */
const EFFECTIVE: Readonly<Record<EptMemoryType, Readonly<Record<MemoryType, EptMemoryType>>>> = {
  [UC]: { [UC]: UC, [WC]: WC, [WT]: UC, [WP]: UC, [WB]: UC, [UCM]: UC },
  [WC]: { [UC]: UC, [WC]: WC, [WT]: UC, [WP]: UC, [WB]: WC, [UCM]: WC },
  [WT]: { [UC]: UC, [WC]: WC, [WT]: WT, [WP]: WP, [WB]: WT, [UCM]: UC },
  [WP]: { [UC]: UC, [WC]: WC, [WT]: WT, [WP]: WP, [WB]: WP, [UCM]: WC },
  [WB]: { [UC]: UC, [WC]: WC, [WT]: WT, [WP]: WP, [WB]: WB, [UCM]: UC },
};

/**
 * The memory type a guest access gets through an EPT entry with `mtMask`'s bits, the
 * guest's PAT giving it `pat`: with IPAT the EPT type; without, the two combined (EPT WB
 * gives the PAT type, UC- resolving to UC).
 */
export function effectiveMemoryType(mtMask: number, pat: MemoryType): EptMemoryType {
  const ept = eptMemoryType(mtMask);
  return eptIgnoresPat(mtMask) ? ept : EFFECTIVE[ept][pat];
}

/** kvm_arch_unregister_noncoherent_dma's outcome: the SPTEs zapped, or refused. */
export type NoncoherentDmaUnregister = { ok: true; zapped: number } | { ok: false; error: string };

/**
 * kvm_emulate_wbinvd_noskip's decision (need_emulate_wbinvd): a guest WBINVD must really
 * write back and invalidate only while non-coherent DMA is registered; otherwise KVM skips
 * it (every DMA snoops the caches, and flushing them slows the whole host). The
 * caller does the flush: on every CPU the vCPU ran on since its last WBINVD
 * (vcpu->arch.wbinvd_dirty_mask, wbinvd_on_cpus_mask), not only the current one.
 */
export function kvmEmulateWbinvd(vm: { noncoherentDma(): boolean }): boolean {
  return vm.noncoherentDma();
}
