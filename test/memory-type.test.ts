import { describe, expect, it } from 'vitest';
import { KVM_MEM_DMA, KVM_X86_QUIRK_IGNORE_GUEST_PAT } from '../src/host/constants.ts';
import type { Memslot } from '../src/host/memslot.ts';
import {
  GLOBAL_WORDS, GlobalWord, IN_GUEST_MODE, LINE_WORDS, type MemslotConfig, VCPU_BLOCK_WORDS, VcpuWord, createVmLayout,
} from '../src/host/layout.ts';
import {
  MEMORY_TYPES, MEMORY_TYPE_NAMES, type MemoryType, VMX_EPT_IPAT_BIT, VMX_EPT_MT_EPTE_SHIFT, X86_MEMTYPE_UC,
  X86_MEMTYPE_UC_MINUS, X86_MEMTYPE_WB, X86_MEMTYPE_WC, X86_MEMTYPE_WP, X86_MEMTYPE_WT, effectiveMemoryType,
  eptIgnoresPat, eptMemoryType, kvmEmulateWbinvd, vmxGetMtMask,
} from '../src/host/memory-type.ts';
import { spteWritable, writeProtectPage } from '../src/host/spte.ts';
import { Vm } from '../src/host/vm.ts';
import { WaitCode } from '../src/roles/role.ts';
import { LEGACY, complete, drive, retire, vcpuWith } from './helpers.ts';

const UC = X86_MEMTYPE_UC, WC = X86_MEMTYPE_WC, WT = X86_MEMTYPE_WT, WP = X86_MEMTYPE_WP, WB = X86_MEMTYPE_WB;
const UCM = X86_MEMTYPE_UC_MINUS;
const EPT_UC = UC << VMX_EPT_MT_EPTE_SHIFT; // 0x00
const EPT_WB = WB << VMX_EPT_MT_EPTE_SHIFT; // 0x30
const EPT_WB_IPAT = EPT_WB | VMX_EPT_IPAT_BIT; // 0x70
const QUIRK_OFF = KVM_X86_QUIRK_IGNORE_GUEST_PAT;

/** What the guest gets for each PAT type (UC, WC, WT, WP, WB, UC-) through an entry. */
const AS_PAT: Record<MemoryType, MemoryType> = { [UC]: UC, [WC]: WC, [WT]: WT, [WP]: WP, [WB]: WB, [UCM]: UC };
const ALWAYS_WB: Record<MemoryType, MemoryType> = { [UC]: WB, [WC]: WB, [WT]: WB, [WP]: WB, [WB]: WB, [UCM]: WB };
const MMIO: Record<MemoryType, MemoryType> = { [UC]: UC, [WC]: WC, [WT]: UC, [WP]: UC, [WB]: UC, [UCM]: UC };

const SLOTS: MemslotConfig[] = [
  { id: 1, asId: 0, baseGfn: 0x100, pages: 64, flags: 0 },
  { id: 2, asId: 0, baseGfn: 0x400, pages: 32, flags: 0 },
];

/** A populated VM (every SPTE present and writable) with the given disabled quirks. */
function vmWith(disabledQuirks = 0, vcpus = 1): Vm {
  const vm = new Vm(createVmLayout({ slots: SLOTS, vcpus, tracking: LEGACY, disabledQuirks }));
  vm.populate();
  return vm;
}

function presentSptes(vm: Vm): number {
  let n = 0;
  for (const s of vm.memory.slots) for (let p = 0; p < s.pages; p++) if (s.spte[p] !== 0) n++;
  return n;
}

const count = (vm: Vm): number => Atomics.load(vm.global, GlobalWord.NONCOHERENT_DMA_COUNT);
const flushes = (vm: Vm): number => Atomics.load(vm.global, GlobalWord.FLUSHES);

describe('vmx_get_mt_mask and the effective memory type', () => {
  // Every combination, the expectation written out (not recomputed).
  const table: [isMmio: boolean, noncoherentDma: boolean, quirkOn: boolean, mask: number, gets: Record<MemoryType, MemoryType>][] = [
    [true, false, true, EPT_UC, MMIO],
    [true, false, false, EPT_UC, MMIO],
    [true, true, true, EPT_UC, MMIO],
    [true, true, false, EPT_UC, MMIO],
    [false, false, true, EPT_WB_IPAT, ALWAYS_WB],
    [false, false, false, EPT_WB, AS_PAT],
    [false, true, true, EPT_WB, AS_PAT],
    [false, true, false, EPT_WB, AS_PAT],
  ];
  for (const [isMmio, noncoherentDma, quirkOn, mask, gets] of table) {
    const name = `${isMmio ? 'host MMIO' : 'RAM'}, non-coherent DMA ${noncoherentDma ? 'on' : 'off'}, IGNORE_GUEST_PAT ${quirkOn ? 'on' : 'off'}`;
    it(`${name}: EPT ${mask.toString(16)}`, () => {
      const m = vmxGetMtMask({ isMmio, noncoherentDma, disabledQuirks: quirkOn ? 0 : QUIRK_OFF });
      expect(m).toBe(mask);
      for (const pat of MEMORY_TYPES) {
        expect(MEMORY_TYPE_NAMES[effectiveMemoryType(m, pat)], `guest PAT ${MEMORY_TYPE_NAMES[pat]}`).toBe(MEMORY_TYPE_NAMES[gets[pat]]);
      }
    });
  }

  it('other quirks disabled leave IGNORE_GUEST_PAT on', () => {
    expect(vmxGetMtMask({ isMmio: false, noncoherentDma: false, disabledQuirks: ~QUIRK_OFF })).toBe(EPT_WB_IPAT);
  });

  it('the EPT field: type in bits 5:3, IPAT bit 6; the SDM table for types KVM does not use', () => {
    expect(eptMemoryType(EPT_WB_IPAT)).toBe(WB);
    expect(eptIgnoresPat(EPT_WB_IPAT)).toBe(true);
    expect(eptIgnoresPat(EPT_WB)).toBe(false);
    // IPAT: the EPT type whatever the PAT says, UC included.
    expect(effectiveMemoryType(EPT_UC | VMX_EPT_IPAT_BIT, WC)).toBe(UC);
    // Without: the EPT type plays the MTRR type.
    expect(effectiveMemoryType(WC << VMX_EPT_MT_EPTE_SHIFT, WB)).toBe(WC);
    expect(effectiveMemoryType(WC << VMX_EPT_MT_EPTE_SHIFT, UCM)).toBe(WC);
    expect(effectiveMemoryType(WT << VMX_EPT_MT_EPTE_SHIFT, WB)).toBe(WT);
    expect(effectiveMemoryType(WP << VMX_EPT_MT_EPTE_SHIFT, WB)).toBe(WP);
    expect(effectiveMemoryType(WP << VMX_EPT_MT_EPTE_SHIFT, UCM)).toBe(WC);
    for (const reserved of [2, 3, 7]) expect(() => eptMemoryType(reserved << VMX_EPT_MT_EPTE_SHIFT)).toThrow(/misconfiguration/);
  });

  it('Vm.getMtMask: RAM WB + IPAT, device memory UC; the guest PAT decides once non-coherent DMA is registered, or in a KVM_MEM_DMA slot', () => {
    const vm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0x100, pages: 8, flags: 0 }, { id: 2, asId: 0, baseGfn: 0x200, pages: 8, flags: 0, hostMmio: true },
        { id: 3, asId: 0, baseGfn: 0x300, pages: 8, flags: KVM_MEM_DMA }],
      vcpus: 1, tracking: LEGACY,
    }));
    const [ram, vram, dma] = vm.memory.slots as [Memslot, Memslot, Memslot];
    expect([vm.getMtMask(ram), vm.getMtMask(vram), vm.getMtMask(dma)]).toEqual([EPT_WB_IPAT, EPT_UC, EPT_WB]);
    complete(vm.registerNoncoherentDma());
    expect([vm.getMtMask(ram), vm.getMtMask(vram), vm.getMtMask(dma)]).toEqual([EPT_WB, EPT_UC, EPT_WB]);
    expect(vmWith(QUIRK_OFF).getMtMask(vmWith().memory.slots[0]!)).toBe(EPT_WB);
  });
});

describe('non-coherent DMA registration (kvm_arch_register/unregister_noncoherent_dma)', () => {
  it('the count has a global line of its own', () => {
    expect(GlobalWord.NONCOHERENT_DMA_COUNT % LINE_WORDS).toBe(0);
    expect(GlobalWord.NONCOHERENT_DMA_COUNT + LINE_WORDS).toBeLessThanOrEqual(GLOBAL_WORDS);
    for (const w of Object.values(GlobalWord)) if (w !== GlobalWord.NONCOHERENT_DMA_COUNT) expect(Math.floor(w / LINE_WORDS)).not.toBe(9);
  });

  it('0 -> 1: every present SPTE of every slot zapped inside an MMU invalidation, then a remote TLB flush awaited', () => {
    const vm = vmWith();
    const a = vm.memory.slots[0]!, b = vm.memory.slots[1]!;
    writeProtectPage(a, 3); // not present: not counted
    const present = presentSptes(vm);
    expect(present).toBe(64 + 32 - 1);
    Atomics.store(vm.vcpuWords, VcpuWord.MODE, IN_GUEST_MODE); // vCPU 0 must acknowledge the flush
    const seq = vm.mmuInvalidate.seq();
    const before = flushes(vm);

    const g = vm.registerNoncoherentDma();
    let r = g.next();
    while (!r.done && r.value === undefined) r = g.next();
    expect(r.done).toBe(false);
    expect(r.value).toMatchObject({ code: WaitCode.FLUSH_ACK, arg: 0 });
    // Mid-flush: counted, zapped, the invalidation covering every slot (faults retry).
    expect(count(vm)).toBe(1);
    expect(presentSptes(vm)).toBe(0);
    expect(flushes(vm)).toBe(before + 1);
    expect(vm.mmuInvalidate.inProgress()).toBe(1);
    expect(vm.mmuInvalidate.retry(seq, a.baseGfn)).toBe(true);
    expect(vm.mmuInvalidate.retry(seq, b.endGfn - 1)).toBe(true);

    Atomics.store(vm.vcpuWords, VcpuWord.FLUSH_ACK, Atomics.load(vm.global, GlobalWord.FLUSH_GEN));
    r = g.next();
    while (!r.done) r = g.next();
    expect(r.value).toBe(present);
    expect(vm.mmuInvalidate.inProgress()).toBe(0);
    expect(vm.mmuInvalidate.seq()).toBe(seq + 1);
    expect(vm.mmuInvalidate.holder()).toBe(0);
    expect(spteWritable(b, 0)).toBe(false);
  });

  it('a running vCPU acknowledges the flush, then its next write faults the SPTE back in', () => {
    const vm = vmWith();
    const slot = vm.memory.slots[0]!;
    const v = vcpuWith(vm, 0, [{ gfn: slot.baseGfn + 5, value: 1 }]);
    retire(v, 1); // in guest mode, its TLB holding the page
    const { value, waits } = drive(vm.registerNoncoherentDma(), [v]);
    expect(value).toBe(64 + 32);
    expect(waits.some((w) => w.code === WaitCode.FLUSH_ACK)).toBe(true);
    retire(v, 1);
    expect(spteWritable(slot, 5)).toBe(true);
  });

  it('1 -> 2 and 2 -> 1 zap nothing and flush nothing; 1 -> 0 zaps every SPTE again', () => {
    const vm = vmWith();
    complete(vm.registerNoncoherentDma());
    vm.populate();
    const before = flushes(vm);
    expect(complete(vm.registerNoncoherentDma())).toBe(0);
    expect(count(vm)).toBe(2);
    expect(complete(vm.unregisterNoncoherentDma())).toEqual({ ok: true, zapped: 0 });
    expect(count(vm)).toBe(1);
    expect(presentSptes(vm)).toBe(64 + 32);
    expect(flushes(vm)).toBe(before);
    expect(vm.noncoherentDma()).toBe(true);

    expect(complete(vm.unregisterNoncoherentDma())).toEqual({ ok: true, zapped: 64 + 32 });
    expect(count(vm)).toBe(0);
    expect(presentSptes(vm)).toBe(0);
    expect(flushes(vm)).toBe(before + 1);
    expect(vm.noncoherentDma()).toBe(false);
    expect(vm.getMtMask(vm.memory.slots[0]!)).toBe(EPT_WB_IPAT);
  });

  it('an unbalanced unregister is refused and leaves the count, the SPTEs and the TLBs alone', () => {
    const vm = vmWith();
    const r = complete(vm.unregisterNoncoherentDma());
    expect(r.ok).toBe(false);
    expect(r.ok ? '' : r.error).toMatch(/no non-coherent DMA is registered/);
    expect(count(vm)).toBe(0);
    expect(presentSptes(vm)).toBe(64 + 32);
    expect(flushes(vm)).toBe(0);
    expect(vm.mmuInvalidate.seq()).toBe(0);
  });

  it('with KVM_X86_QUIRK_IGNORE_GUEST_PAT disabled the guest PAT is honoured either way: counted, nothing zapped', () => {
    const vm = vmWith(QUIRK_OFF);
    expect(complete(vm.registerNoncoherentDma())).toBe(0);
    expect(vm.noncoherentDma()).toBe(true);
    expect(complete(vm.unregisterNoncoherentDma())).toEqual({ ok: true, zapped: 0 });
    expect(presentSptes(vm)).toBe(64 + 32);
    expect(flushes(vm)).toBe(0);
    expect(vm.mmuInvalidate.seq()).toBe(0);
  });

  it('two vCPUs in guest mode: the flush waits for both', () => {
    const vm = vmWith(0, 2);
    for (const i of [0, 1]) Atomics.store(vm.vcpuWords, i * VCPU_BLOCK_WORDS + VcpuWord.MODE, IN_GUEST_MODE);
    const g = vm.registerNoncoherentDma();
    const waits: number[] = [];
    for (let r = g.next(); !r.done; r = g.next()) {
      if (r.value === undefined) continue;
      waits.push(r.value.arg);
      Atomics.store(vm.vcpuWords, r.value.arg * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK, r.value.arg2);
    }
    expect(waits).toEqual([0, 1]);
  });
});

describe('WBINVD emulation (kvm_emulate_wbinvd_noskip)', () => {
  it('really flushes only while non-coherent DMA is registered', () => {
    const vm = vmWith();
    expect(kvmEmulateWbinvd(vm)).toBe(false);
    complete(vm.registerNoncoherentDma());
    expect(kvmEmulateWbinvd(vm)).toBe(true);
    complete(vm.registerNoncoherentDma());
    complete(vm.unregisterNoncoherentDma());
    expect(kvmEmulateWbinvd(vm)).toBe(true);
    complete(vm.unregisterNoncoherentDma());
    expect(kvmEmulateWbinvd(vm)).toBe(false);
    // Not tied to the quirk: with the guest PAT always honoured, WBINVD is still skipped without non-coherent DMA.
    expect(kvmEmulateWbinvd(vmWith(QUIRK_OFF))).toBe(false);
  });
});
