import { GuestMemory } from '../host/guest-memory.ts';
import { BarMmuWord } from '../host/bar-layouts.ts';
import type { BarFindingName } from '../host/mmio/kvm-bar-mmu.ts';
import { type MdevStatePart, loadMdevState, saveMdevState } from '../host/mmio/mdev-state.ts';
import type { BarVmStop } from '../host/vmm/bar-vmm.ts';
import type { Vm } from '../host/vm.ts';
import { DestState } from '../migration/channel.ts';
import { Destination } from '../migration/destination.ts';
import {
  STREAM_VERSION_DEVICE, type StreamSlot, checksumUpdate, encodeComplete, encodeDevice, encodeHeader, encodePages,
} from '../migration/stream.ts';
import { type RoleSpec, vmFor } from './roles.ts';
import { type Driver, runRoles } from './run-roles.ts';
import type { MdevConfig, MdevSetup } from './mdev-setup.ts';
import type { MdevMigration } from './options.ts';


/** The device record's name in the stream. */
export const MDEV_DEVICE_NAME = 'vfio-mdev';
export const MDEV_BLOCKER = 'vfio-mdev: the mediated device does not support migration (migrate_add_blocker): the migration is refused before anything is sent';

export interface MdevMigrationReport {
  mode: Exclude<MdevMigration, 'none'>;
  /** Why nothing was migrated (the blocker, or vm0 stopped), or null. */
  refused: string | null;
  /** The migration failed: the stream or a device load refused, or a check after it failed. */
  error: string | null;
  /** Guest RAM pages sent (normal and zero) and the stream's bytes. */
  pages: number;
  streamBytes: number;
  /** What the device saved: its resources and their pages. */
  device: MdevStatePart[];
  /** The destination's device holds exactly the bytes the source's saved, before the guest ran. */
  deviceStateEqual: boolean;
  /** No BAR page of the destination was mapped when its guest resumed (mapped on fault). */
  startedUnmapped: boolean;
  /** The resumed guest's BAR faults, what the oracles found, and a stop. */
  faults: number;
  findings: { kind: BarFindingName; count: number }[];
  stopped: BarVmStop | null;
}

/** The resumed guest runs until the destination's vendor driver has announced this many times. */
const RESUME_ANNOUNCEMENTS = 8;

/**
 * Migrates VM 0 once the run is over (its vCPUs no longer run: stop-and-copy; pre-copy
 * passes of a VM that shares a device with running VMs are not modelled): its RAM in page
 * frames and the device's save in a device record of a version-4 stream, through the real
 * encoder, decoder and destination; the destination host's own vendor driver loads the
 * device's state into slices of its own MMIO, and its VM's BAR starts unmapped: the
 * resumed guest faults it in again, through validate_map_request.
 */
export async function migrateMdevVm(c: MdevConfig, vm0: Vm, destSetup: MdevSetup, o: { driver: Driver; watchdogMs: number; burst: number; stopped: boolean }): Promise<MdevMigrationReport> {
  const mode = c.migration as Exclude<MdevMigration, 'none'>;
  const report: MdevMigrationReport = {
    mode, refused: null, error: null, pages: 0, streamBytes: 0, device: [], deviceStateEqual: false, startedUnmapped: false, faults: 0, findings: [], stopped: null,
  };
  if (mode === 'blocker') { report.refused = MDEV_BLOCKER; return report; }
  if (o.stopped) { report.refused = 'vm0 was stopped (an internal error): nothing to migrate'; return report; }

  // The source: RAM page frames, then the device's save, then the completion.
  const slots: StreamSlot[] = vm0.memory.slots.map((s) => ({ id: s.id, asId: s.asId, baseGfn: s.baseGfn, pages: s.pages }));
  const frames: Uint8Array[] = [encodeHeader(slots, STREAM_VERSION_DEVICE)];
  let normal = 0;
  let zero = 0;
  for (const s of vm0.memory.slots) {
    const offsets = Array.from({ length: s.pages }, (_, i) => i);
    const b = encodePages((s.asId << 16) | s.id, offsets, { isZero: (p) => s.isZeroPage(p), copy: (p, n, into, at) => s.copyPages(p, n, into, at) });
    frames.push(b.frame);
    normal += b.normal;
    zero += b.zero;
  }
  const saved = saveMdevState(vm0.bars[0]!.driver, 0);
  report.device = saved.parts;
  frames.push(encodeDevice(MDEV_DEVICE_NAME, saved.parts, saved.bytes));
  const checksum = frames.reduce((crc, f) => checksumUpdate(crc, f), 0);
  frames.push(encodeComplete(normal, zero, checksum));
  report.pages = normal + zero;
  report.streamBytes = frames.reduce((n, f) => n + f.length, 0);

  // The destination host: its own device, its VM's memory and BAR, nothing mapped.
  const layout = destSetup.layouts[0]!;
  const dest = new Destination(new GuestMemory(layout), undefined, undefined, true);
  const destVm = vmFor(layout, c.bugs);
  const destDriver = destVm.bars[0]!.driver;
  dest.devices.set(MDEV_DEVICE_NAME, (parts, payload) => loadMdevState(destDriver, 0, parts, payload));
  for (const f of frames) if (!dest.receive(f)) break;
  if (dest.error !== null || dest.state !== DestState.COMPLETE) {
    report.error = dest.error ?? 'the destination did not complete';
    return report;
  }
  const loaded = saveMdevState(destDriver, 0);
  report.deviceStateEqual = JSON.stringify(loaded.parts) === JSON.stringify(saved.parts) && Buffer.compare(loaded.bytes, saved.bytes) === 0;
  const mapping = destVm.bars[0]!.mapping;
  if (c.mapping === 'static') {
    mapping.mmapStatic(destSetup.resources.flatMap((res, r) => {
      const s = destDriver.sliceOf(0, r);
      return s === null ? [] : [{ barPage: res.barOffset, pfn: s.pfn, pages: s.pages, writable: res.writable }];
    }));
  }
  report.startedUnmapped = mapping.presentIn(0, mapping.barPages) === 0;

  // The destination resumes the guest: its vCPUs, its VMM, its vendor driver announcing the loaded slices.
  const specs: RoleSpec[] = [];
  for (let v = 0; v < c.vcpus; v++) specs.push({ kind: 'bar-vcpu', vm: 0, index: v, guest: 'cooperative', bar: destSetup.bar, seed: c.seed + 1 });
  specs.push({ kind: 'bar-vmm', vm: 0 });
  specs.push({ kind: 'vendor-driver', layouts: [layout], bugs: c.bugs, events: RESUME_ANNOUNCEMENTS, static: true, vcpus: c.vcpus, seed: c.seed + 1 });
  const stops: BarVmStop[] = [];
  const run = await runRoles({
    driver: o.driver, specs, primary: 'vendor-driver', vm: destVm, layoutOf: () => layout, bugs: c.bugs, seed: c.seed + 1,
    onEvent: (e) => { if ((e as BarVmStop).kind === 'vm-stopped') stops.push(e as BarVmStop); }, watchdogMs: o.watchdogMs, burst: o.burst,
  });
  if (run.status !== 'done') { report.error = `the resumed guest's run: ${run.errors.join('; ')}`; return report; }
  const mmu = destVm.bars[0]!.mmu;
  mmu.audit();
  report.faults = mmu.stat(BarMmuWord.FAULTS);
  report.findings = mmu.findings().filter((f) => f.count > 0).map((f) => ({ kind: f.kind, count: f.count }));
  report.stopped = stops[0] ?? null;
  if (!report.deviceStateEqual) report.error = 'the destination\'s device does not hold what the source\'s saved';
  else if (report.findings.length > 0) report.error = `the resumed guest breached isolation: ${report.findings.map((f) => `${f.count} ${f.kind}`).join(', ')}`;
  else if (report.stopped !== null) report.error = `the resumed guest was refused: ${report.stopped.reason} at BAR page ${report.stopped.barPage}`;
  else if (c.mapping === 'on-fault' && (!report.startedUnmapped || report.faults === 0)) report.error = 'the destination did not fault its BAR in again';
  return report;
}
