import { lockWord, unlockWord } from '../../util/word-lock.ts';
import { EFAULT } from '../constants.ts';
import { DeviceMmio, NO_OWNER } from './device-mmio.ts';
import { BarRefusal, type MmioResource, VENDOR_SLOT_WORDS, VENDOR_TABLE_BASE, type VendorDriverLayout } from '../bar-layouts.ts';
export type { MmioResource, VendorDriverLayout } from '../bar-layouts.ts';
export { createVendorDriverLayout } from '../bar-layouts.ts';

/**
 * The vendor driver of a mediated device shared by several VMs (a vGPU's), as the 2016
 * design of mapping MMIO on fault has it: each VM sees a virtual BAR whose pages are
 * backed by slices of the device's physical MMIO (device-mmio.ts) that the driver
 * allocates and frees at run time, per VM and per resource (a VM that launches more
 * graphics work gets more of resource A). Nothing is mapped at mmap time; on the first
 * access the fault handler asks `validateMapRequest(vm, pos)` which slice backs BAR page
 * `pos` for that VM, how much to map and with what protection, or refuses.
 *
 * The virtual BAR is laid out by resource: resource r holds BAR pages
 * [barOffset, barOffset + maxPages), backed by a contiguous slice of up to maxPages
 * physical pages once allocated; a BAR page past the allocation (or of a resource not
 * allocated yet: the guest touching the BAR before the allocation was communicated, the
 * race the 2016 thread raised) is refused.
 *
 * Shared memory, for the driver's own thread and the vCPU threads whose faults call the
 * validate callback: the allocation table under one lock word (the driver's mutex, held
 * for a lookup or an update, never across a step).
 */
/** The driver's table: word 0 the lock, then per (vm, resource) the slot's words (bar-layouts.ts). */
const LOCK = 0;
/** A slot's words: first pfn + 1 (0: not allocated), pages, 1 while being reclaimed. */
const SLOT_PFN = 0;
const SLOT_PAGES = 1;
const SLOT_RECLAIMING = 2;
const SLOT_WORDS = VENDOR_SLOT_WORDS;
const TABLE_BASE = VENDOR_TABLE_BASE;

/** A refused fault: the errno, why (BarRefusal) and the words of it. */
export interface Refusal { ok: false; errno: number; reason: BarRefusal; why: string }

/** validate_map_request's answer: map `pages` BAR pages from `barPage` on to physical pages from `pfn`, or refuse. */
export type MapRequest =
  | { ok: true; barPage: number; pfn: number; pages: number; writable: boolean }
  | Refusal;

/** A slice the driver gave a VM. */
export interface MmioSlice { vm: number; resource: number; pfn: number; pages: number }

export class VendorDriver {
  readonly mmio: DeviceMmio;
  readonly barPages: number;
  readonly resources: readonly MmioResource[];
  private readonly t: Int32Array;

  constructor(readonly layout: VendorDriverLayout) {
    this.mmio = new DeviceMmio(layout.mmio);
    this.barPages = layout.barPages;
    this.resources = layout.resources;
    this.t = new Int32Array(layout.table);
  }

  /**
   * validate_map_request(mdev, pos, &virtaddr, &pfn, &size, &prot) for BAR page `pos` of
   * VM `vm`: the whole allocated part of the resource holding it, from its first BAR page.
   */
  validateMapRequest(vm: number, pos: number): MapRequest {
    const r = this.resourceAt(pos);
    if (r < 0) return { ok: false, errno: EFAULT, reason: BarRefusal.NO_RESOURCE, why: `BAR page ${pos} belongs to no resource` };
    const res = this.resources[r]!;
    const { pfn, pages, reclaiming } = this.locked(() => this.slot(vm, r));
    if (pfn === NO_OWNER) return { ok: false, errno: EFAULT, reason: BarRefusal.NOT_ALLOCATED, why: `resource ${res.name} is not allocated to vm${vm}` };
    if (reclaiming) return { ok: false, errno: EFAULT, reason: BarRefusal.NOT_ALLOCATED, why: `resource ${res.name} is being taken back from vm${vm}` };
    if (pos >= res.barOffset + pages) return { ok: false, errno: EFAULT, reason: BarRefusal.PAST_ALLOCATION, why: `BAR page ${pos} is past vm${vm}'s ${pages} page(s) of ${res.name}` };
    return { ok: true, barPage: res.barOffset, pfn, pages, writable: res.writable };
  }

  /** The slice of resource `r` VM `vm` holds, or null. */
  sliceOf(vm: number, r: number): MmioSlice | null {
    const { pfn, pages } = this.locked(() => this.slot(vm, r));
    return pfn === NO_OWNER ? null : { vm, resource: r, pfn, pages };
  }

  /**
   * Gives VM `vm` `pages` contiguous free physical pages for resource `r` (first fit), or
   * null when none are free or it holds that resource already. The pages change owner.
   */
  allocate(vm: number, r: number, pages: number): MmioSlice | null {
    const res = this.resources[r];
    if (res === undefined || pages < 1 || pages > res.maxPages) throw new Error(`vendor driver: ${pages} pages of resource ${r}`);
    return this.locked(() => {
      if (this.slot(vm, r).pfn !== NO_OWNER) return null;
      const pfn = this.firstFree(pages);
      if (pfn < 0) return null;
      for (let p = pfn; p < pfn + pages; p++) this.mmio.setOwner(p, vm);
      this.setSlot(vm, r, pfn, pages, false);
      return { vm, resource: r, pfn, pages };
    });
  }

  /** The resource holding BAR page `pos`, or -1. */
  resourceAt(pos: number): number {
    return this.resources.findIndex((x) => pos >= x.barOffset && pos < x.barOffset + x.maxPages);
  }

  /** The largest run of free physical pages. */
  largestFree(): number {
    let run = 0;
    let best = 0;
    for (let p = 0; p < this.mmio.pages; p++) {
      run = this.mmio.owner(p) === NO_OWNER ? run + 1 : 0;
      if (run > best) best = run;
    }
    return best;
  }

  /**
   * The first step of taking resource `r` back from VM `vm`: from now on validate refuses
   * its pages, so that no fault maps them again while the caller unmaps them (as
   * vfio-pci's faults take memory_lock and refuse once memory is disabled). Returns false
   * when the VM does not hold it.
   */
  beginReclaim(vm: number, r: number): boolean {
    return this.locked(() => {
      const { pfn, pages } = this.slot(vm, r);
      if (pfn === NO_OWNER) return false;
      this.setSlot(vm, r, pfn, pages, true);
      return true;
    });
  }

  /**
   * Takes resource `r` back from VM `vm`: its pages are free for another VM. The caller
   * has zapped every user mapping of them first (unmap_mapping_range): after this,
   * nothing may reach them for `vm` (vfio-bar-mapping.ts).
   */
  free(vm: number, r: number): MmioSlice | null {
    return this.locked(() => {
      const { pfn, pages } = this.slot(vm, r);
      if (pfn === NO_OWNER) return null;
      for (let p = pfn; p < pfn + pages; p++) this.mmio.setOwner(p, NO_OWNER);
      this.setSlot(vm, r, NO_OWNER, 0, false);
      return { vm, resource: r, pfn, pages };
    });
  }

  private firstFree(pages: number): number {
    let run = 0;
    for (let p = 0; p < this.mmio.pages; p++) {
      run = this.mmio.owner(p) === NO_OWNER ? run + 1 : 0;
      if (run === pages) return p - pages + 1;
    }
    return -1;
  }

  private slotAt(vm: number, r: number): number {
    if (!Number.isInteger(vm) || vm < 0 || vm >= this.layout.vms) throw new Error(`vendor driver: no vm${vm}`);
    return TABLE_BASE + (vm * this.resources.length + r) * SLOT_WORDS;
  }

  private slot(vm: number, r: number): { pfn: number; pages: number; reclaiming: boolean } {
    const at = this.slotAt(vm, r);
    return {
      pfn: Atomics.load(this.t, at + SLOT_PFN) - 1, pages: Atomics.load(this.t, at + SLOT_PAGES),
      reclaiming: Atomics.load(this.t, at + SLOT_RECLAIMING) !== 0,
    };
  }

  private setSlot(vm: number, r: number, pfn: number, pages: number, reclaiming: boolean): void {
    const at = this.slotAt(vm, r);
    Atomics.store(this.t, at + SLOT_PAGES, pages);
    Atomics.store(this.t, at + SLOT_RECLAIMING, reclaiming ? 1 : 0);
    Atomics.store(this.t, at + SLOT_PFN, pfn + 1);
  }

  /** Runs `f` holding the table's lock (the driver's mutex). */
  private locked<T>(f: () => T): T {
    lockWord(this.t, LOCK);
    try {
      return f();
    } finally {
      unlockWord(this.t, LOCK);
    }
  }
}
