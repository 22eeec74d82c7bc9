import {
  BAR_REFUSAL_NAMES, BarMmuWord, type BarPrefetch, type BarRefusal, type BarRefusalAction, type MmioResource, type VmBarLayout,
  createVendorDriverLayout, createVmBarLayout,
} from '../host/bar-layouts.ts';
import { BAR_FINDING_NAMES, type BarFindingName } from '../host/mmio/kvm-bar-mmu.ts';
import type { VmBar } from '../host/vm.ts';
import { errnoText, hex } from './syntax.ts';

/**
 * A mediated device's virtual BAR in a litmus file (vm.bar; docs/mdev.md): the device's
 * resources laid out in order from BAR page 0, its physical MMIO, the VMs sharing it (the
 * litmus VM is vm0; the others are not run, but the host can give them slices), KVM's
 * prefetch policy and what a refused access does. The spec keeps this description and
 * each run builds the shared layouts afresh from it, so that running a spec twice starts
 * from the same state.
 */
export interface BarSpec {
  /** The guest frame of BAR page 0. */
  baseGfn: number;
  resources: MmioResource[];
  barPages: number;
  mmioPages: number;
  vms: number;
  prefetch: BarPrefetch;
  onRefusal: BarRefusalAction;
}

/** vm0's BAR layout (KVM's SPTEs, the VMM's mapping, the vendor driver shared by `vms` VMs), new each call. */
export function barLayout(b: BarSpec): VmBarLayout {
  const driver = createVendorDriverLayout({ vms: b.vms, mmioPages: b.mmioPages, resources: b.resources });
  return createVmBarLayout(0, b.baseGfn, driver, { prefetch: b.prefetch, onRefusal: b.onRefusal });
}

/** The BAR for the trace's vm line. */
export function barText(b: BarSpec): string {
  const res = b.resources.map((r) => `${r.name} ${r.maxPages === 1 ? `p${r.barOffset}` : `p${r.barOffset}..${r.barOffset + r.maxPages - 1}`}${r.writable ? '' : ' read-only'}`);
  return `a mediated device's BAR at GFNs ${hex(b.baseGfn)}..${hex(b.baseGfn + b.barPages - 1)} (${res.join(', ')}), ${b.mmioPages} MMIO pages shared by ${b.vms} VM${b.vms === 1 ? '' : 's'} (this one is vm0); `
    + `prefetch ${b.prefetch}; a refused access: ${b.onRefusal === 'kill-vm' ? 'kvm_vm_dead (KVM_RUN fails with EIO)' : 'KVM_EXIT_MEMORY_FAULT'}`;
}

/** The isolation oracles' counts by finding kind. */
export function barFindingCounts(bar: VmBar): Record<BarFindingName, number> {
  const out = {} as Record<BarFindingName, number>;
  for (const f of bar.mmu.findings()) out[f.kind] = f.count;
  return out;
}

/** Trace lines for the findings made since `before`. */
export function newBarFindingLines(bar: VmBar, before: Record<BarFindingName, number>): string[] {
  const out: string[] = [];
  for (const f of bar.mmu.findings()) {
    const n = f.count - before[f.kind];
    if (n > 0) out.push(`ORACLE: ${f.kind}${n > 1 ? ` x${n}` : ''} (the first of its kind at BAR page ${f.firstPage})`);
  }
  return out;
}

/** What a vCPU step of a BAR access is judged by: KVM's counters, and which BAR pages the VMA mapped, before it. */
export interface BarStepBefore {
  words: number[];
  ptes: boolean[];
}

export function barStepBefore(bar: VmBar): BarStepBefore {
  return {
    words: Array.from({ length: BarMmuWord.WORDS }, (_, w) => bar.mmu.stat(w)),
    ptes: Array.from({ length: bar.mapping.barPages }, (_, p) => bar.mapping.pte(p) !== null),
  };
}

/**
 * One vCPU step of an access to BAR page `page` in words: through the SPTE, the first half
 * of a fault (kvm_mmu_faultin_pfn, and the fault handler's validate on a miss), the second
 * (mmu_invalidate_retry_gfn, the install, the prefetch), a refusal. `read` is the value a
 * read retired with.
 */
export function barStepText(bar: VmBar, page: number, write: boolean, value: number, before: BarStepBefore, o: { retired: boolean; exited: boolean; read: number | undefined }): string {
  const d = (w: BarMmuWord): number => bar.mmu.stat(w) - before.words[w]!;
  const what = `BAR page ${page} (${hex(bar.mmu.baseGfn + page)})`;
  const refusal = (): string => {
    const r = bar.mmu.lastRefusal();
    return r === null ? 'refuses' : `refuses: ${BAR_REFUSAL_NAMES[r.reason as BarRefusal]} (${errnoText(r.errno)})`;
  };
  if (d(BarMmuWord.REFUSED) > 0) {
    const head = `${write ? 'write to' : 'read of'} ${what}: kvm_mmu_faultin_pfn finds no usable entry; fixup_user_fault: the fault handler ${refusal()}`;
    if (o.retired) return `${head}; the access completes all the same: ${write ? 'the write is dropped' : `reads ${o.read ?? 0}`}, retires`;
    if (bar.mmu.dead) return `${head}; KVM kills the VM (kvm_vm_dead)`;
    return `${head}: SIGBUS, KVM_RUN fails with EFAULT`;
  }
  if (d(BarMmuWord.FAULTS) > 0) {
    const pte = bar.mapping.pte(page);
    const found = pte === null ? 'nothing' : `pfn ${pte.pfn}${pte.writable ? '' : ' read-only'}`;
    const how = before.ptes[page] === true ? `follow_pfn finds ${found} in the VMA` : `follow_pfn finds nothing; the fault handler validates (validate_map_request) and remap_pfn_range maps ${found}`;
    return `${write ? 'write to' : 'read of'} ${what}: no SPTE; kvm_mmu_faultin_pfn reads mmu_invalidate_seq, ${how}`;
  }
  if (d(BarMmuWord.RETRIES) > 0) return `${what}: under mmu_lock, mmu_invalidate_retry_gfn: an invalidation ran or runs since the lookup: RET_PF_RETRY, nothing installed, it faults again`;
  if (d(BarMmuWord.INSTALLS) > 0) {
    const s = bar.mmu.spte(page);
    const pre = d(BarMmuWord.PREFETCHED);
    return `${what}: under mmu_lock, SPTE installed: pfn ${s?.pfn ?? '?'}${s?.writable === false ? ' read-only' : ''}`
      + (pre > 0 ? `; ${pre} neighbour(s) prefetched` : '') + (d(BarMmuWord.PREFETCH_SKIPPED) > 0 && bar.mmu.layout.prefetch === 'mapped' ? `; ${d(BarMmuWord.PREFETCH_SKIPPED)} neighbour(s) left (not mapped, or under invalidation)` : '');
  }
  if (o.retired) {
    const s = bar.mmu.spte(page);
    return write ? `writes ${what} = ${value} through its SPTE (pfn ${s?.pfn ?? '?'}), retires` : `reads ${what} through its SPTE (pfn ${s?.pfn ?? '?'}) = ${o.read ?? 0}, retires`;
  }
  if (o.exited) return `${what}: exits`;
  return `${what}: mmu_lock is held: it re-enters and faults again`;
}

export { BAR_FINDING_NAMES };
