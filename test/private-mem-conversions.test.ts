import { describe, expect, it } from 'vitest';
import { KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MEM_GUEST_MEMFD } from '../src/host/constants.ts';
import { type GuestOp, OpKind } from '../src/host/guest-op.ts';
import { CONVERSION_AREA_PAGES, CONVERSION_RANGES, PrivateMemConversions, conversionValue } from '../src/guest/private-mem-conversions.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../src/host/iommu/constants.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { Vm } from '../src/host/vm.ts';
import { ExitHandler } from '../src/host/vmm/exit-handler.ts';
import { GuestMemfdRam } from '../src/host/vmm/kvm-convert-memory.ts';
import { wholeSection } from '../src/host/vmm/ram-block-attributes.ts';
import { vfioContainer, vfioRamDiscardRegisterListener } from '../src/host/vmm/vfio-ram-discard-listener.ts';
import { RandomScheduler } from '../src/drivers/deterministic.ts';
import { GeneratorRole, type Steps } from '../src/roles/role.ts';
import { checkPrivateMemory, describePrivateMemoryFinding } from '../src/oracles/private-memory-oracle.ts';
import { DeterministicDriver, MANUAL, VmmControl, drive } from './helpers.ts';

/*
 * private_mem_conversions_test's guest on vmemlab: vCPUs convert ranges of their own areas
 * back and forth (explicitly with KVM_HC_MAP_GPA_RANGE, implicitly through
 * KVM_EXIT_MEMORY_FAULT) and write them, while the VMM serves the exits with QEMU's
 * conversion and VFIO maps what is shared, under the deterministic driver.
 */
const G = 0x1000;
const VCPUS = 2;
const ROUNDS = 2;

function confidentialGuest(seed: number) {
  const pages = VCPUS * CONVERSION_AREA_PAGES;
  const iommu = { backend: 'type1' as const, dmaEntryLimit: VFIO_DEFAULT_DMA_ENTRY_LIMIT, iovaPages: G + pages, devices: 1, tracking: ['iommu' as const] };
  const vm = new Vm(createVmLayout({
    slots: [{ id: 1, asId: 0, baseGfn: G, pages, flags: KVM_MEM_GUEST_MEMFD }], vcpus: VCPUS, tracking: MANUAL,
    privateMem: true, exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE, iommu,
  }));
  vm.populate();
  const slot = vm.memory.slots[0]!;
  const ram = new GuestMemfdRam(vm);
  drive(ram.setupPrivate());
  const rdm = ram.rdmOf(slot)!;
  const registered = drive(vfioRamDiscardRegisterListener(vfioContainer(vm.iommu!), rdm, wholeSection(slot))).value;
  expect(registered.ok).toBe(true);
  const guests = Array.from({ length: VCPUS }, (_, i) => new PrivateMemConversions(G + i * CONVERSION_AREA_PAGES, ROUNDS));
  const vcpus = guests.map((w, i) => new Vcpu(vm, i, w));
  const exits = new ExitHandler(new VmmControl(vm));
  const errors: string[] = [];
  const counts = { hypercalls: 0, memoryFaults: 0, checks: 0 };
  const findings: string[] = [];
  let idle = 0;
  function* vmm(): Steps {
    for (;;) {
      // Between conversions the private memory oracle must hold; every 500th idle point is checked (each check reads every page).
      if (++idle % 500 === 0) {
        counts.checks++;
        findings.push(...checkPrivateMemory(vm, ram).findings.map(describePrivateMemoryFinding));
      }
      if (exits.hypercall() !== null) counts.hypercalls++;
      const h = yield* exits.serviceHypercalls(ram);
      if (exits.memoryFault() !== null) counts.memoryFaults++;
      const f = yield* exits.serviceMemoryFaults(ram);
      for (const e of [h, f]) if (e !== null) { errors.push(e.error); return; }
      yield undefined;
    }
  }
  const driver = new DeterministicDriver([...vcpus, new GeneratorRole('vmm', vmm())], new RandomScheduler(seed));
  const result = driver.run(() => errors.length > 0 || guests.every((w, i) => w.round >= ROUNDS && !vcpus[i]!.opPending), 5_000_000);
  return { vm, ram, slot, rdm, vcpus, errors, counts, findings, result };
}

describe('private_mem_conversions_test under the deterministic driver', () => {
  for (const seed of [1, 2, 3]) {
    it(`seed ${seed}: every vCPU converts its ranges explicitly and implicitly; at the end its area is private with what it last wrote, shared memory discarded, nothing left mapped in the IOMMU`, () => {
      const { vm, ram, slot, rdm, errors, counts, findings } = confidentialGuest(seed);
      expect(errors).toEqual([]);
      expect(counts.checks).toBeGreaterThan(0);
      expect(findings).toEqual([]);
      expect(checkPrivateMemory(vm, ram)).toEqual({ findings: [], count: 0 });
      // Even rounds convert with the hypercall (10 a round per vCPU), odd rounds through memory faults (one per page).
      expect(counts.hypercalls).toBeGreaterThan(0);
      expect(counts.memoryFaults).toBeGreaterThan(0);
      const lastRange = (p: number): number => {
        let last = -1;
        CONVERSION_RANGES.forEach((r, i) => { if (p >= r.offset && p < r.offset + r.pages) last = i; });
        return last;
      };
      for (let v = 0; v < VCPUS; v++) {
        for (let p = 0; p < CONVERSION_AREA_PAGES; p++) {
          const page = v * CONVERSION_AREA_PAGES + p;
          expect(vm.attributes!.isPrivate(slot, page), `vcpu${v} page ${p} is private`).toBe(true);
          expect(slot.gmem!.readU64(page), `vcpu${v} page ${p}`).toBe(conversionValue(ROUNDS - 1, lastRange(p), true));
          expect(slot.gmem!.stampOf(page).writer).toBe(v + 1);
          expect(slot.isZeroPage(page), `vcpu${v} page ${p}: its shared memory was discarded`).toBe(true);
        }
      }
      expect(rdm.populatedBlocks()).toBe(0);
      expect(vm.iommu!.stats().entries).toBe(0);
      expect(vm.mmuInvalidate.inProgress()).toBe(0);
    });
  }
});

describe('PrivateMemConversions, the guest', () => {
  const fetch = (w: PrivateMemConversions, n: number): string[] => Array.from({ length: n }, () => {
    const op: GuestOp = { kind: OpKind.WRITE64, gfn: 0, value: 0, offset: 0 };
    w.next(op, { iteration: 0 });
    return `${op.kind === OpKind.MAP_GPA_RANGE ? 'map' : 'write'} ${(op.gfn - 0x100).toString()} ${op.value} ${op.offset} ${op.private ? 'private' : 'shared'}`;
  });

  it('every value names the round, the range and the kind, and none is 0', () => {
    expect([conversionValue(0, 0, false), conversionValue(0, 0, true), conversionValue(0, 1, false), conversionValue(1, 4, true)]).toEqual([1, 2, 3, 20]);
  });

  it('even rounds convert explicitly again: round 2 starts with the hypercall', () => {
    const w = new PrivateMemConversions(0x100);
    const perRound = 2 * CONVERSION_RANGES.reduce((n, r) => n + r.pages, 0);
    fetch(w, perRound + 10 + perRound);
    expect(w.round).toBe(2);
    expect(fetch(w, 1)).toEqual(['map 0 1 0 shared']);
  });

  it('round 0 converts each range with the hypercall (2 MiB ranges with the 2 MiB hint) before writing it, shared then private', () => {
    const ops = fetch(new PrivateMemConversions(0x100), 1 + 1 + 1 + 1 + 1 + 512);
    expect(ops.slice(0, 6)).toEqual([
      'map 0 1 0 shared', `write 0 ${conversionValue(0, 0, false)} 0 shared`, 'map 0 1 0 private', `write 0 ${conversionValue(0, 0, true)} 0 private`,
      `map 0 512 ${KVM_MAP_GPA_RANGE_PAGE_SZ_2M} shared`, `write 0 ${conversionValue(0, 1, false)} 0 shared`,
    ]);
    expect(ops.at(-1)).toBe(`write 511 ${conversionValue(0, 1, false)} 0 shared`);
  });

  it('round 1 converts implicitly: writes of the other kind, no hypercall; after its rounds the guest rewrites its last page', () => {
    const w = new PrivateMemConversions(0x100, 2);
    const perRound = 10 + 2 * CONVERSION_RANGES.reduce((n, r) => n + r.pages, 0);
    fetch(w, perRound);
    expect(w.round).toBe(1);
    const round1 = fetch(w, perRound - 10);
    expect(round1.every((o) => o.startsWith('write'))).toBe(true);
    expect(round1[0]).toBe(`write 0 ${conversionValue(1, 0, false)} 0 shared`);
    expect(w.round).toBe(2);
    expect(fetch(w, 2)).toEqual(Array(2).fill(`write 512 ${conversionValue(1, 4, true)} 0 private`));
  });
});
