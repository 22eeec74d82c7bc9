import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';
import type { Prng } from '../../util/prng.ts';
import type { Clock } from '../../roles/clock.ts';
import { GlobalWord } from '../layout.ts';
import type { Vm } from '../vm.ts';
import { reclaimResource } from './reclaim.ts';
import type { VendorDriver } from './vendor-driver.ts';

/**
 * The device's resources as the vendor workload lays them out (the BAR every VM sees):
 * resource 0 the status pages (one per data resource, read-only to the guest), 1 the
 * doorbells (one per data resource and vCPU), 2.. the data resources it allocates at run
 * time.
 */
export const STATUS_RESOURCE = 0;
export const DOORBELL_RESOURCE = 1;
export const FIRST_DATA_RESOURCE = 2;

/** A status word: the epoch of the vendor's last change to the resource, and the pages the VM now holds (0: none). */
export const statusWord = (epoch: number, pages: number): number => ((epoch << 8) | pages) >>> 0;
export const statusEpoch = (word: number): number => word >>> 8;
export const statusPages = (word: number): number => word & 0xff;

/** What the vendor driver did, for the report. */
export interface VendorStats {
  grants: number;
  revokes: number;
  /** Revocations to make room for another VM's grant. */
  evictions: number;
  /** VMs that did not acknowledge a change in time: the driver went on without them, and waits for them no more. */
  unresponsive: { vm: number; resource: string; epoch: number }[];
  /** Grants that found no room even after an eviction. */
  refusedGrants: number;
  /** BAR entries the revocations unmapped (the VMs had faulted them in). */
  unmapped: number;
}

export type VendorEvent = { kind: 'vendor'; stats: VendorStats };

export interface VendorWorkloadOptions {
  /** Reallocation events. */
  events: number;
  /**
   * The slices are static (no validate callback): nothing is reallocated. Each event
   * announces a VM's slice again (a new epoch, the same pages) and waits for its guests'
   * acknowledgement, so that the run lasts as long as one that reallocates.
   */
  static?: boolean;
  vcpus: number;
  prng: Prng;
  /** The step clock under the deterministic driver, the wall clock under free-run. */
  clock: Clock;
  /** How long a VM may take to acknowledge a change (ms of `clock`). */
  ackTimeoutMs: number;
}

/**
 * The vendor driver's thread, reallocating the device's MMIO between the VMs that share it
 * on a seeded workload: each VM has a graphics demand (a weight drawn per run) and the
 * heavier a VM's, the more often it asks and the more pages of a resource it gets. An
 * event gives a VM a resource it does not hold (evicting another VM's slice when the MMIO
 * is full), or takes one back and, half the time, gives it again at another size.
 *
 * Every change goes through the protocol a guest driver can follow: the status page says
 * it (a revocation before the zap, a grant after the allocation). A revocation then waits
 * until every vCPU of that VM acknowledged the new epoch on its doorbell, or the VM is
 * stopped, or `ackTimeoutMs` passed (then it waits for that VM no more: isolation never
 * rests on a guest's answer, only its own progress would). Then it reclaims the slice:
 * validate refuses it, unmap_mapping_range (the MMU notifier zaps KVM's SPTEs and
 * flushes), the free (reclaim.ts).
 */
export function* vendorWorkload(vms: readonly Vm[], o: VendorWorkloadOptions, report: (e: VendorEvent) => void): Steps {
  const driver = vms[0]!.bars[0]!.driver;
  const data = driver.resources.length - FIRST_DATA_RESOURCE;
  const epochs = vms.map(() => new Array<number>(driver.resources.length).fill(0));
  const weights = vms.map(() => 1 + o.prng.below(4));
  const total = weights.reduce((a, b) => a + b, 0);
  const stats: VendorStats = { grants: 0, revokes: 0, evictions: 0, refusedGrants: 0, unmapped: 0, unresponsive: [] };
  const deaf = new Set<number>();
  // The VMM stopped the VM (VmmControl.stopOnInternalError), or KVM killed it: no acknowledgement will come.
  const stopped = (k: number): boolean => Atomics.load(vms[k]!.global, GlobalWord.VM_INTERNAL_ERROR) !== 0 || vms[k]!.bars[0]!.mmu.dead;

  /** Publishes the change in VM k's status page; a revocation (0 pages), or any change with `wait`, waits for the acknowledgements. */
  function* change(k: number, r: number, pages: number, wait = false): Steps {
    const epoch = ++epochs[k]![r]!;
    const status = driver.sliceOf(k, STATUS_RESOURCE)!;
    driver.mmio.write32(status.pfn + r - FIRST_DATA_RESOURCE, statusWord(epoch, pages));
    if (pages > 0 && !wait) return; // a grant is usable as soon as it is published
    const bells = driver.sliceOf(k, DOORBELL_RESOURCE)!;
    const first = bells.pfn + (r - FIRST_DATA_RESOURCE) * o.vcpus;
    const since = o.clock.nowMs();
    for (;;) {
      if (stopped(k) || deaf.has(k)) return;
      if (o.clock.nowMs() - since > o.ackTimeoutMs) {
        deaf.add(k);
        stats.unresponsive.push({ vm: k, resource: driver.resources[r]!.name, epoch });
        return;
      }
      let acked = 0;
      for (let v = 0; v < o.vcpus; v++) if (driver.mmio.read32(first + v) === epoch) acked++;
      if (acked === o.vcpus) return;
      yield waitFor(WaitCode.GUEST_ACK, k, r);
    }
  }

  function* revoke(k: number, r: number): Steps {
    yield* change(k, r, 0);
    const mapping = vms[k]!.bars[0]!.mapping;
    const res = driver.resources[r]!;
    stats.unmapped += mapping.presentIn(res.barOffset, res.maxPages);
    yield* reclaimResource(driver, mapping, r);
    stats.revokes++;
  }

  /** The VM holding the largest data slice other than `k`'s, a stopped VM's first. */
  function victim(k: number): { vm: number; r: number } | null {
    let best: { vm: number; r: number; pages: number; stopped: boolean } | null = null;
    for (let j = 0; j < vms.length; j++) {
      if (j === k) continue;
      for (let r = FIRST_DATA_RESOURCE; r < driver.resources.length; r++) {
        const s = driver.sliceOf(j, r);
        if (s === null) continue;
        const better = best === null || (stopped(j) && !best.stopped) || (stopped(j) === best.stopped && s.pages > best.pages);
        if (better) best = { vm: j, r, pages: s.pages, stopped: stopped(j) };
      }
    }
    return best;
  }

  for (let e = 0; e < o.events; e++) {
    let pick = o.prng.below(total);
    let k = 0;
    while (pick >= weights[k]!) pick -= weights[k++]!;
    // Resource A (the first) is asked for three times as often as the others.
    const r = FIRST_DATA_RESOURCE + (data === 1 || o.prng.below(4) < 3 ? 0 : 1 + o.prng.below(data - 1));
    const max = driver.resources[r]!.maxPages;
    // The heavier the VM's demand, the larger the slice it asks for.
    const pages = Math.min(max, 1 + o.prng.below(Math.max(1, Math.ceil((max * weights[k]!) / 4))));
    const regrant = o.prng.below(2) === 0;
    if (stopped(k)) { yield undefined; continue; }
    if (o.static === true) {
      const held = driver.sliceOf(k, r);
      if (held !== null) yield* change(k, r, held.pages, true);
      yield undefined;
      continue;
    }
    if (driver.sliceOf(k, r) !== null) {
      yield* revoke(k, r);
      if (!regrant) { yield undefined; continue; }
    }
    if (driver.largestFree() < pages) {
      const v = victim(k);
      if (v !== null) {
        yield* revoke(v.vm, v.r);
        stats.evictions++;
      }
    }
    if (driver.allocate(k, r, pages) === null) {
      stats.refusedGrants++;
      yield undefined;
      continue;
    }
    yield* change(k, r, pages);
    stats.grants++;
    yield undefined;
  }
  report({ kind: 'vendor', stats });
}

/**
 * Before the VMs run: each VM's status and doorbell pages (for good); with `staticSlices`,
 * each data resource at its most pages too, communicated at once (the static alternative:
 * nothing is reallocated; the driver's thread only announces the slices again).
 */
export function allocateFixedResources(driver: VendorDriver, vms: number, vcpus: number, staticSlices: boolean): void {
  const data = driver.resources.length - FIRST_DATA_RESOURCE;
  for (let k = 0; k < vms; k++) {
    if (driver.allocate(k, STATUS_RESOURCE, data) === null || driver.allocate(k, DOORBELL_RESOURCE, data * vcpus) === null) {
      throw new Error(`vendor driver: no room for vm${k}'s status and doorbell pages`);
    }
    if (!staticSlices) continue;
    const status = driver.sliceOf(k, STATUS_RESOURCE)!;
    for (let r = FIRST_DATA_RESOURCE; r < driver.resources.length; r++) {
      const max = driver.resources[r]!.maxPages;
      if (driver.allocate(k, r, max) === null) throw new Error(`vendor driver: no room for vm${k}'s static ${driver.resources[r]!.name}`);
      driver.mmio.write32(status.pfn + r - FIRST_DATA_RESOURCE, statusWord(1, max));
    }
  }
}
