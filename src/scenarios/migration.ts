import type { TrackingMode } from '../bugs/catalog.ts';
import { injectedBugs } from '../bugs/injected.ts';
import { Acted } from '../host/injections.ts';
import { trackingFor } from '../host/vmm/dirty-log.ts';
import { type InjectionReport, injectionReport } from '../bugs/acted.ts';
import type { DeterministicDriver } from '../drivers/deterministic.ts';
import { type WorkloadOptions, isRenderWorkload } from '../guest/workload.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import type { Memslot } from '../host/memslot.ts';
import { hex } from '../util/hex.ts';
import { CacheStat, type CpuCacheConfig, LINES_PER_PAGE } from '../host/cpu-cache.ts';
import { type DmaSlotLogging, GlobalWord, type MapGpaAbi, type MemslotConfig, type VmConfig, createVmLayout } from '../host/layout.ts';
import { KVM_MEM_DMA, KVM_MEM_KVM_ONLY } from '../host/constants.ts';
import type { GuestRange } from '../host/devices/dma-buffers.ts';
import type { OracleCount, Vm } from '../host/vm.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import { DEST_WORDS, DestWord } from '../migration/channel.ts';
import { DESTINATION_FAILED } from '../migration/precopy.ts';
import { createStreamRing } from '../migration/stream-ring.ts';
import { compareDigests, connectDestination } from '../migration/tcp.ts';
import type { MigrationEvent, MigrationInfo, MigrationParams, PassStats } from '../migration/precopy.ts';
import { type StampMismatch, compareMemory, withHistory } from '../oracles/stamp-oracle.ts';
import { UserError } from '../util/errors.ts';
import { slotLayout } from './dirty-log-test.ts';
import { type RoleSpec, vmFor } from './roles.ts';
import { type DeviceSetup, type DmaReport, NO_DEVICES, attachDevices, dmaReport, iommuConfigFor } from './devices.ts';
import type { IommuServiceEvent } from '../host/iommu/iommu-service.ts';
import { type DestinationRun, resumeDestination } from './resume.ts';
import { type Driver, type RunRolesOptions, runRoles } from './run-roles.ts';
import type { Strategy } from '../drivers/strategy.ts';
import type { KvmCpuExecEvent } from '../host/vmm/kvm-cpu-exec.ts';
import type { Blob, Confidential, NoncoherentMigration } from './options.ts';
import { RENDER_PAGES, renderAreaOf, renderHandover } from '../guest/render-guest.ts';
import { type ConversionDesignName, discardsSharedMemory } from '../host/vmm/conversion-design.ts';
import { CONFIDENTIAL_BLOCKER, type ConfidentialReport, bootConfidential, bootSharedRanges, checkConfidentialMigration, confidentialVerdict, confidentialVmConfig, sharedAreaOf } from './confidential.ts';

export interface MigrationScenario {
  tracking: TrackingMode;
  vcpus: number;
  memoryBytes: number;
  slots: number;
  ringEntries: number;
  workload: WorkloadOptions;
  seed: number;
  bugs: string[];
  hostWriteEvery: number;
  params: MigrationParams;
  /** Record each source page's dirty-tracking events for the mismatch report (default on). */
  pageHistory?: boolean;
  /** The IOMMU and the devices doing DMA (none by default). */
  devices?: DeviceSetup;
  /** Each vCPU's dirty page rate limit from the start, pages per second (QEMU's set-vcpu-dirty-limit); 0 or unset for none. */
  dirtyLimit?: number;
  /** A confidential guest (confidential.ts): its shared pages migrate, or a blocker refuses; default off. */
  confidential?: Confidential;
  /** A confidential guest's explicit conversions (VmConfig.mapGpa): KVM's hypercall (default) or a TD's MapGPA. */
  mapGpa?: MapGpaAbi;
  /** How the VMM converts a confidential guest's memory with a device assigned (conversion-design.ts); default rdm, what QEMU merged. */
  conversionDesign?: ConversionDesignName;
  /** A CPU cache model in front of the source's memory (VmConfig.cpuCache); unset: none. */
  cpuCache?: CpuCacheConfig;
  /** What the migration does about a device doing non-coherent DMA (options.ts NoncoherentMigration); default block, as QEMU. */
  noncoherentMigration?: NoncoherentMigration;
  /** The render guest's buffers in a GPU blob resource's memslot (options.ts Blob); default off. */
  blob?: Blob;
  /** What KVM does when dirty logging starts on a KVM_MEM_DMA slot (VmConfig.dmaSlotLogging); default force-wb. */
  dmaSlotLogging?: DmaSlotLogging;
}

/**
 * The scenario's memslots: guest RAM (slotLayout), then the blob resource's slot, if any,
 * one gfn past the last (RENDER_PAGES pages: the render buffers), with KVM_MEM_KVM_ONLY for
 * the KVM-only blobs, device memory for VRAM, and KVM_MEM_DMA when that is how the VMM
 * asks KVM to honour the guest's PAT.
 */
export function scenarioSlots(s: Pick<MigrationScenario, 'memoryBytes' | 'slots' | 'blob' | 'devices'>): MemslotConfig[] {
  const ram = slotLayout(s.memoryBytes, s.slots);
  if (!hasBlob(s)) return ram;
  const last = ram.at(-1)!;
  const flags = (s.blob !== 'ram' ? KVM_MEM_KVM_ONLY : 0) | (s.devices?.noncoherentRequest === 'kvm-mem-dma' ? KVM_MEM_DMA : 0);
  return [...ram, { id: last.id + 1, asId: 0, baseGfn: last.baseGfn + last.pages + 1, pages: RENDER_PAGES, flags, ...(s.blob === 'kvm-only-vram' ? { hostMmio: true } : {}) }];
}

function hasBlob(s: Pick<MigrationScenario, 'blob'>): boolean {
  return s.blob !== undefined && s.blob !== 'off';
}

/** Where the render guest's buffers are: its blob's slot, or the last pages of guest RAM. */
function renderAreaFor(s: MigrationScenario): GuestRange {
  const slots = scenarioSlots(s);
  return hasBlob(s) ? slots.at(-1)! : renderAreaOf(slots[0]!);
}

export interface MigrationRunOptions {
  driver: Driver;
  /** Aborting it cancels the migration (QEMU's migrate_cancel): it ends failed, the VM keeps running. */
  cancel?: AbortSignal;
  /** A destination process reached over TCP (free-run only); default: in-process. */
  to?: { host: string; port: number };
  watchdogMs: number;
  burst: number;
  onEvent?: (e: MigrationEvent) => void;
  onTick?: (progress: number[], names: string[]) => void;
  /** Called with the source VM before anything runs (benchmarks fill memory or park vCPUs here). */
  prepare?: (vm: Vm) => void;
  /** Deterministic: the scheduling strategy (default random), or a recorded schedule to replay. */
  strategy?: Strategy;
  replay?: Uint8Array;
  /** With `replay`: once the schedule ends the strategy finishes the run (shrinking); otherwise the run stops there. */
  replayThenStrategy?: boolean;
  /** Deterministic: called after every step of the migration run with its number, the role's name and the source VM (tracers). */
  onStep?: (stepNo: number, role: string, vm: Vm) => void;
  /**
   * In-process: once the migration completed, the destination resumes the guest and runs
   * it until each vCPU retired this many operations, then stops it. Unset: it stays paused.
   */
  resumeOps?: number;
  /** Tests only: crash or wedge one role after some steps. */
  fault?: RunRolesOptions['fault'];
  /** Deterministic: the driver's heartbeat, for a watchdog on another thread (hunt's). */
  heartbeat?: SharedArrayBuffer;
}

export interface MigrationRunResult {
  /** passed: completed and verified; failed: lost writes or the migration failed; stuck / crashed: did not complete. */
  status: 'passed' | 'failed' | 'stuck' | 'crashed';
  info: MigrationInfo | null;
  passes: PassStats[];
  reason: string | null;
  mismatches: StampMismatch[];
  mismatchCount: number;
  pagesCompared: number;
  errors: string[];
  seconds: number;
  steps?: number;
  /** Deterministic: the schedule the run took (role index per step); replaying it reproduces the run. */
  schedule?: Uint8Array;
  /** The in-process destination after completion: the sweep-pattern oracle, the resumed guest. */
  destination?: DestinationRun;
  /** IOMMU and device statistics, device faults and stale-IOTLB DMAs (scenarios with devices). */
  dma?: DmaReport;
  /** How often each injected bug acted (a run where one never acted says so). */
  injections: InjectionReport[];
  /** A confidential guest's migration: attributes, the private memory oracle, private memory read. */
  confidential?: ConfidentialReport;
  /** With the CPU cache model: the stale read oracle by reader, pages the migration thread flushed, lines written back. */
  cache?: CacheReport;
  /** The blocker a device doing non-coherent DMA needs was not registered, and the migration ran: what it should have said. */
  blockerIgnored?: string;
  /** The KVM-only slot oracle, when the VM has such a slot: pages of it the VMM's generic paths touched. */
  kvmOnlyTouches?: OracleCount;
}

export interface CacheReport {
  staleReads: { cpu: number; device: number; migration: number; firstGfn: number | null };
  migrationPageFlushes: number;
  writebacks: number;
  /** Write-backs of dirty lines that overwrote newer bytes a UC/WC store or no-snoop DMA had put in memory (lost to the aliasing). */
  overwrites: number;
  /** The machine check oracle: cacheable (WB) accesses to device memory, and the first gfn. */
  machineChecks: OracleCount;
}

function cacheReport(vm: Vm): CacheReport | undefined {
  const c = vm.cache;
  if (c === null) return undefined;
  const st = c.staleReads();
  const frame = st.firstKey === null ? null : Math.floor(st.firstKey / LINES_PER_PAGE);
  const slot = frame === null ? undefined : vm.memory.slotOfFrame(frame);
  return {
    staleReads: { cpu: st.cpu, device: st.device, migration: st.migration, firstGfn: slot === undefined ? null : slot.baseGfn + frame! - slot.firstPage },
    migrationPageFlushes: c.stat(CacheStat.MIGRATION_PAGE_FLUSHES), writebacks: c.stat(CacheStat.WRITEBACKS), overwrites: c.stat(CacheStat.OVERWRITES),
    machineChecks: vm.machineChecks(),
  };
}

export function migrationVmConfig(s: MigrationScenario): VmConfig {
  const bugs = injectedBugs(s.bugs);
  const devices = s.devices ?? NO_DEVICES;
  // Writes by KVM with no running vCPU (host writer, GVT-g) need the ring's backup bitmap.
  const hostWrites = s.hostWriteEvery > 0 || devices.devices.some((d) => d.kind === 'gvt');
  const tracking = trackingFor(s.tracking, { ringEntries: s.ringEntries, hostWrites, noBackupBitmap: bugs.noBackupBitmap });
  const slots = scenarioSlots(s);
  const plain: VmConfig = {
    slots, vcpus: s.vcpus, tracking, pageHistory: s.pageHistory !== false, ...(s.cpuCache ? { cpuCache: s.cpuCache } : {}),
    ...(s.dmaSlotLogging !== undefined ? { dmaSlotLogging: s.dmaSlotLogging } : {}),
  };
  const config = isConfidential(s) ? { ...confidentialVmConfig(plain), ...(s.mapGpa === 'tdx' ? { mapGpa: s.mapGpa } : {}) } : plain;
  const iommu = iommuConfigFor(devices, slots);
  return iommu ? { ...config, iommu } : config;
}

function isConfidential(s: MigrationScenario): boolean {
  return s.confidential !== undefined && s.confidential !== 'off';
}

/** A conversion design other than QEMU's, which the VMM's thread runs (kvm-cpu-exec.ts). */
function designOf(s: MigrationScenario): Exclude<ConversionDesignName, 'rdm'> | undefined {
  const d = s.conversionDesign;
  return isConfidential(s) && d !== undefined && d !== 'rdm' ? d : undefined;
}

/** The scenario's devices; a confidential guest's use its shared bounce buffers, a render guest's its render buffers. */
function devicesOf(s: MigrationScenario): DeviceSetup {
  const d = s.devices ?? NO_DEVICES;
  if (isConfidential(s)) return { ...d, sharedArea: sharedAreaOf(slotLayout(s.memoryBytes, s.slots), s.vcpus) };
  if (!isRenderWorkload(s.workload.name)) return d;
  const area = renderAreaFor(s);
  const handover = renderHandover(area, s.workload.name as 'render' | 'render-wbinvd');
  return { ...d, bufferArea: handover !== undefined ? { ...area, handover } : area };
}

/** QEMU's virtio-gpu with virgl registers a migration blocker; vmemlab's for any device doing non-coherent DMA. */
export const NONCOHERENT_BLOCKER = 'a device does non-coherent DMA (snoop=false): virgl is not yet migratable (a migration blocker, as QEMU\'s virtio-gpu registers)';

function noncoherentBlocked(s: MigrationScenario): boolean {
  return (s.noncoherentMigration ?? 'block') === 'block' && (s.devices?.devices ?? []).some((d) => !d.snoop);
}

/** The roles of a migration, in the order runMigration starts them (a schedule names them by this index). */
export function roleNames(s: MigrationScenario): string[] {
  const devices = s.devices?.devices.length ?? 0;
  return [
    ...Array.from({ length: s.vcpus }, (_, i) => `vcpu${i}`), ...(s.hostWriteEvery > 0 ? ['host-writer'] : []),
    ...Array.from({ length: devices }, (_, i) => `device${i}`), ...(devices > 0 ? ['iommu-service'] : []), ...(isConfidential(s) ? ['vmm'] : []),
    'migration', 'destination',
  ];
}

/** A migration refused at start by a migration blocker: nothing ran. */
function blocked(reason: string): MigrationRunResult {
  return {
    status: 'failed', info: null, passes: [], reason, mismatches: [], mismatchCount: 0, pagesCompared: 0, errors: [], seconds: 0, injections: [],
  };
}

/** Migrates a running, writing VM to an in-process destination and compares memory. */
export async function runMigration(s: MigrationScenario, o: MigrationRunOptions): Promise<MigrationRunResult> {
  if (o.to && o.driver !== 'free') throw new UserError('--to tcp:... needs --driver free (the deterministic driver runs everything on one thread)');
  if (s.confidential === 'blocker') return blocked(CONFIDENTIAL_BLOCKER);
  // missing-migration-blocker: the device model registers none, and the migration runs as if nothing were done.
  const blockerMissing = noncoherentBlocked(s) && injectedBugs(s.bugs).missingMigrationBlocker;
  if (noncoherentBlocked(s) && !blockerMissing) return blocked(NONCOHERENT_BLOCKER);
  const config = migrationVmConfig(s);
  const source = createVmLayout(config);
  // The destination's memory is written by the stream (DRAM); it models no cache of its own.
  const target = createVmLayout({ ...config, pageHistory: false, cpuCache: undefined });
  const destWords = new SharedArrayBuffer(DEST_WORDS * 4);
  o.cancel?.addEventListener('abort', () => Atomics.store(new Int32Array(destWords), DestWord.CANCEL, 1), { once: true });
  const vm = vmFor(source, s.bugs);
  vm.populate();
  const devices = devicesOf(s);
  // QEMU's design boots here; another boots in the VMM's thread, where its state lives, while the vCPUs wait.
  const design = designOf(s);
  if (isConfidential(s) && design === undefined) bootConfidential(vm);
  if (design !== undefined) Atomics.store(vm.global, GlobalWord.VM_START_PENDING, 1);
  attachDevices(vm, devices, s.seed);
  let driver: DeterministicDriver | null = null;
  if (o.driver === 'deterministic') vm.history?.useStepClock(() => driver?.stepCount ?? 0);
  vmFor(target, []).populate();
  Atomics.store(vm.global, GlobalWord.ITERATION, 1);
  const vmm = new VmmControl(vm);
  vmm.resumeHost();
  if (s.dirtyLimit) vmm.setDirtyLimit(s.dirtyLimit);
  o.prepare?.(vm);

  const result: MigrationRunResult = {
    status: 'passed', info: null, passes: [], reason: null, mismatches: [], mismatchCount: 0, pagesCompared: 0, errors: [], seconds: 0, injections: [],
  };
  /** What the private memory oracle found as the conversions ran (the VMM's thread reports it). */
  const conversionFindings: string[] = [];
  let conversionFindingCount = 0;
  let designStats: ConfidentialReport['design'];
  const onEvent = (e: MigrationEvent | IommuServiceEvent | KvmCpuExecEvent): void => {
    if (e.kind === 'iommu-error') { result.errors.push(`device ${e.device}: ${e.detail}`); return; }
    if (e.kind === 'vm-stopped') { result.status = 'failed'; result.reason = `the VM stopped (internal error): vcpu${e.vcpu}: ${e.error}`; return; }
    if (e.kind === 'boot-failed') { result.status = 'failed'; result.reason = `the VMM could not boot the guest (conversion design ${s.conversionDesign}): ${e.error}`; return; }
    if (e.kind === 'design-error') { result.errors.push(`vmm: ${e.detail}`); return; }
    if (e.kind === 'design-stats') { designStats = { name: e.name, stats: e.stats }; return; }
    if (e.kind === 'vfio-register-failed') { result.status = 'failed'; result.reason = `VFIO could not register with slot ${e.slot}'s RamDiscardManager: ${e.error}`; return; }
    if (e.kind === 'conversion-finding') { conversionFindings.push(e.finding); conversionFindingCount = e.count; return; }
    if (e.kind === 'pass') result.passes.push(e.stats);
    else { result.info = e.info; if (e.kind === 'failed') { result.status = 'failed'; result.reason = e.reason; } }
    o.onEvent?.(e);
  };
  const specs: RoleSpec[] = [];
  // A blob's slot holds the render buffers; without one they are the last pages of guest RAM, as the workload finds them itself.
  const workload = isRenderWorkload(s.workload.name) && hasBlob(s) ? { ...s.workload, renderArea: renderAreaFor(s) } : s.workload;
  for (let i = 0; i < s.vcpus; i++) specs.push({ kind: 'vcpu', index: i, workload, seed: s.seed });
  if (s.hostWriteEvery > 0) specs.push({ kind: 'host-writer', every: s.hostWriteEvery, seed: s.seed });
  devices.devices.forEach((_, index) => specs.push({ kind: 'device', index, setup: devices, seed: s.seed }));
  if (vm.iommu) specs.push({ kind: 'iommu-service' });
  if (isConfidential(s)) specs.push({ kind: 'vmm', bugs: s.bugs, ...(design !== undefined ? { design: { name: design, boot: bootSharedRanges(vm) } } : {}) });
  const started = performance.now();

  const queue: Uint8Array[] = [];
  // The network's deadline is half the watchdog's: it knows the reason (a frozen or gone
  // destination) and must end the run before the watchdog, which only sees threads waiting.
  const remote = o.to ? connectDestination(o.to.host, o.to.port, new Int32Array(destWords), o.watchdogMs / 2) : null;
  const ring = o.driver === 'free' && !remote ? createStreamRing() : undefined;
  const workerPort = remote?.workerPort;
  const params = s.noncoherentMigration !== undefined && s.noncoherentMigration !== 'block' ? { ...s.params, noncoherent: s.noncoherentMigration } : s.params;
  if (blockerMissing) vm.acts.acted(Acted.MISSING_MIGRATION_BLOCKER);
  specs.push({ kind: 'migration', params, bugs: s.bugs, destWords, queue, port: workerPort, ring, clockSteps: o.driver === 'free' ? undefined : () => driver?.stepCount ?? 0 });
  if (!remote) specs.push({ kind: 'destination', layout: target, destWords, queue, ring });
  const run = await runRoles({
    driver: o.driver, specs, primary: 'migration', vm, layoutOf: (spec) => (spec.kind === 'destination' ? target : source),
    bugs: s.bugs, seed: s.seed, onEvent: (e) => onEvent(e as MigrationEvent | IommuServiceEvent | KvmCpuExecEvent), watchdogMs: o.watchdogMs, burst: o.burst,
    onTick: o.onTick, onDriver: (d) => { driver = d; }, strategy: o.strategy, fault: o.fault, heartbeat: o.heartbeat, replay: o.replay, replayThenStrategy: o.replayThenStrategy,
    onStep: o.onStep ? (n, role) => o.onStep!(n, role, vm) : undefined,
  });
  if (run.status !== 'done') result.status = run.status;
  result.errors.push(...run.errors);
  result.steps = run.steps;
  result.schedule = run.schedule;
  result.injections = injectionReport(vm, s.bugs);
  if (blockerMissing && result.info !== null) {
    // The oracle: a migration that started although a blocker had to refuse it.
    result.blockerIgnored = 'the migration started although a device does non-coherent DMA (snoop=false): a migration blocker ("virgl is not yet migratable") should have refused it';
    result.status = 'failed';
    result.reason = result.blockerIgnored;
  }
  if (vm.memory.slots.some((x) => x.kvmOnly)) {
    result.kvmOnlyTouches = vm.kvmOnlyTouches();
    if (result.kvmOnlyTouches.count > 0 && result.status === 'passed') {
      result.status = 'failed';
      result.reason = `the VMM touched a KVM-only slot: the migration thread read its pages ${result.kvmOnlyTouches.count} times as RAM (first gfn ${hex(result.kvmOnlyTouches.firstGfn ?? 0)}); only KVM maps it, and the device saves it`;
    }
  }
  const cache = cacheReport(vm);
  if (cache !== undefined) {
    result.cache = cache;
    // A device that read DRAM while the latest write sat in a CPU cache consumed stale data (the guest's PAT was not honoured).
    if (cache.staleReads.device > 0 && result.status === 'passed') {
      result.status = 'failed';
      result.reason = `a device read stale data ${cache.staleReads.device} times: its no-snoop DMA read memory while a newer write sat in the CPU cache (first gfn ${hex(cache.staleReads.firstGfn ?? 0)})`;
    }
    if (cache.machineChecks.count > 0) {
      // A machine check is the host's end: it comes before whatever else the run saw.
      result.status = 'failed';
      result.reason = `a machine check: ${cache.machineChecks.count} cacheable (WB) accesses to device memory (first gfn ${hex(cache.machineChecks.firstGfn ?? 0)}): its EPT memory type must be UC (vmx_get_mt_mask's host MMIO rule)`;
    }
    if (cache.overwrites > 0 && result.status === 'passed') {
      result.status = 'failed';
      result.reason = `a write-back overwrote newer data ${cache.overwrites} times: a dirty cached line was written back over what a UC or WC store or no-snoop DMA had put in memory (first gfn ${hex(cache.staleReads.firstGfn ?? 0)})`;
    }
  }
  const dma = dmaReport(vm, devices);
  if (dma) {
    result.dma = dma;
    if ((dma.faults > 0 || dma.staleIotlb > 0) && result.status === 'passed') result.status = 'failed';
  }
  if (remote) {
    // After a completed migration the destination digests its memory for the oracle (as
    // long as it takes to read it); otherwise whatever it said has arrived by now.
    const completed = result.info?.status === 'completed';
    let timer: NodeJS.Timeout | undefined;
    const end = await Promise.race([remote.finished, new Promise<null>((r) => { timer = setTimeout(() => r(null), completed ? o.watchdogMs : 100); })]);
    clearTimeout(timer);
    remote.close();
    // The bridge knows why the destination failed (refused, closed, stalled, its own error): that is the reason.
    if (end?.error && (result.status === 'passed' || result.reason === DESTINATION_FAILED)) { result.status = 'failed'; result.reason = end.error; }
    if (completed && end === null && result.status === 'passed') {
      result.status = 'stuck';
      result.errors.push(`the destination sent no page digests within ${o.watchdogMs / 1000} s of completing: nothing was verified`);
    }
    if (completed && end?.digests) {
      vm.cache?.wbinvd();
      const cmp = compareDigests(new GuestMemory(source), end.digests);
      result.pagesCompared = cmp.pages;
      result.mismatchCount = cmp.count;
      result.mismatches = withHistory(cmp.mismatches, vm.memory, vm.history);
      if (cmp.count > 0) result.status = 'failed';
    }
    result.seconds = (performance.now() - started) / 1000;
    return result;
  }
  const stalled = result.info?.stalledVcpus ?? [];
  if (stalled.length > 0 && result.status === 'passed') {
    result.status = 'failed';
    result.reason = `the guest stalled: ${stalled.map((v) => `vcpu${v}`).join(', ')} sat in the same KVM_EXIT_DIRTY_RING_FULL across frames of a pass: the VMM never answered it`;
  }
  if (result.info?.status === 'completed') {
    // A private page whose shared memory the design keeps (in place) is not guest memory: not compared.
    // The stamp oracle compares what the source's memory architecturally holds: its cached lines written back first.
    vm.cache?.wbinvd();
    const privateKept = isConfidential(s) && !discardsSharedMemory(s.conversionDesign ?? 'rdm') ? (slot: Memslot, page: number) => vm.attributes!.isPrivate(slot, page) : undefined;
    const cmp = compareMemory(new GuestMemory(source), new GuestMemory(target), 16, privateKept);
    result.pagesCompared = cmp.pages;
    result.mismatches = withHistory(cmp.mismatches, vm.memory, vm.history);
    result.mismatchCount = cmp.count;
    if (cmp.count > 0) result.status = 'failed';
    const stale = result.cache?.staleReads.migration ?? 0;
    if (cmp.count > 0 && stale > 0 && result.reason === null) {
      const hint = s.noncoherentMigration === 'clflush-before-read' ? ''
        : s.noncoherentMigration === 'switch-host-only' ? '; the devices snoop now, but the guest still writes its buffers WC: switch-to-coherent switches the guest too'
          : '; --noncoherent-migration clflush-before-read flushes each page first';
      result.reason = `the migration thread sent stale data: ${stale} of its write-back reads hit a cache line older than memory (a UC or WC store or no-snoop DMA wrote behind the cache; first gfn ${hex(result.cache!.staleReads.firstGfn ?? 0)})${hint}`;
    }
    if (isConfidential(s)) {
      result.confidential = checkConfidentialMigration(vm, target, { design: s.conversionDesign ?? 'rdm', findings: conversionFindings, count: conversionFindingCount });
      if (designStats !== undefined) result.confidential.design = designStats;
      const why = confidentialVerdict(result.confidential);
      if (why !== null && result.status === 'passed') { result.status = 'failed'; result.reason = why; }
      // Private memory is not migrated: the destination has the shared half and the attributes, not a guest to resume.
      result.seconds = (performance.now() - started) / 1000;
      return result;
    }
  } else if (result.status === 'passed') {
    result.status = 'failed';
    result.errors.push('the migration thread ended without completing');
  }
  if (result.info?.status === 'completed') {
    // Host writes land on byte 0 of random pages: the sweep pattern holds only without them.
    const sweepCheck = s.workload.name === 'sweep' && s.hostWriteEvery === 0 && devices.devices.length === 0;
    const d = await resumeDestination(target, { ...o, workload, seed: s.seed, opsPerVcpu: o.resumeOps ?? 0, sweepCheck, cancel: o.cancel });
    result.destination = d;
    if (d.status !== 'passed' && result.status === 'passed') result.status = d.status;
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}
