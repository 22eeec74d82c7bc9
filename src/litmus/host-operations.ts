import { KvmVfio } from '../host/kvm-vfio.ts';
import type { InjectedBugs } from '../bugs/injected.ts';
import { CacheStat } from '../host/cpu-cache.ts';
import { GlobalWord } from '../host/layout.ts';
import {
  EEXIST, EFAULT, EIO, ENOENT, ENOSPC, EXIT_REASON_NAMES, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_DIRTY_GFN_F_DIRTY,
  KVM_DIRTY_GFN_F_RESET, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE,
} from '../host/constants.ts';
import type { PassthroughDma } from '../host/devices/passthrough-dma.ts';
import { kvmGmemFallocate } from '../host/guest-memfd.ts';
import type { DesignConversion } from '../host/vmm/design-conversion.ts';
import { type GuestMemfdRam, kvmConvertMemory } from '../host/vmm/kvm-convert-memory.ts';
import { wholeSection } from '../host/vmm/ram-block-attributes.ts';
import { type VfioContainer, vfioRamDiscardRegisterListener } from '../host/vmm/vfio-ram-discard-listener.ts';
import type { ConversionOracle } from '../oracles/private-memory-oracle.ts';
import { KvmError } from '../util/errors.ts';
import { HOST_WRITER_BASE, type Memslot } from '../host/memslot.ts';
import type { Vm } from '../host/vm.ts';
import type { ExitHandler } from '../host/vmm/exit-handler.ts';
import { DirtyRingHarvester } from '../host/vmm/ring-harvester.ts';
import type { VmmControl } from '../host/vmm/vmm-control.ts';
import type { Steps } from '../roles/role.ts';
import { type HarvestedEntry, type OpRecord, elide, entryText, gfnsText, slotName } from './observations.ts';
import type { HostOp } from './spec.ts';
import { hex } from './syntax.ts';
import { migrationRead } from './cache.ts';
import { BarMmuWord } from '../host/bar-layouts.ts';
import { reclaimResource } from '../host/mmio/reclaim.ts';
import type { VmBar } from '../host/vm.ts';

/**
 * The litmus file's host operations, as the VMM thread and the KVM code it calls run
 * them: each is a step generator (an ioctl that ends in a TLB flush yields while it
 * waits for vCPUs) that records its results and notes in the operation's record. What
 * the host collected and copied is kept for the file's final expectations.
 */
/**
 * A confidential VM's VMM side: its guest_memfd RAM, VFIO's container and device, and the
 * oracle watching them; with a conversion design other than rdm, the design, which
 * converts instead of kvm_convert_memory (then `ram` only reads the RAM blocks' shared
 * bitmaps, which DesignConversion keeps in step, and `container` is null).
 */
export interface ConfidentialHost {
  ram: GuestMemfdRam | null;
  container: VfioContainer | null;
  dma: PassthroughDma | null;
  oracle: ConversionOracle;
  design: DesignConversion | null;
}

export class HostOperations {
  /** Guest frames userspace collected: harvested ring entries, dirty bits GET returned. */
  readonly collected = new Set<number>();
  /** The value each copied guest frame had when the host copied it. */
  readonly copies = new Map<number, number>();
  /** The bitmap the last KVM_GET_DIRTY_LOG returned, per slot (a CLEAR clears what GET got). */
  private readonly lastGot = new Map<number, Uint32Array>();
  private hostSeq = 0;
  /** KVM's VFIO device, created by the first vfio-file-add. */
  private kvmVfio: KvmVfio | null = null;
  private readonly harvester: DirtyRingHarvester | null;

  /** The operation running now (VFIO's error_report goes into its notes). */
  current: OpRecord | null = null;

  constructor(
    private readonly vm: Vm, private readonly vmm: VmmControl, private readonly exits: ExitHandler,
    private readonly bugs: Pick<InjectedBugs, 'harvestSkipEvery' | 'migration'>, private readonly cvm: ConfidentialHost | null = null,
  ) {
    this.harvester = vm.rings ? new DirtyRingHarvester(vm.rings.length, vm.acts) : null;
  }

  private slotsOf(index: number | null): Memslot[] {
    return index === null ? this.vm.memory.slots : [this.vm.memory.slots[index]!];
  }

  private page(gfn: number): { slot: Memslot; page: number } {
    const slot = this.vm.memory.findSlot(gfn)!;
    return { slot, page: gfn - slot.baseGfn };
  }

  /** A host operation as a step generator; results and notes go into its record. */
  *run(r: OpRecord): Steps<void> {
    this.current = r;
    try {
      yield* this.runOp(r);
    } finally {
      this.current = null;
    }
  }

  private *runOp(r: OpRecord): Steps<void> {
    const op = r.op.op as HostOp;
    const vm = this.vm;
    switch (op.kind) {
      case 'enable-logging':
        r.zapped = 0;
        for (const s of this.slotsOf(op.slot)) {
          const dma = vm.isDmaSlot(s);
          r.notes.push(`KVM_SET_USER_MEMORY_REGION: slot ${slotName(s)}${dma ? ' (KVM_MEM_DMA)' : ''} +KVM_MEM_LOG_DIRTY_PAGES (${vm.manualProtect && vm.tracking.kind === 'bitmap' && vm.tracking.initiallySet ? 'bitmap all set, nothing write-protected' : 'write-protects every page'})`);
          // dma_slot_logging refuse: EINVAL, which the op reports (and its `error` expectation takes) as any refused ioctl.
          const zapped = yield* vm.enableDirtyLogging(s);
          r.zapped += zapped;
          if (dma && zapped > 0) r.notes.push(`KVM_MEM_DMA, force-wb: KVM stops honouring the guest's PAT in the slot while it logs: the slot zapped, ${zapped} SPTE(s), faults rebuild them WB + IPAT`);
          if (dma && vm.slotHonoursPat(s)) r.notes.push('KVM_MEM_DMA: KVM still honours the guest\'s PAT in the slot while it logs (dma-slot-with-dirty-logging: nothing zapped)');
        }
        r.notes.push('done');
        return;
      case 'disable-logging':
        for (const s of this.slotsOf(op.slot)) vm.disableDirtyLogging(s);
        r.notes.push('logging off: every page writable again');
        return;
      case 'harvest': {
        const rings = op.vcpu === null ? vm.rings! : [vm.rings![op.vcpu]!];
        const got: HarvestedEntry[] = [];
        for (const ring of rings) {
          this.harvester!.harvest(ring, ring.entries, (slotField, offset) => {
            const slot = vm.memory.slotByField(slotField);
            const e: HarvestedEntry = { slotField, offset };
            if (slot !== undefined && offset < slot.pages) {
              e.slot = slot;
              e.gfn = slot.baseGfn + offset;
              this.collected.add(e.gfn);
            }
            got.push(e);
          }, this.bugs.harvestSkipEvery);
        }
        r.harvested = got;
        r.notes.push(`harvested ${got.length} entr${got.length === 1 ? 'y' : 'ies'}${got.length > 0 ? `: ${elide(got.map(entryText), 6).join(', ')}` : ''}`);
        return;
      }
      case 'reset': {
        r.notes.push('KVM_RESET_DIRTY_RINGS');
        r.reset = yield* vm.resetDirtyRings();
        r.notes.push(`reset ${r.reset} entr${r.reset === 1 ? 'y' : 'ies'}`);
        return;
      }
      case 'get-log': {
        const s = vm.memory.slots[op.slot]!;
        r.notes.push(`KVM_GET_DIRTY_LOG slot ${slotName(s)}`);
        const bits: Uint32Array = yield* vm.getDirtyLog(s);
        this.lastGot.set(op.slot, bits.slice());
        const dirty: number[] = [];
        for (let p = 0; p < s.pages; p++) if ((bits[p >>> 5]! >>> (p & 31)) & 1) dirty.push(s.baseGfn + p);
        for (const g of dirty) this.collected.add(g);
        r.dirty = dirty;
        r.notes.push(`dirty: ${gfnsText(dirty)}`);
        return;
      }
      case 'clear-log': {
        const s = vm.memory.slots[op.slot]!;
        // Bit i of the bitmap passed to KVM_CLEAR_DIRTY_LOG is page first + i.
        const n = op.first + op.num <= s.pages ? op.num : 0;
        const bitmap = new Uint32Array(Math.max(1, Math.ceil(n / 32)));
        if (op.allOnes) bitmap.fill(0xffffffff);
        else {
          const got = this.lastGot.get(op.slot)!;
          for (let i = 0; i < n; i++) {
            const p = op.first + i;
            if ((got[p >>> 5]! >>> (p & 31)) & 1) bitmap[i >>> 5]! |= 1 << (i & 31);
          }
        }
        r.notes.push(`KVM_CLEAR_DIRTY_LOG slot ${slotName(s)} first_page ${op.first} num_pages ${op.num} (${op.allOnes ? 'all ones' : 'the bitmap just got'})`);
        r.cleared = yield* vm.clearDirtyLog(s, op.first, op.num, bitmap);
        r.notes.push(`cleared ${r.cleared}`);
        return;
      }
      case 'write-guest': {
        const { slot, page } = this.page(op.gfn);
        r.notes.push(`kvm_write_guest ${hex(op.gfn)} = ${op.value} with no running vCPU`);
        vm.writeGuest(slot, page, op.value, { writer: HOST_WRITER_BASE, seq: ++this.hostSeq, iteration: 0 }, -1);
        return;
      }
      case 'copy': {
        const { slot, page } = this.page(op.gfn);
        r.value = slot.readU64(page);
        this.copies.set(op.gfn, r.value);
        r.notes.push(`copies ${hex(op.gfn)}: ${r.value}`);
        return;
      }
      case 'forge-entry': {
        const flags = op.flags === KVM_DIRTY_GFN_F_DIRTY ? 'DIRTY' : op.flags === KVM_DIRTY_GFN_F_RESET ? 'RESET' : `${op.flags}`;
        vm.rings![op.vcpu]!.forge(op.index, op.flags, op.slotField, op.offset);
        r.notes.push(`writes vcpu${op.vcpu}'s ring entry ${op.index}: flags ${flags}, slot ${op.slotField}, offset ${op.offset}`);
        return;
      }
      case 'reenter': {
        // kvm_vm_dead: every ioctl of the VM fails with EIO, KVM_RUN included (vm.bar's kill-vm).
        if (vm.bars[0]?.mmu.dead === true) throw new KvmError(EIO, 'KVM_RUN', `vcpu${op.vcpu}: the VM is dead (kvm_vm_dead): KVM_RUN fails with EIO`);
        const exit = this.exits.reenter(op.vcpu);
        r.notes.push(`KVM_RUN again for vcpu${op.vcpu}${exit >= 0 ? ` (after ${EXIT_REASON_NAMES[exit] ?? exit})` : ' (it was not in an exit)'}`);
        return;
      }
      case 'stop':
        this.vmm.requestStop(op.vcpu);
        r.notes.push(`asks vcpu${op.vcpu} to stop at its next operation boundary`);
        return;
      case 'release':
        this.vmm.release(op.vcpu);
        r.notes.push(`lets vcpu${op.vcpu} run again`);
        return;
      case 'register-noncoherent-dma':
      case 'unregister-noncoherent-dma': {
        const register = op.kind === 'register-noncoherent-dma';
        const count = Atomics.load(vm.global, GlobalWord.NONCOHERENT_DMA_COUNT);
        r.notes.push(`kvm_arch_${register ? '' : 'un'}register_noncoherent_dma: noncoherent_dma_count ${count} -> ${count + (register ? 1 : -1)}`);
        if (register) r.zapped = yield* vm.registerNoncoherentDma();
        else {
          const u = yield* vm.unregisterNoncoherentDma();
          if (!u.ok) throw new Error(u.error); // the loader refuses an unregister with nothing registered
          r.zapped = u.zapped;
        }
        // Only the 0 <-> 1 transitions change IPAT, so only they zap.
        const edge = count === (register ? 0 : 1);
        r.notes.push(!edge ? 'not the first or the last: no SPTE changes'
          : r.zapped === 0 ? 'no SPTE zapped: any SPTE present keeps the memory type it was built with'
            : `${r.zapped} SPTE(s) zapped: faults rebuild them ${register ? 'honouring the guest\'s PAT (no IPAT)' : 'with WB + IPAT'}`);
        return;
      }
      case 'vfio-file-add': {
        this.kvmVfio ??= new KvmVfio(vm, vm.bugs.noncoherentUnbalanced === true);
        const count = Atomics.load(vm.global, GlobalWord.NONCOHERENT_DMA_COUNT);
        r.zapped = yield* this.kvmVfio.fileAdd(op.coherent);
        const now = Atomics.load(vm.global, GlobalWord.NONCOHERENT_DMA_COUNT);
        r.notes.push(`KVM_DEV_VFIO_FILE_ADD of a ${op.coherent ? 'coherent' : 'non-coherent'} device; kvm_vfio_update_coherency: noncoherent_dma_count ${count} -> ${now}${r.zapped > 0 ? `, ${r.zapped} SPTE(s) zapped` : ''}`);
        return;
      }
      case 'clflush':
      case 'wbinvd': {
        const cache = vm.cache!;
        const before = cache.stat(CacheStat.WRITEBACKS);
        if (op.kind === 'clflush') {
          const { slot, page } = this.page(op.gfn);
          r.notes.push(`CLFLUSH of every line of ${hex(op.gfn)}: ${cache.clflushPage(slot.firstPage + page)} were cached`);
        } else {
          cache.wbinvd();
          r.notes.push('WBINVD: every line invalidated');
        }
        r.writtenBack = cache.stat(CacheStat.WRITEBACKS) - before;
        r.notes.push(`${r.writtenBack} dirty line(s) written back to memory`);
        return;
      }
      case 'migration-read': {
        const { slot, page } = this.page(op.gfn);
        const m = migrationRead(vm, slot, page, op.flushFirst, this.bugs.migration.noncoherentWithoutFlush === true);
        r.value = m.value;
        this.copies.set(op.gfn, r.value);
        const flush = m.flush === 'flush' ? 'flushed from the cache first (clflush-before-read), then read'
          : m.flush === 'skipped' ? 'NOT flushed first (the flush was skipped), read'
            : op.flushFirst ? 'no non-coherent DMA registered, no KVM_MEM_DMA slot: not flushed, read' : 'read';
        r.notes.push(`the migration thread's copy of ${hex(op.gfn)}: ${flush} write-back: ${r.value}`);
        return;
      }
      case 'bar-grant':
      case 'bar-revoke':
      case 'bar-decode':
        yield* this.bar(r, op, vm.bars[0]!);
        return;
      default:
        yield* this.confidential(r, op);
    }
  }

  /**
   * vm.bar: the vendor driver's grants and revocations, and memory decode. Taking a
   * resource back from vm0 is reclaimResource, step by step as the kernel runs it
   * (validate refuses the slice; unmap_mapping_range: the MMU notifier's
   * invalidate_range_start zaps KVM's SPTEs and flushes, the VMA's entries go one per
   * step, invalidate_range_end; then the free), so that the interleaving can put vCPU
   * steps in between. Another VM sharing the device is not run here: nothing of it is
   * mapped, and its slice is freed at once.
   */
  private *bar(r: OpRecord, op: Extract<HostOp, { kind: 'bar-grant' | 'bar-revoke' | 'bar-decode' }>, bar: VmBar): Steps<void> {
    const { driver, mapping, mmu } = bar;
    const pages = (first: number, n: number): string => (n === 1 ? `${first}` : `${first}..${first + n - 1}`);
    const zappedBefore = mmu.stat(BarMmuWord.ZAPPED);
    /**
     * Runs unmap_mapping_range's (or the reclaim's) steps, saying after each what it did:
     * the notifier's start (KVM's begin and zap), the VMA's entries going, its end, the
     * free; and counts the entries removed and the SPTEs zapped.
     */
    const inv = this.vm.mmuInvalidate;
    const removed = function* (body: Steps<unknown>, first: number, n: number, slice: { vm: number; r: number } | null): Steps<void> {
      const present = (): boolean[] => Array.from({ length: n }, (_, i) => mapping.pte(first + i) !== null);
      const before = present();
      let was = before;
      let zapped = mmu.stat(BarMmuWord.ZAPPED);
      let inProgress = inv.inProgress();
      let freed = false;
      /** invalidate_range_start zapped SPTEs: the flush runs until every vCPU in guest mode acknowledged it. */
      let flushing = false;
      const it = body[Symbol.iterator]();
      for (;;) {
        const x = it.next();
        const z = mmu.stat(BarMmuWord.ZAPPED);
        const now = present();
        const p = inv.inProgress();
        const notes = r.notes.length;
        if (p > inProgress) {
          r.notes.push(`invalidate_range_start: KVM's mmu_invalidate_begin over GFNs ${hex(mmu.baseGfn + first)}..${hex(mmu.baseGfn + first + n - 1)}, ${z - zapped} SPTE(s) zapped`);
          flushing = z > zapped;
        }
        const gone = now.flatMap((on, i) => (was[i] && !on ? [first + i] : []));
        if (gone.length > 0) r.notes.push(`zap_pte_range: the VMA's entr${gone.length === 1 ? 'y' : 'ies'} of BAR page ${gone.join(', ')} removed`);
        if (p < inProgress) r.notes.push('invalidate_range_end: mmu_invalidate_seq moves on; faults may install again');
        if (slice !== null && !freed && driver.sliceOf(slice.vm, slice.r) === null) { freed = true; r.notes.push('the slice is freed: another VM may be given it'); }
        if (r.notes.length === notes && p > 0 && x.value === undefined && !x.done) {
          // A step that changed nothing one can see: the flush ended, or zap_pte_range found no entry.
          r.notes.push(flushing ? 'the TLB flush is complete; the VMA\'s entries are still there' : 'zap_pte_range: no entry at the next BAR page');
          flushing = false;
        }
        [was, zapped, inProgress] = [now, z, p];
        if (x.done) break;
        yield x.value;
      }
      r.unmapped = before.filter((on, i) => on && !was[i]).length;
      r.zapped = mmu.stat(BarMmuWord.ZAPPED) - zappedBefore;
    };
    if (op.kind === 'bar-decode') {
      if (op.on) {
        mapping.enableMemoryDecode();
        r.notes.push('memory decode on: faults are validated again (nothing is mapped until one)');
        return;
      }
      r.notes.push(`memory decode off (a reset): vfio_pci_zap_bars: faults refused from now on, unmap_mapping_range over the whole BAR (pages ${pages(0, mapping.barPages)})`);
      yield* removed(mapping.disableMemoryDecode(), 0, mapping.barPages, null);
      r.notes.push(`done: ${r.unmapped} VMA entr${r.unmapped === 1 ? 'y' : 'ies'} removed, ${r.zapped} SPTE(s) zapped`);
      return;
    }
    const res = driver.resources[op.resource]!;
    const held = driver.sliceOf(op.vm, op.resource);
    if (op.kind === 'bar-grant') {
      const s = driver.allocate(op.vm, op.resource, op.pages);
      if (s === null) {
        if (held !== null) throw new KvmError(EEXIST, 'the vendor driver\'s grant', `vm${op.vm} holds ${res.name} already (pfns ${pages(held.pfn, held.pages)})`);
        throw new KvmError(ENOSPC, 'the vendor driver\'s grant', `no ${op.pages} contiguous free MMIO pages (the largest run is ${driver.largestFree()})`);
      }
      r.pfn = s.pfn;
      const one = s.pages === 1;
      r.notes.push(`the vendor driver gives vm${op.vm} ${op.pages} page${one ? '' : 's'} of ${res.name}: pfn${one ? '' : 's'} ${pages(s.pfn, s.pages)} behind BAR page${one ? '' : 's'} ${pages(res.barOffset, s.pages)}${res.writable ? '' : ' (read-only)'}; validate_map_request maps ${one ? 'it' : 'them'} from now on`);
      return;
    }
    if (held === null) throw new KvmError(ENOENT, 'the vendor driver\'s revocation', `vm${op.vm} does not hold ${res.name}`);
    if (op.vm !== 0) {
      driver.beginReclaim(op.vm, op.resource);
      driver.free(op.vm, op.resource);
      r.unmapped = 0;
      r.zapped = 0;
      r.notes.push(`the vendor driver takes ${res.name} back from vm${op.vm} (not run here: nothing of it mapped): pfns ${pages(held.pfn, held.pages)} freed`);
      return;
    }
    r.notes.push(`the vendor driver takes ${res.name} back from vm0 (pfns ${pages(held.pfn, held.pages)}): validate_map_request refuses it from now on; unmap_mapping_range over BAR pages ${pages(res.barOffset, res.maxPages)}`);
    yield* removed(reclaimResource(driver, mapping, op.resource), res.barOffset, res.maxPages, { vm: 0, r: op.resource });
    r.notes.push(`done: ${r.unmapped} VMA entr${r.unmapped === 1 ? 'y' : 'ies'} removed, ${r.zapped} SPTE(s) zapped, pfns ${pages(held.pfn, held.pages)} freed`);
  }


  /** The operations on private memory, VFIO and the assigned device. */
  private *confidential(r: OpRecord, op: HostOp): Steps<void> {
    const vm = this.vm;
    const cvm = this.cvm!;
    const range = (gfn: number, count: number) => `${hex(gfn)}..${hex(gfn + count - 1)}`;
    switch (op.kind) {
      case 'set-attributes':
        r.notes.push(`KVM_SET_MEMORY_ATTRIBUTES ${range(op.gfn, op.count)} ${op.private ? 'PRIVATE' : '0 (shared)'}`);
        yield* vm.setMemoryAttributes({ address: op.gfn * PAGE_SIZE, size: op.count * PAGE_SIZE, attributes: op.private ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0 });
        r.notes.push('done');
        return;
      case 'convert': {
        const [gpa, size] = [op.gfn * PAGE_SIZE, op.count * PAGE_SIZE];
        const design = cvm.design;
        r.notes.push(`${design === null ? 'kvm_convert_memory' : `the ${design.design.name} design converts`} ${range(op.gfn, op.count)} to ${op.private ? 'private' : 'shared'}`);
        const mapped = (): number => vm.iommu?.stats().pagesMapped ?? 0;
        const before = mapped();
        const c = design === null ? yield* kvmConvertMemory(cvm.ram!, gpa, size, op.private) : yield* design.convert(gpa, size, op.private);
        if (c.ret < 0) throw new KvmError(-c.ret, 'kvm_convert_memory', c.error || `ret ${c.ret}`);
        r.notes.push(vm.iommu === null ? 'converted' : `converted; IOVA pages mapped: ${before} -> ${mapped()}`);
        cvm.oracle.converted(cvm.ram!, gpa, size);
        return;
      }
      case 'punch-hole': {
        const slot = vm.memory.findSlot(op.gfn)!;
        const page = op.gfn - slot.baseGfn;
        r.notes.push(`fallocate(PUNCH_HOLE) on slot ${slotName(slot)}'s guest_memfd, ${range(op.gfn, op.count)}`);
        yield* kvmGmemFallocate(vm, slot, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, page * PAGE_SIZE, op.count * PAGE_SIZE);
        cvm.oracle.gmemPunched(slot, page, op.count);
        r.notes.push('punched');
        return;
      }
      case 'vfio-register': {
        const slot = vm.memory.slots[op.slot]!;
        r.notes.push(`vfio_ram_discard_register_listener for slot ${slotName(slot)} (the replay maps what is shared)`);
        const before = vm.iommu!.stats().entries;
        const reg = yield* vfioRamDiscardRegisterListener(cvm.container!, cvm.ram!.rdmOf(slot)!, wholeSection(slot));
        if (!reg.ok) throw new KvmError(-reg.ret, 'vfio_ram_discard_register_listener', reg.error);
        r.notes.push(`registered; ${vm.iommu!.stats().entries - before} mapping(s) made`);
        return;
      }
      case 'dma':
      case 'dma-read': {
        const a = op.kind === 'dma' ? cvm.dma!.write(op.iova, op.value, op.snoop) : cvm.dma!.read(op.iova, op.snoop);
        const noSnoop = op.snoop ? '' : ' with No Snoop';
        if ('fault' in a) {
          r.faulted = true;
          r.notes.push(`device DMA ${op.kind === 'dma' ? 'write' : 'read'}${noSnoop} at IOVA page ${hex(op.iova)}: IOMMU fault (${a.fault})`);
          return;
        }
        r.faulted = false;
        if (op.kind === 'dma') cvm.oracle.dmaWrite(a.gfn);
        else r.value = a.value;
        const how = vm.cache === null ? '' : op.snoop ? ' (snooped: the cached line, if any)' : ' (memory only, the cache not looked at)';
        r.notes.push(`device DMA${noSnoop} ${op.kind === 'dma' ? `writes ${a.value} to` : `reads ${a.value} from`} IOVA page ${hex(op.iova)} -> GFN ${hex(a.gfn)}${how}`);
        return;
      }
      case 'serve-exits': {
        const mf = this.exits.memoryFault();
        const hc = this.exits.hypercall();
        if (mf !== null) r.notes.push(`vcpu${mf.vcpu}: KVM_EXIT_MEMORY_FAULT at ${hex(mf.gpa)} (${mf.flags !== 0 ? 'private' : 'shared'} access)`);
        if (hc !== null) r.notes.push(`vcpu${hc.vcpu}: KVM_EXIT_HYPERCALL KVM_HC_MAP_GPA_RANGE ${hex(hc.args[0])}+${hc.args[1]} pages`);
        const converter = cvm.design ?? cvm.ram!;
        const failed = (yield* this.exits.serviceHypercalls(converter)) ?? (yield* this.exits.serviceMemoryFaults(converter));
        if (failed !== null) throw new KvmError(EFAULT, 'kvm_cpu_exec', `vcpu${failed.vcpu}: ${failed.error} (QEMU stops the VM)`);
        r.notes.push(mf === null && hc === null ? 'no exit to serve' : 'converted, KVM_RUN again');
        return;
      }
      default:
        throw new Error(`litmus: host operation '${op.kind}' has no implementation`);
    }
  }
}
