import { PAGE_SIZE } from '../constants.ts';
import type { VendorDriver } from './vendor-driver.ts';

/** A part of a device's saved state: a resource and the pages of it the VM held. */
export interface MdevStatePart { name: string; pages: number }

/**
 * The vendor driver's save of one VM's share of a mediated device (VFIO migration's
 * STOP_COPY data, read by the driver itself once the VM stopped): each resource the VM
 * holds, with its MMIO pages' bytes, in resource order. BAR contents are device state, not
 * guest RAM: nothing of it goes through the VMM's mapping, and none of the VM's mappings
 * travels (the destination faults its BAR in again).
 */
export function saveMdevState(driver: VendorDriver, vm: number): { parts: MdevStatePart[]; bytes: Uint8Array } {
  const parts: MdevStatePart[] = [];
  const slices = driver.resources.map((_, r) => driver.sliceOf(vm, r));
  const pages = slices.reduce((n, s) => n + (s?.pages ?? 0), 0);
  const bytes = new Uint8Array(pages * PAGE_SIZE);
  let at = 0;
  for (const [r, s] of slices.entries()) {
    if (s === null) continue;
    parts.push({ name: driver.resources[r]!.name, pages: s.pages });
    bytes.set(driver.mmio.bytesOf(s.pfn, s.pages), at);
    at += s.pages * PAGE_SIZE;
  }
  return { parts, bytes };
}

/**
 * The destination vendor driver's load (VFIO's RESUMING data): a slice of each saved
 * resource for VM `vm`, of the same size, filled with the saved bytes. All or nothing:
 * a resource this device lacks, more pages than it allows, or no room for a slice fails
 * the load (the migration fails) with nothing left allocated.
 */
export function loadMdevState(driver: VendorDriver, vm: number, parts: readonly MdevStatePart[], bytes: Uint8Array): void {
  const done: number[] = [];
  let at = 0;
  try {
    for (const p of parts) {
      const r = driver.resources.findIndex((x) => x.name === p.name);
      if (r < 0) throw new Error(`this device has no resource ${p.name}`);
      const res = driver.resources[r]!;
      if (p.pages < 1 || p.pages > res.maxPages) throw new Error(`${p.pages} pages of ${p.name}, which has at most ${res.maxPages}`);
      const s = driver.allocate(vm, r, p.pages);
      if (s === null) throw new Error(`no room for ${p.pages} pages of ${p.name} for vm${vm}`);
      done.push(r);
      driver.mmio.bytesOf(s.pfn, s.pages).set(bytes.subarray(at, at + p.pages * PAGE_SIZE));
      at += p.pages * PAGE_SIZE;
    }
  } catch (e) {
    for (const r of done) driver.free(vm, r);
    throw e;
  }
}
