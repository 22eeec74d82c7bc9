import { EEXIST, EINVAL, ENOENT, ENOSPC, PAGE_SIZE } from '../constants.ts';
import { Acted, type InjectionCounters } from '../injections.ts';
import type { GuestMemory } from '../guest-memory.ts';
import { DomainLock, LockHolder } from './domain-lock.ts';
import { IOPTE_HEAD, IOPTE_PRESENT, IoPageTable } from './io-page-table.ts';
import { DeviceWord, type IommuBackendKind, type IommuLayout, IoPte, IommuWord, deviceBase } from './iommu-layout.ts';
import { IotlbInvalidation } from './iotlb-invalidation.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from './constants.ts';
import { type Steps } from '../../roles/role.ts';
import { DmaRecords } from './dma-records.ts';
import { errnoName } from '../../util/errors.ts';
import { hex } from '../../util/hex.ts';

/** Mistakes the IOMMU side can be built with (src/bugs/catalog.ts). */
export interface IommuBugs {
  /** Unmap returns without invalidating the device IOTLBs. */
  staleIotlbAfterUnmap?: boolean;
  /** Read-only pins mark their pages dirty, as vfio_pin_pages does today (the seeds propose separate read pins). */
  readPinDirties?: boolean;
}

/** What an ioctl returned: 0 or a count on success, -errno on failure, with the reason. */
export interface IoctlResult { ret: number; detail: string }
const ok = (ret: number): IoctlResult => ({ ret, detail: '' });
/** A failed ioctl: "NAME: ERRNO: why", as KvmError words it. */
const fail = (errno: number, name: string, why: string): IoctlResult => ({ ret: -errno, detail: `${name}: ${errnoName(errno)}: ${why}` });

/** Pin counts: write pins in the low half of the word, read pins in the high half. */
const READ_PIN = 1 << 16;

/**
 * The IOMMU as both backends present it to userspace and to vendor drivers: one DMA
 * address space, its I/O page table, and the backend's rules.
 * - VFIO type1 (drivers/vfio/vfio_iommu_type1.c): every VFIO_IOMMU_MAP_DMA is one entry,
 *   at most dma_entry_limit of them (ENOSPC beyond); an overlapping map fails with EEXIST;
 *   an unmap may not split an entry (EINVAL) and unmapping nothing returns size 0. Dirty
 *   tracking (VFIO_IOMMU_DIRTY_PAGES) reports every mapped page unless every device
 *   declared a pinned page scope; then pinned pages and dma_rw writes, refilled with the
 *   pinned pages after each report.
 * - iommufd (drivers/iommu/iommufd): no entry limit; an unmap that cuts an area and one
 *   that unmaps nothing fail with ENOENT (iopt_unmap_iova_range);
 *   hardware dirty bits in the IOPTEs, read and cleared with an IOTLB flush, or read only
 *   with NO_CLEAR.
 * Usable from any thread with the layout; map and unmap run on the IOMMU service.
 */
export class Iommu {
  readonly backend: IommuBackendKind;
  readonly table: IoPageTable;
  readonly words: Int32Array;
  readonly lock: DomainLock;
  readonly invalidation: IotlbInvalidation;
  readonly dmaRecords: DmaRecords;
  private readonly type1Dirty: Int32Array;
  private readonly pins: Int32Array;
  readonly deviceLogs: Int32Array[];
  private readonly unmapDirty: Int32Array;

  constructor(readonly layout: IommuLayout, readonly memory: GuestMemory, readonly bugs: IommuBugs = {}, private readonly acts?: InjectionCounters) {
    this.backend = layout.config.backend;
    this.table = new IoPageTable(layout.iopte, layout.config.iovaPages);
    this.words = new Int32Array(layout.words);
    this.lock = new DomainLock(this.words);
    this.invalidation = new IotlbInvalidation(this.words, layout.config.devices);
    this.dmaRecords = new DmaRecords(this.words, layout.records);
    this.type1Dirty = new Int32Array(layout.type1Dirty);
    this.pins = new Int32Array(layout.pins);
    this.deviceLogs = layout.deviceLogs.map((b) => new Int32Array(b));
    this.unmapDirty = new Int32Array(layout.unmapDirty);
  }

  /** The VM-wide page number of a guest frame, or -1 when no memslot holds it. */
  vmPage(gfn: number): number {
    const s = this.memory.findSlot(gfn);
    return s === undefined ? -1 : s.firstPage + (gfn - s.baseGfn);
  }

  private ioctl(name: string): string {
    return this.backend === 'type1' ? name : name.replace('VFIO_IOMMU_MAP_DMA', 'IOMMU_IOAS_MAP').replace('VFIO_IOMMU_UNMAP_DMA', 'IOMMU_IOAS_UNMAP');
  }

  /**
   * VFIO_IOMMU_MAP_DMA (type1) / IOMMU_IOAS_MAP (iommufd) at a fixed IOVA: `size` bytes
   * of guest memory from `gpa` at `iova`. Call with the domain lock held (or before any
   * other actor runs).
   */
  mapDma(iova: number, size: number, gpa: number, flags: number): IoctlResult {
    const name = this.ioctl('VFIO_IOMMU_MAP_DMA');
    const r = this.checkMap(name, iova, size, gpa, flags);
    if (r !== null) { Atomics.add(this.words, IommuWord.MAP_ERRORS, 1); return r; }
    const first = iova / PAGE_SIZE;
    const pages = size / PAGE_SIZE;
    const gfn = gpa / PAGE_SIZE;
    const prot = (flags & VFIO_DMA_MAP_FLAG_READ ? IoPte.READ : 0) | (flags & VFIO_DMA_MAP_FLAG_WRITE ? IoPte.WRITE : 0);
    for (let i = 0; i < pages; i++) this.table.set(first + i, gfn + i, prot | (i === 0 ? IOPTE_HEAD : 0));
    Atomics.add(this.words, IommuWord.MAPS, 1);
    Atomics.add(this.words, IommuWord.ENTRIES, 1);
    Atomics.add(this.words, IommuWord.PAGES_MAPPED, pages);
    return ok(0);
  }

  private checkMap(name: string, iova: number, size: number, gpa: number, flags: number): IoctlResult | null {
    if ((flags & (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)) === 0 || (flags & ~3) !== 0) return fail(EINVAL, name, `flags ${hex(flags)}: neither READ nor WRITE, or unknown bits`);
    for (const [what, v] of [['iova', iova], ['size', size], ['vaddr', gpa]] as const) {
      if (!Number.isSafeInteger(v) || v < 0 || v % PAGE_SIZE !== 0) return fail(EINVAL, name, `${what} ${typeof v === 'number' ? hex(v) : v} is not a multiple of the ${PAGE_SIZE}-byte IOMMU page size`);
    }
    if (size === 0) return fail(EINVAL, name, `size 0`);
    const first = iova / PAGE_SIZE;
    const pages = size / PAGE_SIZE;
    if (first + pages > this.table.pages) return fail(EINVAL, name, `iova ${hex(iova)} + size ${hex(size)} passes the end of the IOVA aperture (${hex(this.table.pages * PAGE_SIZE)})`);
    const gfn = gpa / PAGE_SIZE;
    for (let i = 0; i < pages; i++) {
      if (this.vmPage(gfn + i) < 0) return fail(EINVAL, name, `vaddr ${hex(gpa + i * PAGE_SIZE)} is not guest RAM (no memslot)`);
    }
    for (let i = 0; i < pages; i++) {
      if (this.table.gfn(first + i) >= 0) return fail(EEXIST, name, `iova ${hex(iova)} size ${hex(size)} overlaps the mapping at ${hex((first + i) * PAGE_SIZE)}`);
    }
    if (this.backend === 'type1' && Atomics.load(this.words, IommuWord.ENTRIES) >= this.layout.config.dmaEntryLimit) {
      return fail(ENOSPC, name, `the container holds ${this.layout.config.dmaEntryLimit} mappings, its dma_entry_limit`);
    }
    return null;
  }

  /**
   * VFIO_IOMMU_UNMAP_DMA / IOMMU_IOAS_UNMAP: revoke the entries, invalidate every device
   * IOTLB and wait for it, then (tracking on) read the range's dirty bits into the
   * unmap-dirty bitmap, as QEMU does when it unmaps during migration, and free the
   * entries. Returns the bytes unmapped.
   */
  *unmapDma(iova: number, size: number, holder: number = LockHolder.SERVICE): Steps<IoctlResult> {
    const name = this.ioctl('VFIO_IOMMU_UNMAP_DMA');
    if (!Number.isSafeInteger(iova) || !Number.isSafeInteger(size) || iova < 0 || size <= 0 || iova % PAGE_SIZE !== 0 || size % PAGE_SIZE !== 0) {
      Atomics.add(this.words, IommuWord.UNMAP_ERRORS, 1);
      return fail(EINVAL, name, `iova ${hex(iova)} size ${hex(size)}: not ${PAGE_SIZE}-byte aligned, or empty`);
    }
    const first = iova / PAGE_SIZE;
    const last = Math.min(first + size / PAGE_SIZE, this.table.pages);
    yield* this.lock.acquire(holder);
    const t = this.table;
    // An unmap may not split a mapping: it starts at a mapping's head (or where nothing is mapped) and ends where one ends.
    const splits = (first < last && t.gfn(first) >= 0 && (t.flags(first) & IOPTE_HEAD) === 0)
      || (last < t.pages && t.gfn(last) >= 0 && (t.flags(last) & IOPTE_HEAD) === 0);
    if (splits) {
      this.lock.release();
      Atomics.add(this.words, IommuWord.UNMAP_ERRORS, 1);
      return fail(this.backend === 'iommufd' ? ENOENT : EINVAL, name, `iova ${hex(iova)} size ${hex(size)} would split a mapping`);
    }
    let pages = 0;
    let entries = 0;
    for (let p = first; p < last; p++) {
      if ((t.flags(p) & IOPTE_PRESENT) === 0) continue;
      const old = t.revoke(p);
      pages++;
      if (old & IOPTE_HEAD) entries++;
    }
    this.lock.release();
    if (pages === 0) {
      if (this.backend === 'type1') return ok(0); // type1 unmaps nothing and says size 0
      Atomics.add(this.words, IommuWord.UNMAP_ERRORS, 1);
      return fail(ENOENT, name, `nothing is mapped at iova ${hex(iova)} size ${hex(size)}`);
    }
    yield undefined;
    if (!this.bugs.staleIotlbAfterUnmap) yield* this.invalidation.invalidateAll();
    else this.acts?.acted(Acted.STALE_IOTLB_AFTER_UNMAP);
    yield* this.lock.acquire(holder);
    for (let p = first; p < last; p++) {
      if (t.gfn(p) < 0 || (t.flags(p) & IOPTE_PRESENT) !== 0) continue;
      this.collectUnmapped(p);
      t.clear(p);
    }
    this.lock.release();
    Atomics.add(this.words, IommuWord.UNMAPS, 1);
    Atomics.sub(this.words, IommuWord.ENTRIES, entries);
    Atomics.sub(this.words, IommuWord.PAGES_MAPPED, pages);
    yield undefined;
    return ok(pages * PAGE_SIZE);
  }

  /** An unmapped page's dirtiness, read before its entry is freed (QEMU: the unmap's dirty bitmap / a NO_CLEAR read). */
  private collectUnmapped(iova: number): void {
    const vmPage = this.vmPage(this.table.gfn(iova));
    const w = iova >>> 5;
    const bit = 1 << (iova & 31);
    let dirty = false;
    if (Atomics.load(this.words, IommuWord.TYPE1_TRACKING) !== 0 && Atomics.load(this.words, IommuWord.PINNED_SCOPE) === 0) dirty = true;
    if ((Atomics.and(this.type1Dirty, w, ~bit) & bit) !== 0) dirty = true;
    if ((this.table.flags(iova) & IoPte.DIRTY) !== 0) dirty = true;
    for (const log of this.deviceLogs) if ((Atomics.and(log, w, ~bit) & bit) !== 0) dirty = true;
    if (dirty && vmPage >= 0) Atomics.or(this.unmapDirty, vmPage >>> 5, 1 << (vmPage & 31));
  }

  /** Takes the pages unmapped dirty since the last call (VM-wide page numbers). */
  takeUnmapDirty(report: (vmPage: number) => void): number {
    return drainBits(this.unmapDirty, report);
  }

  // ---- pins and dma_rw (mediated devices behind the emulated IOMMU; call with the lock held) ----

  /**
   * vfio_pin_pages for one IOVA page: the gfn it maps, or -errno. A write pin marks the
   * page dirty while type1 tracking is on (and read pins do too with read-pin-dirties).
   */
  pinPage(iova: number, write: boolean): number {
    const t = this.table;
    if (!t.inRange(iova) || !t.present(iova)) return -EINVAL;
    if (write && (t.flags(iova) & IoPte.WRITE) === 0) return -EINVAL;
    Atomics.add(this.pins, iova, write ? 1 : READ_PIN);
    if (write || this.bugs.readPinDirties) {
      if (!write && Atomics.load(this.words, IommuWord.TYPE1_TRACKING) !== 0) this.acts?.acted(Acted.READ_PIN_DIRTIES);
      this.markType1(iova);
    }
    return t.gfn(iova);
  }

  unpinPage(iova: number, write: boolean): void {
    Atomics.sub(this.pins, iova, write ? 1 : READ_PIN);
  }

  /** VFIO_IOMMU_DIRTY_PAGES tracking is on. */
  get type1Tracking(): boolean { return Atomics.load(this.words, IommuWord.TYPE1_TRACKING) !== 0; }

  /** Marks an IOVA page in type1's dirty bitmap while its tracking is on (pins, dma_rw writes). */
  markType1(iova: number): void {
    if (Atomics.load(this.words, IommuWord.TYPE1_TRACKING) === 0) return;
    Atomics.or(this.type1Dirty, iova >>> 5, 1 << (iova & 31));
  }

  private pinnedDirty(iova: number): boolean {
    const p = Atomics.load(this.pins, iova);
    return (p & 0xffff) !== 0 || (this.bugs.readPinDirties === true && p >>> 16 !== 0);
  }

  // ---- dirty tracking ----

  /** VFIO_IOMMU_DIRTY_PAGES with FLAG_START: the bitmap starts with the pinned pages. */
  type1StartDirtyTracking(): void {
    this.type1Dirty.fill(0);
    Atomics.store(this.words, IommuWord.TYPE1_TRACKING, 1);
    for (let i = 0; i < this.table.pages; i++) if (this.pinnedDirty(i)) this.markType1(i);
  }

  type1StopDirtyTracking(): void {
    Atomics.store(this.words, IommuWord.TYPE1_TRACKING, 0);
  }

  /**
   * VFIO_IOMMU_DIRTY_PAGES with FLAG_GET_BITMAP over the whole IOVA space. Without a
   * pinned page scope every mapped page is dirty on every query; with it, the pages set
   * since the last query, after which the bitmap is refilled with the pinned pages.
   * Reports VM-wide page numbers; returns how many.
   */
  *type1GetDirtyBitmap(report: (vmPage: number) => void): Steps<number> {
    yield* this.lock.acquire(LockHolder.MIGRATION);
    const t = this.table;
    let n = 0;
    if (Atomics.load(this.words, IommuWord.PINNED_SCOPE) === 0) {
      for (let i = 0; i < t.pages; i++) {
        if (!t.present(i)) continue;
        const p = this.vmPage(t.gfn(i));
        if (p >= 0) { report(p); n++; }
      }
    } else {
      drainBits(this.type1Dirty, (iova) => {
        const p = this.vmPage(t.gfn(iova));
        if (p >= 0) { report(p); n++; }
      });
      for (let i = 0; i < t.pages; i++) if (this.pinnedDirty(i)) this.markType1(i);
    }
    this.lock.release();
    yield undefined;
    return n;
  }

  /**
   * IOMMU_HWPT_SET_DIRTY_TRACKING. Enabling starts from clean dirty bits and flushes the
   * device IOTLBs, so no cached entry still believes its IOPTE is dirty.
   */
  *hwptSetDirtyTracking(enable: boolean): Steps {
    if (enable) for (let i = 0; i < this.table.pages; i++) this.table.and(i, ~IoPte.DIRTY);
    Atomics.store(this.words, IommuWord.HWPT_TRACKING, enable ? 1 : 0);
    if (enable) yield* this.invalidation.invalidateAll();
  }

  /**
   * IOMMU_HWPT_GET_DIRTY_BITMAP over the whole IOVA space: the IOPTEs' dirty bits, read
   * and cleared, then an IOTLB flush so that devices set them again on their next write
   * (an IOTLB entry caches that its IOPTE is already dirty). With NO_CLEAR: read only.
   */
  *hwptGetDirtyBitmap(report: (vmPage: number) => void, noClear: boolean): Steps<number> {
    yield* this.lock.acquire(LockHolder.MIGRATION);
    const t = this.table;
    let n = 0;
    for (let i = 0; i < t.pages; i++) {
      if ((t.flags(i) & IoPte.DIRTY) === 0) continue;
      if (!noClear) t.and(i, ~IoPte.DIRTY);
      const p = this.vmPage(t.gfn(i));
      if (p >= 0) { report(p); n++; }
    }
    this.lock.release();
    yield undefined;
    if (n > 0 && !noClear) yield* this.invalidation.invalidateAll();
    return n;
  }

  /** IOMMU_HWPT_SET_DIRTY_TRACKING is on. */
  get hwptTracking(): boolean { return Atomics.load(this.words, IommuWord.HWPT_TRACKING) !== 0; }

  /** Device `d` logs its DMA write to IOVA page `iova`, while its DMA logging is on; returns whether it did. */
  logDma(d: number, iova: number): boolean {
    if (Atomics.load(this.words, deviceBase(d) + DeviceWord.LOGGING) === 0) return false;
    Atomics.or(this.deviceLogs[d]!, iova >>> 5, 1 << (iova & 31));
    return true;
  }

  /** VFIO_DEVICE_FEATURE_DMA_LOGGING_START for device `d` over the whole IOVA space. */
  dmaLoggingStart(d: number): void {
    this.deviceLogs[d]!.fill(0);
    Atomics.store(this.words, deviceBase(d) + DeviceWord.LOGGING, 1);
  }

  dmaLoggingStop(d: number): void {
    Atomics.store(this.words, deviceBase(d) + DeviceWord.LOGGING, 0);
  }

  /** VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: the pages device `d` wrote since the last report (the report clears them). */
  *dmaLoggingReport(d: number, report: (vmPage: number) => void): Steps<number> {
    yield* this.lock.acquire(LockHolder.MIGRATION);
    let n = 0;
    drainBits(this.deviceLogs[d]!, (iova) => {
      const p = this.vmPage(this.table.gfn(iova));
      if (p >= 0) { report(p); n++; }
    });
    this.lock.release();
    Atomics.add(this.words, deviceBase(d) + DeviceWord.LOG_REPORTED, n);
    yield undefined;
    return n;
  }

  /** Counters for `vmemlab run`'s statistics. */
  stats(): IommuStats {
    const w = (i: number): number => Atomics.load(this.words, i);
    return {
      backend: this.backend, maps: w(IommuWord.MAPS), unmaps: w(IommuWord.UNMAPS), mapErrors: w(IommuWord.MAP_ERRORS), unmapErrors: w(IommuWord.UNMAP_ERRORS),
      entries: w(IommuWord.ENTRIES), pagesMapped: w(IommuWord.PAGES_MAPPED), iotlbInvalidations: w(IommuWord.INVALIDATIONS),
      dmaEntryLimit: this.backend === 'type1' ? this.layout.config.dmaEntryLimit : null,
    };
  }
}

export interface IommuStats {
  backend: IommuBackendKind;
  maps: number; unmaps: number; mapErrors: number; unmapErrors: number;
  entries: number; pagesMapped: number; iotlbInvalidations: number;
  dmaEntryLimit: number | null;
}

/** Takes every set bit of a shared bitmap (an atomic exchange per non-zero word), lowest first; returns how many. */
function drainBits(bits: Int32Array, each: (index: number) => void): number {
  let n = 0;
  for (let w = 0; w < bits.length; w++) {
    if (Atomics.load(bits, w) === 0) continue;
    let m = Atomics.exchange(bits, w, 0);
    while (m !== 0) {
      each(w * 32 + (31 - Math.clz32(m & -m)));
      m &= m - 1;
      n++;
    }
  }
  return n;
}
