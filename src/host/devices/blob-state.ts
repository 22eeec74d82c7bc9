import { PAGE_SIZE } from '../constants.ts';
import { CacheReader } from '../cpu-cache.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';

/** Where encodePages reads a slot's pages (migration/stream.ts PageSource, repeated here so devices stay below migration). */
export interface BlobPages {
  isZero(page: number): boolean;
  copy(page: number, count: number, into: Uint8Array, at: number): void;
}

/**
 * The GPU device's save handler for a blob resource in a KVM-only slot (the
 * device-state policy): virglrenderer saves GPU state itself, as the seed discussion has
 * it, and QEMU runs device save handlers in the migration thread once the VM is stopped.
 * It reads the resource through the device's own access, never through the VMM's
 * mapping of guest RAM (there is none): device memory (a VRAM BAR) as the GPU sees it,
 * memory itself; a host RAM blob through the renderer's write-back mapping, which the
 * CPU caches keep coherent with the guest's cached stores.
 */
export function blobStateOf(vm: Vm, slot: Memslot): BlobPages {
  const cache = vm.cache;
  if (cache === null || slot.hostMmio) {
    return { isZero: (page) => slot.isZeroPage(page), copy: (page, count, into, at) => slot.copyPages(page, count, into, at) };
  }
  const scratch = new Uint8Array(PAGE_SIZE);
  const read = (page: number, into: Uint8Array, at: number): void => cache.readPage(slot.firstPage + page, into, at, CacheReader.DEVICE);
  return {
    isZero: (page) => { read(page, scratch, 0); return scratch.every((b) => b === 0); },
    copy: (page, count, into, at) => { for (let i = 0; i < count; i++) read(page + i, into, at + i * PAGE_SIZE); },
  };
}
