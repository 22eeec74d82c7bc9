import { KVM_MEM_KVM_ONLY, PAGE_SIZE } from './constants.ts';
import { REGION_PAGES, REGION_PAGES_SHIFT, type MemslotLayout, slotFieldOf } from './layout.ts';

/**
 * The stamp, for the oracles: bytes 8-15 of every page, next to the workload's bytes 0-7.
 * One little-endian u32 holds the writer (low 16 bits) and the guest iteration (high 16
 * bits), the next the writer's sequence number: two stores on the guest's write path.
 */
export const STAMP_WRITER_OFFSET = 8;
export const STAMP_ITERATION_OFFSET = 10;
export const STAMP_SEQ_OFFSET = 12;
/** Writer ids in stamps (16 bits): vCPU i stamps i + 1; devices DEVICE_WRITER_BASE + n; host writers HOST_WRITER_BASE + n. */
export const HOST_WRITER_BASE = 0x8000;
export const DEVICE_WRITER_BASE = 0x4000;
/** The largest iteration a stamp holds. */
export const MAX_STAMP_ITERATION = 0xffff;

/** The stamp's first word: writer and iteration. */
export function stampWord(writer: number, iteration: number): number {
  return (writer | (iteration << 16)) >>> 0;
}

/** A page's stamp from its two words (bytes 8-15): the inverse of stampWord, with the sequence. */
export function decodeStamp(word: number, seq: number): PageStamp {
  return { writer: word & 0xffff, seq, iteration: word >>> 16 };
}

export interface PageStamp { writer: number; seq: number; iteration: number }

const REGION_MASK = REGION_PAGES - 1;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
/** A page's index within its region is `page & REGION_PAGE_MASK`. */
export const REGION_PAGE_MASK = REGION_MASK;
/** 32-bit words per page. */
export const PAGE_WORDS = PAGE_SIZE / 4;

/**
 * A memslot: guest RAM backing one range of guest frames, as in KVM's kvm_memory_slot.
 * RAM lives in SharedArrayBuffer regions of at most 2 GiB; `words(page)` picks the view.
 */
export class Memslot {
  readonly id: number;
  readonly asId: number;
  /** as_id << 16 | id: the value KVM writes into kvm_dirty_gfn.slot. */
  readonly slotField: number;
  readonly index: number;
  readonly baseGfn: number;
  readonly pages: number;
  readonly endGfn: number;
  readonly firstPage: number;
  readonly u32: Uint32Array[];
  readonly u8: Uint8Array[];
  /** Buffer views of the regions, for memcmp without a view per page (isZeroPage). */
  private readonly buffers: Buffer[];
  readonly spte: Uint8Array;
  readonly dirtyBitmap: Int32Array;
  /**
   * KVM_MEM_GUEST_MEMFD: the slot's private pages, the same page numbering over the
   * guest_memfd's memory. Only the vCPUs' private accesses (and guest_memfd itself) use it:
   * the VMM, the migration thread and devices reach the shared pages alone.
   */
  readonly gmem: Memslot | null;
  /** The VMM's RamBlockAttributes words for this RAM block (MemslotLayout.rdmBitmap), or null. */
  readonly rdmBitmap: Uint32Array | null;
  /** Pages the VMM changed itself, for migration (MemslotLayout.vmmDirtyBitmap), or null. */
  readonly vmmDirtyBitmap: Int32Array | null;
  /** Device memory, not RAM (MemslotConfig.hostMmio). */
  readonly hostMmio: boolean;
  /** KVM_MEM_KVM_ONLY: the VMM's generic paths (migration, dumps) must never touch it. */
  readonly kvmOnly: boolean;

  constructor(layout: MemslotLayout, index: number) {
    this.id = layout.id;
    this.asId = layout.asId;
    this.slotField = slotFieldOf(layout);
    this.index = index;
    this.baseGfn = layout.baseGfn;
    this.pages = layout.pages;
    this.endGfn = layout.baseGfn + layout.pages;
    this.firstPage = layout.firstPage;
    this.u32 = layout.regions.map((r) => new Uint32Array(r));
    this.u8 = layout.regions.map((r) => new Uint8Array(r));
    this.buffers = layout.regions.map((r) => Buffer.from(r));
    this.spte = new Uint8Array(layout.spte);
    this.dirtyBitmap = new Int32Array(layout.dirtyBitmap);
    this.rdmBitmap = layout.rdmBitmap !== null ? new Uint32Array(layout.rdmBitmap) : null;
    this.vmmDirtyBitmap = layout.vmmDirtyBitmap !== null ? new Int32Array(layout.vmmDirtyBitmap) : null;
    this.hostMmio = layout.hostMmio === true;
    this.kvmOnly = (layout.flags & KVM_MEM_KVM_ONLY) !== 0;
    this.gmem = layout.gmem !== null ? new Memslot({ ...layout, regions: layout.gmem, gmem: null, rdmBitmap: null, vmmDirtyBitmap: null }, index) : null;
  }

  /** The region's 32-bit view holding `page`; index it with `wordIndex(page)`. */
  words(page: number): Uint32Array {
    return this.u32[page >>> REGION_PAGES_SHIFT]!;
  }

  bytes(page: number): Uint8Array {
    return this.u8[page >>> REGION_PAGES_SHIFT]!;
  }

  /** Index of the page's first 32-bit word within its region. */
  wordIndex(page: number): number {
    return (page & REGION_MASK) * PAGE_WORDS;
  }

  /** Byte offset of the page within its region. */
  byteOffset(page: number): number {
    return (page & REGION_MASK) * PAGE_SIZE;
  }

  /** The first 8 bytes of a page as a number (dirty_log_test's value). */
  readU64(page: number): number {
    const w = this.words(page);
    const i = this.wordIndex(page);
    return w[i]! + w[i + 1]! * 4294967296;
  }

  writeU64(page: number, value: number): void {
    const w = this.words(page);
    const i = this.wordIndex(page);
    w[i] = value >>> 0;
    w[i + 1] = (value / 4294967296) >>> 0;
  }

  /** writeU64 then stamp: the vCPU's guest store, the same five word stores in the same order. */
  writeU64Stamped(page: number, value: number, writer: number, seq: number, iteration: number): void {
    const w = this.words(page);
    const i = this.wordIndex(page);
    w[i] = value >>> 0;
    // (value / 2^32) >>> 0, without the division when |value| < 2^32 (the result is 0).
    w[i + 1] = value < 4294967296 && value > -4294967296 ? 0 : (value / 4294967296) >>> 0;
    w[i + 2] = stampWord(writer, iteration);
    w[i + 3] = seq;
  }

  /**
   * The first 16 bytes writeU64Stamped leaves in a page (value, stamp), put in `into`:
   * what a store through the CPU cache model writes (cpu-cache.ts).
   */
  static stampedBytes(into: Uint32Array, value: number, writer: number, seq: number, iteration: number): void {
    into[0] = value >>> 0;
    into[1] = (value / 4294967296) >>> 0;
    into[2] = stampWord(writer, iteration);
    into[3] = seq;
  }

  /**
   * Writes the oracle stamp next to the workload's bytes (which use bytes 0-7): who
   * wrote (writer id), that writer's sequence number, and the guest iteration.
   */
  stamp(page: number, writer: number, seq: number, iteration: number): void {
    const w = this.words(page);
    const i = this.wordIndex(page);
    w[i + 2] = stampWord(writer, iteration);
    w[i + 3] = seq;
  }

  stampOf(page: number): PageStamp {
    const w = this.words(page);
    const i = this.wordIndex(page);
    return decodeStamp(w[i + 2]!, w[i + 3]!);
  }

  /** The iteration in the page's stamp: what the dirty_log_test oracle checks. */
  stampIteration(page: number): number {
    return this.words(page)[this.wordIndex(page) + 2]! >>> 16;
  }

  /** Copies `count` consecutive pages from `page` on into `into` at `at`, one copy per region. */
  copyPages(page: number, count: number, into: Uint8Array, at: number): void {
    while (count > 0) {
      const n = Math.min(count, REGION_PAGES - (page & REGION_MASK));
      const off = this.byteOffset(page);
      into.set(this.bytes(page).subarray(off, off + n * PAGE_SIZE), at);
      page += n;
      count -= n;
      at += n * PAGE_SIZE;
    }
  }

  /** Zeroes `count` pages from `page` on (a discarded or truncated range reads zeros). */
  zeroPages(page: number, count: number): void {
    while (count > 0) {
      const n = Math.min(count, REGION_PAGES - (page & REGION_MASK));
      const off = this.byteOffset(page);
      this.bytes(page).fill(0, off, off + n * PAGE_SIZE);
      page += n;
      count -= n;
    }
  }

  /** True when every byte of the page is zero (reading never commits untouched memory). */
  isZeroPage(page: number): boolean {
    // Written pages are told apart by their first words (the stamp is at bytes 8-15).
    const w = this.words(page);
    const i = this.wordIndex(page);
    if ((w[i]! | w[i + 1]! | w[i + 2]! | w[i + 3]!) !== 0) return false;
    const off = this.byteOffset(page);
    return this.buffers[page >>> REGION_PAGES_SHIFT]!.compare(ZERO_PAGE, 0, PAGE_SIZE, off, off + PAGE_SIZE) === 0;
  }

  containsGfn(gfn: number): boolean {
    return gfn >= this.baseGfn && gfn < this.endGfn;
  }
}

export function describeWriter(writer: number): string {
  if (writer === 0) return 'nobody';
  if (writer >= HOST_WRITER_BASE) return `host writer ${writer - HOST_WRITER_BASE}`;
  if (writer >= DEVICE_WRITER_BASE) return `device ${writer - DEVICE_WRITER_BASE}`;
  return `vcpu${writer - 1}`;
}
