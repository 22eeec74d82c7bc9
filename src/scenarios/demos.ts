import type { BugName } from '../bugs/catalog.ts';
import type { InjectionReport } from '../bugs/acted.ts';
import { DEVICE_DEFAULTS, type DeviceConfig } from '../host/devices/device-config.ts';
import { type ScenarioKind, type Settings, demoFlags } from './options.ts';

const MiB = 1 << 20;
const device = (d: Partial<DeviceConfig> & Pick<DeviceConfig, 'kind'>): DeviceConfig => ({ ...DEVICE_DEFAULTS, ...d });

/**
 * Each catalogued bug's demonstration: the settings `vmemlab migrate --inject NAME` and
 * `vmemlab dirty-log-test --inject NAME` take as defaults (flags still override them). A
 * migration demonstration is a scenario in which the write the bug loses is not written
 * again before completion, so the stamp oracle sees it on every seed of the
 * deterministic driver.
 */
export interface Demo {
  migrate?: Partial<Settings>;
  dirtyLogTest?: Partial<Settings>;
  mdev?: Partial<Settings>;
}

/**
 * migration-test's sweep on a small guest with four vCPUs: every write after the last
 * sync goes to a page not written since it was last sent, and a page is written again
 * only one whole sweep later, after the migration ended. Unlimited bandwidth keeps the
 * copy ahead of the sweep; 4-page frames spread each 64-page chunk's copy over many steps;
 * two slots make the last sync two GETs, with vCPUs running in between.
 */
const SWEEP: Partial<Settings> = { workload: 'sweep', memoryBytes: 8 * MiB, slots: 2, vcpus: 4, bandwidth: 0, batchPages: 4, hostWriteEvery: 32 };
/**
 * Random writes over 32 MiB with a small ring: enough dirty pages between syncs to fill a
 * 256-entry ring, and few enough that a page lost in one pass is rarely written again.
 */
const RANDOM: Partial<Settings> = { workload: 'random', memoryBytes: 32 * MiB, ringEntries: 256, bandwidth: 256 * MiB, hostWriteEvery: 32 };
/**
 * A guest writing only its hot set, with one mdev doing DMA to random pages: the pages
 * the device writes are mostly never written by a vCPU, so a DMA write no source
 * reports stays lost. 4-page frames spread the copy over many steps, with DMA between.
 */
const DMA: Partial<Settings> = { workload: 'hotset', memoryBytes: 16 * MiB, hostWriteEvery: 0, batchPages: 4, devices: [device({ kind: 'mdev', every: 4 })] };
/**
 * 16 MiB of random writes with a 256-entry ring: the ring fills many times per
 * iteration (20000 writes), and the bitmap modes see thousands of pages per collection.
 */
const DIRTY_LOG_TEST: Partial<Settings> = { memoryBytes: 16 * MiB, ringEntries: 256 };
/**
 * A confidential guest, two vCPUs converting their areas while a device DMAs into the
 * shared bounce buffers; 4 MiB of guest memory (two 2 MiB + 4 KiB areas, then the bounce
 * buffers) and small frames so conversions land between the copies.
 */
const CVM: Partial<Settings> = {
  confidential: 'shared', workload: 'convert', memoryBytes: 8 * MiB, vcpus: 2, batchPages: 8, hostWriteEvery: 0,
  devices: [device({ kind: 'dma-engine', identity: true, every: 8, buffers: 16, remapEvery: 0 })],
};

/**
 * A guest rendering through a device that does not snoop, with the CPU cache model: two
 * vCPUs writing their WC render buffers and ordinary memory, the device's no-snoop DMA in
 * the same buffers; the migration thread flushes each page before it reads it (the bugs
 * that need another policy say so).
 */
const NONCOHERENT: Partial<Settings> = {
  cpuCache: 'on', workload: 'render', memoryBytes: 4 * MiB, vcpus: 2, hostWriteEvery: 0, noncoherentMigration: 'clflush-before-read',
  devices: [device({ kind: 'dma-engine', snoop: false, every: 4, buffers: 32, remapEvery: 0 })],
};

/**
 * Two VMs sharing a mediated device under the vendor's reallocations, vm0's guest as the
 * bug needs it: a cooperative guest when the bug breaks isolation on its own; one that
 * keeps using what it lost, writes what it may only read, or touches the BAR before its
 * allocation, when the bug is in how KVM or the vendor answers such a guest.
 */
const MDEV = (guest: Settings['mdevGuest'], more: Partial<Settings> = {}): Partial<Settings> => ({ mdevGuest: guest, ...more });

export const DEMOS: Record<BugName, Demo> = {
  'skip-tlb-shootdown': { migrate: SWEEP, dirtyLogTest: DIRTY_LOG_TEST },
  'ring-full-ignored': { migrate: RANDOM, dirtyLogTest: DIRTY_LOG_TEST },
  'harvest-skips-entry': { migrate: SWEEP, dirtyLogTest: DIRTY_LOG_TEST },
  'clear-without-protect': { migrate: RANDOM, dirtyLogTest: DIRTY_LOG_TEST },
  'untracked-host-write': { migrate: SWEEP, dirtyLogTest: DIRTY_LOG_TEST },
  'no-backup-bitmap': { migrate: SWEEP, dirtyLogTest: DIRTY_LOG_TEST },
  // A 256-entry ring fills early in the first pass over 16 MiB; 4-page frames give the
  // guest-progress check many frames in which the vCPUs sit in the same exit.
  'ring-full-exit-unhandled': { migrate: { workload: 'random', memoryBytes: 16 * MiB, ringEntries: 256, hostWriteEvery: 0, batchPages: 4 }, dirtyLogTest: DIRTY_LOG_TEST },
  // A guest dirtying everything, switched over by force after two passes: in the last
  // pass most copied pages are written again before the deferred reset, and the VM stops
  // before they are written (and logged) once more.
  'copy-before-reset': { migrate: { workload: 'random', memoryBytes: 8 * MiB, bandwidth: 32 * MiB, downtimeLimitMs: 50, policy: 'force', maxIterations: 2, hostWriteEvery: 32 } },
  'copy-before-clear': { migrate: SWEEP },
  'skip-final-sync': { migrate: SWEEP },
  'untracked-dma': { migrate: DMA },
  'stale-iotlb-after-unmap': { migrate: { ...DMA, devices: [device({ kind: 'dma-engine', every: 4, remapEvery: 4 })] } },
  'gpa-as-iova': { migrate: DMA },
  'read-pin-dirties': { migrate: DMA },
  'convert-without-unmap': { migrate: CVM },
  'discard-before-unmap': { migrate: CVM },
  'map-before-shared': { migrate: CVM },
  'attributes-before-zap': { migrate: CVM },
  'rdm-bitmap-drift': { migrate: CVM },
  'split-huge-mapping': { migrate: CVM },
  'migrate-private-pages': { migrate: CVM },
  'inplace-convert-while-pinned': { migrate: { ...CVM, conversionDesign: 'in-place' } },
  'no-zap-on-noncoherent-transition': { migrate: NONCOHERENT },
  'migrate-noncoherent-without-flush': { migrate: NONCOHERENT },
  'missing-migration-blocker': { migrate: { ...NONCOHERENT, noncoherentMigration: 'block' } },
  // The driver's buffers dirty in the cache when it maps them WC and flushes with WBINVD.
  'wbinvd-noop': { migrate: { ...NONCOHERENT, workload: 'render-wbinvd' } },
  // A second, coherent device added after the non-coherent one.
  'noncoherent-unbalanced': { migrate: { ...NONCOHERENT, devices: [...NONCOHERENT.devices!, device({ kind: 'dma-engine', every: 4, buffers: 32, remapEvery: 0 })] } },
  // The buffers in a host RAM blob with KVM_MEM_DMA; the host switches the device to snooping, KVM must force WB while logging.
  'dma-slot-with-dirty-logging': { migrate: { ...NONCOHERENT, blob: 'ram', noncoherentRequest: 'kvm-mem-dma', noncoherentMigration: 'switch-host-only' } },
  // virgl's case: the buffers in the GPU's device memory, which only KVM maps; nobody registers non-coherent DMA.
  'mmio-mapped-wb': { migrate: { ...NONCOHERENT, blob: 'kvm-only-vram', noncoherentRequest: 'none', noncoherentMigration: 'device-state' } },
  'vmm-touches-kvm-only-slot': { migrate: { ...NONCOHERENT, blob: 'kvm-only-ram', noncoherentMigration: 'device-state' } },
  'reassign-without-zap': { mdev: MDEV('lingering') },
  'no-invalidate-retry': { mdev: MDEV('lingering') },
  'prefetch-unvalidated-mmio': { mdev: MDEV('cooperative') },
  // Many reallocations: the prefetch must meet a revocation of a neighbouring resource half-way.
  'prefetch-during-invalidation': { mdev: MDEV('cooperative', { barPrefetch: 'mapped', reallocations: 96 }) },
  'ignore-readonly-pfnmap': { mdev: MDEV('scribbler') },
  'zap-misses-a-mapping': { mdev: MDEV('lingering') },
  'refused-access-reads-zeros': { mdev: MDEV('eager') },
  'map-whole-bar-without-validate': { mdev: MDEV('cooperative') },
};

export function demoOf(bug: BugName, kind: ScenarioKind): Partial<Settings> | undefined {
  return kind === 'migrate' ? DEMOS[bug].migrate : kind === 'mdev' ? DEMOS[bug].mdev : DEMOS[bug].dirtyLogTest;
}

/**
 * The verdict's qualifier when injected bugs never acted: "ring-full-ignored never acted:
 * no ring reached its soft limit (...); its demonstration settings: vmemlab ...". Null
 * when every injected bug acted.
 */
export function describeIdleBugs(r: readonly InjectionReport[], kind: ScenarioKind): string | null {
  const idle = r.filter((x) => x.acted === 0);
  if (idle.length === 0) return null;
  return idle.map((x) => {
    const demo = demoOf(x.bug as BugName, kind);
    const how = demo ? `; its demonstration settings: vmemlab ${kind} --inject ${x.bug} ${demoFlags(demo, kind)}` : '';
    return `${x.bug} never acted: ${x.idle}${how}`;
  }).join('; ');
}
