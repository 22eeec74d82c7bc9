import { ENOENT, ENOSPC, KVM_USER_MEM_SLOTS, PAGE_SIZE } from '../constants.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../iommu/constants.ts';
import { LockHolder } from '../iommu/domain-lock.ts';
import type { IoctlResult, Iommu } from '../iommu/iommu.ts';
import type { Steps } from '../../roles/role.ts';
import { RDM_OK, type RamBlockAttributes, type RamDiscardListener, type RamDiscardResult, type RamSection } from './ram-block-attributes.ts';
import { hex } from '../../util/hex.ts';
import { Acted, ConversionInjection } from './conversion-bugs.ts';

/**
 * KVM_CAP_NR_MEMSLOTS on x86 is KVM_USER_MEM_SLOTS, which QEMU's kvm_get_max_memslots()
 * returns and the registration check counts as sections that may each take one DMA mapping.
 */
export { KVM_USER_MEM_SLOTS };

/** The parts of QEMU's VFIOContainer that RAM discard listeners use. */
export interface VfioContainer {
  readonly iommu: Iommu;
  /**
   * bcontainer->dma_max_mappings: type1's VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL when the container
   * was set up (dma_entry_limit less the entries then in use); 0 for iommufd, which has no
   * limit, and 0 skips the registration check.
   */
  readonly dmaMaxMappings: number;
  /** kvm_get_max_memslots(). */
  readonly maxMemslots: number;
  /** bcontainer->vrdl_list, newest first. */
  readonly vrdlList: VfioRamDiscardListener[];
  /** QEMU's error_report for the failures it only prints (a failed unmap on discard). */
  readonly report: (detail: string) => void;
  /** Injected conversion bugs (split-huge-mapping lives in the listener). */
  readonly injection: ConversionInjection;
}

/** A container over `iommu`, read as QEMU's vfio_connect_container reads it (vfio_get_info_dma_avail). */
export function vfioContainer(iommu: Iommu, o: { maxMemslots?: number; report?: (detail: string) => void; injection?: ConversionInjection } = {}): VfioContainer {
  const s = iommu.stats();
  return {
    iommu,
    dmaMaxMappings: s.dmaEntryLimit === null ? 0 : Math.max(0, s.dmaEntryLimit - s.entries),
    maxMemslots: o.maxMemslots ?? KVM_USER_MEM_SLOTS,
    vrdlList: [],
    report: o.report ?? (() => {}),
    injection: o.injection ?? ConversionInjection.NONE,
  };
}

const alignDown = (n: number, a: number): number => Math.floor(n / a) * a;
/** What split-huge-mapping maps at once: a 2 MiB huge page's worth. */
const HUGE_CHUNK = 512 * PAGE_SIZE;
const roundUp = (n: number, a: number): number => Math.ceil(n / a) * a;

/**
 * QEMU's VFIORamDiscardListener (hw/vfio/listener.c): keeps the container's DMA mappings of
 * a RamDiscardManager section equal to its populated (shared) parts, IOVA = GPA.
 * - Populate maps one mapping per granule (the manager's 4 KiB block), because type1 and
 *   iommufd cannot unmap part of a mapping: a 2 MiB mapping could never lose one page
 *   that the guest converts back to private.
 * - Any failed map rolls the whole populated section back with a discard and returns the
 *   error.
 * - Discard is one unmap of the section (double discard supported: parts of it may be
 *   unmapped already).
 */
export class VfioRamDiscardListener implements RamDiscardListener {
  readonly doubleDiscardSupported = true;
  /** ram_discard_manager_get_min_granularity. */
  readonly granularity: number;
  readonly offsetWithinAddressSpace: number;
  readonly size: number;

  constructor(readonly container: VfioContainer, readonly rdm: RamBlockAttributes, section: RamSection) {
    this.granularity = rdm.minGranularity();
    this.offsetWithinAddressSpace = section.offsetWithinAddressSpace;
    this.size = section.size;
  }

  /** The DMA mappings the section takes when all of it is shared: one per granule, counted as the registration check counts them. */
  get maxMappings(): number {
    const start = alignDown(this.offsetWithinAddressSpace, this.granularity);
    const end = roundUp(this.offsetWithinAddressSpace + this.size, this.granularity);
    return (end - start) / this.granularity;
  }

  /** vfio_ram_discard_notify_populate. */
  *notifyPopulate(section: RamSection): Steps<RamDiscardResult> {
    const end = section.offsetWithinRegion + section.size;
    const ramBase = this.rdm.block.baseGfn * PAGE_SIZE;
    const injection = this.container.injection;
    // split-huge-mapping: 2 MiB chunks (fewer entries), which a later 4 KiB discard cannot unmap.
    const step = injection.bugs.splitHugeMapping ? HUGE_CHUNK : this.granularity;
    let next: number;
    for (let start = section.offsetWithinRegion; start < end; start = next) {
      // Aligned within the region, so any granule can be unmapped alone later.
      next = Math.min(roundUp(start + 1, step), end);
      if (next - start > this.granularity) injection.acted(Acted.SPLIT_HUGE_MAPPING);
      const iova = start - section.offsetWithinRegion + section.offsetWithinAddressSpace;
      const r = yield* this.dmaMap(iova, next - start, ramBase + start, section.readonly === true);
      if (r.ret !== 0) {
        yield* this.notifyDiscard(section); // QEMU's "Rollback": the whole section, in one unmap
        return { ret: r.ret, detail: `vfio_ram_discard_notify_populate: ${r.detail}` };
      }
    }
    return RDM_OK;
  }

  /** vfio_ram_discard_notify_discard: "Unmap with a single call"; a failure is only reported. */
  *notifyDiscard(section: RamSection): Steps {
    const r = yield* this.dmaUnmap(section.offsetWithinAddressSpace, section.size);
    if (r.ret < 0) this.container.report(`vfio_ram_discard_notify_discard: vfio_container_dma_unmap() failed: ${r.detail}`);
  }

  /** vfio_container_dma_map, under the domain lock as the VMM. */
  private *dmaMap(iova: number, size: number, gpa: number, readonly: boolean): Steps<IoctlResult> {
    const iommu = this.container.iommu;
    yield* iommu.lock.acquire(LockHolder.VMM);
    const r = iommu.mapDma(iova, size, gpa, VFIO_DMA_MAP_FLAG_READ | (readonly ? 0 : VFIO_DMA_MAP_FLAG_WRITE));
    iommu.lock.release();
    return r;
  }

  /**
   * vfio_container_dma_unmap. iommufd_backend_unmap_dma takes ENOENT (nothing mapped there,
   * or an area the range would cut) as success, like type1's unmap of nothing.
   */
  private *dmaUnmap(iova: number, size: number): Steps<IoctlResult> {
    const iommu = this.container.iommu;
    const r = yield* iommu.unmapDma(iova, size, LockHolder.VMM);
    if (iommu.backend === 'iommufd' && r.ret === -ENOENT) return { ret: 0, detail: r.detail };
    return r;
  }
}

/** What vfio_ram_discard_register_listener ended with. */
export type VfioRamDiscardRegistration =
  | { ok: true; listener: VfioRamDiscardListener }
  /**
   * replay: a populated part could not be mapped (QEMU exits), `ret` the map's -errno;
   * dma-mappings: the container's limit could be exceeded, `ret` -ENOSPC.
   */
  | { ok: false; reason: 'replay' | 'dma-mappings'; ret: number; error: string };

/**
 * The registration check's figure: every RAM discard section's mappings (one per granule)
 * plus one for each other memslot KVM could have (kvm_get_max_memslots). More than the
 * container can hold and QEMU refuses the device ("possibly running out of DMA mappings").
 */
export function possibleDmaMappings(mappings: number, sections: number, maxMemslots = KVM_USER_MEM_SLOTS): number {
  return mappings + maxMemslots - sections;
}

/**
 * vfio_ram_discard_register_listener, for a RAM section whose memory region has a
 * RamDiscardManager. As in QEMU: the listener registers with the manager (which maps the
 * shared parts at once) and joins the container's list, then the sanity check: every RAM
 * discard section counted at one mapping per granule, and every other memslot KVM could
 * have at one mapping each; more than the container can hold and QEMU fails the region
 * ("possibly running out of DMA mappings"), which fails the device's realize and tears the
 * listener down again. Here a refused registration is unregistered at once, leaving
 * nothing registered or mapped. A failed replay (QEMU exits) ends the same way.
 */
export function* vfioRamDiscardRegisterListener(container: VfioContainer, rdm: RamBlockAttributes, section: RamSection): Steps<VfioRamDiscardRegistration> {
  for (const [what, v] of [['offset_within_region', section.offsetWithinRegion], ['offset_within_address_space', section.offsetWithinAddressSpace], ['size', section.size]] as const) {
    // QEMU asserts these ("corner cases not relevant in practice").
    if (!Number.isSafeInteger(v) || v < 0 || v % PAGE_SIZE !== 0) throw new Error(`vfio_ram_discard_register_listener: section ${what} ${hex(v)} is not ${PAGE_SIZE}-byte aligned`);
  }
  const vrdl = new VfioRamDiscardListener(container, rdm, section);
  const replay = yield* rdm.registerListener(vrdl, section);
  container.vrdlList.unshift(vrdl);
  if (replay.ret !== 0) {
    yield* vfioRamDiscardUnregisterListener(container, rdm, section);
    return { ok: false, reason: 'replay', ret: replay.ret, error: replay.detail };
  }
  if (container.dmaMaxMappings !== 0) {
    let mappings = 0;
    for (const v of container.vrdlList) mappings += v.maxMappings;
    const sections = container.vrdlList.length;
    if (possibleDmaMappings(mappings, sections, container.maxMemslots) > container.dmaMaxMappings) {
      yield* vfioRamDiscardUnregisterListener(container, rdm, section);
      return {
        ok: false, reason: 'dma-mappings', ret: -ENOSPC,
        error: `vfio_ram_discard_register_listener: possibly running out of DMA mappings: ${mappings} mappings of ${vrdl.granularity} bytes for ${sections} RAM discard section(s)`
          + ` + ${container.maxMemslots - sections} other memslots > ${container.dmaMaxMappings}. Maximum possible DMA mappings: ${container.dmaMaxMappings},`
          + ` Maximum possible memslots: ${container.maxMemslots} (raise type1's dma_entry_limit, or use iommufd)`,
      };
    }
  }
  return { ok: true, listener: vrdl };
}

/**
 * vfio_ram_discard_unregister_listener: the manager has the listener discard its section
 * (one unmap), then it leaves the container's list.
 */
export function* vfioRamDiscardUnregisterListener(container: VfioContainer, rdm: RamBlockAttributes, section: RamSection): Steps {
  const vrdl = container.vrdlList.find((v) => v.rdm === rdm && v.offsetWithinAddressSpace === section.offsetWithinAddressSpace);
  if (vrdl === undefined) throw new Error('vfio: Trying to unregister missing RAM discard listener');
  yield* rdm.unregisterListener(vrdl);
  container.vrdlList.splice(container.vrdlList.indexOf(vrdl), 1);
}
