import { EINVAL, PAGE_SIZE } from '../constants.ts';
import { PageBitmap } from '../dirty-bitmap.ts';
import { Acted, ConversionInjection } from './conversion-bugs.ts';
import type { Steps } from '../../roles/role.ts';
import { errnoName } from '../../util/errors.ts';
import { hex } from '../../util/hex.ts';

/**
 * QEMU's MemoryRegionSection as a RamDiscardManager hands it out: a byte range of one RAM
 * block and the guest physical address its first byte has.
 */
export interface RamSection {
  /** Bytes from the start of the RAM block (offset_within_region). */
  offsetWithinRegion: number;
  size: number;
  /** The GPA of offsetWithinRegion (offset_within_address_space). */
  offsetWithinAddressSpace: number;
  /** A read-only region (a ROM): VFIO maps it without write permission. */
  readonly?: boolean;
}

/** What a notification or replay returned: 0, or -errno with the reason (QEMU prints it with error_report). */
export interface RamDiscardResult { ret: number; detail: string }

export const RDM_OK: RamDiscardResult = Object.freeze({ ret: 0, detail: '' });

/** QEMU's RamDiscardListener (include/system/memory.h). */
export interface RamDiscardListener {
  /** Discarded memory is about to be populated; a listener may object with -errno. */
  notifyPopulate(section: RamSection): Steps<RamDiscardResult>;
  /** Populated memory was discarded: drop every reference to it (VFIO: unmap). */
  notifyDiscard(section: RamSection): Steps;
  /** Accepts notify_discard over ranges that are partly discarded already (VFIO does). */
  readonly doubleDiscardSupported: boolean;
}

/** ReplayRamDiscardState: called per populated (or discarded) run; a non-zero ret stops the replay. */
export type ReplayRamDiscardState = (section: RamSection) => Steps<RamDiscardResult>;

/** The guest RAM a RamBlockAttributes tracks: a memslot's frames (Memslot fits). */
export interface RamBlock {
  readonly baseGfn: number;
  readonly pages: number;
  /** Where the bitmap lives when the VMM's threads share it (Memslot.rdmBitmap); else private to this object. */
  readonly rdmBitmap?: Uint32Array | null;
}

/** QEMU's MemoryRegionSection for all of a RAM block, at the GPA where its memslot puts it. */
export function wholeSection(block: RamBlock): RamSection {
  return { offsetWithinRegion: 0, size: block.pages * PAGE_SIZE, offsetWithinAddressSpace: block.baseGfn * PAGE_SIZE };
}

/** memory_region_section_intersect_range: the part of `s` inside [offset, offset + size), or null. */
export function intersectSection(s: RamSection, offset: number, size: number): RamSection | null {
  const start = Math.max(s.offsetWithinRegion, offset);
  const end = Math.min(s.offsetWithinRegion + s.size, offset + size);
  if (end <= start) return null;
  return { ...s, offsetWithinRegion: start, size: end - start, offsetWithinAddressSpace: s.offsetWithinAddressSpace + (start - s.offsetWithinRegion) };
}

/**
 * QEMU's RamBlockAttributes (system/ram-block-attributes.c, QOM "ram-block-attributes"):
 * the RamDiscardManager of a guest_memfd RAM block. One bit per 4 KiB block, 1 =
 * populated = shared, 0 = discarded = private; all private at creation. Conversions
 * (kvm_convert_memory) call stateChange after KVM_SET_MEMORY_ATTRIBUTES, and VFIO's
 * listener maps and unmaps what they populate and discard.
 *
 * Listeners are kept newest first (QLIST_INSERT_HEAD) and notified in that order.
 */
export class RamBlockAttributes {
  /** ram_block_attributes_get_block_size: the host page size, the smallest unit a conversion can have. */
  static readonly BLOCK_SIZE = PAGE_SIZE;
  /** bitmap_size. */
  readonly blocks: number;
  /** The region's size in bytes (memory_region_size). */
  readonly size: number;
  private readonly bitmap: PageBitmap;
  /** rdl_list, newest first, each with its registered section (rdl->section). */
  private readonly rdlList: { rdl: RamDiscardListener; section: RamSection }[] = [];

  constructor(readonly block: RamBlock, readonly injection: ConversionInjection = ConversionInjection.NONE) {
    this.blocks = block.pages;
    this.size = block.pages * RamBlockAttributes.BLOCK_SIZE;
    this.bitmap = new PageBitmap(this.blocks, block.rdmBitmap ?? undefined);
  }

  /** ram_block_attributes_rdm_get_min_granularity. */
  minGranularity(): number { return RamBlockAttributes.BLOCK_SIZE; }

  /** The listeners registered, in the order they are notified (newest first). */
  get listeners(): readonly RamDiscardListener[] { return this.rdlList.map((e) => e.rdl); }

  /**
   * ram_block_attributes_rdm_is_populated: every block of the range is shared. Like QEMU,
   * the range is taken in whole blocks from the one holding `offset`.
   */
  isPopulated(offset: number, size: number): boolean {
    return this.allBlocks(offset, size, true, 'isPopulated');
  }

  /** Every block of the range is discarded (private): nothing in it is populated. */
  isDiscarded(offset: number, size: number): boolean {
    return this.allBlocks(offset, size, false, 'isDiscarded');
  }

  /** Every block of the range (whole blocks from the one holding `offset`) is populated, or every one discarded. */
  private allBlocks(offset: number, size: number, populated: boolean, what: string): boolean {
    this.checkInside(offset, size, what);
    const bs = RamBlockAttributes.BLOCK_SIZE;
    const first = Math.floor(offset / bs);
    const last = first + Math.floor(size / bs) - 1;
    return this.findNext(first, last + 1, !populated) > last;
  }

  /** Blocks populated (shared) now. */
  populatedBlocks(): number {
    return this.bitmap.count();
  }

  /**
   * ram_block_attributes_state_change: `toPrivate` is QEMU's to_discard. Returns 0, or
   * -EINVAL for an invalid range (ram_block_attributes_is_valid_range: unaligned, empty,
   * wrapping, past the block's end), or the first error a listener's populate returned.
   *
   * - A range entirely in the wanted state: nothing. Entirely in the other state: all its
   *   bits at once, then one notification of the whole range per listener.
   * - A mixture: block by block, skipping the blocks already converted, one notification
   *   per block.
   * - To shared, the bits are set before the listeners hear of them, and a listener's
   *   error stops everything with the bits left set: QEMU does not roll the bitmap back
   *   (nor the listeners already notified), so after a failed populate the bitmap says
   *   shared where the failing listener mapped nothing.
   */
  *stateChange(offset: number, size: number, toPrivate: boolean): Steps<RamDiscardResult> {
    const invalid = this.invalidRange(offset, size);
    if (invalid !== null) return { ret: -EINVAL, detail: `ram_block_attributes_state_change: EINVAL: invalid range: offset ${hex(offset)}, size ${hex(size)} (${invalid})` };
    const bs = RamBlockAttributes.BLOCK_SIZE;
    const first = offset / bs;
    const nbits = size / bs;
    const last = first + nbits - 1;
    const isDiscarded = this.findNext(first, this.blocks, true) > last;
    const isPopulated = this.findNext(first, this.blocks, false) > last;
    if (toPrivate) {
      if (isDiscarded) return RDM_OK;
      if (isPopulated) {
        // rdm-bitmap-drift: the bits stay set, so the bitmap says shared where KVM says private.
        if (this.injection.bugs.rdmBitmapDrift) this.injection.acted(Acted.RDM_BITMAP_DRIFT, nbits);
        else this.fill(first, nbits, false);
        yield* this.notifyDiscard(offset, size);
        return RDM_OK;
      }
      for (let bit = first; bit <= last; bit++) {
        if (!this.bitmap.isDirty(bit)) continue;
        this.fill(bit, 1, false);
        yield* this.notifyDiscard(bit * bs, bs);
      }
      return RDM_OK;
    }
    if (isPopulated) return RDM_OK;
    if (isDiscarded) {
      this.fill(first, nbits, true);
      return yield* this.notifyPopulate(offset, size);
    }
    for (let bit = first; bit <= last; bit++) {
      if (this.bitmap.isDirty(bit)) continue;
      this.fill(bit, 1, true);
      const r = yield* this.notifyPopulate(bit * bs, bs);
      if (r.ret !== 0) return r;
    }
    return RDM_OK;
  }

  /**
   * ram_block_attributes_rdm_register_listener: adds the listener (first in the list) and
   * replays the populated runs of its section to it, so a device that arrives late (a
   * hot-plug) maps what is shared already. QEMU exits when a replayed populate fails
   * ("Failed to register RAM discard listener"); here the error is returned with the
   * listener still registered, and the caller decides (VFIO's registration unregisters).
   */
  *registerListener(rdl: RamDiscardListener, section: RamSection): Steps<RamDiscardResult> {
    this.checkInside(section.offsetWithinRegion, section.size, 'registerListener');
    if (this.rdlList.some((e) => e.rdl === rdl)) throw new Error('RamBlockAttributes.registerListener: the listener is registered already');
    const copy = { ...section };
    this.rdlList.unshift({ rdl, section: copy });
    const r = yield* this.forEachRun(copy, true, (s) => rdl.notifyPopulate(s));
    if (r.ret !== 0) return { ret: r.ret, detail: `ram_block_attributes_rdm_register_listener: Failed to register RAM discard listener: ${r.detail}` };
    return RDM_OK;
  }

  /**
   * ram_block_attributes_rdm_unregister_listener: the listener drops what it holds first,
   * then leaves the list. One discard of its whole section when it accepts double
   * discards (VFIO: one unmap); otherwise one per populated run.
   */
  *unregisterListener(rdl: RamDiscardListener): Steps {
    const i = this.rdlList.findIndex((e) => e.rdl === rdl);
    if (i < 0) throw new Error('RamBlockAttributes.unregisterListener: the listener is not registered');
    const section = this.rdlList[i]!.section;
    if (rdl.doubleDiscardSupported) yield* rdl.notifyDiscard({ ...section });
    else yield* this.forEachRun(section, true, function* (s) { yield* rdl.notifyDiscard(s); return RDM_OK; });
    this.rdlList.splice(this.rdlList.findIndex((e) => e.rdl === rdl), 1);
  }

  /** ram_block_attributes_rdm_replay_populated: `fn` per shared run of the section, lowest first; stops at the first error. */
  replayPopulated(section: RamSection, fn: ReplayRamDiscardState): Steps<RamDiscardResult> {
    this.checkInside(section.offsetWithinRegion, section.size, 'replayPopulated');
    return this.forEachRun({ ...section }, true, fn);
  }

  /** ram_block_attributes_rdm_replay_discarded: `fn` per private run (migration skips them); stops at the first error. */
  replayDiscarded(section: RamSection, fn: ReplayRamDiscardState): Steps<RamDiscardResult> {
    this.checkInside(section.offsetWithinRegion, section.size, 'replayDiscarded');
    return this.forEachRun({ ...section }, false, fn);
  }

  // ---- QEMU's helpers ----

  /** ram_block_attributes_is_valid_range; null when valid, else why not. */
  private invalidRange(offset: number, size: number): string | null {
    const bs = RamBlockAttributes.BLOCK_SIZE;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(size) || offset < 0 || size < 0) return 'wraps around';
    if (offset % bs !== 0 || size % bs !== 0) return `not aligned to the ${bs}-byte block size`;
    if (offset + size <= offset) return 'empty';
    if (offset + size > this.size) return `past the end of the ${hex(this.size)}-byte RAM block`;
    return null;
  }

  /** ram_block_attributes_notify_discard: every listener whose section meets the range. */
  private *notifyDiscard(offset: number, size: number): Steps {
    for (const { rdl, section } of [...this.rdlList]) {
      const s = intersectSection(section, offset, size);
      if (s === null) continue;
      // convert-without-unmap: the listener never hears, so VFIO keeps mapping memory that is now private.
      if (this.injection.bugs.convertWithoutUnmap) { this.injection.acted(Acted.CONVERT_WITHOUT_UNMAP); continue; }
      yield* rdl.notifyDiscard(s);
    }
  }

  /** ram_block_attributes_notify_populate: stops at the first listener that objects (the ones before it keep their state). */
  private *notifyPopulate(offset: number, size: number): Steps<RamDiscardResult> {
    for (const { rdl, section } of [...this.rdlList]) {
      const s = intersectSection(section, offset, size);
      if (s === null) continue;
      const r = yield* rdl.notifyPopulate(s);
      if (r.ret !== 0) return r;
    }
    return RDM_OK;
  }

  /**
   * ram_block_attributes_for_each_populated_section / _discarded_section: the maximal runs
   * of blocks with the bit `populated` from the section's first block on, each clipped to
   * the section; stops at the first run past it, or at the first error.
   */
  private *forEachRun(section: RamSection, populated: boolean, cb: ReplayRamDiscardState): Steps<RamDiscardResult> {
    const bs = RamBlockAttributes.BLOCK_SIZE;
    let first = this.findNext(Math.floor(section.offsetWithinRegion / bs), this.blocks, populated);
    while (first < this.blocks) {
      const last = this.findNext(first + 1, this.blocks, !populated) - 1;
      const s = intersectSection(section, first * bs, (last - first + 1) * bs);
      if (s === null) break;
      const r = yield* cb(s);
      if (r.ret !== 0) {
        return { ret: r.ret, detail: r.detail || `Failed to notify RAM discard listener: ${errnoName(-r.ret)}` };
      }
      first = this.findNext(last + 2, this.blocks, populated);
    }
    return RDM_OK;
  }

  /** find_next_bit (value true) / find_next_zero_bit (false): the first such bit in [from, limit), or limit. */
  private findNext(from: number, limit: number, value: boolean): number {
    const end = Math.min(limit, this.blocks);
    let bit = from;
    while (bit < end) {
      const w = bit >>> 5;
      const word = value ? this.bitmap.words[w]! : ~this.bitmap.words[w]! >>> 0;
      const m = (word >>> (bit & 31)) << (bit & 31) >>> 0;
      if (m !== 0) {
        const found = w * 32 + (31 - Math.clz32(m & -m));
        return found < end ? found : limit;
      }
      bit = (w + 1) * 32;
    }
    return limit;
  }

  /** bitmap_set / bitmap_clear. */
  private fill(first: number, n: number, value: boolean): void {
    for (let bit = first; bit < first + n; bit++) {
      if (value) this.bitmap.mark(bit);
      else this.bitmap.unmark(bit);
    }
  }

  /** The sections and ranges the class is handed must lie in the block (QEMU asserts section->mr == attr->ram_block->mr). */
  private checkInside(offset: number, size: number, what: string): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(size) || offset < 0 || size < 0 || offset + size > this.size) {
      throw new RangeError(`RamBlockAttributes.${what}: offset ${hex(offset)} size ${hex(size)} is not inside the ${hex(this.size)}-byte RAM block`);
    }
  }
}
