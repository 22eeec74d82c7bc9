import type { PageBitmap } from '../dirty-bitmap.ts';
import type { Memslot } from '../memslot.ts';
import { slotLogsDirtyPages } from '../layout.ts';
import type { Vm } from '../vm.ts';
import { Acted } from '../injections.ts';
import type { Steps } from '../../roles/role.ts';
import type { DirtySource, SourceTally } from './dirty-source.ts';

export const KVM_DIRTY_BITMAP = 'KVM_GET_DIRTY_LOG';

/**
 * KVM's dirty bitmap, the legacy way (QEMU's kvm_physical_sync_dirty_bitmap without
 * manual protect): KVM_GET_DIRTY_LOG per slot, which snapshots and clears the bitmap,
 * write-protects the pages it returns and flushes remote TLBs.
 */
export class KvmBitmapSource implements DirtySource {
  readonly name: string = KVM_DIRTY_BITMAP;
  readonly dma = false;
  protected readonly scratch: Uint32Array[];

  constructor(readonly vm: Vm) {
    this.scratch = vm.memory.slots.map((s) => new Uint32Array(s.dirtyBitmap.length));
  }

  *start(): Steps {
    for (const slot of this.vm.memory.slots) yield* this.vm.enableDirtyLogging(slot);
  }

  *sync(into: PageBitmap, _final: boolean, tally?: SourceTally): Steps<number> {
    const before = into.count();
    for (const slot of this.vm.memory.slots) {
      // Only slots that log (QEMU's kvm_physical_sync_dirty_bitmap skips the others; KVM would say ENOENT).
      if (!slotLogsDirtyPages(this.vm.flags(slot))) continue;
      const bitmap: Uint32Array = yield* this.vm.getDirtyLog(slot, this.scratch[slot.index]);
      yield* this.afterGet(slot, bitmap);
      into.orWords(bitmap, slot.firstPage);
    }
    const found = into.count() - before;
    tally?.(KVM_DIRTY_BITMAP, found);
    return found;
  }

  /** What follows a slot's GET (manual protect: the CLEAR). */
  protected *afterGet(_slot: Memslot, _bitmap: Uint32Array): Steps {}

  /** Logging off (QEMU's log_global_stop: KVM_MEM_LOG_DIRTY_PAGES cleared on every slot). */
  stop(): void {
    for (const slot of this.vm.memory.slots) this.vm.disableDirtyLogging(slot);
  }
}

export interface KvmClearLogSourceOptions {
  /** CLEAR each 64-page chunk just before it is copied (QEMU), instead of the whole slot after each GET (the selftests). */
  perChunk: boolean;
  /** copy-before-clear: a chunk's CLEAR comes only after its pages were copied. */
  clearAfterCopy?: boolean;
}

/** A 64-page CLEAR range: its slot-relative first page, length, and the bits to clear. */
export interface ClearChunk { slot: Memslot; first: number; num: number; bits: Uint32Array }

/** The 64-page chunk holding `page` (slot-relative), with the bits `dirty` (VM-wide) has set there now. */
export function chunkOf(slot: Memslot, page: number, dirty: PageBitmap): ClearChunk {
  const first = page - (page % 64);
  const g = slot.firstPage + first; // 64-aligned in the VM-wide numbering
  return { slot, first, num: Math.min(64, slot.pages - first), bits: new Uint32Array([dirty.words[g >>> 5]!, dirty.words[(g >>> 5) + 1] ?? 0]) };
}

/**
 * KVM's dirty bitmap under manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
 * KVM_GET_DIRTY_LOG only copies the bitmap; KVM_CLEAR_DIRTY_LOG clears bits and
 * re-protects those pages, either for the whole slot right after the GET (the
 * selftests' collector), or per 64-page chunk just before the chunk is copied (QEMU's
 * migration_clear_memory_region_dirty_bitmap, log_clear).
 */
export class KvmClearLogSource extends KvmBitmapSource {
  /** copy-before-clear: the chunk whose CLEAR waits until its pages were copied. */
  private uncleared: ClearChunk | null = null;

  constructor(vm: Vm, private readonly o: KvmClearLogSourceOptions) {
    super(vm);
  }

  protected override *afterGet(slot: Memslot, bitmap: Uint32Array): Steps {
    if (!this.o.perChunk) yield* this.vm.clearDirtyLog(slot, 0, slot.pages, bitmap);
  }

  *beforeCopy(slot: Memslot, page: number, dirty: PageBitmap): Steps {
    if (!this.o.perChunk) return;
    if (this.o.clearAfterCopy) {
      // The bug: the previous chunk was copied first; its CLEAR (the bits that pass sends) comes now.
      yield* this.clearUncleared();
      this.uncleared = chunkOf(slot, page, dirty);
      return;
    }
    const c = chunkOf(slot, page, dirty);
    yield* this.vm.clearDirtyLog(c.slot, c.first, c.num, c.bits);
  }

  *afterSlot(): Steps {
    yield* this.clearUncleared();
  }

  private *clearUncleared(): Steps {
    const c = this.uncleared;
    if (c === null) return;
    this.uncleared = null;
    if ((yield* this.vm.clearDirtyLog(c.slot, c.first, c.num, c.bits)) > 0) this.vm.acts.acted(Acted.COPY_BEFORE_CLEAR);
  }
}
