import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import {
  CACHE_LINE_SIZE, CacheAccess, CacheServed, CacheStat, CpuCache, type CpuCacheConfig, type Dram, createCpuCacheLayout, lineKey,
} from '../src/host/cpu-cache.ts';
import { PAGE_SIZE } from '../src/host/constants.ts';
import { guestDram } from '../src/host/guest-dram.ts';
import { MANUAL, makeVm } from './helpers.ts';

/**
 * The CPU cache in front of guest memory (src/host/cpu-cache.ts): what each kind of access
 * sees and leaves behind, per 64-byte line, as the Intel SDM describes caching and
 * aliasing. DRAM is the guest's memory; values are bytes of one line.
 */
function setup(config: Partial<CpuCacheConfig> = {}) {
  const vm = makeVm({ tracking: MANUAL, pages: 16 });
  const dram = guestDram(vm.memory);
  const cache = new CpuCache(createCpuCacheLayout({ sets: 4, ways: 2, seed: 7, selfSnoop: false, ...config }), dram);
  const slot = vm.memory.slots[0]!;
  const key = lineKey(slot.firstPage + 3, 128); // page 3, line 2
  const inDram = (k = key): number => dram.line(k)[0]!;
  const byte = (v: number): Uint8Array => Uint8Array.of(v);
  const read = (access: CacheAccess.WB | CacheAccess.UC | CacheAccess.WC, k = key): number => { const out = new Uint8Array(1); cache.read(access, k, 0, out); return out[0]!; };
  return { vm, dram, cache, key, slot, inDram, byte, read };
}

describe('write-back accesses', () => {
  it('a WB write dirties the line and leaves DRAM alone until the line is written back (CLFLUSH)', () => {
    const { cache, key, inDram, byte, read } = setup();
    expect(cache.write(CacheAccess.WB, key, 0, byte(5))).toBe(CacheServed.FILL);
    expect(cache.state(key)).toBe('dirty');
    expect(inDram(), 'DRAM still holds the old value').toBe(0);
    expect(read(CacheAccess.WB)).toBe(5);
    expect(cache.clflush(key)).toBe(true);
    expect(cache.state(key)).toBe('invalid');
    expect(inDram()).toBe(5);
    expect(cache.clflush(key), 'nothing cached any more').toBe(false);
  });

  it('a WB read fills a clean line, then hits; the guest memory the stamp oracle reads is DRAM', () => {
    const { cache, key, read } = setup();
    expect(cache.read(CacheAccess.WB, key, 0, new Uint8Array(8))).toBe(CacheServed.FILL);
    expect(cache.state(key)).toBe('clean');
    expect(cache.read(CacheAccess.WB, key, 8, new Uint8Array(8))).toBe(CacheServed.CACHE);
    expect([cache.stat(CacheStat.FILLS), cache.stat(CacheStat.HITS)]).toEqual([1, 1]);
    expect(read(CacheAccess.WB)).toBe(0);
  });

  it('the line lives in its page: the key is frame * 64 + offset / 64, and a write reaches DRAM at that offset once written back', () => {
    const { cache, slot, dram } = setup();
    const key = lineKey(slot.firstPage + 1, PAGE_SIZE - 8);
    expect(key).toBe((slot.firstPage + 1) * 64 + 63);
    cache.write(CacheAccess.WB, key, 56, Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8));
    cache.wbinvd();
    expect([...slot.bytes(1).subarray(slot.byteOffset(1) + PAGE_SIZE - 8, slot.byteOffset(1) + PAGE_SIZE)]).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(dram.line(key)[63]).toBe(8);
  });
});

describe('aliasing: UC and WC next to a cached copy', () => {
  it('without self-snoop a UC read misses the dirty cached copy: it reads stale DRAM', () => {
    const { cache, key, byte, read } = setup();
    cache.write(CacheAccess.WB, key, 0, byte(9));
    expect(read(CacheAccess.UC), 'stale').toBe(0);
    expect(cache.state(key), 'the cached copy is untouched').toBe('dirty');
  });

  it('a WC write goes to DRAM, and the later eviction of the dirty aliased line overwrites it: silent corruption', () => {
    const { cache, key, inDram, byte } = setup();
    cache.write(CacheAccess.WB, key, 0, byte(1));
    expect(cache.write(CacheAccess.WC, key, 0, byte(2))).toBe(CacheServed.DRAM);
    expect(inDram()).toBe(2);
    cache.wbinvd();
    expect(inDram(), 'the write-back of the WB copy lost the WC write').toBe(1);
  });

  it('with self-snoop the CPU writes the cached copy back and invalidates it first: the UC read is fresh, the WC write survives', () => {
    const { cache, key, inDram, byte, read } = setup({ selfSnoop: true });
    cache.write(CacheAccess.WB, key, 0, byte(9));
    expect(read(CacheAccess.UC)).toBe(9);
    expect(cache.state(key)).toBe('invalid');
    cache.write(CacheAccess.WB, key, 0, byte(1));
    cache.write(CacheAccess.WC, key, 0, byte(2));
    cache.wbinvd();
    expect(inDram()).toBe(2);
  });
});

describe('DMA: snooped and no-snoop', () => {
  it('a snooped DMA read sees the dirty line; a no-snoop one reads stale DRAM; neither allocates', () => {
    const { cache, key, byte } = setup();
    cache.write(CacheAccess.WB, key, 0, byte(4));
    const out = new Uint8Array(1);
    expect(cache.dmaRead(CacheAccess.DMA_SNOOP, key, 0, out)).toBe(CacheServed.CACHE);
    expect(out[0]).toBe(4);
    expect(cache.dmaRead(CacheAccess.DMA_NO_SNOOP, key, 0, out)).toBe(CacheServed.DRAM);
    expect(out[0]).toBe(0);
    const other = key + 1;
    cache.dmaRead(CacheAccess.DMA_SNOOP, other, 0, out);
    expect(cache.state(other)).toBe('invalid');
  });

  it('a snooped DMA write invalidates the line, keeping the CPU\'s bytes it does not write; the next WB read fills the device\'s data', () => {
    const { cache, key, dram, read } = setup();
    cache.write(CacheAccess.WB, key, 0, Uint8Array.of(1, 1));
    cache.dmaWrite(CacheAccess.DMA_SNOOP, key, 1, Uint8Array.of(7));
    expect(cache.state(key)).toBe('invalid');
    expect([...dram.line(key).subarray(0, 2)]).toEqual([1, 7]);
    expect(read(CacheAccess.WB)).toBe(1);
  });

  it('a no-snoop DMA write leaves a dirty copy cached, whose eviction overwrites the device\'s data', () => {
    const { cache, key, inDram, byte } = setup();
    cache.write(CacheAccess.WB, key, 0, byte(1));
    cache.dmaWrite(CacheAccess.DMA_NO_SNOOP, key, 0, byte(8));
    expect(inDram()).toBe(8);
    expect(cache.state(key)).toBe('dirty');
    cache.clflush(key);
    expect(inDram(), 'lost the device\'s write').toBe(1);
  });
});

describe('the stale read oracle', () => {
  it('counts by reader every read that missed the line\'s latest write: a UC read of a dirty line, a no-snoop DMA read of one, a WB hit on a clean line DRAM no longer matches', () => {
    const { cache, key, slot, byte, read } = setup({ sets: 128, ways: 4 }); // a page's 64 lines fit
    cache.write(CacheAccess.WB, key, 0, byte(1));
    read(CacheAccess.UC);
    cache.dmaRead(CacheAccess.DMA_NO_SNOOP, key, 0, new Uint8Array(1));
    expect(cache.staleReads()).toEqual({ cpu: 1, device: 1, migration: 0, firstKey: key });
    cache.clflush(key);
    // The migration thread reads the page (clean lines), the guest writes it WC, the migration thread reads it again.
    const page = new Uint8Array(PAGE_SIZE);
    cache.readPage(slot.firstPage + 3, page, 0);
    cache.write(CacheAccess.WC, key, 0, byte(2));
    cache.readPage(slot.firstPage + 3, page, 0);
    expect(page[128], 'line 2 of page 3: the stale copy').toBe(1);
    expect(cache.staleReads().migration).toBe(1);
  });

  it('counts nothing when every access is coherent: WB reads and writes, snooped DMA, UC after a flush', () => {
    const { cache, key, byte, read } = setup();
    cache.write(CacheAccess.WB, key, 0, byte(1));
    expect(read(CacheAccess.WB)).toBe(1);
    cache.dmaRead(CacheAccess.DMA_SNOOP, key, 0, new Uint8Array(1));
    cache.dmaWrite(CacheAccess.DMA_SNOOP, key, 0, byte(3));
    expect(read(CacheAccess.WB)).toBe(3);
    cache.clflush(key);
    expect(read(CacheAccess.UC)).toBe(3);
    expect(cache.staleReads()).toEqual({ cpu: 0, device: 0, migration: 0, firstKey: null });
  });

  it('counts a write-back that overwrites newer bytes a WC store or no-snoop DMA put in DRAM, and no other', () => {
    const { cache, key, byte } = setup();
    cache.write(CacheAccess.WB, key, 0, byte(1));
    cache.write(CacheAccess.WC, key, 0, byte(2));
    cache.clflush(key);
    expect(cache.stat(CacheStat.OVERWRITES)).toBe(1);
    expect(cache.staleReads().firstKey).toBe(key);
    // A WB store over the same bytes makes the cached copy the latest again: its write-back loses nothing.
    cache.write(CacheAccess.WB, key, 0, Uint8Array.of(1, 1, 1, 1));
    cache.dmaWrite(CacheAccess.DMA_NO_SNOOP, key, 0, Uint8Array.of(5, 5, 5, 5));
    cache.write(CacheAccess.WB, key, 0, Uint8Array.of(6, 6, 6, 6));
    cache.wbinvd();
    expect(cache.stat(CacheStat.OVERWRITES)).toBe(1);
    // A clean copy under a WC store, dirtied elsewhere in the line: its write-back overwrites the WC bytes.
    cache.read(CacheAccess.WB, key, 0, new Uint8Array(1));
    cache.write(CacheAccess.WC, key, 0, byte(7));
    cache.write(CacheAccess.WB, key, 32, byte(8));
    cache.clflush(key);
    expect(cache.stat(CacheStat.OVERWRITES)).toBe(2);
  });

  it('a DRAM read of bytes whose latest write is in DRAM (a WC store after the line was dirtied) is not stale; of the cached bytes it is', () => {
    const { cache, key } = setup();
    cache.write(CacheAccess.WB, key, 0, Uint8Array.of(1, 1, 1, 1));
    cache.write(CacheAccess.WC, key, 0, Uint8Array.of(2, 2, 2, 2));
    cache.dmaRead(CacheAccess.DMA_NO_SNOOP, key, 0, new Uint8Array(4));
    expect(cache.staleReads().device, 'DRAM holds the latest write of these bytes').toBe(0);
    cache.write(CacheAccess.WB, key, 16, Uint8Array.of(3));
    cache.dmaRead(CacheAccess.DMA_NO_SNOOP, key, 16, new Uint8Array(1));
    expect(cache.staleReads().device).toBe(1);
    // A WB read of the WC bytes hits the older cached copy: stale for the CPU.
    cache.read(CacheAccess.WB, key, 0, new Uint8Array(4));
    expect(cache.staleReads().cpu).toBe(1);
  });
});

describe('capacity, replacement and flushes', () => {
  it('WBINVD writes back every dirty line and invalidates all; it returns the lines written back', () => {
    const { cache, slot, dram } = setup({ sets: 64, ways: 4 });
    for (let l = 0; l < 10; l++) cache.write(CacheAccess.WB, lineKey(slot.firstPage, l * 64), 0, Uint8Array.of(l + 1));
    cache.read(CacheAccess.WB, lineKey(slot.firstPage + 1, 0), 0, new Uint8Array(1));
    expect(cache.wbinvd()).toBe(10);
    for (let l = 0; l < 10; l++) {
      expect(cache.state(lineKey(slot.firstPage, l * 64))).toBe('invalid');
      expect(dram.line(lineKey(slot.firstPage, l * 64))[0]).toBe(l + 1);
    }
    expect(cache.state(lineKey(slot.firstPage + 1, 0))).toBe('invalid');
  });

  it('holds at most sets * ways lines: a full set evicts a victim, writing it back when dirty; every write reaches DRAM in the end', () => {
    const { cache, slot, dram } = setup({ sets: 4, ways: 2 });
    const keys = Array.from({ length: 64 }, (_, i) => lineKey(slot.firstPage + (i >> 6), (i & 63) * 64));
    keys.forEach((k, i) => cache.write(CacheAccess.WB, k, 0, Uint8Array.of(i + 1)));
    expect(keys.filter((k) => cache.state(k) !== 'invalid').length).toBeLessThanOrEqual(8);
    expect(cache.stat(CacheStat.EVICTIONS)).toBeGreaterThanOrEqual(64 - 8);
    cache.wbinvd();
    keys.forEach((k, i) => expect(dram.line(k)[0]).toBe(i + 1));
  });

  it('replacement is seeded: the same accesses leave the same lines cached with the same seed', () => {
    const cachedAfter = (seed: number): string => {
      const { cache, slot } = setup({ sets: 2, ways: 4, seed });
      const keys = Array.from({ length: 200 }, (_, i) => lineKey(slot.firstPage + (i % 16), ((i * 7) % 64) * 64));
      for (const k of keys) cache.read(CacheAccess.WB, k, 0, new Uint8Array(1));
      return keys.map((k) => (cache.state(k) === 'invalid' ? '.' : 'x')).join('');
    };
    expect(cachedAfter(3)).toBe(cachedAfter(3));
    expect(new Set([1, 2, 3, 4, 5].map(cachedAfter)).size, 'seeds choose different victims').toBeGreaterThan(1);
  });
});

describe('bad input', () => {
  it('an access that crosses its line, a key out of range, a bad shape', () => {
    const { cache, key } = setup();
    expect(() => cache.read(CacheAccess.WB, key, 60, new Uint8Array(8))).toThrow('cpu cache: 8 bytes at offset 60 do not lie in one 64-byte line');
    expect(() => cache.clflush(-1)).toThrow('cpu cache: line key -1 out of range');
    expect(() => createCpuCacheLayout({ sets: 3, ways: 2, seed: 1, selfSnoop: false })).toThrow('cpu cache: sets must be a power of two, not 3');
    expect(() => createCpuCacheLayout({ sets: 4, ways: 0, seed: 1, selfSnoop: false })).toThrow('cpu cache: ways must be a positive integer, not 0');
  });
});

describe('shared by real threads', () => {
  it('four worker threads write their own bytes of the same lines through the cache, with fills, evictions and flushes racing: after WBINVD DRAM holds every thread\'s last write', async () => {
    const lines = 64;
    const rounds = 200;
    const layout = createCpuCacheLayout({ sets: 8, ways: 2, seed: 1, selfSnoop: false });
    const memory = new SharedArrayBuffer(lines * CACHE_LINE_SIZE);
    const bytes = new Uint8Array(memory);
    const dram: Dram = { line: (k) => bytes.subarray(k * 64, k * 64 + 64) };
    const workers = Array.from({ length: 4 }, (_, index) => new Worker(new URL('../workers/ts-bootstrap.mjs', import.meta.url), {
      workerData: { entry: new URL('./fixtures/cpu-cache-worker.ts', import.meta.url).href, data: { layout, dram: memory, index, lines, rounds } },
    }));
    await Promise.all(workers.map((w) => new Promise<void>((resolve, reject) => {
      w.once('message', () => resolve());
      w.once('error', reject);
    })));
    await Promise.all(workers.map((w) => w.terminate()));
    const cache = new CpuCache(layout, dram);
    cache.wbinvd();
    const view = new DataView(memory);
    for (let key = 0; key < lines; key++) {
      for (let t = 0; t < 4; t++) {
        expect([view.getUint32(key * 64 + t * 8, true), view.getUint32(key * 64 + t * 8 + 4, true)], `line ${key}, thread ${t}`).toEqual([rounds, key]);
      }
    }
    expect(cache.stat(CacheStat.EVICTIONS), 'the lines did not all fit: evictions raced').toBeGreaterThan(0);
  }, 60_000);
});
