import type { Steps } from '../../roles/role.ts';
import { Acted } from '../injections.ts';
import type { VfioBarMapping } from './vfio-bar-mapping.ts';
import type { MmioSlice, VendorDriver } from './vendor-driver.ts';

/**
 * The vendor driver taking a resource back from a VM (to give it to another): validate
 * refuses its pages from then on (a fault meanwhile would map them again), then every
 * user mapping of its BAR pages goes (unmap_mapping_range, which reaches KVM through the
 * MMU notifier: SPTEs zapped, TLBs flushed), then the slice is freed. In that order, the
 * pages are unreachable from the VM before another VM can own them. Returns the slice
 * freed, or null when the VM did not hold the resource.
 *
 * The mapping's injected bugs act here: reassign-without-zap frees at once;
 * zap-misses-a-mapping unmaps one page short of the resource.
 */
export function* reclaimResource(driver: VendorDriver, mapping: VfioBarMapping, r: number): Steps<MmioSlice | null> {
  const slice = driver.sliceOf(mapping.vm, r);
  if (slice === null || !driver.beginReclaim(mapping.vm, r)) return null;
  const res = driver.resources[r]!;
  const { bugs, acts } = mapping.injection;
  if (bugs.reassignWithoutZap === true) {
    if (mapping.presentIn(res.barOffset, res.maxPages) > 0) acts?.acted(Acted.REASSIGN_WITHOUT_ZAP);
  } else if (bugs.zapMissesAMapping === true) {
    const last = res.barOffset + slice.pages - 1;
    if (mapping.presentIn(last, 1) > 0) acts?.acted(Acted.ZAP_MISSES_A_MAPPING);
    if (slice.pages > 1) yield* mapping.unmapMappingRange(res.barOffset, slice.pages - 1);
  } else {
    yield* mapping.unmapMappingRange(res.barOffset, res.maxPages);
  }
  return driver.free(mapping.vm, r);
}
