import { type BugName, CATALOG, type TrackingMode, findBug } from '../bugs/catalog.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { MODES } from '../host/vmm/dirty-log.ts';
export { MODES };
import { checkRingSize } from '../host/dirty-ring.ts';
import { DEVICE_DEFAULTS, DEVICE_KINDS, type DeviceConfig, type DeviceKind } from '../host/devices/device-config.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../host/iommu/constants.ts';
import type { IommuBackendKind } from '../host/iommu/iommu-layout.ts';
import { type DmaSlotLogging, type MapGpaAbi } from '../host/layout.ts';
import { CONVERSION_DESIGNS, type ConversionDesignName } from '../host/vmm/conversion-design.ts';
import { WORKLOAD_NAMES, type WorkloadName } from '../guest/workload.ts';
import { MDEV_GUEST_KINDS, type MdevGuestKind } from '../guest/mdev-guest.ts';
import { BAR_PREFETCH, BAR_REFUSAL_ACTIONS, type BarPrefetch, type BarRefusalAction } from '../host/bar-layouts.ts';
import type { ConvergencePolicy } from '../migration/precopy.ts';
import { UserError } from '../util/errors.ts';
import { formatSize, parseSize } from '../util/size.ts';
import { LIMITS, type LimitName } from '../util/limits.ts';

/**
 * The one option table of a scenario: every setting once, with its flag, its place in a
 * scenario file, its parser and its default per kind of run. The command line (src/cli),
 * scenario files (scenario-file.ts), the catalog's demonstration settings, hunt and the
 * tests all build their scenarios from it (settings.ts), so a value is parsed once, and
 * its error names the flag, or the file and field, and the value.
 */

export type ScenarioKind = 'dirty-log-test' | 'migrate' | 'mdev';
export type Driver = 'free' | 'deterministic';
/** A mediated device's BAR: mapped on fault through validate_map_request, or statically 1:1 at mmap time (no validate callback). */
export type BarMapping = 'on-fault' | 'static';
export const BAR_MAPPINGS: readonly BarMapping[] = ['on-fault', 'static'];
/**
 * What a migration of VM 0 does about its mediated device (scenarios/mdev-migration.ts):
 * 'device-state', the device's own save carries the BAR contents in the stream (a device
 * record) and the destination's device loads them; 'blocker', the device registers a
 * migration blocker and the migration is refused at once, as QEMU's VFIO does for a device
 * without migration support; 'none': no migration.
 */
export type MdevMigration = 'none' | 'device-state' | 'blocker';
export const MDEV_MIGRATIONS: readonly MdevMigration[] = ['none', 'device-state', 'blocker'];
export type OnDeviceFault = 'continue' | 'stop';
/**
 * A confidential guest (private memory in guest_memfd, converted at run time): `off`;
 * `shared`, its shared pages migrate with the attributes; `blocker`, the migration is
 * refused at start, as QEMU's SEV and TDX migration blockers do.
 */
/** The CPU cache model (cpu-cache.ts) in front of the source's memory: off, on, or on with a self-snooping CPU. */
export type CpuCacheMode = 'off' | 'on' | 'self-snoop';
export const DMA_SLOT_LOGGING: readonly DmaSlotLogging[] = ['force-wb', 'refuse'];
export const CPU_CACHE_MODES: readonly CpuCacheMode[] = ['off', 'on', 'self-snoop'];
/**
 * What a migration does about a device doing non-coherent DMA (the seed discussion's
 * proposals): `block`, a migration blocker, as QEMU's virgl ("virgl is not yet
 * migratable"); `clflush-before-read`, the migration thread flushes each page before it
 * reads it; `switch-to-coherent`, the devices snoop and the guest maps its buffers WB
 * again before the migration reads anything; `switch-host-only`, the devices alone (broken
 * while the guest still writes WC); `device-state`, RAM migration skips the KVM-only blob
 * slot and the device saves it as its own state once the VM is stopped; `none`, nothing
 * (it may send stale cache lines: the bug).
 */
export type NoncoherentMigration = 'block' | 'clflush-before-read' | 'switch-to-coherent' | 'switch-host-only' | 'device-state' | 'none';
export const NONCOHERENT_MIGRATIONS: readonly NoncoherentMigration[] = ['block', 'clflush-before-read', 'switch-to-coherent', 'switch-host-only', 'device-state', 'none'];
/**
 * How KVM learns that a device does non-coherent DMA, so that it honours the guest's PAT
 * (the seed discussion's ways, side by side): `vfio`, VFIO registers it for an assigned
 * device (kvm_vfio_update_coherency); `capability`, the VMM enables a VM capability;
 * `kvm-virtio-device`, the VMM sets NONCOHERENT_SET on a KVM virtio device (its virtio-gpu
 * backend's GPU, which VFIO never sees); `none`, nobody tells KVM (the seeds' problem).
 */
export type NoncoherentRequest = 'vfio' | 'capability' | 'kvm-virtio-device' | 'kvm-mem-dma' | 'none';
export const NONCOHERENT_REQUESTS: readonly NoncoherentRequest[] = ['vfio', 'capability', 'kvm-virtio-device', 'kvm-mem-dma', 'none'];
/**
 * A blob resource of the render guest's GPU, mapped into the guest through a memslot of
 * its own (its render buffers are there): `ram`, host RAM the VMM maps too and migrates;
 * `kvm-only-ram`, host RAM only KVM maps (KVM_MEM_KVM_ONLY); `kvm-only-vram`, the GPU's
 * device memory (a VRAM BAR: host MMIO), only KVM maps; `off`, none (the buffers are the
 * last pages of guest RAM).
 */
export type Blob = 'off' | 'ram' | 'kvm-only-ram' | 'kvm-only-vram';
export const BLOBS: readonly Blob[] = ['off', 'ram', 'kvm-only-ram', 'kvm-only-vram'];
export type Confidential = 'off' | 'shared' | 'blocker';
export const CONFIDENTIAL: readonly Confidential[] = ['off', 'shared', 'blocker'];
/** How a confidential guest's explicit conversions reach KVM (VmConfig.mapGpa): KVM's hypercall or a TD's MapGPA. */
export const MAP_GPA_ABIS: readonly MapGpaAbi[] = ['kvm', 'tdx'];

export const DRIVERS: readonly Driver[] = ['free', 'deterministic'];
export const POLICIES: readonly ConvergencePolicy[] = ['fail', 'force', 'auto-converge', 'dirty-limit'];

/** Every setting a scenario can have, parsed (see OPTIONS for what each is). */
export interface Settings {
  /** Unset: the first injected bug's mode, else dirty-ring. */
  tracking?: TrackingMode;
  vcpus: number;
  memoryBytes: number;
  slots: number;
  ringEntries: number;
  workload: WorkloadName;
  hotFraction: number;
  hotShare: number;
  writePercent: number;
  randomOrder: boolean;
  opRate: number;
  hostWriteEvery: number;
  dirtyLimit: number;
  driver: Driver;
  seed: number;
  inject: BugName[];
  watchdogMs: number;
  burst: number;
  // dirty-log-test
  iterations: number;
  /** Unset: depends on memory and driver. */
  writes?: number;
  // migrate
  bandwidth: number;
  downtimeLimitMs: number;
  maxIterations: number;
  timeoutMs: number;
  policy: ConvergencePolicy;
  vcpuDirtyLimit?: number;
  /** Unset: one per page (free-run), or twice that up to 20000 (deterministic). */
  warmup?: number;
  batchPages: number;
  pageHistory: boolean;
  to?: string;
  allowRemote: boolean;
  /** Unset: 1.5 passes over each vCPU's share of memory. */
  resumeOps?: number;
  devices: DeviceConfig[];
  iommu: IommuBackendKind;
  dmaEntryLimit: number;
  onDeviceFault: OnDeviceFault;
  confidential: Confidential;
  mapGpa: MapGpaAbi;
  conversionDesign: ConversionDesignName;
  cpuCache: CpuCacheMode;
  noncoherentMigration: NoncoherentMigration;
  noncoherentRequest: NoncoherentRequest;
  blob: Blob;
  dmaSlotLogging: DmaSlotLogging;
  // mdev
  vms: number;
  reallocations: number;
  barMapping: BarMapping;
  barPrefetch: BarPrefetch;
  barRefusal: BarRefusalAction;
  mdevGuest: MdevGuestKind;
  mdevMigration: MdevMigration;
}
export type SettingKey = keyof Settings;

/** A raw value: as typed on the command line, or as a scenario file holds it. */
export type Raw = unknown;

export interface OptionDef<K extends SettingKey = SettingKey> {
  key: K;
  /** The flag, as `vmemlab` takes it (`--memory`); the value's name for --help. */
  flag: string;
  arg?: string;
  /** dirty-log-test (and `run`) call the tracking mode --mode. */
  flagFor?: Partial<Record<ScenarioKind, string>>;
  /** Where a scenario file holds it (`vm.memory`). */
  yaml?: string;
  help: string;
  /** The kinds of run that take it. */
  kinds: readonly ScenarioKind[];
  /** Parses a raw value; `where` is the flag or the file and field. */
  parse(raw: Raw, where: string): Settings[K];
  /** The value as a flag's text (demonstration settings, --help defaults). */
  format(v: NonNullable<Settings[K]>): string;
  /** The default per kind, when there is a fixed one (others are computed: settings.ts). */
  defaults?: Partial<Record<ScenarioKind, Settings[K]>>;
  /** Repeatable flag (collects values). */
  repeatable?: boolean;
  /** A flag without a value. */
  boolean?: boolean;
  /** Commander's negated form (`--no-page-history`). */
  negate?: boolean;
}

// ---- parsers (every mistake names `where` and the value) ----

const text = (raw: Raw): string => (typeof raw === 'string' ? raw : String(raw));

export function wholeNumber(raw: Raw, where: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const t = text(raw);
  const n = Number(t);
  if (!/^\s*\d+\s*$/.test(t) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UserError(`${where}: '${t}' is not a whole number from ${min} to ${max}`);
  }
  return n;
}

export function parseFraction(raw: Raw, where: string): number {
  const t = text(raw);
  const n = Number(t);
  if (t.trim() === '' || !Number.isFinite(n) || n <= 0 || n > 1) throw new UserError(`${where}: '${t}' is not a fraction in (0, 1]`);
  return n;
}

export function parsePositive(raw: Raw, where: string, unit: string): number {
  const t = text(raw);
  const n = Number(t);
  if (t.trim() === '' || !Number.isFinite(n) || n <= 0) throw new UserError(`${where}: '${t}' is not a positive number of ${unit}`);
  return n;
}

export function parseMemory(raw: Raw, where: string): number {
  const bytes = parseSize(typeof raw === 'number' ? raw : text(raw), where);
  if (bytes % PAGE_SIZE !== 0 || bytes === 0) throw new UserError(`${where}: '${text(raw)}' is not a whole, non-zero number of 4 KiB pages`);
  const l = LIMITS.memoryBytes;
  if (bytes > l.max) throw new UserError(`${where}: '${text(raw)}' is more than ${formatSize(l.max)} of guest memory (${l.why})`);
  return bytes;
}

/** A migration bandwidth: a size per second, or `unlimited` (0); never 0 written as a number. */
export function parseBandwidth(raw: Raw, where: string): number {
  if (raw === 'unlimited') return 0;
  const bytes = parseSize(typeof raw === 'number' ? raw : text(raw), where);
  const l = LIMITS.bandwidth;
  if (bytes < l.min || bytes > l.max) throw new UserError(`${where}: '${text(raw)}' is not a bandwidth from ${formatSize(l.min)} to ${formatSize(l.max)} per second (write unlimited for no cap)`);
  return bytes;
}

/** A limit's whole number (LIMITS names the range and the reason). */
export function limitedNumber(raw: Raw, where: string, limit: LimitName): number {
  return wholeNumber(raw, where, LIMITS[limit].min, LIMITS[limit].max);
}

export function parseRingSize(raw: Raw, where: string): number {
  const n = wholeNumber(raw, where, 1);
  const err = checkRingSize(n);
  if (err) throw new UserError(`${where}: ${err}`);
  return n;
}

function oneOf<T extends string>(raw: Raw, where: string, values: readonly T[], what: string, list: string): T {
  const t = text(raw);
  if ((values as readonly string[]).includes(t)) return t as T;
  throw new UserError(`${where}: unknown ${what} '${t}' (${list})`);
}

/** The most pages per second a dirty limit may name: more than any vCPU here can dirty. */
export const MAX_DIRTY_RATE = 10_000_000;
/** The most guest operations per second an operation rate may name: more than a vCPU here retires. */
export const MAX_OP_RATE = 100_000_000;

/**
 * A dirty page rate: pages per second (`1000`), or a size per second as QEMU writes its
 * dirty limits (`1MB/s`, `4MiB/s`; MB is 2^20 bytes, as in QEMU's dirtylimit). Returns
 * 4 KiB pages per second, at least 1.
 */
export function parseDirtyRate(raw: Raw, where: string): number {
  const t = text(raw).trim();
  const sized = /^(.*\S)\s*\/\s*s$/i.exec(t);
  let pages: number;
  if (sized) {
    let bytes = NaN;
    if (!Number.isFinite(Number(sized[1]))) { try { bytes = parseSize(sized[1]!, ''); } catch { bytes = NaN; } }
    pages = bytes / PAGE_SIZE;
  } else pages = t === '' ? NaN : Number(t);
  if (!Number.isFinite(pages) || pages < 1 || pages > MAX_DIRTY_RATE) {
    throw new UserError(`${where}: '${text(raw)}' is not a dirty page rate from 1 to ${MAX_DIRTY_RATE} pages per second (write pages per second, or a size per second like 1MB/s)`);
  }
  return Math.round(pages);
}

function parseBool(raw: Raw, where: string): boolean {
  if (typeof raw === 'boolean') return raw;
  if (raw === 'true') return true;
  if (raw === 'false') return false;
  throw new UserError(`${where}: '${text(raw)}' is not true or false`);
}

function parseInject(raw: Raw, where: string): BugName[] {
  const list = Array.isArray(raw) ? raw : [raw];
  const names = list.map((n) => findBug(text(n), where).name);
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  if (twice !== undefined) throw new UserError(`${where}: '${twice}' is given twice`);
  return names;
}

// ---- devices: `--device KIND[:key=value,...]`, or a scenario file's `devices:` entry ----

/** The device options, each a DeviceConfig field, by the name flags and files give them. */
const DEVICE_FIELDS: Record<string, keyof Omit<DeviceConfig, 'kind'>> = {
  every: 'every', buffers: 'buffers', 'write-percent': 'writePercent', 'remap-every': 'remapEvery', pattern: 'pattern',
  tracking: 'tracking', 'stray-every': 'strayEvery', iotlb: 'iotlbEntries', identity: 'identity', snoop: 'snoop',
};
export const DEVICE_KEYS = Object.keys(DEVICE_FIELDS);

/** One device option's value into `d`; errors name `at` (the device and the key). */
function deviceOption(d: DeviceConfig, field: keyof Omit<DeviceConfig, 'kind'>, key: string, value: Raw, at: string): void {
  if (field === 'identity' || field === 'snoop') {
    if (value !== undefined && value !== true && value !== false && value !== 'true' && value !== 'false') throw new UserError(`${at}: '${text(value)}' is not true or false`);
    d[field] = value !== false && value !== 'false';
    return;
  }
  if (value === undefined) throw new UserError(`${at}: needs a value (${key}=...)`);
  switch (field) {
    case 'pattern':
      if (value !== 'random' && value !== 'sequential') throw new UserError(`${at}: '${text(value)}' is not random or sequential`);
      d.pattern = value;
      break;
    case 'tracking':
      if (value !== 'iommu' && value !== 'device') throw new UserError(`${at}: '${text(value)}' is not iommu (the container's / HWPT's dirty tracking) or device (its own DMA logging)`);
      d.tracking = value;
      break;
    case 'every': d.every = wholeNumber(value, at, 1); break;
    case 'buffers': d.buffers = wholeNumber(value, at, 1, 1 << 20); break;
    case 'writePercent': d.writePercent = wholeNumber(value, at, 0, 100); break;
    case 'remapEvery': d.remapEvery = wholeNumber(value, at, 0); break;
    case 'strayEvery': d.strayEvery = wholeNumber(value, at, 0); break;
    case 'iotlbEntries': {
      const n = wholeNumber(value, at, 1, 1 << 16);
      if ((n & (n - 1)) !== 0) throw new UserError(`${at}: '${text(value)}' is not a power of two`);
      d.iotlbEntries = n;
      break;
    }
  }
}

function newDevice(kind: string, where: string): DeviceConfig {
  if (!(DEVICE_KINDS as readonly string[]).includes(kind)) throw new UserError(`${where}: unknown kind '${kind}' (one of: ${DEVICE_KINDS.join(', ')})`);
  return { ...DEVICE_DEFAULTS, kind: kind as DeviceKind };
}

function checkDevice(d: DeviceConfig, where: string): DeviceConfig {
  if (d.kind !== 'dma-engine' && d.tracking === 'device') throw new UserError(`${where}: tracking=device: only a dma-engine logs its own DMA (an mdev is tracked by its pins and dma_rw, gvt by KVM's log)`);
  return d;
}

/** `--device KIND[:key=value,...]`: errors name the device, the key and the value. */
export function parseDeviceSpec(spec: string, index: number, flag = '--device'): DeviceConfig {
  const [kind, rest] = spec.split(/:(.*)/s, 2) as [string, string | undefined];
  const where = `${flag}: device ${index} '${spec}'`;
  const d = newDevice(kind, where);
  for (const item of (rest ?? '').split(',').map((x) => x.trim()).filter(Boolean)) {
    const [key, value] = item.split(/=(.*)/s, 2) as [string, string | undefined];
    const field = DEVICE_FIELDS[key];
    if (field === undefined) throw new UserError(`${where}: unknown option '${key}' (one of: ${DEVICE_KEYS.join(', ')})`);
    deviceOption(d, field, key, value, `${where}: ${key}`);
  }
  return checkDevice(d, where);
}

/** A scenario file's `devices:` entry (snake_case keys): errors name the entry and its field. */
export function parseDeviceEntry(entry: Record<string, unknown>, where: string): DeviceConfig {
  const d = newDevice(text(entry['kind']), `${where}.kind`);
  for (const [k, value] of Object.entries(entry)) {
    if (k === 'kind') continue;
    const key = k.replace(/_/g, '-');
    const field = DEVICE_FIELDS[key];
    if (field === undefined || !Object.hasOwn(DEVICE_FIELDS, key)) throw new UserError(`${where}.${k}: unknown option (one of: ${DEVICE_KEYS.map((x) => x.replace(/-/g, '_')).join(', ')})`);
    if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') throw new UserError(`${where}.${k}: expected a number, word or true/false`);
    deviceOption(d, field, key, value, `${where}.${k}`);
  }
  return checkDevice(d, where);
}

/** A device as a scenario file's `devices:` entry (what parseDeviceEntry reads). */
export function deviceEntry(d: DeviceConfig): Record<string, unknown> {
  const e: Record<string, unknown> = { kind: d.kind };
  for (const [k, f] of Object.entries(DEVICE_FIELDS)) if (Object.hasOwn(d, f)) e[k.replace(/-/g, '_')] = d[f];
  for (const k of Object.keys(d)) if (k !== 'kind' && !Object.values(DEVICE_FIELDS).includes(k as never)) e[k] = (d as unknown as Record<string, unknown>)[k];
  return e;
}

function formatDevice(d: DeviceConfig): string {
  const opts = Object.entries(DEVICE_FIELDS)
    .filter(([, f]) => d[f] !== DEVICE_DEFAULTS[f])
    .map(([k, f]) => (f === 'identity' && d.identity ? k : `${k}=${String(d[f])}`));
  return opts.length ? `${d.kind}:${opts.join(',')}` : d.kind;
}

// ---- the table ----

const BOTH: readonly ScenarioKind[] = ['dirty-log-test', 'migrate'];
/** What every kind of run takes: the VM's vCPUs, the driver, the seed, the bugs, the watchdog. */
const ANY: readonly ScenarioKind[] = ['dirty-log-test', 'migrate', 'mdev'];
const MIGRATE: readonly ScenarioKind[] = ['migrate'];
const DLT: readonly ScenarioKind[] = ['dirty-log-test'];
const MDEV: readonly ScenarioKind[] = ['mdev'];
const same = <T>(v: T): Record<ScenarioKind, T> => ({ 'dirty-log-test': v, migrate: v, mdev: v });
const num = (v: number): string => String(v);

function def<K extends SettingKey>(o: OptionDef<K>): OptionDef<K> { return o; }

export const OPTIONS = [
  def({
    key: 'tracking', flag: '--tracking', arg: '<mode>', flagFor: { 'dirty-log-test': '--mode' }, yaml: 'tracking.mode', kinds: BOTH,
    help: `dirty tracking: ${MODES.join(', ')} (default: dirty-ring, or the injected bug's mode)`,
    parse: (r, w) => oneOf(r, w, MODES, 'mode', `one of: ${MODES.join(', ')}`), format: (v) => v,
  }),
  def({ key: 'vcpus', flag: '--vcpus', arg: '<n>', yaml: 'vm.vcpus', kinds: ANY, help: 'vCPUs, each its own worker thread under --driver free', parse: (r, w) => limitedNumber(r, w, 'vcpus'), format: num, defaults: same(2) }),
  def({ key: 'memoryBytes', flag: '--memory', arg: '<size>', yaml: 'vm.memory', kinds: BOTH, help: 'guest memory, e.g. 512MiB, 16GiB', parse: parseMemory, format: formatSize, defaults: same(256 << 20) }),
  def({ key: 'slots', flag: '--slots', arg: '<n>', yaml: 'vm.slots', kinds: BOTH, help: 'memslots to split the memory into', parse: (r, w) => limitedNumber(r, w, 'slots'), format: num, defaults: same(1) }),
  def({ key: 'ringEntries', flag: '--ring-size', arg: '<entries>', yaml: 'tracking.ring_size', kinds: BOTH, help: 'dirty ring entries per vCPU (power of two, 256..65536)', parse: parseRingSize, format: num, defaults: same(4096) }),
  def({
    key: 'workload', flag: '--workload', arg: '<name>', yaml: 'workload.name', kinds: BOTH, help: `guest workload: ${WORKLOAD_NAMES.join(', ')}`,
    parse: (r, w) => oneOf(r, w, WORKLOAD_NAMES, 'workload', `one of: ${WORKLOAD_NAMES.join(', ')}`), format: (v) => v,
    defaults: { 'dirty-log-test': 'random', migrate: 'hotset' },
  }),
  def({ key: 'hotFraction', flag: '--hot-fraction', arg: '<f>', yaml: 'workload.hot_fraction', kinds: BOTH, help: 'hotset: fraction of pages that are hot', parse: parseFraction, format: num, defaults: { 'dirty-log-test': 0.1, migrate: 0.02 } }),
  def({ key: 'hotShare', flag: '--hot-share', arg: '<f>', yaml: 'workload.hot_share', kinds: BOTH, help: 'hotset: share of writes to hot pages', parse: parseFraction, format: num, defaults: { 'dirty-log-test': 0.9, migrate: 1 } }),
  def({ key: 'writePercent', flag: '--write-percent', arg: '<p>', yaml: 'workload.write_percent', kinds: BOTH, help: 'perf: percentage of operations that write', parse: (r, w) => wholeNumber(r, w, 0, 100), format: num, defaults: same(100) }),
  def({ key: 'randomOrder', flag: '--random-order', yaml: 'workload.random_order', kinds: DLT, boolean: true, help: 'perf: visit pages in random order', parse: parseBool, format: String, defaults: same(false) }),
  def({
    key: 'opRate', flag: '--op-rate', arg: '<n>', yaml: 'workload.op_rate', kinds: BOTH,
    help: 'guest operations per second each vCPU runs at most (the guest is that busy; default: as fast as it can)',
    parse: (r, w) => wholeNumber(r, w, 1, MAX_OP_RATE), format: num, defaults: same(0),
  }),
  def({
    key: 'hostWriteEvery', flag: '--host-write-every', arg: '<n>', yaml: 'host_writes.every', kinds: BOTH,
    help: 'one host write (kvm_write_guest, no vCPU) per n guest writes; 0 for none', parse: (r, w) => wholeNumber(r, w, 0), format: num,
    defaults: { 'dirty-log-test': 64, migrate: 0 },
  }),
  def({
    key: 'dirtyLimit', flag: '--dirty-limit', arg: '<rate>', yaml: 'vm.dirty_limit', kinds: BOTH,
    help: 'hold each vCPU to this dirty page rate from the start (QEMU\'s set-vcpu-dirty-limit): pages per second, or a size per second like 1MB/s; the vCPU sleeps outside guest mode when ahead (default: none)',
    parse: parseDirtyRate, format: num, defaults: same(0),
  }),
  def({
    key: 'driver', flag: '--driver', arg: '<driver>', yaml: 'driver', kinds: ANY, help: 'free (worker threads) or deterministic (one thread, seeded scheduler)',
    parse: (r, w) => oneOf(r, w, DRIVERS, 'driver', 'free or deterministic'), format: (v) => v, defaults: same<Driver>('free'),
  }),
  def({ key: 'seed', flag: '--seed', arg: '<n>', yaml: 'seed', kinds: ANY, help: 'seed for workloads and the scheduler', parse: (r, w) => wholeNumber(r, w, 0, 0xffffffff), format: num, defaults: same(1) }),
  def({
    key: 'inject', flag: '--inject', arg: '<bug>', yaml: 'inject', kinds: ANY, repeatable: true,
    help: 'inject a catalogued bug (repeatable; see vmemlab catalog)', parse: parseInject, format: (v) => v.join(' '), defaults: same<BugName[]>([]),
  }),
  def({
    key: 'watchdogMs', flag: '--watchdog', arg: '<seconds>', yaml: 'watchdog_s', kinds: ANY, help: 'stop when no actor progresses for this long',
    parse: (r, w) => parsePositive(r, w, 'seconds') * 1000, format: (v) => num(v / 1000), defaults: same(10_000),
  }),
  def({ key: 'burst', flag: '--burst', arg: '<n>', kinds: ANY, help: 'free-run: guest operations between a vCPU\'s step boundaries', parse: (r, w) => wholeNumber(r, w, 1, 1 << 20), format: num, defaults: same(256) }),
  // dirty-log-test
  def({ key: 'iterations', flag: '--iterations', arg: '<n>', yaml: 'test.iterations', kinds: DLT, help: 'collect-and-verify iterations', parse: (r, w) => limitedNumber(r, w, 'iterations'), format: num, defaults: same(6) }),
  def({ key: 'writes', flag: '--writes', arg: '<n>', yaml: 'test.writes', kinds: DLT, help: 'guest writes per iteration, all vCPUs together (default: depends on memory and driver)', parse: (r, w) => limitedNumber(r, w, 'writes'), format: num }),
  // migrate
  def({
    key: 'bandwidth', flag: '--bandwidth', arg: '<size>', yaml: 'migration.bandwidth', kinds: MIGRATE, help: 'max-bandwidth per second, e.g. 128MiB, or unlimited',
    parse: parseBandwidth, format: (v) => (v === 0 ? 'unlimited' : formatSize(v)), defaults: same(128 << 20),
  }),
  def({ key: 'downtimeLimitMs', flag: '--downtime-limit', arg: '<ms>', yaml: 'migration.downtime_limit_ms', kinds: MIGRATE, help: 'switch over when the expected downtime is below this', parse: (r, w) => parsePositive(r, w, 'milliseconds'), format: num, defaults: same(300) }),
  def({ key: 'maxIterations', flag: '--max-iterations', arg: '<n>', yaml: 'migration.max_iterations', kinds: MIGRATE, help: 'passes before the policy applies', parse: (r, w) => wholeNumber(r, w, 1), format: num, defaults: same(30) }),
  def({ key: 'timeoutMs', flag: '--timeout', arg: '<seconds>', yaml: 'migration.timeout_s', kinds: MIGRATE, help: 'time before the policy applies', parse: (r, w) => parsePositive(r, w, 'seconds') * 1000, format: (v) => num(v / 1000), defaults: same(60_000) }),
  def({
    key: 'policy', flag: '--policy', arg: '<policy>', yaml: 'migration.policy', kinds: MIGRATE,
    help: 'without convergence: fail or force at the limits; auto-converge (throttle the vCPUs\' CPU time) or dirty-limit (hold each vCPU to --vcpu-dirty-limit; needs the dirty ring), both until --timeout',
    parse: (r, w) => oneOf(r, w, POLICIES, 'policy', `one of: ${POLICIES.join(', ')}`), format: (v) => v, defaults: same<ConvergencePolicy>('fail'),
  }),
  def({
    key: 'vcpuDirtyLimit', flag: '--vcpu-dirty-limit', arg: '<rate>', yaml: 'migration.vcpu_dirty_limit', kinds: MIGRATE,
    help: 'the dirty-limit policy\'s quota per vCPU (QEMU\'s vcpu-dirty-limit): pages per second, or a size per second (default: 1MB/s, as QEMU)',
    parse: parseDirtyRate, format: num,
  }),
  def({ key: 'warmup', flag: '--warmup', arg: '<ops>', yaml: 'migration.warmup', kinds: MIGRATE, help: 'guest writes before migration starts (default: one per page)', parse: (r, w) => wholeNumber(r, w, 0), format: num }),
  // 4 MiB frames at most: within the stream ring's RING_MAX_FRAME.
  def({ key: 'batchPages', flag: '--batch-pages', arg: '<n>', yaml: 'migration.batch_pages', kinds: MIGRATE, help: 'pages per stream frame', parse: (r, w) => limitedNumber(r, w, 'batchPages'), format: num, defaults: same(256) }),
  def({
    key: 'pageHistory', flag: '--no-page-history', yaml: 'migration.page_history', kinds: MIGRATE, negate: true, boolean: true,
    help: 'do not record each page\'s dirty-tracking events for the lost-write report', parse: parseBool, format: String, defaults: same(true),
  }),
  def({ key: 'to', flag: '--to', arg: '<target>', yaml: 'migration.to', kinds: MIGRATE, help: 'tcp:HOST:PORT, a `vmemlab destination` process (default: an in-process destination)', parse: (r) => text(r), format: (v) => v }),
  def({ key: 'allowRemote', flag: '--allow-remote', kinds: MIGRATE, boolean: true, help: 'allow a --to host that is not a loopback address', parse: parseBool, format: String, defaults: same(false) }),
  def({
    key: 'resumeOps', flag: '--resume-ops', arg: '<n>', yaml: 'migration.resume_ops', kinds: MIGRATE,
    help: 'after completion the destination resumes the guest until each vCPU retired n operations, then stops it; 0: it stays paused, as with QEMU\'s -S (default: 1.5 passes over each vCPU\'s share of memory)',
    parse: (r, w) => wholeNumber(r, w, 0), format: num,
  }),
  def({
    key: 'devices', flag: '--device', arg: '<spec>', yaml: 'devices', kinds: MIGRATE, repeatable: true,
    help: `a device doing DMA (repeatable): KIND[:key=value,...]; kinds ${DEVICE_KINDS.join(', ')}; keys ${DEVICE_KEYS.join(', ')} (see docs/iommu.md)`,
    parse: (r, w) => (Array.isArray(r) ? r : [r]).map((d, i) => (typeof d === 'string' ? parseDeviceSpec(d, i, w) : parseDeviceEntry(d as Record<string, unknown>, `${w}.${i}`))),
    format: (v) => v.map(formatDevice).join(' '), defaults: same<DeviceConfig[]>([]),
  }),
  def({
    key: 'iommu', flag: '--iommu', arg: '<backend>', yaml: 'iommu.backend', kinds: MIGRATE, help: 'the IOMMU backend the devices sit behind: type1 (VFIO type1 container) or iommufd',
    parse: (r, w) => oneOf(r, w, ['type1', 'iommufd'] as const, 'backend', 'type1 or iommufd'), format: (v) => v, defaults: same<IommuBackendKind>('type1'),
  }),
  def({
    key: 'dmaEntryLimit', flag: '--dma-entry-limit', arg: '<n>', yaml: 'iommu.dma_entry_limit', kinds: MIGRATE, help: 'type1\'s dma_entry_limit: mappings per container',
    parse: (r, w) => wholeNumber(r, w, 1, 2 ** 31 - 1), format: num, defaults: same(VFIO_DEFAULT_DMA_ENTRY_LIMIT),
  }),
  def({
    key: 'onDeviceFault', flag: '--on-device-fault', arg: '<action>', yaml: 'iommu.on_fault', kinds: MIGRATE,
    help: 'continue (count device faults, the run fails at the end) or stop (the migration stops at the first)',
    parse: (r, w) => { const t = text(r); if (t !== 'continue' && t !== 'stop') throw new UserError(`${w}: '${t}' is not continue or stop`); return t; },
    format: (v) => v, defaults: same<OnDeviceFault>('continue'),
  }),
  def({
    key: 'confidential', flag: '--confidential', arg: '<migration>', yaml: 'vm.confidential', kinds: MIGRATE,
    help: 'a confidential guest (guest_memfd, workload convert): off; shared (its shared pages and the attributes migrate); blocker (the migration is refused, as QEMU\'s SEV blocker)',
    parse: (r, w) => oneOf(r, w, CONFIDENTIAL, 'confidential mode', `one of: ${CONFIDENTIAL.join(', ')}`), format: (v) => v, defaults: same<Confidential>('off'),
  }),
  def({
    key: 'mapGpa', flag: '--map-gpa', arg: '<abi>', yaml: 'vm.map_gpa', kinds: MIGRATE,
    help: 'a confidential guest\'s explicit conversions: kvm (KVM_HC_MAP_GPA_RANGE, one exit per call) or tdx (a TD\'s TDG.VP.VMCALL<MapGPA>: one KVM_EXIT_HYPERCALL per 2 MiB chunk; RETRY between chunks needs a pending interrupt, which nothing in a scenario raises)',
    parse: (r, w) => oneOf(r, w, MAP_GPA_ABIS, 'MapGPA ABI', 'kvm or tdx'), format: (v) => v, defaults: same<MapGpaAbi>('kvm'),
  }),
  def({
    key: 'conversionDesign', flag: '--conversion-design', arg: '<design>', yaml: 'vm.conversion_design', kinds: MIGRATE,
    help: 'how the VMM converts a confidential guest\'s memory with a device assigned: rdm (QEMU\'s RamDiscardManager, the default), notifier (a conversion notifier list VFIO registers with), in-place (guest_memfd holds both; VFIO unmaps before a page turns private), kvm-iommu (KVM updates the device\'s IOMMU table itself)',
    parse: (r, w) => oneOf(r, w, CONVERSION_DESIGNS, 'conversion design', `one of: ${CONVERSION_DESIGNS.join(', ')}`), format: (v) => v, defaults: same<ConversionDesignName>('rdm'),
  }),
  def({
    key: 'cpuCache', flag: '--cpu-cache', arg: '<mode>', yaml: 'vm.cpu_cache', kinds: MIGRATE,
    help: 'a CPU cache model in front of guest memory, where page aliasing shows: off; on (vCPU accesses by their memory type, devices snoop unless snoop=false, the migration thread reads through it); self-snoop (a CPU that writes a cached copy back before a UC or WC access)',
    parse: (r, w) => oneOf(r, w, CPU_CACHE_MODES, 'CPU cache mode', `one of: ${CPU_CACHE_MODES.join(', ')}`), format: (v) => v, defaults: same<CpuCacheMode>('off'),
  }),
  def({
    key: 'noncoherentMigration', flag: '--noncoherent-migration', arg: '<policy>', yaml: 'migration.noncoherent', kinds: MIGRATE,
    help: 'with a device doing non-coherent DMA (snoop=false): block (a migration blocker, as QEMU\'s virgl), clflush-before-read (the migration thread flushes each page before it reads it), switch-to-coherent (the devices snoop and the guest maps its buffers WB again first), switch-host-only (the devices alone), device-state (RAM migration skips the KVM-only blob, which the device saves as its state), none (nothing: stale cache lines may be sent)',
    parse: (r, w) => oneOf(r, w, NONCOHERENT_MIGRATIONS, 'non-coherent migration policy', `one of: ${NONCOHERENT_MIGRATIONS.join(', ')}`), format: (v) => v, defaults: same<NoncoherentMigration>('block'),
  }),
  def({
    key: 'noncoherentRequest', flag: '--noncoherent-request', arg: '<way>', yaml: 'vm.noncoherent_request', kinds: MIGRATE,
    help: 'how KVM learns of a device doing non-coherent DMA (snoop=false), so that it honours the guest\'s PAT: vfio (VFIO registers it for the assigned device), capability (a VM capability the VMM enables), kvm-virtio-device (NONCOHERENT_SET on a KVM virtio device), kvm-mem-dma (the KVM_MEM_DMA flag on the blob\'s memslot: that slot alone), none (nobody tells KVM)',
    parse: (r, w) => oneOf(r, w, NONCOHERENT_REQUESTS, 'way to request honouring', `one of: ${NONCOHERENT_REQUESTS.join(', ')}`), format: (v) => v, defaults: same<NoncoherentRequest>('vfio'),
  }),
  def({
    key: 'blob', flag: '--blob', arg: '<memory>', yaml: 'vm.blob', kinds: MIGRATE,
    help: 'the render guest\'s buffers in a GPU blob resource mapped through a memslot of its own: off (the last pages of guest RAM); ram (host RAM); kvm-only-ram (host RAM only KVM maps: KVM_MEM_KVM_ONLY); kvm-only-vram (the GPU\'s device memory, host MMIO, only KVM maps)',
    parse: (r, w) => oneOf(r, w, BLOBS, 'blob memory', `one of: ${BLOBS.join(', ')}`), format: (v) => v, defaults: same<Blob>('off'),
  }),
  def({
    key: 'dmaSlotLogging', flag: '--dma-slot-logging', arg: '<rule>', yaml: 'vm.dma_slot_logging', kinds: MIGRATE,
    help: 'what KVM does when dirty logging starts on a KVM_MEM_DMA slot (the two exclude each other): force-wb (stop honouring the guest\'s PAT there, zapping the slot) or refuse (EINVAL: the migration cannot start)',
    parse: (r, w) => oneOf(r, w, DMA_SLOT_LOGGING, 'rule for dirty logging on a KVM_MEM_DMA slot', `one of: ${DMA_SLOT_LOGGING.join(', ')}`), format: (v) => v, defaults: same<DmaSlotLogging>('force-wb'),
  }),
  // mdev
  def({ key: 'vms', flag: '--vms', arg: '<n>', yaml: 'mdev.vms', kinds: MDEV, help: 'VMs sharing the mediated device, each with --vcpus vCPUs and its own VMM', parse: (r, w) => limitedNumber(r, w, 'vms'), format: num, defaults: { mdev: 2 } }),
  def({
    key: 'reallocations', flag: '--reallocations', arg: '<n>', yaml: 'mdev.reallocations', kinds: MDEV,
    help: 'the vendor driver\'s reallocation events (a grant, a revocation, or both); the run ends after the last', parse: (r, w) => limitedNumber(r, w, 'reallocations'), format: num, defaults: { mdev: 24 },
  }),
  def({
    key: 'barMapping', flag: '--bar-mapping', arg: '<how>', yaml: 'mdev.mapping', kinds: MDEV,
    help: 'on-fault (nothing mapped at mmap; each first access is validated by the vendor\'s validate_map_request) or static (no validate callback: each VM\'s slices fixed and mapped 1:1 at mmap; nothing is reallocated)',
    parse: (r, w) => oneOf(r, w, BAR_MAPPINGS, 'BAR mapping', 'on-fault or static'), format: (v) => v, defaults: { mdev: 'on-fault' as BarMapping },
  }),
  def({
    key: 'barPrefetch', flag: '--bar-prefetch', arg: '<rule>', yaml: 'mdev.prefetch', kinds: MDEV,
    help: 'KVM\'s prefetch of BAR pages around a fault: off (KVM\'s rule: PFNMAP pages are never prefetched) or mapped (up to 8 neighbours the VMA maps already, never under an invalidation, as the 2016 patch would allow)',
    parse: (r, w) => oneOf(r, w, BAR_PREFETCH, 'prefetch rule', 'off or mapped'), format: (v) => v, defaults: { mdev: 'off' as BarPrefetch },
  }),
  def({
    key: 'barRefusal', flag: '--on-refused-access', arg: '<action>', yaml: 'mdev.on_refused_access', kinds: MDEV,
    help: 'a BAR access the vendor refuses: memory-fault (KVM_RUN fails with EFAULT, KVM_EXIT_MEMORY_FAULT, and the VMM stops the VM) or kill-vm (KVM kills the VM: every KVM_RUN fails with EIO, the 2016 design)',
    parse: (r, w) => oneOf(r, w, BAR_REFUSAL_ACTIONS, 'action', 'memory-fault or kill-vm'), format: (v) => v, defaults: { mdev: 'memory-fault' as BarRefusalAction },
  }),
  def({
    key: 'mdevGuest', flag: '--mdev-guest', arg: '<driver>', yaml: 'mdev.guest', kinds: MDEV,
    help: 'vm0\'s guest driver (the others\' are cooperative): cooperative (touches what the status page grants, acknowledges changes), eager (touches the BAR before its allocation is communicated), lingering (keeps writing a revoked resource), scribbler (writes its read-only status page)',
    parse: (r, w) => oneOf(r, w, MDEV_GUEST_KINDS, 'guest driver', `one of: ${MDEV_GUEST_KINDS.join(', ')}`), format: (v) => v, defaults: { mdev: 'cooperative' as MdevGuestKind },
  }),
  def({
    key: 'mdevMigration', flag: '--mdev-migration', arg: '<how>', yaml: 'mdev.migration', kinds: MDEV,
    help: 'after the run, migrate vm0: device-state (the device\'s save carries its BAR contents in the stream; the destination\'s device loads them and the resumed guest faults its BAR in again), blocker (the device blocks the migration, as QEMU\'s VFIO for a device without migration support), none',
    parse: (r, w) => oneOf(r, w, MDEV_MIGRATIONS, 'migration', `one of: ${MDEV_MIGRATIONS.join(', ')}`), format: (v) => v, defaults: { mdev: 'none' as MdevMigration },
  }),
] as const;

export type AnyOption = (typeof OPTIONS)[number];

export function optionFor(key: SettingKey): OptionDef {
  const o = OPTIONS.find((x) => x.key === key);
  if (!o) throw new Error(`no option ${key}`);
  return o as unknown as OptionDef;
}

/** The flag a kind of run calls an option by. */
export function flagOf(key: SettingKey, kind: ScenarioKind): string {
  const o = optionFor(key);
  return o.flagFor?.[kind] ?? o.flag;
}

/** The commander key of an option (what commander calls `--ring-size`: ringSize). */
export function commanderKey(o: OptionDef): string {
  const name = o.flag.replace(/^--(no-)?/, '');
  return name.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

/** A demonstration's settings as the flags they stand for (vmemlab KIND --flag value ...). */
export function demoFlags(d: Partial<Settings>, kind: ScenarioKind): string {
  return (Object.entries(d) as [SettingKey, unknown][]).flatMap(([k, v]) => {
    const o = optionFor(k);
    if (k === 'devices') return (v as DeviceConfig[]).map((x) => `${o.flag} ${formatDevice(x)}`);
    return [`${flagOf(k, kind)} ${o.format(v as never)}`];
  }).join(' ');
}

/** Bugs named in the catalog, in their catalog order. */
export function knownBug(name: string): boolean {
  return CATALOG.some((b) => b.name === name);
}
