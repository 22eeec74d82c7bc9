import { PAGE_SIZE } from './constants.ts';
import { lockWord, unlockWord } from '../util/word-lock.ts';

/**
 * The CPU caches in front of guest memory, for the places where page aliasing can happen
 * (docs/architecture.md, "Memory types and the CPU cache"): a page mapped write-combining
 * or uncached by one side and write-back by another, or a device that does not snoop.
 * Guest memory plays DRAM; this is one cache shared by every CPU-side actor (vCPUs, VMM
 * threads, the migration thread), because the CPUs' caches are coherent with each other
 * (MESI): what matters here is only what is in some cache and not yet in DRAM.
 *
 * Per 64-byte line, as the Intel SDM vol. 3A §12.3 ("Methods of caching available") and
 * §12.12.4 (aliasing) describe it:
 * - a write-back (WB) read hits the cache, or fills the line from DRAM; a WB write fills
 *   the line and dirties it; DRAM is updated only when the line is written back: evicted,
 *   CLFLUSH, WBINVD;
 * - uncached (UC) and write-combining (WC) accesses go to DRAM. Without self-snoop they
 *   neither see nor invalidate a cached copy of the same line, so a UC read can return
 *   stale data and a later write-back of a dirty aliased line overwrites what a UC or WC
 *   write put in DRAM ("a WC page must never be aliased to a cacheable page because WC
 *   writes may not check the processor caches", SDM §12.3.1). With self-snoop
 *   (CPUID.01H:EDX.SS) the CPU writes a dirty copy back and invalidates it first;
 * - snooped DMA reads a dirty line's data and a DMA write invalidates the line (it writes
 *   DRAM); no-snoop DMA (PCIe No Snoop, a virtio-gpu backend's GPU) reads and writes DRAM only;
 * - CLFLUSH writes one line back if dirty and invalidates it; WBINVD does so for every line.
 *
 * Simplifications: one level, set-associative, a bounded capacity with seeded random
 * replacement (the same victims for the same sequence of accesses, so runs under the
 * deterministic driver repeat exactly); WC writes go straight to DRAM (no WC buffers to
 * drain); no prefetch. The layout is shared memory: each set has a lock word, held only
 * for the few loads and stores of one access (never across a step), and its own
 * replacement state.
 */

export const CACHE_LINE_SIZE = 64;
export const LINES_PER_PAGE = PAGE_SIZE / CACHE_LINE_SIZE;

/** How an access treats the cache: the memory type of the mapping a CPU used, or a device's snoop attribute. */
export const enum CacheAccess {
  /** Write-back: through the cache. */
  WB = 0,
  /** Uncached: DRAM, with no look at the cache (unless the CPU self-snoops). */
  UC = 1,
  /** Write-combining: as UC here (writes go straight to DRAM). */
  WC = 2,
  /** A device's DMA that snoops the CPU caches (the normal, coherent case). */
  DMA_SNOOP = 3,
  /** A device's DMA with No Snoop: DRAM only. */
  DMA_NO_SNOOP = 4,
}

/** Where an access was served from: what a trace or a litmus file shows. */
export const enum CacheServed {
  /** The line was in the cache (a hit, or a snoop that found it dirty). */
  CACHE = 0,
  /** The line was filled from DRAM, then used. */
  FILL = 1,
  /** DRAM, with the cache left as it was. */
  DRAM = 2,
}

export interface CpuCacheConfig {
  /** Sets (a power of two) and ways per set: the capacity is sets * ways lines. */
  sets: number;
  ways: number;
  /** Seeds the replacement choice of every set. */
  seed: number;
  /** CPUID self-snoop: UC and WC accesses write back and invalidate a cached copy first. */
  selfSnoop: boolean;
}

/** 2 MiB, 8 ways: a small last-level cache (real ones hold tens of MiB), enough to keep a render guest's buffers between two migration passes. */
export const DEFAULT_CPU_CACHE: CpuCacheConfig = { sets: 4096, ways: 8, seed: 1, selfSnoop: false };

/**
 * Counters, one word each after the sets. STALE_*: reads that returned something other
 * than the line's latest write in the model's order (the stale read oracle), by who read:
 * a WB hit on a clean line that DRAM no longer matches (something wrote DRAM behind the
 * cache: a UC or WC store, no-snoop DMA), or a DRAM read (UC, WC, no-snoop DMA) of a line
 * that is dirty in the cache. STALE_FIRST_KEY: the first such line's key + 1.
 */
export const enum CacheStat {
  HITS = 0, FILLS, EVICTIONS, WRITEBACKS, BYPASSES, STALE_CPU, STALE_DEVICE, STALE_MIGRATION, STALE_FIRST_KEY, MIGRATION_PAGE_FLUSHES,
  /** Write-backs of a dirty line that overwrote newer bytes a UC/WC store or no-snoop DMA had put in DRAM (the aliasing's lost write). */
  OVERWRITES,
  COUNT,
}

/** Who reads, for the stale read oracle's count. */
export const enum CacheReader { CPU = CacheStat.STALE_CPU, DEVICE = CacheStat.STALE_DEVICE, MIGRATION = CacheStat.STALE_MIGRATION }

export interface CpuCacheLayout {
  config: CpuCacheConfig;
  /** Per set: lock, replacement state, then per way its line key + 1 (0: invalid) and whether it is dirty; then the counters. */
  words: SharedArrayBuffer;
  /** Per set and way: the line's 64 bytes. */
  data: SharedArrayBuffer;
}

const SET_LOCK = 0;
const SET_PRNG = 1;
const SET_HEADER = 2;

function setWords(ways: number): number {
  return SET_HEADER + 2 * ways;
}

export function createCpuCacheLayout(config: CpuCacheConfig = DEFAULT_CPU_CACHE): CpuCacheLayout {
  if (!Number.isInteger(config.sets) || config.sets < 1 || (config.sets & (config.sets - 1)) !== 0) throw new Error(`cpu cache: sets must be a power of two, not ${config.sets}`);
  if (!Number.isInteger(config.ways) || config.ways < 1) throw new Error(`cpu cache: ways must be a positive integer, not ${config.ways}`);
  const words = new Int32Array(new SharedArrayBuffer((config.sets * setWords(config.ways) + CacheStat.COUNT) * 4));
  for (let s = 0; s < config.sets; s++) words[s * setWords(config.ways) + SET_PRNG] = seedOfSet(config.seed, s);
  return { config, words: words.buffer as SharedArrayBuffer, data: new SharedArrayBuffer(config.sets * config.ways * CACHE_LINE_SIZE) };
}

/** A non-zero xorshift32 state per set, from the cache's seed. */
function seedOfSet(seed: number, set: number): number {
  let z = Math.imul((seed >>> 0) ^ Math.imul(set + 1, 0x9e3779b9), 0x85ebca6b);
  z ^= z >>> 13;
  z = Math.imul(z, 0xc2b2ae35);
  z ^= z >>> 16;
  return z === 0 ? 1 : z;
}

/** DRAM as the cache sees it: a line, by its key (frame * 64 + line within the page), as a 64-byte view. */
export interface Dram {
  line(key: number): Uint8Array;
}

/** The key of the line holding byte `offset` of VM-wide page `frame` (Memslot.firstPage + page). */
export function lineKey(frame: number, offset: number): number {
  return frame * LINES_PER_PAGE + Math.floor(offset / CACHE_LINE_SIZE);
}

export class CpuCache {
  readonly config: CpuCacheConfig;
  private readonly w: Int32Array;
  private readonly data: Uint8Array;
  private readonly stride: number;
  private readonly statsAt: number;

  constructor(layout: CpuCacheLayout, private readonly dram: Dram) {
    this.config = layout.config;
    this.w = new Int32Array(layout.words);
    this.data = new Uint8Array(layout.data);
    this.stride = setWords(this.config.ways);
    this.statsAt = this.config.sets * this.stride;
  }

  /**
   * A CPU reads `out.length` bytes at `offset` within line `key` (one line: offset +
   * length <= 64) through a mapping of memory type `access` (WB, UC or WC).
   */
  read(access: CacheAccess.WB | CacheAccess.UC | CacheAccess.WC, key: number, offset: number, out: Uint8Array, reader = CacheReader.CPU): CacheServed {
    checkSpan(offset, out.length);
    const set = this.lock(key);
    try {
      if (access !== CacheAccess.WB) {
        return this.bypass(set, key, () => {
          this.checkDramRead(set, key, offset, out.length, reader);
          out.set(this.dram.line(key).subarray(offset, offset + out.length));
        });
      }
      const { way, served } = this.fill(set, key);
      if (served === CacheServed.CACHE) this.checkHit(set, way, key, offset, out.length, reader);
      const at = this.lineAt(set, way) + offset;
      out.set(this.data.subarray(at, at + out.length));
      return served;
    } finally {
      this.unlock(set);
    }
  }

  /** A CPU writes `src` at `offset` within line `key` through a mapping of memory type `access`. */
  write(access: CacheAccess.WB | CacheAccess.UC | CacheAccess.WC, key: number, offset: number, src: Uint8Array): CacheServed {
    checkSpan(offset, src.length);
    const set = this.lock(key);
    try {
      if (access !== CacheAccess.WB) return this.bypass(set, key, () => { this.dramWrite(set, key, offset, src); });
      const { way, served } = this.fill(set, key);
      this.data.set(src, this.lineAt(set, way) + offset);
      // Dirty; the bytes written are newest here again, whatever a bypassing store put in DRAM.
      const ww = this.wayWord(set, way);
      this.w[ww + 1] = (this.w[ww + 1]! | DIRTY) & ~chunksCovered(offset, src.length);
      return served;
    } finally {
      this.unlock(set);
    }
  }

  /** A CPU reads all of VM-wide page `frame` through a WB mapping (the migration thread's read), into `into` at `at`. */
  readPage(frame: number, into: Uint8Array, at: number, reader = CacheReader.MIGRATION): void {
    for (let l = 0; l < LINES_PER_PAGE; l++) {
      const o = at + l * CACHE_LINE_SIZE;
      this.read(CacheAccess.WB, frame * LINES_PER_PAGE + l, 0, into.subarray(o, o + CACHE_LINE_SIZE), reader);
    }
  }

  /** A device reads by DMA: snooped, a dirty line's data; no-snoop, DRAM. Never allocates. */
  dmaRead(access: CacheAccess.DMA_SNOOP | CacheAccess.DMA_NO_SNOOP, key: number, offset: number, out: Uint8Array): CacheServed {
    checkSpan(offset, out.length);
    const set = this.lock(key);
    try {
      const way = access === CacheAccess.DMA_SNOOP ? this.find(set, key) : -1;
      if (access === CacheAccess.DMA_NO_SNOOP) this.checkDramRead(set, key, offset, out.length, CacheReader.DEVICE);
      if (way >= 0) {
        const at = this.lineAt(set, way) + offset;
        out.set(this.data.subarray(at, at + out.length));
        return CacheServed.CACHE;
      }
      out.set(this.dram.line(key).subarray(offset, offset + out.length));
      return CacheServed.DRAM;
    } finally {
      this.unlock(set);
    }
  }

  /**
   * A device writes by DMA (to DRAM). Snooped, a cached copy is written back first (the
   * bytes the device does not write keep the CPU's data) and invalidated; no-snoop leaves
   * the cache alone, and a dirty copy will overwrite the device's data when it is evicted.
   */
  dmaWrite(access: CacheAccess.DMA_SNOOP | CacheAccess.DMA_NO_SNOOP, key: number, offset: number, src: Uint8Array): CacheServed {
    checkSpan(offset, src.length);
    const set = this.lock(key);
    try {
      if (access === CacheAccess.DMA_SNOOP) {
        const way = this.find(set, key);
        if (way >= 0) this.evict(set, way, key);
      }
      this.dramWrite(set, key, offset, src);
      return CacheServed.DRAM;
    } finally {
      this.unlock(set);
    }
  }

  /** CLFLUSH: the line written back if dirty, and invalidated. Returns whether it was cached. */
  clflush(key: number): boolean {
    const set = this.lock(key);
    try {
      const way = this.find(set, key);
      if (way < 0) return false;
      this.evict(set, way, key);
      return true;
    } finally {
      this.unlock(set);
    }
  }

  /**
   * CLFLUSH of every line of VM-wide page `frame` (a guest's cpa_flush, or the migration
   * thread flushing a page before it reads it: `byMigration`, counted). Returns the lines that were cached.
   */
  clflushPage(frame: number, byMigration = false): number {
    if (byMigration) this.count(CacheStat.MIGRATION_PAGE_FLUSHES);
    let n = 0;
    for (let l = 0; l < LINES_PER_PAGE; l++) if (this.clflush(frame * LINES_PER_PAGE + l)) n++;
    return n;
  }

  /** WBINVD: every dirty line written back, every line invalidated. Returns the lines written back. */
  wbinvd(): number {
    let written = 0;
    for (let set = 0; set < this.config.sets; set++) {
      this.lockSet(set);
      for (let way = 0; way < this.config.ways; way++) {
        const ww = this.wayWord(set, way);
        const tag = this.w[ww]!;
        if (tag === 0) continue;
        if ((this.w[ww + 1]! & DIRTY) !== 0) written++;
        this.evict(set, way, tag - 1);
      }
      this.unlock(set);
    }
    return written;
  }

  /** Whether line `key` is cached, and dirty (for oracles and traces; takes the set's lock). */
  state(key: number): 'invalid' | 'clean' | 'dirty' {
    const set = this.lock(key);
    try {
      const way = this.find(set, key);
      return way < 0 ? 'invalid' : (this.w[this.wayWord(set, way) + 1]! & DIRTY) !== 0 ? 'dirty' : 'clean';
    } finally {
      this.unlock(set);
    }
  }

  stat(s: CacheStat): number {
    return Atomics.load(this.w, this.statsAt + s);
  }

  /** The stale read oracle's counts (CacheReader), and the first stale line's key or null. */
  staleReads(): { cpu: number; device: number; migration: number; firstKey: number | null } {
    const first = this.stat(CacheStat.STALE_FIRST_KEY);
    return { cpu: this.stat(CacheStat.STALE_CPU), device: this.stat(CacheStat.STALE_DEVICE), migration: this.stat(CacheStat.STALE_MIGRATION), firstKey: first > 0 ? first - 1 : null };
  }

  // --- one set, its lock held ---

  /**
   * A WB hit: stale where a byte read differs from DRAM because DRAM changed behind the
   * cache (any byte of a clean line; a marked chunk of a dirty one, whose other bytes are
   * the latest writes).
   */
  private checkHit(set: number, way: number, key: number, offset: number, length: number, reader: CacheReader): void {
    const state = this.w[this.wayWord(set, way) + 1]!;
    if (state === DIRTY) return;
    const at = this.lineAt(set, way);
    const dram = this.dram.line(key);
    const dirty = (state & DIRTY) !== 0;
    for (let i = offset; i < offset + length; i++) {
      if (this.data[at + i] !== dram[i] && (!dirty || (state & chunkBit(i)) !== 0)) { this.stale(key, reader); return; }
    }
  }

  /**
   * A read of DRAM while the line is dirty in the cache: stale where a byte read differs
   * from the cached copy and the cache holds the latest write for it (not a chunk a
   * bypassing store wrote to DRAM since).
   */
  private checkDramRead(set: number, key: number, offset: number, length: number, reader: CacheReader): void {
    const way = this.find(set, key);
    if (way < 0) return;
    const state = this.w[this.wayWord(set, way) + 1]!;
    if ((state & DIRTY) === 0) return;
    const at = this.lineAt(set, way);
    const dram = this.dram.line(key);
    for (let i = offset; i < offset + length; i++) {
      if (this.data[at + i] !== dram[i] && (state & chunkBit(i)) === 0) { this.stale(key, reader); return; }
    }
  }

  /**
   * A UC/WC store or a DMA write puts `src` in DRAM. Left under a cached copy (no
   * self-snoop, no snoop), those bytes are newer than the copy, whose write-back (once
   * dirty) will overwrite them: the chunks are marked, and counted as overwritten then.
   */
  private dramWrite(set: number, key: number, offset: number, src: Uint8Array): void {
    this.dram.line(key).set(src, offset);
    const way = this.find(set, key);
    if (way < 0) return;
    const ww = this.wayWord(set, way);
    this.w[ww + 1] = this.w[ww + 1]! | chunksTouched(offset, src.length);
  }

  private overwrote(key: number): void {
    this.count(CacheStat.OVERWRITES);
    Atomics.compareExchange(this.w, this.statsAt + CacheStat.STALE_FIRST_KEY, 0, key + 1);
  }

  private stale(key: number, reader: CacheReader): void {
    Atomics.add(this.w, this.statsAt + reader, 1);
    Atomics.compareExchange(this.w, this.statsAt + CacheStat.STALE_FIRST_KEY, 0, key + 1);
  }

  /** UC and WC: DRAM only; with self-snoop, a cached copy is written back and invalidated first. */
  private bypass(set: number, key: number, access: () => void): CacheServed {
    this.count(CacheStat.BYPASSES);
    if (this.config.selfSnoop) {
      const way = this.find(set, key);
      if (way >= 0) this.evict(set, way, key);
    }
    access();
    return CacheServed.DRAM;
  }

  /** The way holding `key`, filled from DRAM if it was not cached (evicting a victim when the set is full). */
  private fill(set: number, key: number): { way: number; served: CacheServed } {
    const hit = this.find(set, key);
    if (hit >= 0) { this.count(CacheStat.HITS); return { way: hit, served: CacheServed.CACHE }; }
    let way = -1;
    for (let i = 0; i < this.config.ways; i++) if (this.w[this.wayWord(set, i)] === 0) { way = i; break; }
    if (way < 0) {
      way = this.victim(set);
      this.count(CacheStat.EVICTIONS);
      this.evict(set, way, this.w[this.wayWord(set, way)]! - 1);
    }
    this.data.set(this.dram.line(key), this.lineAt(set, way));
    const ww = this.wayWord(set, way);
    this.w[ww] = key + 1;
    this.w[ww + 1] = 0;
    this.count(CacheStat.FILLS);
    return { way, served: CacheServed.FILL };
  }

  /** Writes the line back if dirty and invalidates the way. */
  private evict(set: number, way: number, key: number): void {
    const ww = this.wayWord(set, way);
    const state = this.w[ww + 1]!;
    if ((state & DIRTY) !== 0) {
      const at = this.lineAt(set, way);
      this.dram.line(key).set(this.data.subarray(at, at + CACHE_LINE_SIZE));
      this.count(CacheStat.WRITEBACKS);
      if ((state & ~DIRTY) !== 0) this.overwrote(key);
    }
    this.w[ww] = 0;
    this.w[ww + 1] = 0;
  }

  private find(set: number, key: number): number {
    for (let way = 0; way < this.config.ways; way++) if (this.w[this.wayWord(set, way)] === key + 1) return way;
    return -1;
  }

  /** The seeded replacement choice: xorshift32 in the set's own word. */
  private victim(set: number): number {
    const at = set * this.stride + SET_PRNG;
    let x = this.w[at]!;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.w[at] = x;
    return (x >>> 0) % this.config.ways;
  }

  private wayWord(set: number, way: number): number {
    return set * this.stride + SET_HEADER + 2 * way;
  }

  private lineAt(set: number, way: number): number {
    return (set * this.config.ways + way) * CACHE_LINE_SIZE;
  }

  private count(s: CacheStat): void {
    Atomics.add(this.w, this.statsAt + s, 1);
  }

  private setOf(key: number): number {
    if (!Number.isInteger(key) || key < 0 || key >= 0x7fffffff) throw new Error(`cpu cache: line key ${key} out of range`);
    return (Math.imul(key, 0x9e3779b1) >>> 0) % this.config.sets;
  }

  private lock(key: number): number {
    const set = this.setOf(key);
    this.lockSet(set);
    return set;
  }

  /** The set's lock: held for one access's loads and stores only. */
  private lockSet(set: number): void {
    lockWord(this.w, set * this.stride + SET_LOCK);
  }

  private unlock(set: number): void {
    unlockWord(this.w, set * this.stride + SET_LOCK);
  }
}

/**
 * A way's state word: DIRTY, and the 4-byte chunks whose latest write is in DRAM (a
 * bypassing store since the line was filled or last written there), one bit each above it.
 */
const DIRTY = 1;
const CHUNK = 4;

function chunkBit(byte: number): number {
  return 2 << ((byte / CHUNK) | 0);
}

/** The chunks a store of `length` bytes at `offset` touches. */
function chunksTouched(offset: number, length: number): number {
  let m = 0;
  for (let c = (offset / CHUNK) | 0; c * CHUNK < offset + length; c++) m |= 2 << c;
  return m;
}

/** The chunks a store of `length` bytes at `offset` covers whole. */
function chunksCovered(offset: number, length: number): number {
  let m = 0;
  for (let c = Math.ceil(offset / CHUNK); (c + 1) * CHUNK <= offset + length; c++) m |= 2 << c;
  return m;
}

function checkSpan(offset: number, length: number): void {
  if (!Number.isInteger(offset) || offset < 0 || length < 1 || offset + length > CACHE_LINE_SIZE) {
    throw new Error(`cpu cache: ${length} bytes at offset ${offset} do not lie in one ${CACHE_LINE_SIZE}-byte line`);
  }
}
