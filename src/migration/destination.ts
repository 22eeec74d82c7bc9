import { KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE } from '../host/constants.ts';
import type { MemoryAttributes } from '../host/memory-attributes.ts';
import type { Memslot } from '../host/memslot.ts';
import type { GuestMemory } from '../host/guest-memory.ts';
import { DEST_WORDS, DestState, DestWord } from './channel.ts';
import { type DevicePart, PAGE_NORMAL, type PageBatch, type StreamRecord, type StreamSlot, StreamDecoder, StreamError } from './stream.ts';

/** A device's load handler (QEMU's vmstate load, VFIO's RESUMING data): it takes the state its source saved, or throws why not. */
export type DeviceLoad = (parts: readonly DevicePart[], payload: Uint8Array) => void;

export interface DestinationStats {
  frames: number;
  normal: number;
  zero: number;
  syncs: number;
}

/**
 * The destination: decodes the stream and writes pages into its own guest memory. Every
 * page is checked against its own memslots before it is written; anything malformed
 * fails the migration with the decoder's message. Publishes applied bytes (credit) and
 * its state in shared words.
 */
export class Destination {
  private readonly decoder = new StreamDecoder();
  readonly stats: DestinationStats = { frames: 0, normal: 0, zero: 0, syncs: 0 };
  error: string | null = null;
  private appliedBytes = 0;

  /**
   * `memory` is this destination's guest memory; or null, and `createMemory` builds it
   * from the stream header's slot layout (a destination process that was told nothing).
   * `fresh`: the memory is all zero and written by nobody else until the migration
   * completes, so a zero page for a page this destination never wrote needs no access.
   */
  constructor(
    public memory: GuestMemory | null,
    readonly words: Int32Array = new Int32Array(new SharedArrayBuffer(DEST_WORDS * 4)),
    private readonly createMemory?: (slots: StreamSlot[]) => GuestMemory,
    private readonly fresh = false,
  ) {}

  /** KVM's memory attributes of the destination VM, when its type has private memory (an attributes record needs them). */
  attributes: MemoryAttributes | null = null;

  /** The destination's devices that take saved state, by name (a device record for another is refused). */
  readonly devices = new Map<string, DeviceLoad>();

  /** Fresh memory: pages this destination has written (the others are still zero). */
  private written: Uint8Array | null = null;

  get state(): DestState { return Atomics.load(this.words, DestWord.STATE); }

  /** Feeds received bytes; returns false once the migration has failed. */
  receive(chunk: Uint8Array): boolean {
    if (this.error !== null) return false;
    try {
      for (const r of this.decoder.push(chunk)) this.apply(r);
    } catch (e) {
      this.fail(e instanceof StreamError ? e.message : `destination: ${(e as Error).message}`);
      return false;
    }
    this.appliedBytes += chunk.length;
    Atomics.store(this.words, DestWord.APPLIED_KIB, Math.floor(this.appliedBytes / 1024));
    Atomics.notify(this.words, DestWord.APPLIED_KIB);
    return true;
  }

  /** The connection closed: a stream that did not complete fails. */
  end(): void {
    if (this.error !== null || this.state === DestState.COMPLETE) return;
    try { this.decoder.end(); } catch (e) { this.fail((e as Error).message); }
  }

  fail(message: string): void {
    this.error = message;
    Atomics.store(this.words, DestWord.STATE, DestState.FAILED);
    Atomics.notify(this.words, DestWord.STATE);
  }

  private apply(r: StreamRecord | PageBatch): void {
    this.stats.frames++;
    if (!('t' in r)) return this.applyPages(r);
    if (r.t === 'header') {
      if (this.memory === null) this.memory = this.createMemory!(r.slots);
      if (this.fresh) this.written = new Uint8Array(this.memory.totalPages);
      for (const s of r.slots) {
        const mine = this.memory.slotByField((s.asId << 16) | s.id);
        if (!mine || mine.baseGfn !== s.baseGfn || mine.pages !== s.pages) {
          throw new StreamError(`the source's slot ${s.asId}:${s.id} (gfn 0x${s.baseGfn.toString(16)}, ${s.pages} pages) does not match this destination's memory`);
        }
      }
    } else if (r.t === 'sync') {
      this.stats.syncs++;
    } else if (r.t === 'attributes') {
      this.applyAttributes(r);
    } else if (r.t === 'device') {
      const load = this.devices.get(r.name);
      if (load === undefined) throw new StreamError(`the source sent the state of device ${r.name}, which this destination does not have`);
      try {
        load(r.parts, r.payload);
      } catch (e) {
        throw new StreamError(`device ${r.name} could not load its state: ${(e as Error).message}`);
      }
    } else if (r.t === 'complete') {
      if (r.normal !== this.stats.normal || r.zero !== this.stats.zero) {
        throw new StreamError(`completion record counts ${r.normal} normal and ${r.zero} zero pages, received ${this.stats.normal} and ${this.stats.zero}`);
      }
      Atomics.store(this.words, DestWord.STATE, DestState.COMPLETE);
      Atomics.notify(this.words, DestWord.STATE);
    }
  }

  /**
   * QEMU's ram_handle_zero: write only if the page is not zero already, so that untouched
   * destination memory stays uncommitted (and, if fresh, is not even read).
   */
  private zeroPage(slot: Memslot, page: number): void {
    const untouched = this.written !== null && this.written[slot.firstPage + page] === 0;
    if (untouched || slot.isZeroPage(page)) return;
    const off = slot.byteOffset(page);
    slot.bytes(page).fill(0, off, off + PAGE_SIZE);
  }

  /**
   * A confidential guest's shared/private state of one slot, as the destination's VMM
   * converts its memory before the guest runs: each private page gets the PRIVATE
   * attribute and its shared memory is discarded (zeros; QEMU's ram_block_discard_range),
   * each shared page the attribute 0; the destination's RamBlockAttributes (when its slot
   * has one) ends with the same bitmap.
   */
  private applyAttributes(r: Extract<StreamRecord, { t: 'attributes' }>): void {
    const slot = this.memory!.slotByField(r.slot)!;
    if (this.attributes === null || slot.gmem === null) {
      throw new StreamError(`attributes for slot ${slot.id}: the destination's slot has no private memory (a VM type with private memory and KVM_MEM_GUEST_MEMFD)`);
    }
    for (let page = 0; page < slot.pages; page++) {
      const shared = (r.shared[page >>> 5]! & (1 << (page & 31))) !== 0;
      this.attributes.store({ slot, page, count: 1 }, shared ? 0 : KVM_MEMORY_ATTRIBUTE_PRIVATE);
      if (!shared) this.zeroPage(slot, page);
    }
    slot.rdmBitmap?.set(r.shared);
  }

  /**
   * Writes a batch: each run of consecutive normal pages in one region with one copy; a
   * zero page only where the destination page is not already zero (untouched memory
   * stays uncommitted, as a destination that never writes zero pages keeps it).
   */
  private applyPages(b: PageBatch): void {
    const slot = this.memory!.slotByField(b.slot)!;
    const { offsets, kinds, payload } = b;
    const n = offsets.length;
    let at = 0;
    for (let i = 0; i < n;) {
      const page = offsets[i]!;
      if (page >= slot.pages) throw new StreamError(`page ${page} is outside this destination's slot ${slot.id}`);
      const dst = slot.bytes(page);
      const off = slot.byteOffset(page);
      if (kinds[i] !== PAGE_NORMAL) {
        this.zeroPage(slot, page);
        this.stats.zero++;
        i++;
        continue;
      }
      // The run: following pages that are normal, next in number, and in the same region.
      let j = i + 1;
      while (j < n && kinds[j] === PAGE_NORMAL && offsets[j] === page + (j - i) && slot.bytes(offsets[j]!) === dst && offsets[j]! < slot.pages) j++;
      const bytes = (j - i) * PAGE_SIZE;
      dst.set(payload.subarray(at, at + bytes), off);
      this.written?.fill(1, slot.firstPage + page, slot.firstPage + page + (j - i));
      at += bytes;
      this.stats.normal += j - i;
      i = j;
    }
  }
}

