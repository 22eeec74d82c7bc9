import { EINVAL, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE } from '../constants.ts';
import { kvmGmemFallocate } from '../guest-memfd.ts';
import type { Memslot } from '../memslot.ts';
import { SPTE_WRITABLE } from '../spte.ts';
import type { Vm } from '../vm.ts';
import { RamBlockAttributes } from './ram-block-attributes.ts';
import { Acted, ConversionInjection } from './conversion-bugs.ts';
import type { Steps } from '../../roles/role.ts';
import { KvmError, errnoName } from '../../util/errors.ts';
import { hex } from '../../util/hex.ts';

/** What a conversion returned: 0, or -errno with what QEMU would have printed (error_report), or '' where it prints nothing. */
export interface ConvertResult { ret: number; error: string }

const OK: ConvertResult = Object.freeze({ ret: 0, error: '' });

/**
 * The VMM's guest_memfd RAM: each such memslot's RAM block with its RamBlockAttributes,
 * the RamDiscardManager VFIO listens to (QEMU creates one per guest_memfd RAM block).
 */
export class GuestMemfdRam {
  private readonly rdms = new Map<Memslot, RamBlockAttributes>();
  /** Who watches the conversions' discards (the private memory oracle), as a tracepoint would. */
  private readonly observers: ConversionObserver[] = [];

  constructor(readonly vm: Vm, readonly injection: ConversionInjection = ConversionInjection.NONE) {
    for (const slot of vm.memory.slots) if (slot.gmem !== null) this.rdms.set(slot, new RamBlockAttributes(slot, injection));
  }

  /** Adds an observer; returns the function that removes it. */
  observe(o: ConversionObserver): () => void {
    this.observers.push(o);
    return () => { const i = this.observers.indexOf(o); if (i >= 0) this.observers.splice(i, 1); };
  }

  /** Tells every observer (no observer: nothing is done). */
  notify(f: (o: ConversionObserver) => void): void {
    for (const o of this.observers) f(o);
  }

  rdmOf(slot: Memslot): RamBlockAttributes | undefined {
    return this.rdms.get(slot);
  }

  get blocks(): ReadonlyMap<Memslot, RamBlockAttributes> { return this.rdms; }

  /**
   * kvm_set_phys_mem for a guest_memfd region: its memory starts private in KVM
   * (KVM_SET_MEMORY_ATTRIBUTES over the whole slot), as RamBlockAttributes starts all
   * discarded.
   */
  *setupPrivate(): Steps {
    for (const slot of this.rdms.keys()) {
      yield* this.vm.setMemoryAttributes({ address: slot.baseGfn * PAGE_SIZE, size: slot.pages * PAGE_SIZE, attributes: KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0 });
    }
  }
}

/** What a conversion shows an observer, at the points where the order matters. */
export interface ConversionObserver {
  /** kvm_convert_memory starts on pages [page, page + count) of `slot`. */
  converting(slot: Memslot, page: number, count: number, toPrivate: boolean): void;
  /** The shared memory of those pages was discarded (ram_block_discard_range returned). */
  sharedDiscarded(slot: Memslot, page: number, count: number): void;
  /** The guest_memfd pages were punched (fallocate PUNCH_HOLE returned). */
  gmemPunched(slot: Memslot, page: number, count: number): void;
}

/**
 * ram_block_discard_range on shared memory (madvise(MADV_DONTNEED) or a hole in its
 * memfd): the kernel's MMU notifier reaches KVM first (invalidate_range_start: begin,
 * zap the shared SPTEs, flush), then the pages go (they read back as zeros), then
 * invalidate_range_end.
 */
export function* ramBlockDiscardRange(vm: Vm, slot: Memslot, page: number, count: number): Steps {
  const start = slot.baseGfn + page;
  yield* vm.invalidateGfnRange(start, start + count, SPTE_WRITABLE);
  slot.zeroPages(page, count);
  yield undefined;
  vm.mmuInvalidate.end();
}

/** The memslot run a conversion acts on, or the result it ends with at once. */
export type ConversionTarget = { slot: Memslot; page: number; pages: number } | { result: ConvertResult };

/**
 * kvm_convert_memory's first checks (accel/kvm/kvm-all.c), shared by every design: an
 * unaligned or empty range is -EINVAL (printed by nobody); memory_region_find at `start`,
 * the range clipped to its region; a range outside every region is ignored to shared
 * (TDX guests share vMMIO) and -EINVAL to private; memory without guest_memfd is refused.
 */
export function conversionTarget(vm: Vm, start: number, size: number, toPrivate: boolean): ConversionTarget {
  if (start % PAGE_SIZE !== 0 || size % PAGE_SIZE !== 0 || size <= 0) return { result: { ret: -EINVAL, error: '' } };
  const slot = vm.memory.findSlot(start / PAGE_SIZE);
  if (slot === undefined) return { result: toPrivate ? { ret: -EINVAL, error: '' } : OK };
  if (slot.gmem === null) {
    return { result: { ret: -EINVAL, error: `Convert non guest_memfd backed memory region (${hex(start)} ,+ ${hex(size)}) to ${toPrivate ? 'private' : 'shared'}` } };
  }
  const page = start / PAGE_SIZE - slot.baseGfn;
  return { slot, page, pages: Math.min(size / PAGE_SIZE, slot.pages - page) };
}

/** QEMU's kvm_set_memory_attributes: KVM_SET_MEMORY_ATTRIBUTES over `pages` pages from `start`, a failure worded as QEMU prints it. */
export function* kvmSetMemoryAttributes(vm: Vm, start: number, pages: number, attributes: number): Steps<ConvertResult> {
  try {
    yield* vm.setMemoryAttributes({ address: start, size: pages * PAGE_SIZE, attributes, flags: 0 });
  } catch (e) {
    if (!(e instanceof KvmError)) throw e;
    return { ret: -e.errno, error: `failed to set memory (${hex(start)}+${hex(pages * PAGE_SIZE)}) with attr ${hex(attributes)} error '${errnoName(e.errno)}'` };
  }
  return OK;
}

/**
 * QEMU's kvm_convert_memory (accel/kvm/kvm-all.c), in its order: KVM_SET_MEMORY_ATTRIBUTES;
 * then ram_block_attributes_state_change, which tells the RamDiscardManager's listeners
 * (VFIO maps what becomes shared, unmaps what becomes private); then the backing no
 * longer used is discarded (to private: the shared memory; to shared: a hole in
 * guest_memfd). Any failure returns at once with what is done left done, as QEMU does;
 * the caller (kvm_cpu_exec) stops the VM.
 */
export function* kvmConvertMemory(ram: GuestMemfdRam, start: number, size: number, toPrivate: boolean): Steps<ConvertResult> {
  const vm = ram.vm;
  const to = toPrivate ? 'private' : 'shared';
  const t = conversionTarget(vm, start, size, toPrivate);
  if ('result' in t) return t.result;
  const { slot, page, pages } = t;
  const rdm = ram.rdmOf(slot)!; // every guest_memfd slot has one
  const attributes = toPrivate ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0;
  const bugs = ram.injection.bugs;
  ram.notify((o) => o.converting(slot, page, pages, toPrivate));
  const setAttributes = function* (): Steps<ConvertResult | null> {
    const r = yield* kvmSetMemoryAttributes(vm, start, pages, attributes);
    return r.ret === 0 ? null : r;
  };
  const stateChange = function* (): Steps<ConvertResult | null> {
    const changed = yield* rdm.stateChange(page * PAGE_SIZE, pages * PAGE_SIZE, toPrivate);
    if (changed.ret === 0) return null;
    return { ret: changed.ret, error: `Failed to notify the listener the state change of (${hex(start)} + ${hex(size)}) to ${to}: ${changed.detail}` };
  };
  const discard = function* (): Steps {
    if (toPrivate) {
      yield* ramBlockDiscardRange(vm, slot, page, pages);
      ram.notify((o) => o.sharedDiscarded(slot, page, pages));
    } else {
      yield* kvmGmemFallocate(vm, slot, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, page * PAGE_SIZE, pages * PAGE_SIZE);
      ram.notify((o) => o.gmemPunched(slot, page, pages));
    }
  };
  const listening = rdm.listeners.length > 0;
  if (!toPrivate && bugs.mapBeforeShared) {
    // map-before-shared: the listeners map the range while KVM still says private.
    if (listening && !rdm.isPopulated(page * PAGE_SIZE, pages * PAGE_SIZE)) ram.injection.acted(Acted.MAP_BEFORE_SHARED);
    const failed = (yield* stateChange()) ?? (yield* setAttributes());
    if (failed !== null) return failed;
    yield* discard();
    return OK;
  }
  const failed = yield* setAttributes();
  if (failed !== null) return failed;
  if (toPrivate && bugs.discardBeforeUnmap) {
    // discard-before-unmap: the shared memory goes while VFIO still maps it; a DMA meanwhile writes freed memory.
    if (listening && !rdm.isDiscarded(page * PAGE_SIZE, pages * PAGE_SIZE)) ram.injection.acted(Acted.DISCARD_BEFORE_UNMAP);
    yield* discard();
    return (yield* stateChange()) ?? OK;
  }
  const changed = yield* stateChange();
  if (changed !== null) return changed;
  yield* discard();
  return OK;
}
