import { PAGE_SIZE } from '../host/constants.ts';
import type { Vm } from '../host/vm.ts';
import type { GuestMemfdRam } from '../host/vmm/kvm-convert-memory.ts';
import { hex } from '../util/hex.ts';

/**
 * What must hold for a confidential guest's memory whenever no conversion is under way
 * (docs/reference.md §7, the orderings that leak or lose data): QEMU's RamDiscardManager says shared
 * exactly where KVM's attributes do (a drift makes a late listener, a hot-plugged device,
 * map the wrong pages); no IOMMU mapping reaches a page that is private (a mapping left
 * behind lets the device write memory that is discarded, or reused); and a private page's
 * shared memory was discarded (what is left there is data the host still sees).
 */
export type PrivateMemoryFindingKind = 'rdm-drift' | 'mapping-left' | 'shared-not-discarded';

export interface PrivateMemoryFinding { kind: PrivateMemoryFindingKind; slot: number; gfn: number; detail: string }

export function checkPrivateMemory(vm: Vm, ram: GuestMemfdRam, max = 16): { findings: PrivateMemoryFinding[]; count: number } {
  const attributes = vm.attributes;
  const findings: PrivateMemoryFinding[] = [];
  let count = 0;
  if (attributes === null) return { findings, count };
  const found = (f: PrivateMemoryFinding): void => { count++; if (findings.length < max) findings.push(f); };
  // Which gfns the IOMMU maps, and at which IOVA (one pass over the IO page table).
  const mappedAt = new Map<number, number>();
  const table = vm.iommu?.table;
  if (table !== undefined) for (let iova = 0; iova < table.pages; iova++) if (table.present(iova)) mappedAt.set(table.gfn(iova), iova);
  for (const [slot, rdm] of ram.blocks) {
    for (let page = 0; page < slot.pages; page++) {
      const gfn = slot.baseGfn + page;
      const priv = attributes.isPrivate(slot, page);
      if (rdm.isPopulated(page * PAGE_SIZE, PAGE_SIZE) === priv) {
        found({ kind: 'rdm-drift', slot: slot.id, gfn, detail: `KVM says ${priv ? 'private' : 'shared'}, the RamDiscardManager ${priv ? 'populated (shared)' : 'discarded (private)'}` });
      }
      if (!priv) continue;
      const iova = mappedAt.get(gfn);
      if (iova !== undefined) found({ kind: 'mapping-left', slot: slot.id, gfn, detail: `private, still mapped in the IOMMU at IOVA ${hex(iova * PAGE_SIZE)}` });
      if (!slot.isZeroPage(page)) found({ kind: 'shared-not-discarded', slot: slot.id, gfn, detail: 'private, its shared memory still holds data' });
    }
  }
  return { findings, count };
}

export function describePrivateMemoryFinding(f: PrivateMemoryFinding): string {
  return `${f.kind}: slot ${f.slot} gfn ${hex(f.gfn)}: ${f.detail}`;
}
