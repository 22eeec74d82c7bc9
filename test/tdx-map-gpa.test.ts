import { describe, expect, it } from 'vitest';
import {
  KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_DECRYPTED, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
  KVM_MEM_GUEST_MEMFD, PAGE_SIZE, TDVMCALL_MAP_GPA, TDVMCALL_STATUS_INVALID_OPERAND, TDVMCALL_STATUS_RETRY,
  TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, TDVMCALL_STATUS_SUCCESS, TDX_MAP_GPA_MAX_LEN,
} from '../src/host/constants.ts';
import { type GuestContext, type GuestOp, OpKind } from '../src/host/guest-op.ts';
import {
  CONVERSION_AREA_PAGES, CONVERSION_RANGES, PrivateMemConversions, WHOLE_AREA_RANGE, conversionValue,
} from '../src/guest/private-mem-conversions.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../src/host/iommu/constants.ts';
import { type MapGpaAbi, VcpuRequest, VcpuWord, createVmLayout } from '../src/host/layout.ts';
import { Vcpu } from '../src/host/vcpu.ts';
import { Vm } from '../src/host/vm.ts';
import { ExitHandler } from '../src/host/vmm/exit-handler.ts';
import { GuestMemfdRam } from '../src/host/vmm/kvm-convert-memory.ts';
import { wholeSection } from '../src/host/vmm/ram-block-attributes.ts';
import { vfioContainer, vfioRamDiscardRegisterListener } from '../src/host/vmm/vfio-ram-discard-listener.ts';
import { RandomScheduler } from '../src/drivers/deterministic.ts';
import { GeneratorRole, Step, type Steps } from '../src/roles/role.ts';
import { checkPrivateMemory, describePrivateMemoryFinding } from '../src/oracles/private-memory-oracle.ts';
import { runMigration, migrationVmConfig } from '../src/scenarios/migration.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { Prng } from '../src/util/prng.ts';
import { UserError } from '../src/util/errors.ts';
import { DeterministicDriver, MANUAL, Ops, VmmControl, drive, runOne } from './helpers.ts';

/*
 * A TD's MapGPA (VmConfig.mapGpa 'tdx'; arch/x86/kvm/vmx/tdx.c, tdx_map_gpa and
 * tdx_complete_vmcall_map_gpa): one KVM_EXIT_HYPERCALL per 2 MiB chunk, RETRY with the GPA
 * to resume from when an interrupt is pending between chunks, INVALID_OPERAND when the VMM
 * fails a chunk; the guest calling again from R11 (Linux's tdx_map_gpa loop).
 */
const G = 0x1000;
const MAP = OpKind.MAP_GPA_RANGE;
const CHUNK = TDX_MAP_GPA_MAX_LEN / PAGE_SIZE;

function td(o: { mapGpa?: MapGpaAbi; exitHypercalls?: number } = {}): Vm {
  const vm = new Vm(createVmLayout({
    slots: [{ id: 1, asId: 0, baseGfn: G, pages: 2048, flags: KVM_MEM_GUEST_MEMFD }], vcpus: 1, tracking: MANUAL, privateMem: true,
    exitHypercalls: o.exitHypercalls ?? 1 << KVM_HC_MAP_GPA_RANGE, ...(o.mapGpa !== undefined ? { mapGpa: o.mapGpa } : {}),
  }));
  vm.populate();
  return vm;
}

/** kvm_run.hypercall of vCPU 0's last exit. */
function hypercall(vm: Vm): { reason: number; nr: number; gpa: number; pages: number; attributes: number; ret: number } {
  const w = vm.vcpuWords;
  return {
    reason: w[VcpuWord.EXIT_REASON]!, nr: w[VcpuWord.HYPERCALL_NR]!,
    gpa: (w[VcpuWord.HYPERCALL_ARG0_LO]! >>> 0) + (w[VcpuWord.HYPERCALL_ARG0_HI]! >>> 0) * 2 ** 32,
    pages: w[VcpuWord.HYPERCALL_ARG1]!, attributes: w[VcpuWord.HYPERCALL_ARG2]!, ret: w[VcpuWord.HYPERCALL_RET]!,
  };
}


/** The VMM re-enters KVM_RUN, leaving `ret` in kvm_run.hypercall.ret. */
function reenter(vm: Vm, ret = 0): void {
  Atomics.store(vm.vcpuWords, VcpuWord.HYPERCALL_RET, ret);
  Atomics.add(vm.vcpuWords, VcpuRequest.RUN_SEQ, 1);
}

const raiseInterrupt = (vm: Vm, v = 0): void => { Atomics.store(vm.vcpuWords, vm.vcpuBase(v) + VcpuRequest.PENDING_INTERRUPT, 1); };
const interruptPending = (vm: Vm, v = 0): boolean => Atomics.load(vm.vcpuWords, vm.vcpuBase(v) + VcpuRequest.PENDING_INTERRUPT) !== 0;

/** Runs one MapGPA to its end, re-entering after each exit; returns the chunks it exited with (gpa, pages, attributes). */
function chunks(vm: Vm, v: Vcpu, onExit: (n: number) => number = () => 0): { gpa: number; pages: number; attributes: number }[] {
  const seen: { gpa: number; pages: number; attributes: number }[] = [];
  while (runOne(v) === 'exited') {
    const h = hypercall(vm);
    expect(h).toMatchObject({ reason: KVM_EXIT_HYPERCALL, nr: KVM_HC_MAP_GPA_RANGE, ret: 0 });
    seen.push({ gpa: h.gpa, pages: h.pages, attributes: h.attributes });
    expect(v.step()).toBe(Step.BLOCKED); // parked in the exit until the VMM re-enters
    reenter(vm, onExit(seen.length));
  }
  return seen;
}

describe('TDG.VP.VMCALL<MapGPA> on a TD: one KVM_EXIT_HYPERCALL per 2 MiB chunk', () => {
  it('2 MiB + 4 KiB to private: a 512-page chunk, then a 1-page chunk, ENCRYPTED and no page-size hint; then SUCCESS', () => {
    const vm = td({ mapGpa: 'tdx' });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G + 1, value: 513, kind: MAP, private: true, offset: KVM_MAP_GPA_RANGE_PAGE_SZ_2M }, { gfn: G, value: 1 }]));
    expect(chunks(vm, v)).toEqual([
      { gpa: (G + 1) * PAGE_SIZE, pages: CHUNK, attributes: KVM_MAP_GPA_RANGE_ENCRYPTED },
      { gpa: (G + 1 + CHUNK) * PAGE_SIZE, pages: 1, attributes: KVM_MAP_GPA_RANGE_ENCRYPTED },
    ]);
    expect(v.retired).toBe(1);
    expect(v.ctx).toMatchObject({ tdvmcallStatus: TDVMCALL_STATUS_SUCCESS, tdvmcallR11: TDVMCALL_MAP_GPA });
    expect(v.ctx.hypercallRet).toBeUndefined(); // a TD's MapGPA is no KVM hypercall: RAX is not its result
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXITS)).toBe(2);
  });

  it('4 MiB to shared: two 512-page chunks, DECRYPTED; the last chunk ends the call (map_gpa_next >= map_gpa_end)', () => {
    const vm = td({ mapGpa: 'tdx' });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 1024, kind: MAP }, { gfn: G, value: 1 }]));
    expect(chunks(vm, v)).toEqual([
      { gpa: G * PAGE_SIZE, pages: CHUNK, attributes: KVM_MAP_GPA_RANGE_DECRYPTED },
      { gpa: (G + CHUNK) * PAGE_SIZE, pages: CHUNK, attributes: KVM_MAP_GPA_RANGE_DECRYPTED },
    ]);
    expect(v.ctx.tdvmcallStatus).toBe(TDVMCALL_STATUS_SUCCESS);
  });

  it('an interrupt pending between chunks ends the call with TDVMCALL_STATUS_RETRY, R11 the next chunk\'s GPA, and is taken', () => {
    const vm = td({ mapGpa: 'tdx' });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 1025, kind: MAP, private: true }, { gfn: G, value: 1, private: true }]));
    raiseInterrupt(vm); // already pending at the call: tdx_map_gpa does not look, the first chunk exits
    expect(chunks(vm, v)).toEqual([{ gpa: G * PAGE_SIZE, pages: CHUNK, attributes: KVM_MAP_GPA_RANGE_ENCRYPTED }]);
    expect(v.retired).toBe(1);
    expect(v.ctx).toMatchObject({ tdvmcallStatus: TDVMCALL_STATUS_RETRY, tdvmcallR11: (G + CHUNK) * PAGE_SIZE });
    expect(interruptPending(vm)).toBe(false); // delivered on the entry that returned RETRY
  });

  it('an interrupt raised during the last chunk does not stop the call: past the end it succeeds, and the interrupt stays pending', () => {
    const vm = td({ mapGpa: 'tdx' });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 513, kind: MAP }, { gfn: G, value: 1 }]));
    const seen = chunks(vm, v, (n) => { if (n === 2) raiseInterrupt(vm); return 0; });
    expect(seen.map((c) => c.pages)).toEqual([CHUNK, 1]);
    expect(v.ctx.tdvmcallStatus).toBe(TDVMCALL_STATUS_SUCCESS);
    expect(interruptPending(vm)).toBe(true);
  });

  it('a non-zero hypercall.ret fails the call with TDVMCALL_STATUS_INVALID_OPERAND, R11 the failed chunk\'s GPA, no further chunk', () => {
    const vm = td({ mapGpa: 'tdx' });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 1200, kind: MAP, private: true }, { gfn: G, value: 1 }]));
    const seen = chunks(vm, v, (n) => (n === 2 ? 22 : 0));
    expect(seen.map((c) => c.gpa / PAGE_SIZE - G)).toEqual([0, CHUNK]);
    expect(v.ctx).toMatchObject({ tdvmcallStatus: TDVMCALL_STATUS_INVALID_OPERAND, tdvmcallR11: (G + CHUNK) * PAGE_SIZE });
  });

  it('refused without an exit: SUBFUNC_UNSUPPORTED without KVM_CAP_EXIT_HYPERCALL, INVALID_OPERAND for no pages or a wrapping span; R11 the GPA', () => {
    const off = td({ mapGpa: 'tdx', exitHypercalls: 0 });
    const v0 = new Vcpu(off, 0, new Ops([{ gfn: G, value: 4, kind: MAP, private: true }]));
    expect(runOne(v0)).toBe('retired');
    expect(v0.ctx).toMatchObject({ tdvmcallStatus: TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, tdvmcallR11: G * PAGE_SIZE });
    const vm = td({ mapGpa: 'tdx' });
    const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 0, kind: MAP }, { gfn: 2 ** 52 - 2, value: 4, kind: MAP }]));
    for (const gfn of [G, 2 ** 52 - 2]) {
      expect(runOne(v)).toBe('retired');
      expect(v.ctx).toMatchObject({ tdvmcallStatus: TDVMCALL_STATUS_INVALID_OPERAND, tdvmcallR11: gfn * PAGE_SIZE });
    }
    expect(Atomics.load(vm.vcpuWords, VcpuWord.EXITS) + Atomics.load(off.vcpuWords, VcpuWord.EXITS)).toBe(0);
  });

  it('the default (KVM_HC_MAP_GPA_RANGE) is unchanged: one exit for 4 MiB + 4 KiB with the hint, RAX the result, the interrupt word not looked at', () => {
    for (const mapGpa of [undefined, 'kvm' as const]) {
      const vm = td(mapGpa === undefined ? {} : { mapGpa });
      const v = new Vcpu(vm, 0, new Ops([{ gfn: G, value: 1025, kind: MAP, private: true, offset: KVM_MAP_GPA_RANGE_PAGE_SZ_2M }, { gfn: G, value: 1 }]));
      raiseInterrupt(vm);
      expect(chunks(vm, v)).toEqual([{ gpa: G * PAGE_SIZE, pages: 1025, attributes: KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M }]);
      expect(v.ctx.hypercallRet).toBe(0);
      expect(v.ctx.tdvmcallStatus).toBeUndefined();
      expect(interruptPending(vm)).toBe(true);
    }
  });
});

describe('the guest calls MapGPA again from R11 (Linux\'s tdx_map_gpa)', () => {
  const op = (): GuestOp => ({ kind: OpKind.WRITE64, gfn: 0, value: 0, offset: 0 });
  const retry = (gpa: number): GuestContext => ({ iteration: 0, tdvmcallStatus: TDVMCALL_STATUS_RETRY, tdvmcallR11: gpa });

  it('on a TD with an interrupt pending: the whole area (2 MiB + 4 KiB) is one chunk, RETRY, then the rest from R11; then the writes', () => {
    const vm = td({ mapGpa: 'tdx' });
    const guest = new PrivateMemConversions(G, 1, [WHOLE_AREA_RANGE]);
    const v = new Vcpu(vm, 0, guest);
    const seen = chunks(vm, v, () => { raiseInterrupt(vm); return 0; });
    expect(seen).toEqual([{ gpa: G * PAGE_SIZE, pages: CHUNK, attributes: KVM_MAP_GPA_RANGE_DECRYPTED }]);
    expect(v.ctx).toMatchObject({ tdvmcallStatus: TDVMCALL_STATUS_RETRY, tdvmcallR11: (G + CHUNK) * PAGE_SIZE });
    // The guest's next operation is the call again, for what is left.
    expect(chunks(vm, v)).toEqual([{ gpa: (G + CHUNK) * PAGE_SIZE, pages: 1, attributes: KVM_MAP_GPA_RANGE_DECRYPTED }]);
    expect(v.ctx.tdvmcallStatus).toBe(TDVMCALL_STATUS_SUCCESS);
    expect(guest).toMatchObject({ mapGpaRetries: 1, mapGpaFailures: 0 });
    expect(runOne(v)).toBe('retired'); // then the range's writes, shared
    expect(v.op).toMatchObject({ kind: OpKind.WRITE64, gfn: G, private: false });
  });

  it('checks R11 (it comes from the untrusted VMM): outside the range fails; no progress three times fails; progress resets the count', () => {
    const g = new PrivateMemConversions(0x100, 1, [WHOLE_AREA_RANGE]);
    const o = op();
    g.next(o, { iteration: 0 });
    expect(o).toMatchObject({ kind: MAP, gfn: 0x100, value: 513 });
    g.next(o, retry(0x100 * PAGE_SIZE)); // no progress: 1
    expect(o).toMatchObject({ kind: MAP, gfn: 0x100, value: 513 });
    g.next(o, retry(0x101 * PAGE_SIZE)); // progress: the count starts again
    expect(o).toMatchObject({ kind: MAP, gfn: 0x101, value: 512, offset: KVM_MAP_GPA_RANGE_PAGE_SZ_2M });
    g.next(o, retry(0x101 * PAGE_SIZE));
    g.next(o, retry(0x101 * PAGE_SIZE));
    expect(o).toMatchObject({ kind: MAP, gfn: 0x101 });
    expect(g.mapGpaFailures).toBe(0);
    g.next(o, retry(0x101 * PAGE_SIZE)); // a third retry without progress: it gives up and writes the range
    expect(g).toMatchObject({ mapGpaRetries: 5, mapGpaFailures: 1 });
    expect(o).toMatchObject({ kind: OpKind.WRITE64, gfn: 0x100 });
    const h = new PrivateMemConversions(0x100, 1, [WHOLE_AREA_RANGE]);
    h.next(o, { iteration: 0 });
    h.next(o, retry((0x100 + 513) * PAGE_SIZE)); // past the end
    expect(h.mapGpaFailures).toBe(1);
    expect(o.kind).toBe(OpKind.WRITE64);
    const f = new PrivateMemConversions(0x100, 1);
    f.next(o, { iteration: 0 });
    f.next(o, { iteration: 0, tdvmcallStatus: TDVMCALL_STATUS_INVALID_OPERAND, tdvmcallR11: 0x100 * PAGE_SIZE });
    expect(f).toMatchObject({ mapGpaRetries: 0, mapGpaFailures: 1 });
    expect(o.kind).toBe(OpKind.WRITE64);
  });
});

describe('private_mem_conversions_test\'s guest on a TD, under the deterministic driver', () => {
  const VCPUS = 2;
  const ROUNDS = 2;
  // The selftest's ranges, then the whole area: the one MapGPA TDX splits into two chunks.
  const RANGES = [...CONVERSION_RANGES, WHOLE_AREA_RANGE];

  function run(seed: number) {
    const pages = VCPUS * CONVERSION_AREA_PAGES;
    const iommu = { backend: 'type1' as const, dmaEntryLimit: VFIO_DEFAULT_DMA_ENTRY_LIMIT, iovaPages: G + pages, devices: 1, tracking: ['iommu' as const] };
    const vm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: G, pages, flags: KVM_MEM_GUEST_MEMFD }], vcpus: VCPUS, tracking: MANUAL,
      privateMem: true, exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE, iommu, mapGpa: 'tdx',
    }));
    vm.populate();
    const slot = vm.memory.slots[0]!;
    const ram = new GuestMemfdRam(vm);
    drive(ram.setupPrivate());
    expect(drive(vfioRamDiscardRegisterListener(vfioContainer(vm.iommu!), ram.rdmOf(slot)!, wholeSection(slot))).value.ok).toBe(true);
    const guests = Array.from({ length: VCPUS }, (_, i) => new PrivateMemConversions(G + i * CONVERSION_AREA_PAGES, ROUNDS, RANGES));
    const vcpus = guests.map((w, i) => new Vcpu(vm, i, w));
    const exits = new ExitHandler(new VmmControl(vm));
    const errors: string[] = [];
    const findings: string[] = [];
    const chunkPages: number[] = [];
    function* vmm(): Steps {
      for (let idle = 1; ; idle++) {
        if (idle % 500 === 0) findings.push(...checkPrivateMemory(vm, ram).findings.map(describePrivateMemoryFinding));
        const h = exits.hypercall();
        if (h !== null) chunkPages.push(h.args[1]);
        const e = (yield* exits.serviceHypercalls(ram)) ?? (yield* exits.serviceMemoryFaults(ram));
        if (e !== null) { errors.push(e.error); return; }
        yield undefined;
      }
    }
    // An interrupt source (a timer, a device's MSI), seeded: now and then it posts an interrupt to a vCPU.
    function* interrupts(): Steps {
      const prng = new Prng(seed);
      for (;;) {
        if (prng.below(64) === 0) raiseInterrupt(vm, prng.below(VCPUS));
        yield undefined;
      }
    }
    const roles = [...vcpus, new GeneratorRole('vmm', vmm()), new GeneratorRole('interrupts', interrupts())];
    const driver = new DeterministicDriver(roles, new RandomScheduler(seed));
    driver.run(() => errors.length > 0 || guests.every((w, i) => w.round >= ROUNDS && !vcpus[i]!.opPending), 5_000_000);
    return { vm, ram, slot, guests, errors, findings, chunkPages };
  }

  for (const seed of [1, 2]) {
    it(`seed ${seed}: MapGPA chunks and RETRYs along the way, and every page still ends private with what the vCPU last wrote`, () => {
      const { vm, ram, slot, guests, errors, findings, chunkPages } = run(seed);
      expect(errors).toEqual([]);
      expect(findings).toEqual([]);
      expect(checkPrivateMemory(vm, ram)).toEqual({ findings: [], count: 0 });
      expect(Math.max(...chunkPages), 'no exit spans more than one chunk').toBe(CHUNK);
      expect(guests.reduce((n, g) => n + g.mapGpaRetries, 0), 'an interrupt stopped a MapGPA between its chunks').toBeGreaterThan(0);
      expect(guests.map((g) => g.mapGpaFailures)).toEqual([0, 0]);
      for (let v = 0; v < VCPUS; v++) {
        for (let p = 0; p < CONVERSION_AREA_PAGES; p++) {
          const page = v * CONVERSION_AREA_PAGES + p;
          expect(vm.attributes!.isPrivate(slot, page), `vcpu${v} page ${p} is private`).toBe(true);
          // The whole area is the last range: every page holds its value.
          expect(slot.gmem!.readU64(page), `vcpu${v} page ${p}`).toBe(conversionValue(ROUNDS - 1, RANGES.length - 1, true, RANGES.length));
          expect(slot.isZeroPage(page), `vcpu${v} page ${p}: its shared memory was discarded`).toBe(true);
        }
      }
      expect(vm.iommu!.stats().entries).toBe(0);
    });
  }
});

describe('vmemlab migrate --map-gpa tdx', () => {
  const CVM = { confidential: 'shared', workload: 'convert', memoryBytes: '8MiB', vcpus: '2', batchPages: '8', devices: ['dma-engine:identity,every=8,buffers=16,remap-every=0'] };

  it('--confidential shared --workload convert --map-gpa tdx: the TD\'s conversions take MapGPA, and the migration passes', async () => {
    const { scenario } = migrationSetup({ ...CVM, mapGpa: 'tdx', driver: 'deterministic', seed: '1' } as never);
    expect(migrationVmConfig(scenario).mapGpa).toBe('tdx');
    expect(migrationVmConfig(migrationSetup({ ...CVM, driver: 'deterministic' } as never).scenario).mapGpa).toBeUndefined();
    const r = await runMigration(scenario, { driver: 'deterministic', watchdogMs: 10_000, burst: 64 });
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(r.confidential!.conversions).toBeGreaterThan(0);
    expect(r.confidential).toMatchObject({ attributeMismatches: 0, findings: [], privateTouches: 0 });
    expect(r.mismatchCount).toBe(0);
  });

  it('refuses --map-gpa tdx for a guest that is not confidential, and an unknown ABI, naming the flag', () => {
    const refused = (raw: Record<string, unknown>): string => {
      try { migrationSetup(raw as never); } catch (e) { expect(e).toBeInstanceOf(UserError); return (e as Error).message; }
      return 'accepted';
    };
    expect(refused({ mapGpa: 'tdx' })).toBe('--map-gpa: tdx is how a confidential guest converts memory; it needs --confidential shared or blocker');
    expect(refused({ ...CVM, mapGpa: 'snp' })).toBe('--map-gpa: unknown MapGPA ABI \'snp\' (kvm or tdx)');
  });
});
