/**
 * Dirty bitmaps. KVM's per-slot bitmap lives in shared memory and is set with atomic
 * OR from any thread; userspace keeps plain bitmaps of what it collected. Like rust-vmm
 * vm-memory, the write path talks to a `Bitmap` interface, with a no-op implementation
 * for memory that is not tracked.
 */
export interface Bitmap {
  mark(page: number): void;
  isDirty(page: number): boolean;
}

export const NO_BITMAP: Bitmap = {
  mark(): void {},
  isDirty(): boolean { return false; },
};

/** KVM's kvm_memory_slot::dirty_bitmap: one bit per page, set with Atomics.or. */
export class SharedDirtyBitmap implements Bitmap {
  constructor(readonly words: Int32Array, readonly pages: number) {}

  mark(page: number): void {
    Atomics.or(this.words, page >>> 5, 1 << (page & 31));
  }

  isDirty(page: number): boolean {
    return (Atomics.load(this.words, page >>> 5) & (1 << (page & 31))) !== 0;
  }

  /** Sets every page's bit (KVM_DIRTY_LOG_INITIALLY_SET), leaving bits past the end clear. */
  setAll(): void {
    const full = this.pages >>> 5;
    for (let w = 0; w < full; w++) Atomics.store(this.words, w, -1);
    const rest = this.pages & 31;
    if (rest) Atomics.store(this.words, full, (1 << rest) - 1);
  }
}

/** A plain (thread-local) bitmap over `pages` pages, as userspace holds them. */
export class PageBitmap implements Bitmap {
  readonly words: Uint32Array;

  /** `words`: memory to keep the bits in (shared with other threads), else a fresh array. */
  constructor(readonly pages: number, words?: Uint32Array) {
    this.words = words ?? new Uint32Array(Math.ceil(pages / 32));
  }

  mark(page: number): void {
    this.words[page >>> 5]! |= 1 << (page & 31);
  }

  unmark(page: number): void {
    this.words[page >>> 5]! &= ~(1 << (page & 31));
  }

  isDirty(page: number): boolean {
    return (this.words[page >>> 5]! & (1 << (page & 31))) !== 0;
  }

  clear(): void {
    this.words.fill(0);
  }

  /** ORs another bitmap's words in at page offset `at` (a multiple of 32). */
  orWords(src: ArrayLike<number>, at = 0): void {
    const base = at >>> 5;
    for (let i = 0; i < src.length; i++) this.words[base + i]! |= src[i]!;
  }

  count(): number {
    let n = 0;
    for (const w of this.words) n += popcount32(w);
    return n;
  }

  *pagesSet(): Generator<number> {
    for (let i = 0; i < this.words.length; i++) {
      let w = this.words[i]!;
      while (w !== 0) {
        const bit = 31 - Math.clz32(w & -w);
        yield i * 32 + bit;
        w &= w - 1;
      }
    }
  }
}

export function popcount32(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (Math.imul((x + (x >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
}
