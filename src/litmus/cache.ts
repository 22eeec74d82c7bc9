import { PAGE_SIZE } from '../host/constants.ts';
import { CacheAccess, CacheStat, type CpuCache, type CpuCacheConfig, DEFAULT_CPU_CACHE, lineKey } from '../host/cpu-cache.ts';
import {
  MEMORY_TYPE_NAMES, X86_MEMTYPE_WB, eptIgnoresPat, eptMemoryType,
} from '../host/memory-type.ts';
import { Memslot } from '../host/memslot.ts';
import { spteMtMask } from '../host/spte.ts';
import type { Vm } from '../host/vm.ts';
import type { CpuCacheMode } from '../scenarios/options.ts';
import { type MigrationFlush, cachedPagesOf, flushBeforeRead } from '../migration/precopy.ts';

/**
 * The CPU cache model (host/cpu-cache.ts) as litmus files see it: the VM's cache from
 * vm.cpu_cache, what a vCPU access through it got, the migration thread's and the
 * device's reads and writes, and the stale read and machine check oracles' counts as
 * trace lines.
 */

/**
 * vm.cpu_cache: the migration scenarios' cache (2 MiB, 8 ways, seeded replacement, so a
 * run repeats exactly), with or without self-snoop; `off`: none (no cache model at all).
 */
export function cpuCacheConfig(mode: CpuCacheMode): CpuCacheConfig | undefined {
  return mode === 'off' ? undefined : { ...DEFAULT_CPU_CACHE, selfSnoop: mode === 'self-snoop' };
}

export type LineState = ReturnType<CpuCache['state']>;
export const LINE_STATES: readonly LineState[] = ['invalid', 'clean', 'dirty'];

/** The key of the page's first line: the one litmus operations write and read (the first 8 bytes and the stamp). */
function firstLine(slot: Memslot, page: number): number {
  return lineKey(slot.firstPage + page, 0);
}

/** Two little-endian u32 words as the u64 value Memslot.readU64 gives. */
function u64(w: Uint32Array): number {
  return w[0]! + w[1]! * 4294967296;
}

/** The first 8 bytes of a line as a DMA read of `access` returns them. */
function dmaRead64(cache: CpuCache, access: CacheAccess.DMA_SNOOP | CacheAccess.DMA_NO_SNOOP, key: number): number {
  const w = new Uint32Array(2);
  cache.dmaRead(access, key, 0, new Uint8Array(w.buffer));
  return u64(w);
}

/** The state of the page's first line in the cache. */
export function firstLineState(cache: CpuCache, slot: Memslot, page: number): LineState {
  return cache.state(firstLine(slot, page));
}

/**
 * Where a vCPU's store to (or read of) the page went, by its memory type, for the trace: a
 * host MMIO slot's memory is device memory (a WB access to it is the machine check oracle's line).
 */
export function accessText(vm: Vm, slot: Memslot, page: number, store: boolean): string {
  const type = vm.accessMemoryType(slot, page);
  const cached = type === X86_MEMTYPE_WB;
  const memory = slot.hostMmio ? 'device memory' : 'memory';
  return `${MEMORY_TYPE_NAMES[type]}: ${store ? (cached ? 'into the cache, the line dirty' : `to ${memory}`) : (cached ? 'through the cache' : `from ${memory}`)}`;
}

/** The memory type an SPTE got at its fault (vmx_get_mt_mask), for the trace. */
export function spteTypeText(spte: number): string {
  const mt = spteMtMask(spte);
  return `EPT ${MEMORY_TYPE_NAMES[eptMemoryType(mt)]}${eptIgnoresPat(mt) ? ' + IPAT (the guest\'s PAT ignored)' : ' (the guest\'s PAT honoured)'}`;
}

/** The page's first 8 bytes as a snoop sees them: the cached data if any, else memory (no counter moves, nothing changes). */
function snoop(cache: CpuCache, slot: Memslot, page: number): number {
  return dmaRead64(cache, CacheAccess.DMA_SNOOP, firstLine(slot, page));
}

/** What a vCPU's read of the page's first 8 bytes just returned: a WB read left its line cached, any other went to memory. */
export function vcpuReadValue(vm: Vm, slot: Memslot, page: number): number {
  return vm.accessMemoryType(slot, page) === X86_MEMTYPE_WB ? snoop(vm.cache!, slot, page) : slot.readU64(page);
}

/** The page's latest value: a dirty line's data, else memory's (a clean line that differs from memory is the stale one). */
export function latestValue(vm: Vm, slot: Memslot, page: number): number {
  const cache = vm.cache;
  return cache !== null && firstLineState(cache, slot, page) === 'dirty' ? snoop(cache, slot, page) : slot.readU64(page);
}

/**
 * The migration thread's read of one page through the cache (precopy.ts cachedPagesOf):
 * write-back; with `flushFirst` (--noncoherent-migration clflush-before-read) flushed from
 * the cache first while KVM honours the guest's PAT there, as precopy's flushFirst decides,
 * unless migrate-noncoherent-without-flush skips the flush (counted as acted).
 */
export function migrationRead(vm: Vm, slot: Memslot, page: number, flushFirst: boolean, withoutFlush: boolean): { value: number; flush: MigrationFlush } {
  const cache = vm.cache!;
  const flush = flushBeforeRead(vm, slot, flushFirst, withoutFlush, 1);
  const bytes = new Uint8Array(PAGE_SIZE);
  cachedPagesOf(slot, cache, flush === 'flush').copy(page, 1, bytes, 0);
  return { value: u64(new Uint32Array(bytes.buffer, 0, 2)), flush };
}

/**
 * Who read stale data, as the stale read oracle counts it (CpuCache.staleReads), and
 * `overwrite`: a write-back that overwrote newer data in memory (CacheStat.OVERWRITES).
 */
export type StaleReader = 'cpu' | 'device' | 'migration' | 'overwrite';
export const STALE_READERS: readonly StaleReader[] = ['cpu', 'device', 'migration', 'overwrite'];
export type StaleCounts = Record<StaleReader, number>;

const STALE_TEXT: Record<StaleReader, string> = {
  cpu: 'a vCPU read older data than the latest write (a WB hit on a line memory no longer matches, or a UC or WC read while the line was dirty in the cache)',
  device: 'the device\'s no-snoop DMA read memory while a newer write sat dirty in the CPU cache',
  migration: 'the migration thread\'s write-back read hit a cache line older than memory (a UC or WC store or no-snoop DMA wrote behind the cache)',
  overwrite: 'a dirty cache line was written back over newer data a UC or WC store or no-snoop DMA had put in memory',
};

export function staleCounts(cache: CpuCache): StaleCounts {
  const { cpu, device, migration } = cache.staleReads();
  return { cpu, device, migration, overwrite: cache.stat(CacheStat.OVERWRITES) };
}

/** The stale reads between two counts (null: no cache model), one line per reader, named as `expect.stale` names it. */
export function staleReadLines(before: StaleCounts | null, now: StaleCounts | null): string[] {
  if (before === null || now === null) return [];
  return STALE_READERS.filter((r) => now[r] > before[r]).map((r) => `ORACLE: ${r === 'overwrite' ? 'write-back over newer data' : 'stale read'} (${r}${now[r] - before[r] > 1 ? `, ${now[r] - before[r]} times` : ''}): ${STALE_TEXT[r]}`);
}

/** The machine checks between two counts, as a line named as `expect.machine_checks` names it; `at`: the access's page. */
export function machineCheckLines(before: number, now: number, at: string): string[] {
  if (now <= before) return [];
  return [`ORACLE: machine check${now - before > 1 ? ` (${now - before} times)` : ''}: a cacheable (WB) access to device memory at ${at}; vmx_get_mt_mask types host MMIO UC so that none happens`];
}
