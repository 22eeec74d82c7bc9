import type { MdevGuestBar, MdevGuestKind } from '../guest/mdev-guest.ts';
import {
  type BarPrefetch, type BarRefusalAction, type MmioResource, createVendorDriverLayout, createVmBarLayout,
} from '../host/bar-layouts.ts';
import { INJECTION_WORDS } from '../host/injections.ts';
import { type VmLayout, createVmLayout } from '../host/layout.ts';
import { DOORBELL_RESOURCE, FIRST_DATA_RESOURCE, STATUS_RESOURCE } from '../host/mmio/vendor-workload.ts';
import type { RoleSpec } from './roles.ts';
import type { BarMapping, MdevMigration } from './options.ts';

/**
 * Several VMs sharing one mediated device whose MMIO is mapped on fault (docs/mdev.md):
 * each VM has its vCPUs running a guest driver for the device (mdev-guest.ts) and a VMM
 * that stops it on a refused access (bar-vmm.ts); the vendor driver's thread reallocates
 * the device's MMIO between them (vendor-workload.ts). The run ends when the vendor's
 * workload is done; the isolation oracles (kvm-bar-mmu.ts) count what they saw in each VM.
 * Here: the configuration, the device's resources, the VMs' layouts and the roles.
 */
export interface MdevConfig {
  vms: number;
  /** vCPUs per VM. */
  vcpus: number;
  /** The vendor's reallocation events (with a static mapping: announcements of the same slices). */
  reallocations: number;
  /** 'on-fault': validate_map_request at each first access; 'static': no validate callback, each VM's slices mapped 1:1 at mmap time, for good. */
  mapping: BarMapping;
  prefetch: BarPrefetch;
  onRefusal: BarRefusalAction;
  /** vm0's guest driver; the other VMs' are cooperative. */
  guest: MdevGuestKind;
  /** After the run, vm0 migrates with its device's state, or the device blocks it (mdev-migration.ts). */
  migration: MdevMigration;
  seed: number;
  bugs: string[];
}

export const MDEV_DEFAULTS: MdevConfig = {
  vms: 2, vcpus: 2, reallocations: 24, mapping: 'on-fault', prefetch: 'off', onRefusal: 'memory-fault', guest: 'cooperative', migration: 'none', seed: 1, bugs: [],
};

/** The guest frame of BAR page 0 in every VM (above its 16 pages of RAM). */
export const MDEV_BAR_GFN = 0x10000;
const RAM_PAGES = 16;
/** The data resources: a VRAM aperture and a fence register file. */
const DATA: readonly Omit<MmioResource, 'barOffset'>[] = [
  { name: 'vram', maxPages: 8, writable: true },
  { name: 'fences', maxPages: 4, writable: true },
];

export interface MdevSetup {
  layouts: VmLayout[];
  bar: MdevGuestBar;
  resources: MmioResource[];
}

/**
 * The device's resources and every VM's layout, the device's MMIO shared by all: `vms`
 * VMs (a migration's destination host: one), and with `fullPool` room for every VM to hold
 * every resource at its most (the static mapping; a destination, which must take whatever
 * the source's VM held).
 */
export function mdevSetup(c: MdevConfig, vms = c.vms, fullPool = c.mapping === 'static'): MdevSetup {
  const d = DATA.length;
  const resources: MmioResource[] = [];
  let at = 0;
  const add = (r: Omit<MmioResource, 'barOffset'>): void => { resources.push({ ...r, barOffset: at }); at += r.maxPages; };
  add({ name: 'status', maxPages: d, writable: false });
  add({ name: 'doorbells', maxPages: d * c.vcpus, writable: true });
  for (const r of DATA) add(r);
  if (resources[STATUS_RESOURCE]!.name !== 'status' || resources[DOORBELL_RESOURCE]!.name !== 'doorbells') throw new Error('mdev: resource order');
  const fixed = d + d * c.vcpus;
  const dataMax = DATA.reduce((n, r) => n + r.maxPages, 0);
  // Mapped on fault, half of what every VM could hold at once: the VMs compete, and grants evict.
  const pool = fullPool ? vms * dataMax : vms * Math.ceil(dataMax / 2);
  const driver = createVendorDriverLayout({ vms, mmioPages: vms * fixed + pool, resources });
  const injections = new SharedArrayBuffer(INJECTION_WORDS * 4); // one count for the whole run, whichever VM's code acts
  const layouts = Array.from({ length: vms }, (_, k) => {
    const bar = createVmBarLayout(k, MDEV_BAR_GFN, driver, { prefetch: c.prefetch, onRefusal: c.onRefusal });
    const layout = createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: 0, pages: RAM_PAGES, flags: 0 }], vcpus: c.vcpus,
      tracking: { kind: 'bitmap', manualProtect: true, initiallySet: false }, bars: [bar],
    });
    return { ...layout, injections };
  });
  const bar: MdevGuestBar = {
    baseGfn: MDEV_BAR_GFN, vcpus: c.vcpus, statusOffset: resources[STATUS_RESOURCE]!.barOffset, doorbellOffset: resources[DOORBELL_RESOURCE]!.barOffset,
    resources: resources.slice(FIRST_DATA_RESOURCE),
  };
  return { layouts, bar, resources };
}

export function mdevRoleSpecs(c: MdevConfig, s: MdevSetup): RoleSpec[] {
  const specs: RoleSpec[] = [];
  for (let k = 0; k < c.vms; k++) {
    const guest = k === 0 ? c.guest : 'cooperative';
    for (let v = 0; v < c.vcpus; v++) specs.push({ kind: 'bar-vcpu', vm: k, index: v, guest, bar: s.bar, seed: c.seed });
    specs.push({ kind: 'bar-vmm', vm: k });
  }
  specs.push({ kind: 'vendor-driver', layouts: s.layouts, bugs: c.bugs, events: c.reallocations, static: c.mapping === 'static', vcpus: c.vcpus, seed: c.seed });
  return specs;
}
