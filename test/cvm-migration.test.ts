import { describe, expect, it } from 'vitest';
import { KVM_HC_MAP_GPA_RANGE, KVM_MEM_GUEST_MEMFD, PAGE_SIZE } from '../src/host/constants.ts';
import { PageBitmap } from '../src/host/dirty-bitmap.ts';
import { GuestMemory } from '../src/host/guest-memory.ts';
import { createVmLayout } from '../src/host/layout.ts';
import { MemoryAttributes } from '../src/host/memory-attributes.ts';
import { SPTE_PRIVATE, mapPagePrivate } from '../src/host/spte.ts';
import { Vm } from '../src/host/vm.ts';
import { VmmDirtySource, markVmmDirty } from '../src/host/vmm/vmm-dirty-source.ts';
import { Destination } from '../src/migration/destination.ts';
import { StreamDecoder, encodeAttributes, encodeComplete, encodeHeader } from '../src/migration/stream.ts';
import { CONFIDENTIAL_BLOCKER } from '../src/scenarios/confidential.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';
import { buildMigration, migrationSetup, resolve } from '../src/scenarios/settings.ts';
import { loadScenario } from '../src/scenarios/scenario-file.ts';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MANUAL, drive, frameOf, refusedMigration } from './helpers.ts';

/**
 * A confidential guest migrating (src/scenarios/confidential.ts): vCPUs convert their
 * areas back and forth, a device does DMA into the bounce buffers they share, and only
 * shared pages migrate, with the attributes in the stream.
 */
const CVM = { confidential: 'shared', workload: 'convert', memoryBytes: '8MiB', vcpus: '2', batchPages: '8', devices: ['dma-engine:identity,every=8,buffers=16,remap-every=0'] };
const DET = { driver: 'deterministic' as const, watchdogMs: 10_000, burst: 64 };

function cvm(extra: Record<string, unknown> = {}) {
  return migrationSetup({ ...CVM, driver: 'deterministic', ...extra } as never).scenario;
}

describe('a confidential guest migrates its shared half', () => {
  for (const seed of [1, 2, 3]) {
    it(`deterministic seed ${seed}: conversions and DMA during the migration; shared memory and attributes equal on the destination, no private page read or left mapped`, async () => {
      const r = await runMigration(cvm({ seed: String(seed) }), DET);
      expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
      expect(r.info?.status).toBe('completed');
      const c = r.confidential!;
      expect(c.conversions, 'the guest converted memory').toBeGreaterThan(0);
      expect(c.privatePages).toBeGreaterThan(0);
      expect(c.sharedPages, 'at least the bounce buffers are shared').toBeGreaterThanOrEqual(256);
      expect(c.privatePages + c.sharedPages).toBe(2048);
      expect(c).toMatchObject({ attributeMismatches: 0, findings: [], privateTouches: 0 });
      expect(r.mismatchCount).toBe(0);
      expect(r.pagesCompared).toBe(2048);
      expect(r.dma!.faults, 'the device only ever reached mapped shared buffers').toBe(0);
      expect(r.dma!.devices[0]!.dmaWrites, 'the device wrote the bounce buffers').toBeGreaterThan(0);
      // Nothing resumes: the destination holds the shared half and the attributes.
      expect(r.destination).toBeUndefined();
    });
  }

  it('free-run: the same guest with worker threads passes the same checks', async () => {
    const { scenario } = migrationSetup({ ...CVM, driver: 'free', dirtyLimit: '1MB/s', iommu: 'iommufd', warmup: '200' } as never);
    const r = await runMigration(scenario, { driver: 'free', watchdogMs: 30_000, burst: 64 });
    expect(r.status, `${r.reason ?? ''} ${r.errors.join('; ')}`).toBe('passed');
    expect(r.confidential).toMatchObject({ attributeMismatches: 0, findings: [], privateTouches: 0 });
    expect(r.confidential!.sharedPages + r.confidential!.privatePages).toBe(2048);
  });

  it('a conversion that runs while the migration thread yields before a batch\'s first page is not a private read (seeds where it did)', async () => {
    // Three vCPUs and a 4 MiB/s cap: conversions land in the flush before a batch's first
    // page; the probe must count from before that page's check, not from after the flush.
    for (const seed of [130, 133, 136]) {
      const r = await runMigration(cvm({ vcpus: '3', memoryBytes: '12MiB', bandwidth: '4MiB', seed: String(seed) }), DET);
      expect(r.status, `seed ${seed}: ${r.reason ?? ''}`).toBe('passed');
      expect(r.confidential!.privateTouches).toBe(0);
    }
  });

  it('migrate-private-pages: the migration thread reads the discarded (private) pages; the probe catches it on every seed, and it acted', async () => {
    for (const seed of [1, 2, 3]) {
      const r = await runMigration(cvm({ seed: String(seed), inject: ['migrate-private-pages'] }), DET);
      expect(r.status).toBe('failed');
      expect(r.confidential!.privateTouches).toBeGreaterThan(0);
      expect(r.reason).toMatch(/^the migration thread read \d+ pages of private memory \(discarded in the RamDiscardManager; first gfn 0x[0-9a-f]+\)$/);
      expect(failureOf(r)?.kind).toBe('private-memory');
      expect(r.injections.find((x) => x.bug === 'migrate-private-pages')!.acted).toBeGreaterThan(0);
    }
  });

  it('the blocker refuses the migration at start, as QEMU\'s SEV blocker does', async () => {
    const r = await runMigration(cvm({ confidential: 'blocker' }), DET);
    expect(r).toMatchObject({ status: 'failed', reason: CONFIDENTIAL_BLOCKER, info: null, passes: [] });
  });
});

describe('a confidential scenario refuses what it cannot run, naming the setting', () => {
  const refused = refusedMigration;
  it('another workload, or convert without a confidential guest', () => {
    expect(refused({ ...CVM, workload: 'hotset' })).toBe('--workload: a confidential guest runs the convert workload (private_mem_conversions_test\'s guest), not hotset');
    expect(refused({ workload: 'convert' })).toBe('--workload: convert is a confidential guest\'s workload; it needs --confidential shared or blocker');
  });
  it('several memslots, too little memory, a device that is no identity dma-engine, too many buffers', () => {
    expect(refused({ ...CVM, slots: '2' })).toBe('--slots: a confidential guest has one guest_memfd memslot here, not 2');
    expect(refused({ ...CVM, memoryBytes: '4MiB' })).toBe('--memory: 4MiB is too small for a confidential guest with 2 vCPUs: each converts its own 513 pages (2 MiB + 4 KiB) and 256 pages of bounce buffers follow (5128KiB in all)');
    expect(refused({ ...CVM, devices: ['mdev'] })).toMatch(/^--device: device 0 \(mdev\): a confidential guest's device is a dma-engine with identity/);
    expect(refused({ ...CVM, devices: ['dma-engine:identity,buffers=300'] })).toBe('--device: device 0 has 300 buffers; a confidential guest\'s devices use 128 pages of its bounce buffers');
  });
  it('more shared memory than the type1 container can map: refused before it runs, as VFIO\'s registration check, naming the limit and the figure', () => {
    expect(refused({ ...CVM, memoryBytes: '256MiB' })).toBe('--memory: 256MiB of guest_memfd memory can take 65536 DMA mappings of 4 KiB, and the 32763 other memslots KVM allows one each: 98299 > --dma-entry-limit 65535 (type1\'s dma_entry_limit), so VFIO would refuse to register ("possibly running out of DMA mappings"); use less memory, a larger limit, or --iommu iommufd');
    expect(refused({ ...CVM, memoryBytes: '128MiB' }), '32768 + 32763 fits').toBe('accepted');
    expect(refused({ ...CVM, memoryBytes: '256MiB', dmaEntryLimit: '98299' })).toBe('accepted');
    expect(refused({ ...CVM, memoryBytes: '256MiB', iommu: 'iommufd' })).toBe('accepted');
  });

  it('a TCP destination, and resuming on the destination', () => {
    expect(refused({ ...CVM, to: 'tcp:127.0.0.1:4444' })).toMatch(/^--to: a confidential guest migrates to an in-process destination only/);
    expect(refused({ ...CVM, resumeOps: '10' })).toMatch(/^--resume-ops: the destination does not resume a confidential guest/);
  });
  it('in a scenario file, a default that does not fit is blamed on the confidential setting that was written', () => {
    const path = join(mkdtempSync(join(tmpdir(), 'vmemlab-')), 'cvm.yaml');
    writeFileSync(path, 'kind: migrate\nvm: {confidential: shared}\ndevices: [{kind: dma-engine, identity: true}]\n');
    const f = loadScenario(path);
    expect(() => buildMigration(resolve(f.kind, [f.layer]))).toThrow(`${path}: vm.confidential: 256MiB of guest_memfd memory can take 65536 DMA mappings of 4 KiB`);
  });

  it('a confidential guest runs the convert workload unless told otherwise', () => {
    expect(migrationSetup({ confidential: 'shared' } as never).scenario.workload.name).toBe('convert');
  });

  it('an unknown confidential mode', () => {
    expect(refused({ ...CVM, confidential: 'yes' })).toBe('--confidential: unknown confidential mode \'yes\' (one of: off, shared, blocker)');
  });
});

describe('the pieces', () => {
  const G = 0x100;
  function gmemVm(log = true) {
    const vm = new Vm(createVmLayout({
      slots: [{ id: 1, asId: 0, baseGfn: G, pages: 64, flags: KVM_MEM_GUEST_MEMFD }], vcpus: 1, tracking: MANUAL,
      privateMem: true, exitHypercalls: 1 << KVM_HC_MAP_GPA_RANGE, logSharedGuestMemfd: log,
    }));
    vm.populate();
    return vm;
  }

  it('VmConfig.logSharedGuestMemfd lets KVM_MEM_LOG_DIRTY_PAGES onto a guest_memfd slot; turning it off leaves a private SPTE private', () => {
    const vm = gmemVm();
    const slot = vm.memory.slots[0]!;
    mapPagePrivate(slot, 3);
    drive(vm.enableDirtyLogging(slot));
    expect(slot.spte[3]).toBe(SPTE_PRIVATE);
    expect(slot.spte[4], 'a shared SPTE is write-protected').toBe(0);
    vm.disableDirtyLogging(slot);
    expect(slot.spte[3], 'not made shared-writable').toBe(SPTE_PRIVATE);
    expect(slot.spte[4], 'a shared mapping comes from a fault that checks the attribute').toBe(0);
  });

  it('VmmDirtySource: the VMM\'s marks go into the migration bitmap once, clipped to guest_memfd slots, and count what was new', () => {
    const vm = gmemVm();
    markVmmDirty(vm, (G + 2) * PAGE_SIZE, 3 * PAGE_SIZE);
    markVmmDirty(vm, (G + 62) * PAGE_SIZE, 8 * PAGE_SIZE); // runs past the slot's end
    const src = new VmmDirtySource(vm);
    const into = new PageBitmap(vm.memory.totalPages);
    into.mark(3);
    const tally: [string, number][] = [];
    expect(drive(src.sync(into, false, (s, n) => tally.push([s, n]))).value).toBe(5);
    expect([2, 3, 4, 62, 63].every((p) => into.isDirty(p))).toBe(true);
    expect(into.count()).toBe(5);
    expect(tally).toEqual([[src.name, 4]]);
    expect(drive(src.sync(into, false)).value, 'read and cleared').toBe(0);
    expect(VmmDirtySource.needed(vm)).toBe(true);
  });

  it('the attributes record: the destination makes private pages private and discards their shared memory, shared pages shared, and its RamDiscardManager bitmap equal', () => {
    const layout = createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: G, pages: 40, flags: KVM_MEM_GUEST_MEMFD }], vcpus: 1, tracking: MANUAL, privateMem: true });
    const memory = new GuestMemory(layout);
    const slot = memory.slots[0]!;
    for (const p of [1, 2, 35]) slot.writeU64Stamped(p, 7, 1, 1, 1);
    const dest = new Destination(memory);
    dest.attributes = new MemoryAttributes(layout.attributes!, memory);
    const shared = new Uint32Array(2);
    shared[0] = 1 << 1; // page 1 shared; pages 2 and 35 private
    dest.receive(encodeHeader([{ id: 1, asId: 0, baseGfn: G, pages: 40 }]));
    dest.receive(encodeAttributes(slot.slotField, shared));
    dest.receive(encodeComplete(0, 0, 0));
    expect(dest.error).toMatch(/checksum/); // the checksum of this hand-made stream is 0: only the attributes matter here
    expect(dest.attributes.isPrivate(slot, 1)).toBe(false);
    expect([2, 35].every((p) => dest.attributes!.isPrivate(slot, p))).toBe(true);
    expect(slot.readU64(1)).toBe(7);
    expect(slot.isZeroPage(2) && slot.isZeroPage(35)).toBe(true);
    expect(Array.from(slot.rdmBitmap!)).toEqual([2, 0]);
    expect(new MemoryAttributes(layout.attributes!, memory).privatePages()).toBe(39);
  });

  it('the stream refuses attributes of the wrong size or in a version 2 stream, and a destination without private memory refuses them', () => {
    const d = new StreamDecoder();
    d.push(encodeHeader([{ id: 1, asId: 0, baseGfn: G, pages: 40 }]));
    expect(() => d.push(encodeAttributes(1, new Uint32Array(1)))).toThrow('frame 1: attributes for slot 1 must be 8 bytes (one bit per page of 40), got 4');
    // Version 2 streams are still read; an attributes record came with version 3.
    const v2 = new StreamDecoder();
    v2.push(frameOf({ t: 'header', magic: 'vmemlab-migration', version: 2, pageSize: 4096, slots: [{ id: 1, asId: 0, baseGfn: G, pages: 40 }] }));
    expect(() => v2.push(encodeAttributes(1, new Uint32Array(2)))).toThrow('frame 1: an attributes record in a version 2 stream (they came with version 3)');
    const plain = createVmLayout({ slots: [{ id: 1, asId: 0, baseGfn: G, pages: 40, flags: 0 }], vcpus: 1, tracking: MANUAL });
    const dest = new Destination(new GuestMemory(plain));
    dest.receive(encodeHeader([{ id: 1, asId: 0, baseGfn: G, pages: 40 }]));
    dest.receive(encodeAttributes(1, new Uint32Array(2)));
    expect(dest.error).toBe('attributes for slot 1: the destination\'s slot has no private memory (a VM type with private memory and KVM_MEM_GUEST_MEMFD)');
  });
});
