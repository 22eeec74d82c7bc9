/**
 * Confidential VMs with an assigned device (issue 13): the four conversion designs side by
 * side, and the 16 GiB experiment.
 *
 *   tsx bench/cvm-designs.ts designs   conversions/s (4 KiB and 2 MiB) of each design against
 *                                      a plain KVM_SET_MEMORY_ATTRIBUTES flip in the same
 *                                      process; ioctls per conversion, IOMMU entries, the
 *                                      largest shared memory under type1's default limit,
 *                                      bookkeeping bytes
 *   tsx bench/cvm-designs.ts guest     the same confidential guest migrating under each design
 *                                      (deterministic: exact counts): VFIO ioctls per conversion
 *   tsx bench/cvm-designs.ts 16GiB     a 16 GiB confidential guest converting all its memory
 *                                      to shared: type1 with the default dma_entry_limit,
 *                                      with dma_entry_limit=4194304, iommufd; time, mappings,
 *                                      peak RSS of this process
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_GUEST_MEMFD, KVM_USER_MEM_SLOTS, PAGE_SIZE } from '../src/host/constants.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../src/host/iommu/constants.ts';
import type { IommuBackendKind } from '../src/host/iommu/iommu-layout.ts';
import { type MemslotConfig, type VmLayout, createVmLayout } from '../src/host/layout.ts';
import type { Memslot } from '../src/host/memslot.ts';
import { Vm } from '../src/host/vm.ts';
import { CONVERSION_DESIGNS, type ConversionDesign, type ConversionDesignName, vfioDmaMappingsCheck } from '../src/host/vmm/conversion-design.ts';
import { createConversionDesign } from '../src/host/vmm/conversion-designs.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { type Figure, type Sample, alternate, caseArgs, consume, drive, emit, median, settle } from './harness.ts';

const MiB = 1 << 20;
const GiB = 1 << 30;
const BASE_GFN = 0x100;
const MANUAL = { kind: 'bitmap', manualProtect: true, initiallySet: false } as const;

interface GuestOptions { backend?: IommuBackendKind; limit?: number; registrationCheck?: boolean }

/** A confidential guest: one guest_memfd slot of `bytes` at gfn 0x100, an IOMMU whose IOVA space covers it, one (quiesced) device. */
function confidentialVm(bytes: number, o: GuestOptions = {}): Vm {
  const pages = bytes / PAGE_SIZE;
  const slots: MemslotConfig[] = [{ id: 1, asId: 0, baseGfn: BASE_GFN, pages, flags: KVM_MEM_GUEST_MEMFD }];
  const iommu = { backend: o.backend ?? 'type1', dmaEntryLimit: o.limit ?? VFIO_DEFAULT_DMA_ENTRY_LIMIT, iovaPages: BASE_GFN + pages + 1024, devices: 1, tracking: ['iommu' as const] };
  const vm = new Vm(createVmLayout({ slots, vcpus: 1, tracking: MANUAL, privateMem: true, iommu }));
  vm.populate();
  return vm;
}

function designOn(name: ConversionDesignName, vm: Vm, o: GuestOptions = {}): ConversionDesign {
  const d = createConversionDesign(name, vm, o.registrationCheck === false ? { registrationCheck: false } : {});
  const r = drive(d.setup());
  if (r.ret !== 0) throw new Error(`${name}: setup failed: ${r.error}`);
  return d;
}

// ---------------------------------------------------------------------------------------
// designs

const GUEST = 64 * MiB;
const REPS = 7;
const WARMUP = 2;
const WINDOW_MS = 200;

/** Converts ranges of `pages` pages, walking the guest, shared then private, for at least `ms`: conversions done. */
function timedConversions(ms: number, pages: number, convert: (start: number, size: number, toPrivate: boolean) => void): Sample {
  const ranges = GUEST / PAGE_SIZE / pages;
  let ops = 0;
  let i = 0;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < ms) {
    for (let k = 0; k < 8; k++) {
      const start = (BASE_GFN + (i % ranges) * pages) * PAGE_SIZE;
      convert(start, pages * PAGE_SIZE, false);
      convert(start, pages * PAGE_SIZE, true);
      i++;
      ops += 2;
    }
    t = performance.now();
  }
  return { ops, seconds: (t - t0) / 1000 };
}

function rateText(x: number): string {
  return x >= 1e6 ? `${(x / 1e6).toFixed(2)} M` : x >= 1e3 ? `${(x / 1e3).toFixed(1)} k` : x.toFixed(0);
}

/**
 * The largest shared memory a design gives the device under type1's default limit: 2 MiB
 * conversions, then 4 KiB ones from the first that failed, until a 4 KiB one fails too;
 * the pages the device can reach at the end. (After a failed populate RamBlockAttributes
 * keeps its bits set, so rdm's 4 KiB retries inside the failed range "succeed" without a
 * mapping: what counts is what is mapped.)
 */
function largestShared(name: ConversionDesignName): { pages: number; error: string } {
  const bytes = 512 * MiB;
  const vm = confidentialVm(bytes);
  const d = designOn(name, vm, { registrationCheck: false });
  let page = 0;
  let error = '';
  for (const chunk of [512, 1]) {
    while (page + chunk <= bytes / PAGE_SIZE) {
      const r = drive(d.convert((BASE_GFN + page) * PAGE_SIZE, chunk * PAGE_SIZE, false));
      if (r.ret !== 0) { error = r.error; break; }
      page += chunk;
    }
  }
  return { pages: d.stats().pagesMapped, error };
}

function designs(): Figure[] {
  const figures: Figure[] = [];
  // The plain flip: KVM_SET_MEMORY_ATTRIBUTES alone, on a guest of its own with the same layout.
  const plainVm = confidentialVm(GUEST);
  drive(plainVm.setMemoryAttributes({ address: BASE_GFN * PAGE_SIZE, size: GUEST, attributes: KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0 }));
  const flip = (start: number, size: number, toPrivate: boolean): void => {
    drive(plainVm.setMemoryAttributes({ address: start, size, attributes: toPrivate ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0 }));
  };
  const rows: string[] = [];
  for (const name of CONVERSION_DESIGNS) {
    const vm = confidentialVm(GUEST);
    const d = designOn(name, vm);
    const convert = (start: number, size: number, toPrivate: boolean): void => {
      const r = drive(d.convert(start, size, toPrivate));
      if (r.ret !== 0) throw new Error(`${name}: ${r.error}`);
      consume(r.ret);
    };
    for (const [label, pages] of [['4KiB', 1], ['2MiB', 512]] as const) {
      const before = d.stats();
      const r = alternate(REPS, WARMUP, () => timedConversions(WINDOW_MS, pages, convert), () => timedConversions(WINDOW_MS, pages, flip));
      const after = d.stats();
      const conversions = after.conversions - before.conversions;
      const perConversion = Object.entries(after.ioctls).map(([k, v]) => [k, (v - (before.ioctls[k] ?? 0)) / conversions] as const).filter(([, v]) => v > 0);
      const ioctls = perConversion.reduce((n, [, v]) => n + v, 0);
      const ratio = median(r.ratios);
      figures.push({
        id: `cvm/designs/${name}/${label}`,
        what: `${name}: ${label} conversions (shared and back) with an assigned device, vs a plain KVM_SET_MEMORY_ATTRIBUTES flip`,
        figure: `${ratio.toFixed(3)}x (${rateText(median(r.a))} conversions/s, ${ioctls.toFixed(1)} ioctls each)`, value: ratio,
        detail: `${name}, ${label} ranges walking a ${GUEST / MiB} MiB guest_memfd slot, to shared then to private, ${REPS} paired repeats of ${WINDOW_MS} ms after ${WARMUP} warm-up pairs: `
          + `${rateText(median(r.a))} conversions/s against ${rateText(median(r.b))} plain attribute flips/s (the same ranges on a guest of its own); `
          + `per conversion: ${perConversion.map(([k, v]) => `${v.toFixed(v >= 10 ? 0 : 2)} ${k}`).join(', ')}`,
      });
    }
    // The whole guest shared: the entries it takes, and the design's bookkeeping.
    drive(d.convert(BASE_GFN * PAGE_SIZE, GUEST, false));
    const s = d.stats();
    const book = Object.entries(s.bookkeeping);
    const bookBytes = book.reduce((n, [, v]) => n + v, 0);
    const fit = largestShared(name);
    rows.push(name);
    figures.push({
      id: `cvm/designs/${name}/footprint`,
      what: `${name}: IOMMU entries with all of a ${GUEST / MiB} MiB guest shared; the largest shared memory under type1's default dma_entry_limit; bookkeeping`,
      figure: `${s.iommuEntries} entries, ${fit.error === '' ? 'all 512 MiB' : `${((fit.pages * PAGE_SIZE) / MiB).toFixed(3)} MiB`} shared at most, ${bookBytes} B bookkeeping`,
      value: s.iommuEntries,
      detail: `${GUEST / MiB} MiB shared: ${s.iommuEntries} container entries, ${s.pagesMapped} IOVA pages mapped; bookkeeping beside KVM's attribute array (1 byte per page): `
        + `${book.length === 0 ? 'none (KVM\'s attributes are the record)' : book.map(([k, v]) => `${k}: ${v} B (${(v * (GiB / GUEST) / 1024).toFixed(0)} KiB per GiB of guest)`).join(', ')}; `
        + `a 512 MiB guest under type1 with dma_entry_limit ${VFIO_DEFAULT_DMA_ENTRY_LIMIT} (registration check off) converted 2 MiB then 4 KiB ranges to shared: `
        + (fit.error === '' ? 'all of it, no limit met' : `${fit.pages} pages (${((fit.pages * PAGE_SIZE) / MiB).toFixed(3)} MiB) before the first failure: ${fit.error}`),
    });
  }
  // QEMU's registration check reserves one mapping per possible memslot: the largest guest_memfd RAM block it lets a device in with.
  const probe = confidentialVm(4 * MiB);
  let lo = 0;
  let hi = 1 << 22;
  while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (vfioDmaMappingsCheck(probe.iommu!, mid, 1) === null) lo = mid; else hi = mid - 1; }
  figures.push({
    id: 'cvm/designs/registration-limit',
    what: 'the largest guest_memfd RAM block QEMU\'s VFIO registration check accepts under type1\'s default dma_entry_limit (rdm, notifier, in-place)',
    figure: `${lo} pages (${((lo * PAGE_SIZE) / MiB).toFixed(3)} MiB)`, value: lo,
    detail: `vfio_ram_discard_register_listener counts one mapping per 4 KiB of the section plus one for each of the other ${KVM_USER_MEM_SLOTS - 1} memslots KVM could have `
      + `(kvm_get_max_memslots = KVM_USER_MEM_SLOTS = ${KVM_USER_MEM_SLOTS}) against ${VFIO_DEFAULT_DMA_ENTRY_LIMIT}: a device assigned to a bigger guest fails to realize, `
      + `well before the 256 MiB the mappings themselves would allow`,
  });
  return figures;
}

// ---------------------------------------------------------------------------------------
// 16GiB

const BIG = 16 * GiB;

function status(field: string): number {
  const m = readFileSync('/proc/self/status', 'utf8').match(new RegExp(`${field}:\\s+(\\d+) kB`));
  return m ? Number(m[1]) * 1024 : NaN;
}

/** Resets the peak resident size (VmHWM) to the current one (Linux 4.0+: clear_refs 5). */
function resetPeak(): boolean {
  try { writeFileSync('/proc/self/clear_refs', '5'); return true; } catch { return false; }
}

/**
 * The guest never writes its memory, so every discard in the experiment (PUNCH_HOLE of
 * guest_memfd, MADV_DONTNEED of shared memory) meets a hole: the kernel frees nothing and
 * writes nothing. Memslot.zeroPages fill(0)s regardless, and a write commits the page (on
 * this machine reads do too: the kernel runs without the shared zero page), so 16 GiB of
 * holes would become 16 GiB of resident zeros. This guest's backings skip the zeroing and
 * count the pages instead; the figures say how many.
 */
function holesStayHoles(slot: Memslot): { pages: number } {
  const skipped = { pages: 0 };
  for (const m of [slot, slot.gmem!]) m.zeroPages = (_page: number, count: number): void => { skipped.pages += count; };
  return skipped;
}

/** What a discard of never-written memory costs with Memslot.zeroPages as it is: resident bytes before and after zeroing 64 MiB. */
function discardCommits(): number {
  const layout: VmLayout = createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: BASE_GFN, pages: (64 * MiB) / PAGE_SIZE, flags: 0 }], vcpus: 1, tracking: MANUAL });
  const vm = new Vm(layout);
  const before = process.memoryUsage.rss();
  vm.memory.slots[0]!.zeroPages(0, (64 * MiB) / PAGE_SIZE);
  return process.memoryUsage.rss() - before;
}

interface BigRun { label: string; rssBefore: number; seconds: number; ret: number; error: string; entries: number; pagesMapped: number; maps: number; mapErrors: number; unmaps: number; peakRss: number; skipped: number; setupError: string; iommuBytes: number }

function bigRun(label: string, name: ConversionDesignName, o: GuestOptions): BigRun {
  const rssBefore = process.memoryUsage.rss();
  resetPeak();
  const vm = confidentialVm(BIG, o);
  const skipped = holesStayHoles(vm.memory.slots[0]!);
  const l = vm.iommu!.layout;
  const iommuBytes = l.iopte.byteLength + l.pins.byteLength + l.type1Dirty.byteLength + l.deviceLogs.reduce((n, b) => n + b.byteLength, 0) + l.unmapDirty.byteLength;
  const d = createConversionDesign(name, vm, o.registrationCheck === false ? { registrationCheck: false } : {});
  const setup = drive(d.setup());
  const t0 = performance.now();
  const r = setup.ret === 0 ? drive(d.convert(BASE_GFN * PAGE_SIZE, BIG, false)) : { ret: setup.ret, error: '' };
  const seconds = (performance.now() - t0) / 1000;
  const s = vm.iommu!.stats();
  return {
    label, rssBefore, seconds, ret: r.ret, error: r.error, entries: s.entries, pagesMapped: d.stats().pagesMapped, maps: s.maps, mapErrors: s.mapErrors, unmaps: s.unmaps,
    peakRss: status('VmHWM'), skipped: skipped.pages, setupError: setup.ret === 0 ? '' : setup.error, iommuBytes,
  };
}

async function sixteen(): Promise<Figure[]> {
  const committed = discardCommits();
  await settle();
  const runs: BigRun[] = [];
  const configs: [string, ConversionDesignName, GuestOptions][] = [
    ['type1, default dma_entry_limit (65535), QEMU\'s registration check', 'rdm', {}],
    ['type1, default dma_entry_limit (65535), registration check off', 'rdm', { registrationCheck: false }],
    ['type1, dma_entry_limit=4194304', 'rdm', { limit: 4194304, registrationCheck: false }],
    ['iommufd', 'rdm', { backend: 'iommufd' }],
    ['iommufd', 'notifier', { backend: 'iommufd' }],
    ['iommufd', 'in-place', { backend: 'iommufd' }],
    ['KVM writes the table (no container mappings)', 'kvm-iommu', {}],
  ];
  for (const [label, name, o] of configs) {
    runs.push(bigRun(label, name, o));
    await settle();
  }
  const pages = BIG / PAGE_SIZE;
  const MiBs = (b: number): string => `${(b / MiB).toFixed(0)} MiB`;
  return runs.map((r, i) => {
    const name = configs[i]![1];
    const outcome = r.setupError !== '' ? `refused at registration: ${r.setupError}`
      : r.ret === 0 ? `all ${pages} pages shared`
        : `stopped: ${r.error}`;
    const figure = r.setupError !== '' ? 'refused before any conversion'
      : r.ret === 0 ? `${r.pagesMapped} pages mapped in ${r.seconds.toFixed(1)} s, peak RSS ${MiBs(r.peakRss)}`
        : `ENOSPC after ${r.maps} mappings, rolled back to ${r.entries}; ${r.seconds.toFixed(1)} s, peak RSS ${MiBs(r.peakRss)}`;
    return {
      id: `cvm/16GiB/${i}`,
      what: `a 16 GiB confidential guest (${pages} pages) converting all its memory to shared, ${name}: ${r.label}`,
      figure, value: r.seconds,
      detail: `${outcome}; ${r.maps} map ioctls (${r.mapErrors} failed), ${r.unmaps} unmaps, ${r.entries} container entries and ${r.pagesMapped} IOVA pages mapped at the end; `
        + `${r.seconds.toFixed(2)} s for the conversion; peak resident size of the emulator ${MiBs(r.peakRss)} (VmHWM, reset before the guest was made; ${MiBs(r.rssBefore)} resident then); `
        + `the IOMMU layout for ${pages + BASE_GFN + 1024} IOVA pages allocates ${MiBs(r.iommuBytes)} (8 B IOPTE + 4 B pin count per page, bitmaps); `
        + `${r.skipped} pages of discards met holes and were not zeroed (zeroing 64 MiB of never-written memory made ${MiBs(committed)} resident in this process)`,
    };
  });
}

// ---------------------------------------------------------------------------------------
// guest

/**
 * The same guest under each design: the convert workload's confidential guest (2 vCPUs,
 * 8 MiB, a dma-engine) migrating under the deterministic driver, seeds 1-3, as
 * `vmemlab migrate --confidential shared --conversion-design NAME` runs it. Exact counts,
 * the same on every machine: what each design asked of VFIO per conversion the guest made.
 */
async function guest(): Promise<Figure[]> {
  const base = { confidential: 'shared', workload: 'convert', memoryBytes: '8MiB', vcpus: '2', batchPages: '8', devices: ['dma-engine:identity,every=8,buffers=16,remap-every=0'], driver: 'deterministic' };
  const seeds = [1, 2, 3];
  const figures: Figure[] = [];
  for (const name of CONVERSION_DESIGNS) {
    let conversions = 0;
    let maps = 0;
    let unmaps = 0;
    let reachable = 0;
    const ioctls: Record<string, number> = {};
    const verdicts: string[] = [];
    for (const seed of seeds) {
      const { scenario } = migrationSetup({ ...base, conversionDesign: name, seed: String(seed) } as never);
      const r = await runMigration(scenario, { driver: 'deterministic', watchdogMs: 60_000, burst: 64 });
      verdicts.push(r.status);
      const c = r.confidential!;
      conversions += c.conversions;
      maps += r.dma!.iommu.maps;
      unmaps += r.dma!.iommu.unmaps;
      reachable += c.design?.stats.pagesMapped ?? r.dma!.iommu.pagesMapped;
      for (const [k, v] of Object.entries(c.design?.stats.ioctls ?? {})) ioctls[k] = (ioctls[k] ?? 0) + v;
    }
    const perConversion = (maps + unmaps) / conversions;
    const named = Object.entries(ioctls).map(([k, v]) => `${(v / conversions).toFixed(2)} ${k}`).join(', ');
    figures.push({
      id: `cvm/guest/${name}`,
      what: `${name}: the convert guest migrating with a device (deterministic, seeds ${seeds.join(', ')}): VFIO map and unmap ioctls per conversion the guest made`,
      figure: `${perConversion.toFixed(2)} VFIO ioctls/conversion (${conversions} conversions, ${verdicts.every((v) => v === 'passed') ? 'all passed' : verdicts.join(', ')})`,
      value: perConversion,
      detail: `${name} over seeds ${seeds.join(', ')}: ${conversions} conversions served (hypercalls and memory faults), ${maps} VFIO_IOMMU_MAP_DMA and ${unmaps} VFIO_IOMMU_UNMAP_DMA, `
        + `${(reachable / seeds.length).toFixed(0)} pages the device reaches at the end on average; `
        + (named !== '' ? `the design's own count per conversion (its boot's included): ${named}` : 'QEMU\'s path counts no ioctls of its own: per conversion one KVM_SET_MEMORY_ATTRIBUTES and one discard besides VFIO\'s'),
    });
  }
  return figures;
}

// ---------------------------------------------------------------------------------------

const [which = 'designs'] = caseArgs();
const run = { designs, '16GiB': sixteen, guest }[which];
if (run === undefined) throw new Error(`unknown case '${which}' (designs, 16GiB, guest)`);
emit(await run());
process.exit(0);
