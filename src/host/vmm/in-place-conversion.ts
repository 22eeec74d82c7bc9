import { EINVAL, ENOSPC, PAGE_SIZE } from '../constants.ts';
import { InPlaceGuestMemfd } from '../guest-memfd-in-place.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../iommu/constants.ts';
import { LockHolder } from '../iommu/domain-lock.ts';
import type { Memslot } from '../memslot.ts';
import type { Vm } from '../vm.ts';
import {
  CONVERT_OK, type ConversionDesign, type ConversionStats, type DesignOptions, IoctlCounts, conversionTarget, vfioDmaMappingsCheck,
} from './conversion-design.ts';
import { Acted, type ConversionInjection } from './conversion-bugs.ts';
import { CountingIommu } from './counting-iommu.ts';
import type { ConvertResult } from './kvm-convert-memory.ts';
import type { Steps } from '../../roles/role.ts';
import { hex } from '../../util/hex.ts';

export interface InPlaceOptions extends DesignOptions {
  /**
   * The bug inplace-convert-while-pinned: shared -> private goes ahead while VFIO's pin
   * still holds the page (the VMM skips the unmap, and guest_memfd's reference check
   * lets it through): the device keeps its mapping, and its pin, of a page that is now
   * private.
   */
  convertWhilePinned?: boolean;
  /** Where the bug's acting is counted (vm.acts in a scenario). */
  injection?: ConversionInjection;
}

/** The guest_memfd conversion ioctl's name. */
const SET_ATTRIBUTES2 = 'KVM_SET_MEMORY_ATTRIBUTES2 (guest_memfd)';
const RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

/**
 * Design (c), in-place conversion: each guest_memfd holds shared and private memory in
 * one file (InPlaceGuestMemfd), and VFIO maps the shared pages from the VMM's mapping of
 * it, pinning them. A page held by a pin cannot become private (EAGAIN), so the order
 * is: to private, VFIO unmaps (and unpins) the range's shared pages, then the conversion;
 * to shared, the conversion, then VFIO maps each page not mapped yet (4 KiB each, so
 * any page can be unmapped alone later; a failed map unmaps what this conversion mapped,
 * and the file keeps saying shared, as KVM's attributes do after a failed
 * kvm_convert_memory: the VM stops). Nothing is
 * discarded afterwards: the memory stays in the file. There is no bitmap in the VMM: the
 * file's shareability is the one record of which pages are shared.
 */
export class InPlaceConversion implements ConversionDesign {
  readonly name = 'in-place' as const;
  readonly iommu: CountingIommu;
  readonly files = new Map<Memslot, InPlaceGuestMemfd>();
  /** Pages the bug converted while a pin held them (Acted's count for inplace-convert-while-pinned). */
  acted = 0;
  private readonly counts = new IoctlCounts();
  private conversions = 0;

  constructor(readonly vm: Vm, private readonly o: InPlaceOptions = {}) {
    this.iommu = new CountingIommu(vm, this.counts);
    for (const slot of vm.memory.slots) if (slot.gmem !== null) this.files.set(slot, new InPlaceGuestMemfd(slot));
  }

  gmemOf(slot: Memslot): InPlaceGuestMemfd | undefined {
    return this.files.get(slot);
  }

  *setup(): Steps<ConvertResult> {
    for (const [slot, file] of this.files) {
      this.counts.add(SET_ATTRIBUTES2);
      const r = yield* file.convert(this.vm, 0, slot.pages, true);
      if (r.ret !== 0) return { ret: r.ret, error: r.detail };
    }
    const pages = [...this.files.keys()].reduce((n, s) => n + s.pages, 0);
    const refused = this.o.registrationCheck === false ? null : vfioDmaMappingsCheck(this.iommu, pages, this.files.size);
    if (refused !== null) return { ret: -ENOSPC, error: `vfio: ${refused}` };
    return CONVERT_OK;
  }

  *convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult> {
    this.conversions++;
    const t = conversionTarget(this.vm, start, size, toPrivate);
    if ('result' in t) return t.result;
    const { slot, page, pages } = t;
    const file = this.files.get(slot);
    if (file === undefined) return { ret: -EINVAL, error: '' };
    const what = `(${hex(start)} + ${hex(size)}) to ${toPrivate ? 'private' : 'shared'}`;
    if (toPrivate) {
      if (this.o.convertWhilePinned !== true) yield* this.unmapShared(slot, file, page, pages);
      this.counts.add(SET_ATTRIBUTES2);
      const r = yield* file.convert(this.vm, page, pages, true, this.o.convertWhilePinned === true);
      this.acted += r.convertedWhilePinned;
      if (r.convertedWhilePinned > 0) this.o.injection?.acted(Acted.INPLACE_CONVERT_WHILE_PINNED, r.convertedWhilePinned);
      return r.ret === 0 ? CONVERT_OK : { ret: r.ret, error: `failed to convert ${what}: ${r.detail}` };
    }
    this.counts.add(SET_ATTRIBUTES2);
    const r = yield* file.convert(this.vm, page, pages, false);
    if (r.ret !== 0) return { ret: r.ret, error: `failed to convert ${what}: ${r.detail}` };
    // VFIO maps every page of the range that is shared and not mapped yet (so a retry after a failed map maps what that one did not).
    const mapped: number[] = [];
    for (let p = page; p < page + pages; p++) {
      if (this.iommu.table.present(slot.baseGfn + p)) continue;
      const m = yield* this.mapPage(slot, file, p);
      if (m.ret !== 0) {
        for (const q of mapped) yield* this.unmapShared(slot, file, q, 1);
        return { ret: m.ret, error: `Failed to map ${what} for the device: ${m.detail}` };
      }
      mapped.push(p);
    }
    return CONVERT_OK;
  }

  /** VFIO_IOMMU_MAP_DMA of one page at IOVA = GPA: type1 pins it first (vfio_pin_pages_remote), then maps. */
  private *mapPage(slot: Memslot, file: InPlaceGuestMemfd, page: number): Steps<{ ret: number; detail: string }> {
    const gpa = (slot.baseGfn + page) * PAGE_SIZE;
    yield* this.iommu.lock.acquire(LockHolder.VMM);
    const pinned = file.pin(page);
    let r: { ret: number; detail: string };
    if (pinned !== 0) {
      this.counts.add(this.iommu.mapName); // the ioctl was issued; its pin_user_pages failed
      r = { ret: pinned, detail: `${this.iommu.mapName}: EFAULT: ${hex(gpa)} is private in guest_memfd` };
    } else {
      r = this.iommu.mapDma(gpa, PAGE_SIZE, gpa, RW);
      if (r.ret !== 0) file.unpin(page);
    }
    this.iommu.lock.release();
    return r;
  }

  /** One unmap of the range's mapped pages (vfio_unmap_unpin drops each page's pin). */
  private *unmapShared(slot: Memslot, file: InPlaceGuestMemfd, page: number, pages: number): Steps {
    const mapped: number[] = [];
    for (let p = page; p < page + pages; p++) if (this.iommu.table.present(slot.baseGfn + p)) mapped.push(p);
    if (mapped.length === 0) return;
    const r = yield* this.iommu.unmapDma((slot.baseGfn + page) * PAGE_SIZE, pages * PAGE_SIZE, LockHolder.VMM);
    if (r.ret < 0) { this.o.report?.(`vfio_container_dma_unmap() failed: ${r.detail}`); return; }
    for (const p of mapped) file.unpin(p);
  }

  sharedInBookkeeping(gfn: number): boolean | undefined {
    const slot = this.vm.memory.findSlot(gfn);
    const file = slot === undefined ? undefined : this.files.get(slot);
    return slot === undefined || file === undefined ? undefined : file.isShared(gfn - slot.baseGfn);
  }

  stats(): ConversionStats {
    const s = this.iommu.stats();
    let bytes = 0;
    for (const f of this.files.values()) bytes += f.stateBytes;
    return {
      iommuEntries: s.entries, pagesMapped: s.pagesMapped, ioctls: { ...this.counts.byName }, conversions: this.conversions,
      bookkeeping: { 'guest_memfd shareability (kernel, 1 bit per 4 KiB)': bytes },
    };
  }
}
