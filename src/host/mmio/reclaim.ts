import type { Steps } from '../../roles/role.ts';
import type { VfioBarMapping } from './vfio-bar-mapping.ts';
import type { MmioSlice, VendorDriver } from './vendor-driver.ts';

/**
 * The vendor driver taking a resource back from a VM (to give it to another): first every
 * user mapping of its BAR pages goes (unmap_mapping_range, which reaches KVM through the
 * MMU notifier: SPTEs zapped, TLBs flushed), then the slice is freed. In that order, the
 * pages are unreachable from the VM before another VM can own them. Returns the slice
 * freed, or null when the VM did not hold the resource.
 */
export function* reclaimResource(driver: VendorDriver, mapping: VfioBarMapping, r: number): Steps<MmioSlice | null> {
  const slice = driver.sliceOf(mapping.vm, r);
  if (slice === null) return null;
  const res = driver.resources[r]!;
  yield* mapping.unmapMappingRange(res.barOffset, res.maxPages);
  return driver.free(mapping.vm, r);
}
