import { KVM_HC_MAP_GPA_RANGE, KVM_MEM_GUEST_MEMFD, PAGE_SIZE } from '../host/constants.ts';
import type { GuestRange } from '../host/devices/dma-buffers.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import { GlobalWord, type VmConfig, type VmLayout } from '../host/layout.ts';
import { MemoryAttributes } from '../host/memory-attributes.ts';
import type { Vm } from '../host/vm.ts';
import { type ConversionDesignName, type ConversionStats, discardsSharedMemory } from '../host/vmm/conversion-design.ts';
import type { BootRange } from '../host/vmm/design-conversion.ts';
import { GuestMemfdRam, kvmConvertMemory } from '../host/vmm/kvm-convert-memory.ts';
import { DEVICE_BUFFER_PAGES, SWIOTLB_PAGES, swiotlbBase } from '../guest/confidential-guest.ts';
import { checkPrivateMemory, describePrivateMemoryFinding } from '../oracles/private-memory-oracle.ts';
import { runAlone } from '../roles/role.ts';
import { hex } from '../util/hex.ts';

/**
 * QEMU refuses to migrate SEV and TDX guests with a migration blocker (target/i386/sev.c:
 * "SEV: Migration is not implemented"); `--confidential blocker` does the same.
 */
export const CONFIDENTIAL_BLOCKER = 'confidential guest: Migration is not implemented (a migration blocker, as QEMU\'s SEV and TDX guests register)';

/**
 * A confidential VM's configuration: a VM type with private memory whose memslots have
 * guest_memfd, KVM_HC_MAP_GPA_RANGE exiting to the VMM (KVM_CAP_EXIT_HYPERCALL), and the
 * shared half of guest_memfd slots dirty-logged so that it can migrate (a departure from
 * KVM, which refuses dirty logging on guest_memfd slots: VmConfig.logSharedGuestMemfd).
 */
export function confidentialVmConfig(config: VmConfig): VmConfig {
  return {
    ...config, privateMem: true, exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE, logSharedGuestMemfd: true,
    slots: config.slots.map((s) => ({ ...s, flags: s.flags | KVM_MEM_GUEST_MEMFD })),
  };
}

/** The bounce buffers the devices use: the first part of the guest's (confidential-guest.ts). */
export function sharedAreaOf(slots: readonly GuestRange[], vcpus: number): GuestRange {
  return { baseGfn: swiotlbBase(slots[0]!.baseGfn, vcpus), pages: DEVICE_BUFFER_PAGES };
}

/**
 * The confidential guest's boot, before anything runs: its memory starts private (QEMU's
 * kvm_set_phys_mem sets the PRIVATE attribute over each guest_memfd slot), then the guest
 * shares all its bounce buffers at once (a conversion, with no listener registered yet:
 * VFIO's listener registers as the VMM's conversion thread starts, and its replay maps
 * them).
 */
export function bootConfidential(vm: Vm): void {
  const ram = new GuestMemfdRam(vm);
  runAlone(ram.setupPrivate(), 'setting guest memory private');
  for (const b of bootSharedRanges(vm)) {
    const r = runAlone(kvmConvertMemory(ram, b.gpa, b.size, false), 'sharing the bounce buffers');
    if (r.ret < 0) throw new Error(`sharing the bounce buffers failed: ${r.error || r.ret}`);
  }
}

/** What the guest shares as it boots: all its bounce buffers (confidential-guest.ts). */
export function bootSharedRanges(vm: Vm): BootRange[] {
  const swiotlb = swiotlbBase(vm.memory.slots[0]!.baseGfn, vm.layout.config.vcpus);
  return [{ gpa: swiotlb * PAGE_SIZE, size: SWIOTLB_PAGES * PAGE_SIZE }];
}

/** What a confidential guest's migration is checked for, besides its shared memory (the stamp oracle). */
export interface ConfidentialReport {
  /** Source pages private / shared at the end (KVM's attributes). */
  privatePages: number;
  sharedPages: number;
  /** Conversions the VMM finished (hypercalls and memory faults it served). */
  conversions: number;
  /** Pages whose attribute the destination does not have as the source does (the first 16 listed). */
  attributeMismatches: number;
  mismatchedGfns: number[];
  /**
   * The private memory oracle: what it saw as each conversion ran (from the VMM's thread),
   * then on the stopped source (RamDiscardManager against KVM, IOMMU mappings, discards);
   * the first few described, and how many in all.
   */
  findings: string[];
  findingCount: number;
  /** Reads of private (discarded) memory by the migration thread, and the first frame read. */
  privateTouches: number;
  firstTouchedGfn: number | null;
  /** vCPU stores of the kind the page's attribute no longer said (through a translation that outlived the change), and the first frame. */
  staleStores: number;
  firstStaleGfn: number | null;
  /** A conversion design other than QEMU's: what it did, as the VM stopped (IOMMU entries, ioctls by name, bookkeeping). */
  design?: { name: ConversionDesignName; stats: ConversionStats };
}

/** The confidential checks after a migration completed: attributes equal, the source's private memory oracle, private memory never read. */
export function checkConfidentialMigration(vm: Vm, target: VmLayout, o: { design: ConversionDesignName; findings?: readonly string[]; count?: number } = { design: 'rdm' }): ConfidentialReport {
  const duringConversions = o.findings ?? [];
  const countDuring = o.count ?? 0;
  const dest = new GuestMemory(target);
  const destAttrs = new MemoryAttributes(target.attributes!, dest);
  const report: ConfidentialReport = {
    privatePages: 0, sharedPages: 0, conversions: Atomics.load(vm.global, GlobalWord.CONVERSIONS_DONE), attributeMismatches: 0, mismatchedGfns: [], findings: [], findingCount: 0, privateTouches: 0, firstTouchedGfn: null, staleStores: 0, firstStaleGfn: null,
  };
  for (const s of vm.memory.slots) {
    const d = dest.slotByField(s.slotField)!;
    for (let page = 0; page < s.pages; page++) {
      const priv = vm.attributes!.isPrivate(s, page);
      if (priv) report.privatePages++; else report.sharedPages++;
      if (destAttrs.isPrivate(d, page) !== priv) {
        if (report.attributeMismatches++ < 16) report.mismatchedGfns.push(s.baseGfn + page);
      }
    }
  }
  const atEnd = checkPrivateMemory(vm, new GuestMemfdRam(vm), { discards: discardsSharedMemory(o.design) });
  report.findings = [...duringConversions, ...atEnd.findings.map(describePrivateMemoryFinding)];
  report.findingCount = countDuring + atEnd.count;
  report.privateTouches = Atomics.load(vm.global, GlobalWord.PRIVATE_TOUCHES);
  const first = Atomics.load(vm.global, GlobalWord.PRIVATE_TOUCH_FIRST_GFN);
  report.firstTouchedGfn = first > 0 ? first - 1 : null;
  report.staleStores = Atomics.load(vm.global, GlobalWord.STALE_STORES);
  const stale = Atomics.load(vm.global, GlobalWord.STALE_STORE_FIRST_GFN);
  report.firstStaleGfn = stale > 0 ? stale - 1 : null;
  return report;
}

/** Why a confidential migration failed its checks, or null. */
export function confidentialVerdict(r: ConfidentialReport): string | null {
  if (r.privateTouches > 0) return `the migration thread read ${r.privateTouches} pages of private memory (discarded in the RamDiscardManager; first gfn ${hex(r.firstTouchedGfn!)})`;
  if (r.staleStores > 0) return `${r.staleStores} vCPU stores went through a translation of the kind the page's attribute no longer said (first gfn ${hex(r.firstStaleGfn!)}): KVM changed the attribute before it zapped and flushed`;
  if (r.attributeMismatches > 0) return `${r.attributeMismatches} pages have other attributes on the destination than on the source (gfns ${r.mismatchedGfns.map(hex).join(', ')})`;
  if (r.findingCount > 0) return `the private memory oracle: ${r.findings[0]}${r.findingCount > 1 ? ` (and ${r.findingCount - 1} more)` : ''}`;
  return null;
}
