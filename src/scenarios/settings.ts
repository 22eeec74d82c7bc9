import { type BugName, CATALOG, type CatalogEntry, type TrackingMode } from '../bugs/catalog.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { DEFAULT_WORKLOAD, isRenderWorkload } from '../guest/workload.ts';
import { DEFAULT_CPU_CACHE } from '../host/cpu-cache.ts';
import { DEFAULT_VCPU_DIRTY_LIMIT } from '../migration/precopy.ts';
import { UserError } from '../util/errors.ts';
import { LIMITS } from '../util/limits.ts';
import { formatSize } from '../util/size.ts';
import { type DeviceSetup, checkDeviceSetup } from './devices.ts';
import { CONVERSION_AREA_PAGES } from '../guest/private-mem-conversions.ts';
import { DEVICE_BUFFER_PAGES, SWIOTLB_PAGES } from '../guest/confidential-guest.ts';
import { KVM_USER_MEM_SLOTS } from '../host/constants.ts';
import { possibleDmaMappings } from '../host/vmm/vfio-ram-discard-listener.ts';
import { demoOf } from './demos.ts';
import type { DirtyLogTestConfig } from './dirty-log-test.ts';
import type { MigrationScenario } from './migration.ts';
import type { MdevConfig } from './mdev.ts';
import { OPTIONS, type Raw, type ScenarioKind, type SettingKey, type Settings, flagOf, optionFor } from './options.ts';
import { defaultResumeOps } from './resume.ts';
import type { Driver } from './run-roles.ts';
import { parseEndpoint } from '../util/endpoint.ts';

/**
 * Settings from several sources, each parsed where it comes from: the defaults of the
 * kind of run, then the injected bugs' demonstration settings (the first bug's win),
 * then each layer given (a scenario file, then the command line: the later wins). A
 * value keeps where it came from, so a mistake found later (slots that do not fit the
 * memory) names the flag or the file and field that set it.
 */
export interface Layer {
  values: Partial<Settings>;
  where: Partial<Record<SettingKey, string>>;
  /** The values as given (a message quotes what the user wrote). */
  text?: Partial<Record<SettingKey, string>>;
}

export interface Resolved {
  kind: ScenarioKind;
  s: Settings;
  /** Set by a layer (a file or the command line), not a default or a demonstration. */
  given(key: SettingKey): boolean;
  /** The flag, or the file and field, a setting came from. */
  where(key: SettingKey): string;
  /** A setting as given, else as the option writes it. */
  text(key: SettingKey): string;
}

/** Parses raw values (by setting key) into a layer; `whereOf` names each key's source. */
export function parseLayer(raw: Partial<Record<SettingKey, Raw>>, whereOf: (key: SettingKey) => string): Layer {
  const layer: Layer = { values: {}, where: {}, text: {} };
  for (const [key, value] of Object.entries(raw) as [SettingKey, Raw][]) {
    if (value === undefined) continue;
    const where = whereOf(key);
    (layer.values as Record<string, unknown>)[key] = optionFor(key).parse(value, where);
    layer.where[key] = where;
    layer.text![key] = typeof value === 'object' ? JSON.stringify(value) : String(value);
  }
  return layer;
}

/** Raw values as typed on a command line, each named by its flag. */
export function flagLayer(kind: ScenarioKind, raw: Partial<Record<SettingKey, Raw>>): Layer {
  return parseLayer(raw, (key) => flagOf(key, kind));
}

/** The settings of a run of `kind` from its layers (lowest priority first). */
export function resolve(kind: ScenarioKind, layers: readonly Layer[]): Resolved {
  const defaults: Partial<Settings> = {};
  for (const o of OPTIONS) {
    const d = (o.defaults as Partial<Record<ScenarioKind, unknown>> | undefined)?.[kind];
    if (d !== undefined && o.kinds.includes(kind)) (defaults as Record<string, unknown>)[o.key] = d;
  }
  const given: Partial<Settings> = {};
  const where: Partial<Record<SettingKey, string>> = {};
  const text: Partial<Record<SettingKey, string>> = {};
  for (const l of layers) { Object.assign(given, l.values); Object.assign(where, l.where); Object.assign(text, l.text ?? {}); }
  const inject: BugName[] = given.inject ?? [];
  const demos = inject.map((n) => demoOf(n, kind) ?? {}).reverse();
  const s = { ...defaults, ...Object.assign({}, ...demos), ...given, inject } as Settings;
  return {
    kind, s,
    given: (key) => where[key] !== undefined,
    where: (key) => where[key] ?? flagOf(key, kind),
    text: (key) => text[key] ?? String(s[key]),
  };
}

/** The injected bugs and the tracking mode: the mode defaults to the first bug's. */
function bugsAndMode(r: Resolved, command: ScenarioKind): { bugs: CatalogEntry[]; mode: TrackingMode } {
  const bugs = r.s.inject.map((name) => CATALOG.find((b) => b.name === name)!);
  const injectFlag = r.where('inject');
  for (const b of bugs) {
    if (!b.commands.includes(command)) throw new UserError(`${injectFlag} ${b.name}: this bug shows in ${b.commands.map((c) => `'vmemlab ${c}'`).join(' and ')}, not in 'vmemlab ${command}'`);
  }
  const m: TrackingMode = r.s.tracking ?? bugs[0]?.modes[0] ?? 'dirty-ring';
  const modeFlag = r.where('tracking');
  for (const b of bugs) {
    if (!b.modes.includes(m)) throw new UserError(`${injectFlag} ${b.name}: this bug does not occur with ${modeFlag} ${m} (it needs ${b.modes.join(' or ')})`);
  }
  return { bugs, mode: m };
}

function slotsFit(r: Resolved): void {
  const pages = r.s.memoryBytes / PAGE_SIZE;
  if (pages >= r.s.slots) return;
  if (r.given('slots') || !r.given('memoryBytes')) throw new UserError(`${r.where('slots')}: ${r.s.slots} slots do not fit in ${formatSize(r.s.memoryBytes)} (${pages} pages)`);
  // The slot count came from a bug's demonstration settings: the memory the user gave is what is wrong.
  const from = r.s.inject.length ? `the demonstration settings of ${r.where('inject')} ${r.s.inject.join(', ')}` : 'the default';
  throw new UserError(`${r.where('memoryBytes')}: ${formatSize(r.s.memoryBytes)} (${pages} pages) is too small for the ${r.s.slots} slots of ${from}`);
}

export interface DirtyLogTestSetup { config: DirtyLogTestConfig; driver: Driver; watchdogMs: number; burst: number }

/** dirty_log_test's configuration from resolved settings (cross-setting checks included). */
export function buildDirtyLogTest(r: Resolved): DirtyLogTestSetup {
  const s = r.s;
  const { bugs, mode } = bugsAndMode(r, 'dirty-log-test');
  slotsFit(r);
  const needsHost = bugs.find((b) => b.needsHostWrites);
  if (needsHost && s.hostWriteEvery === 0) throw new UserError(`${r.where('inject')} ${needsHost.name}: needs host writes; ${r.where('hostWriteEvery')} must not be 0`);
  const pages = s.memoryBytes / PAGE_SIZE;
  const defaultWrites = s.driver === 'deterministic' ? Math.min(4096, pages * 2) : Math.max(20000, Math.min(200000, pages));
  const config: DirtyLogTestConfig = {
    mode, vcpus: s.vcpus, memoryBytes: s.memoryBytes, slots: s.slots, ringEntries: s.ringEntries, iterations: s.iterations,
    workload: { name: s.workload, hotFraction: s.hotFraction, hotShare: s.hotShare, writePercent: s.writePercent, randomOrder: s.randomOrder, opRate: s.opRate },
    seed: s.seed, bugs: bugs.map((b) => b.name),
    opsPerIteration: s.writes ?? defaultWrites,
    hostWriteEvery: s.hostWriteEvery,
    dirtyLimit: s.dirtyLimit,
  };
  return { config, driver: s.driver, watchdogMs: s.watchdogMs, burst: s.burst };
}

export interface MigrationSetup {
  scenario: MigrationScenario;
  driver: Driver;
  watchdogMs: number;
  burst: number;
  to?: { host: string; port: number };
  resumeOps?: number;
}

/** A blob resource's slot and what goes with it, each refusal one line naming the setting. */
function checkBlob(r: Resolved, s: Settings): void {
  const blob = s.blob;
  if (blob !== 'off' && !isRenderWorkload(s.workload)) throw new UserError(`${r.where('blob')}: ${blob} holds a render guest's buffers; it needs ${r.where('workload')} render or render-wbinvd, not ${s.workload}`);
  if (blob !== 'off' && s.cpuCache === 'off') throw new UserError(`${r.where('blob')}: a blob resource's memory types show only with the CPU cache model; add ${r.where('cpuCache')} on`);
  if (s.noncoherentRequest === 'kvm-mem-dma' && blob === 'off') throw new UserError(`${r.where('noncoherentRequest')}: kvm-mem-dma sets KVM_MEM_DMA on the blob resource's memslot; it needs ${r.where('blob')} ram, kvm-only-ram or kvm-only-vram`);
  if (r.given('dmaSlotLogging') && s.noncoherentRequest !== 'kvm-mem-dma') throw new UserError(`${r.where('dmaSlotLogging')}: ${s.dmaSlotLogging} is what KVM does with a KVM_MEM_DMA slot; it needs ${r.where('noncoherentRequest')} kvm-mem-dma`);
  const kvmOnly = blob === 'kvm-only-ram' || blob === 'kvm-only-vram';
  if (s.noncoherentMigration === 'device-state' && !kvmOnly) throw new UserError(`${r.where('noncoherentMigration')}: device-state has the device save a KVM-only blob; it needs ${r.where('blob')} kvm-only-ram or kvm-only-vram`);
  if (kvmOnly && s.noncoherentMigration !== 'device-state') throw new UserError(`${r.where('blob')}: ${blob} is a slot RAM migration never reads; it needs ${r.where('noncoherentMigration')} device-state (the device saves it)`);
}

/**
 * What a confidential guest needs: the convert workload, one memslot holding every
 * vCPU's conversion area and the bounce buffers, and devices that reach guest memory at
 * IOVA = GPA through VFIO's RAM discard listener (dma-engine with identity), so that they
 * only ever reach shared memory.
 */
function checkConfidential(r: Resolved, devices: DeviceSetup): void {
  const s = r.s;
  // A default the user did not set is not what is wrong: name the confidential setting instead.
  const where = (key: SettingKey): string => (r.given(key) ? r.where(key) : r.where('confidential'));
  if (s.workload !== 'convert') throw new UserError(`${where('workload')}: a confidential guest runs the convert workload (private_mem_conversions_test's guest), not ${s.workload}`);
  if (s.slots !== 1) throw new UserError(`${where('slots')}: a confidential guest has one guest_memfd memslot here, not ${s.slots}`);
  const need = s.vcpus * CONVERSION_AREA_PAGES + SWIOTLB_PAGES;
  if (s.memoryBytes / PAGE_SIZE < need) {
    throw new UserError(`${where('memoryBytes')}: ${formatSize(s.memoryBytes)} is too small for a confidential guest with ${s.vcpus} vCPUs: each converts its own ${CONVERSION_AREA_PAGES} pages (2 MiB + 4 KiB) and ${SWIOTLB_PAGES} pages of bounce buffers follow (${formatSize(need * PAGE_SIZE)} in all)`);
  }
  // vfio_ram_discard_register_listener's check, before anything runs: one 4 KiB mapping per
  // page of the guest_memfd block, plus one for each other memslot KVM allows, must fit the
  // container's dma_entry_limit (iommufd has none).
  const mappings = possibleDmaMappings(s.memoryBytes / PAGE_SIZE, 1);
  // KVM keeping the IOMMU table itself maps nothing through the container.
  if (s.conversionDesign !== 'kvm-iommu' && devices.devices.length > 0 && devices.backend === 'type1' && mappings > devices.dmaEntryLimit) {
    throw new UserError(`${where('memoryBytes')}: ${formatSize(s.memoryBytes)} of guest_memfd memory can take ${s.memoryBytes / PAGE_SIZE} DMA mappings of 4 KiB, and the ${KVM_USER_MEM_SLOTS - 1} other memslots KVM allows one each: ${mappings} > ${r.where('dmaEntryLimit')} ${devices.dmaEntryLimit} (type1's dma_entry_limit), so VFIO would refuse to register ("possibly running out of DMA mappings"); use less memory, a larger limit, or ${r.where('iommu')} iommufd`);
  }
  if (s.conversionDesign !== 'rdm' && devices.devices.length === 0) {
    throw new UserError(`${r.where('conversionDesign')}: ${s.conversionDesign} is a way to keep an assigned device in step with conversions; add one (--device dma-engine,identity)`);
  }
  devices.devices.forEach((d, i) => {
    if (d.kind !== 'dma-engine' || !d.identity) throw new UserError(`${where('devices')}: device ${i} (${d.kind}${d.identity ? ', identity' : ''}): a confidential guest's device is a dma-engine with identity (VFIO maps shared memory at IOVA = GPA as it becomes shared)`);
    if (d.buffers > DEVICE_BUFFER_PAGES) throw new UserError(`${where('devices')}: device ${i} has ${d.buffers} buffers; a confidential guest's devices use ${DEVICE_BUFFER_PAGES} pages of its bounce buffers`);
  });
}

/** A migration's scenario from resolved settings (cross-setting checks included). */
export function buildMigration(r: Resolved): MigrationSetup {
  const s = r.s;
  // A confidential guest's workload is convert unless another was asked for (and refused below).
  if (s.confidential !== 'off' && !r.given('workload')) s.workload = 'convert';
  const { bugs, mode } = bugsAndMode(r, 'migrate');
  // QEMU's migrate_caps_check: the dirty-limit capability needs KVM's dirty ring.
  if (s.policy === 'dirty-limit' && mode !== 'dirty-ring') throw new UserError(`${r.where('policy')}: dirty-limit needs the dirty ring (QEMU's dirty-limit capability requires dirty-ring-size), not ${r.where('tracking')} ${mode}`);
  if (r.given('vcpuDirtyLimit') && s.policy !== 'dirty-limit') {
    throw new UserError(`${r.where('vcpuDirtyLimit')}: '${r.text('vcpuDirtyLimit')}' is the dirty-limit policy's quota; it needs --policy dirty-limit (for a limit from the start: --dirty-limit)`);
  }
  slotsFit(r);
  const pages = s.memoryBytes / PAGE_SIZE;
  const devices: DeviceSetup = {
    backend: s.iommu, dmaEntryLimit: s.dmaEntryLimit, stopOnFault: s.onDeviceFault === 'stop', devices: s.devices,
    ...(s.noncoherentRequest !== 'vfio' ? { noncoherentRequest: s.noncoherentRequest } : {}),
  };
  if (devices.devices.length > LIMITS.devices.max) throw new UserError(`${r.where('devices')}: ${devices.devices.length} devices; at most ${LIMITS.devices.max} (${LIMITS.devices.why})`);
  checkDeviceSetup(devices, r.where('devices'));
  const scenario: MigrationScenario = {
    tracking: mode, vcpus: s.vcpus, memoryBytes: s.memoryBytes, slots: s.slots, ringEntries: s.ringEntries,
    workload: { ...DEFAULT_WORKLOAD, name: s.workload, hotFraction: s.hotFraction, hotShare: s.hotShare, writePercent: s.writePercent, opRate: s.opRate },
    dirtyLimit: s.dirtyLimit,
    seed: s.seed,
    bugs: bugs.map((b) => b.name),
    hostWriteEvery: s.hostWriteEvery,
    pageHistory: s.pageHistory,
    devices,
    confidential: s.confidential,
    ...(s.mapGpa !== 'kvm' ? { mapGpa: s.mapGpa } : {}),
    ...(s.conversionDesign !== 'rdm' ? { conversionDesign: s.conversionDesign } : {}),
    ...(s.cpuCache !== 'off' ? { cpuCache: { ...DEFAULT_CPU_CACHE, seed: s.seed, selfSnoop: s.cpuCache === 'self-snoop' } } : {}),
    noncoherentMigration: s.noncoherentMigration,
    ...(s.blob !== 'off' ? { blob: s.blob } : {}),
    ...(s.dmaSlotLogging !== 'force-wb' ? { dmaSlotLogging: s.dmaSlotLogging } : {}),
    params: {
      bandwidth: s.bandwidth,
      downtimeLimitMs: s.downtimeLimitMs,
      maxIterations: s.maxIterations,
      timeoutMs: s.timeoutMs,
      policy: s.policy,
      vcpuDirtyLimit: s.vcpuDirtyLimit ?? DEFAULT_VCPU_DIRTY_LIMIT,
      batchPages: s.batchPages,
      warmupOps: s.warmup ?? (s.driver === 'deterministic' ? Math.min(pages * 2, 20000) : pages),
    },
  };
  if (s.confidential !== 'off') checkConfidential(r, devices);
  else if (s.workload === 'convert') throw new UserError(`${r.where('workload')}: convert is a confidential guest's workload; it needs ${r.where('confidential')} shared or blocker`);
  if (s.cpuCache !== 'off' && s.confidential !== 'off') throw new UserError(`${r.where('cpuCache')}: the CPU cache model is not modelled with a confidential guest's private memory; it needs ${r.where('confidential')} off`);
  if (s.noncoherentRequest !== 'vfio' && !devices.devices.some((d) => !d.snoop)) {
    throw new UserError(`${r.where('noncoherentRequest')}: ${s.noncoherentRequest} is how KVM learns of a device doing non-coherent DMA; no device has snoop=false`);
  }
  checkBlob(r, s);
  if (s.noncoherentMigration === 'switch-to-coherent' && !isRenderWorkload(s.workload)) {
    throw new UserError(`${r.where('noncoherentMigration')}: switch-to-coherent asks the guest's driver to map its buffers WB again; it needs a guest with one (${r.where('workload')} render or render-wbinvd, not ${s.workload})`);
  }
  devices.devices.forEach((d, i) => {
    if (!d.snoop && s.cpuCache === 'off') throw new UserError(`${r.where('devices')}: device ${i} (${d.kind}, snoop=false): no-snoop DMA differs from snooped DMA only with the CPU cache model; add ${r.where('cpuCache')} on`);
  });
  if (s.conversionDesign !== 'rdm' && s.confidential === 'off') throw new UserError(`${r.where('conversionDesign')}: ${s.conversionDesign} is how the VMM converts a confidential guest's memory; it needs ${r.where('confidential')} shared or blocker`);
  if (bugs.some((b) => b.name === 'inplace-convert-while-pinned') && s.conversionDesign !== 'in-place') {
    throw new UserError(`${r.where('inject')} inplace-convert-while-pinned: this bug lives in the in-place conversion design; it needs ${r.where('conversionDesign')} in-place, not ${s.conversionDesign}`);
  }
  if (s.mapGpa !== 'kvm' && s.confidential === 'off') throw new UserError(`${r.where('mapGpa')}: ${s.mapGpa} is how a confidential guest converts memory; it needs ${r.where('confidential')} shared or blocker`);
  for (const b of bugs) {
    const kinds = b.devices ?? [];
    if (kinds.length > 0 && !devices.devices.some((d) => kinds.includes(d.kind))) {
      throw new UserError(`${r.where('inject')} ${b.name}: this bug lives in a device (${kinds.join(' or ')}); add one, e.g. --device ${kinds[0]}`);
    }
  }
  let to: { host: string; port: number } | undefined;
  if (s.to !== undefined && s.confidential !== 'off') throw new UserError(`${r.where('to')}: a confidential guest migrates to an in-process destination only (a destination process has no private memory to convert)`);
  if (s.to !== undefined) {
    if (!s.to.startsWith('tcp:')) throw new UserError(`${r.where('to')}: '${s.to}' is not tcp:HOST:PORT`);
    to = parseEndpoint(r.where('to'), s.to.slice(4), s.allowRemote);
  }
  if (to && s.driver !== 'free') throw new UserError(`${r.where('to')}: a TCP destination needs --driver free (the deterministic driver runs on one thread)`);
  if (to && s.resumeOps !== undefined) throw new UserError(`${r.where('resumeOps')}: a destination process resumes the guest itself (vmemlab destination --resume)`);
  if (s.confidential !== 'off' && s.resumeOps !== undefined) throw new UserError(`${r.where('resumeOps')}: the destination does not resume a confidential guest (its private memory is not migrated)`);
  const resumeOps = to || s.confidential !== 'off' ? undefined : s.resumeOps ?? defaultResumeOps(pages, scenario.vcpus);
  return { scenario, driver: s.driver, to, resumeOps, watchdogMs: s.watchdogMs, burst: s.burst };
}

/**
 * The migration a command line describes, from raw values by setting key as typed
 * (`{ memoryBytes: '8MiB', inject: ['copy-before-reset'], driver: 'deterministic' }`):
 * what library code, hunt and the tests use to build a scenario.
 */
export function migrationSetup(raw: Partial<Record<SettingKey, Raw>> = {}): MigrationSetup {
  return buildMigration(resolve('migrate', [flagLayer('migrate', raw)]));
}

/** The dirty_log_test a command line describes (as migrationSetup). */
export function dirtyLogTestSetup(raw: Partial<Record<SettingKey, Raw>> = {}): DirtyLogTestSetup {
  return buildDirtyLogTest(resolve('dirty-log-test', [flagLayer('dirty-log-test', raw)]));
}

export interface MdevSetupSettings { config: MdevConfig; driver: Driver; watchdogMs: number; burst: number }

/** Several VMs sharing a mediated device (`vmemlab mdev`), from resolved settings. */
export function buildMdev(r: Resolved): MdevSetupSettings {
  const s = r.s;
  for (const name of s.inject) {
    const b = CATALOG.find((x) => x.name === name)!;
    if (!b.commands.includes('mdev')) throw new UserError(`${r.where('inject')} ${b.name}: this bug shows in ${b.commands.map((c) => `'vmemlab ${c}'`).join(' and ')}, not in 'vmemlab mdev'`);
  }
  // One byte per step names the role under the deterministic driver: each VM's vCPUs and VMM, and the vendor driver.
  const roles = s.vms * (s.vcpus + 1) + 1;
  if (roles > 255) throw new UserError(`${r.where('vms')}: ${s.vms} VMs of ${s.vcpus} vCPUs are ${roles} actors; at most 255 (each VM's vCPUs and VMM, and the vendor driver)`);
  const config: MdevConfig = {
    vms: s.vms, vcpus: s.vcpus, reallocations: s.reallocations, mapping: s.barMapping, prefetch: s.barPrefetch, onRefusal: s.barRefusal,
    guest: s.mdevGuest, migration: s.mdevMigration, seed: s.seed, bugs: [...s.inject],
  };
  return { config, driver: s.driver, watchdogMs: s.watchdogMs, burst: s.burst };
}

/** The mdev run a command line describes (as migrationSetup). */
export function mdevSettings(raw: Partial<Record<SettingKey, Raw>> = {}): MdevSetupSettings {
  return buildMdev(resolve('mdev', [flagLayer('mdev', raw)]));
}
