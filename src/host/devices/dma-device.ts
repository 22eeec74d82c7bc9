import { GlobalWord } from '../layout.ts';
import { CacheAccess, lineKey } from '../cpu-cache.ts';
import { Memslot } from '../memslot.ts';
import { HostActor } from '../host-actor.ts';
import type { Vm } from '../vm.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../iommu/constants.ts';
import type { Iommu } from '../iommu/iommu.ts';
import { DMA_ACTIVE, DMA_QUIESCED, DeviceWord, IommuWord, MailboxOp, MailboxWord, deviceBase } from '../iommu/iommu-layout.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';
import { DmaRecordKind } from '../iommu/dma-records.ts';
import { BufferPages, type DeviceArea, type IovaWindow } from './dma-buffers.ts';
import { DEVICE_WRITER_BASE, type DeviceConfig } from './device-config.ts';
import { type Device, type DeviceStats, deviceStats } from './device.ts';

export const enum BufferState { MAPPED, UNMAPPING, MAPPING, FREE }

/** One buffer: its index, its IOVA page (fixed: the driver recycles it) and the guest page behind it now. */
export interface Buffer { index: number; iova: number; gfn: number; state: BufferState }

/**
 * What the IOVA devices share: the guest driver's side (buffers in a window of IOVAs,
 * unmapped and mapped again through the IOMMU service's mailbox, one request at a time,
 * while DMA to the other buffers goes on) and the device's (a DMA operation per `every`
 * guest operations, acknowledging IOTLB invalidations at each step boundary, stamping
 * every page it writes like vCPUs do). Kinds differ in how one DMA reaches memory.
 */
export abstract class DmaDevice implements Device {
  readonly words: Int32Array;
  readonly base: number;
  readonly iommu: Iommu;
  readonly buffers: Buffer[];
  readonly pages: BufferPages;
  readonly writer: number;
  private seq = 0;
  /** The IOTLB invalidation generation last acknowledged. */
  private acked = 0;
  private pending: { op: MailboxOp; buffer: Buffer } | null = null;
  ops = 0;

  constructor(
    readonly vm: Vm, readonly index: number, readonly config: DeviceConfig, seed: number, readonly window: IovaWindow,
    /** Where buffers come from: a confidential guest's shared bounce buffers (DMA waits until the VMM mapped them), a render guest's buffers (DMA waits for their handover). */
    readonly sharedArea: DeviceArea | null = null,
  ) {
    if (vm.iommu === null) throw new Error(`device ${index} (${config.kind}) needs an IOMMU`);
    this.iommu = vm.iommu;
    this.words = this.iommu.words;
    this.base = deviceBase(index);
    this.writer = DEVICE_WRITER_BASE + index;
    this.pages = new BufferPages(config, index, seed, sharedArea !== null ? { slots: [sharedArea] } : vm.memory);
    this.buffers = this.pages.initial().map((gfn, index) => ({ index, iova: config.identity ? gfn : window.base + index, gfn, state: BufferState.MAPPED }));
  }

  stats(): DeviceStats {
    this.publish();
    return deviceStats(this.iommu, this.index, this.config);
  }

  /** The IOVA no buffer ever uses (stray DMAs go there). */
  get strayIova(): number { return this.window.base + this.config.buffers; }

  /** One DMA operation on a mapped buffer. */
  protected abstract dma(b: Buffer, write: boolean): Steps;
  /** A DMA to an IOVA nothing maps. */
  protected abstract stray(): void;
  /** After a buffer was mapped (mdev: pin it). */
  protected *afterMap(_b: Buffer): Steps { /* nothing by default */ }
  /** Before a buffer is unmapped (mdev: unpin it). */
  protected *beforeUnmap(_b: Buffer): Steps { /* nothing by default */ }
  /** Drops cached translations (an IOTLB invalidation, or the device quiescing). */
  protected dropTranslations(): void { /* no cache by default */ }
  /** Scratch for a DMA write through the CPU cache model: the value and the stamp. */
  private readonly line32 = new Uint32Array(4);
  /** How its DMA meets the CPU cache model: snooped, or with No Snoop (DeviceConfig.snoop) until the host switches every device to snooping. */
  private get dmaAccess(): CacheAccess.DMA_SNOOP | CacheAccess.DMA_NO_SNOOP {
    return this.config.snoop || Atomics.load(this.vm.global, GlobalWord.DEVICES_SNOOP) !== 0 ? CacheAccess.DMA_SNOOP : CacheAccess.DMA_NO_SNOOP;
  }
  private readonly line8 = new Uint8Array(this.line32.buffer);

  /** DMA reads and writes done (kept here, published to the shared counters now and then). */
  writes = 0;
  reads = 0;

  /** Publishes the counters kept in the device (a shared atomic add per DMA would cost more than the DMA). */
  protected publish(): void {
    Atomics.store(this.words, this.base + DeviceWord.DMA_WRITES, this.writes);
    Atomics.store(this.words, this.base + DeviceWord.DMA_READS, this.reads);
  }

  /** Stores the iteration and the stamp into guest frame `gfn`, as a vCPU's write does. */
  protected store(gfn: number): void {
    const slot = this.vm.memory.findSlot(gfn);
    if (slot === undefined) return;
    const page = gfn - slot.baseGfn;
    const iteration = Atomics.load(this.vm.global, GlobalWord.ITERATION);
    const cache = this.vm.cache;
    if (cache === null) slot.writeU64Stamped(page, iteration, this.writer, ++this.seq, iteration);
    else {
      // Snooped, a cached copy of the line is written back and invalidated first; no-snoop, DRAM alone.
      Memslot.stampedBytes(this.line32, iteration, this.writer, ++this.seq, iteration);
      cache.dmaWrite(this.dmaAccess, lineKey(slot.firstPage + page, 0), 0, this.line8);
    }
    this.writes++;
  }

  protected load(gfn: number): void {
    const slot = this.vm.memory.findSlot(gfn);
    const cache = this.vm.cache;
    if (slot !== undefined) {
      if (cache === null) slot.readU64(gfn - slot.baseGfn);
      else cache.dmaRead(this.dmaAccess, lineKey(slot.firstPage + gfn - slot.baseGfn, 0), 0, this.line8);
    }
    this.reads++;
  }

  protected fault(kind: DmaRecordKind, iova: number, write: boolean, cachedGfn = -1): void {
    this.iommu.dmaRecords.report(kind, this.index, iova, write, cachedGfn, this.iommu.table.gfn(iova));
  }

  /** The step boundary: acknowledge an IOTLB invalidation. Returns true when that changed state. */
  private acknowledge(): boolean {
    const gen = Atomics.load(this.words, IommuWord.INV_GEN);
    if (gen === this.acked) return false;
    this.dropTranslations();
    this.acked = gen;
    Atomics.store(this.words, this.base + DeviceWord.INV_ACK, gen);
    Atomics.notify(this.words, this.base + DeviceWord.INV_ACK);
    return true;
  }

  private request(op: MailboxOp, b: Buffer): void {
    const w = this.words;
    const at = this.base;
    w[at + MailboxWord.OP] = op;
    w[at + MailboxWord.IOVA] = b.iova;
    w[at + MailboxWord.PAGES] = 1;
    w[at + MailboxWord.GFN] = b.gfn;
    w[at + MailboxWord.PROT] = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    Atomics.add(w, at + MailboxWord.REQ_SEQ, 1);
    Atomics.add(w, IommuWord.DOORBELL, 1);
    Atomics.notify(w, IommuWord.DOORBELL);
    this.pending = { op, buffer: b };
  }

  private replied(): boolean {
    return Atomics.load(this.words, this.base + MailboxWord.RESP_SEQ) === Atomics.load(this.words, this.base + MailboxWord.REQ_SEQ);
  }

  /** The device role: runs until the run ends. */
  *run(): Steps {
    const w = this.words;
    const c = this.config;
    const actor = new HostActor(this.vm.global, {
      // A paused device holds no translations: invalidations need not wait for it.
      quiesce: () => { this.publish(); this.dropTranslations(); Atomics.store(w, this.base + DeviceWord.MODE, DMA_QUIESCED); },
      resume: () => { Atomics.store(w, this.base + DeviceWord.MODE, DMA_ACTIVE); this.acknowledge(); },
    });
    Atomics.store(w, this.base + DeviceWord.MODE, DMA_ACTIVE);
    this.acknowledge();
    // A confidential guest hands the device its bounce buffers once they are shared; VFIO
    // maps them as it registers with the RamDiscardManager (the VMM's thread, running now).
    while (this.sharedArea !== null && !this.buffers.every((b) => this.iommu.table.present(b.iova) && this.iommu.table.gfn(b.iova) === b.gfn)) {
      yield* actor.gate();
      yield waitFor(WaitCode.DMA_BUFFERS, this.index);
    }
    const handover = this.sharedArea?.handover;
    while (handover !== undefined && this.vm.vcpuOps(handover.vcpu) < handover.ops) {
      yield* actor.gate();
      yield waitFor(WaitCode.GUEST_OPS, handover.ops, this.vm.vcpuOps(handover.vcpu));
    }
    for (const b of this.buffers) yield* this.afterMap(b);
    let nextAt = c.every;
    for (;;) {
      yield* actor.gate();
      if (this.acknowledge()) { yield undefined; continue; }
      if (this.pending !== null && this.replied()) {
        yield* this.onReply(this.pending.op, this.pending.buffer, w[this.base + MailboxWord.RESULT]!);
        continue;
      }
      const ops = this.vm.guestOps();
      if (ops < nextAt) {
        this.publish();
        yield waitFor(WaitCode.GUEST_OPS, nextAt, ops);
        continue;
      }
      // One operation per `every` guest operations, counted from the last one due: the
      // guest publishes its count in bursts, and a device that slept catches up.
      nextAt += c.every;
      this.ops++;
      Atomics.store(w, this.base + DeviceWord.OPS, this.ops);
      if ((this.ops & 31) === 0) this.publish();
      if (c.remapEvery > 0 && !c.identity && this.ops % c.remapEvery === 0 && this.pending === null) {
        const b = this.pickMapped();
        if (b !== null) {
          yield* this.beforeUnmap(b);
          b.state = BufferState.UNMAPPING;
          this.request(MailboxOp.UNMAP, b);
          yield undefined;
          continue;
        }
      }
      if (c.strayEvery > 0 && this.ops % c.strayEvery === 0) {
        this.stray();
        yield undefined;
        continue;
      }
      const b = this.pickMapped();
      if (b === null) { yield undefined; continue; }
      yield* this.dma(b, this.pages.prng.below(100) < c.writePercent);
    }
  }

  private *onReply(op: MailboxOp, b: Buffer, result: number): Steps {
    this.pending = null;
    if (op === MailboxOp.UNMAP) {
      // The IOVA is free again: the driver maps it to another page (IOVA reuse, as guest IOVA allocators do).
      b.state = BufferState.FREE;
      if (result < 0) { yield undefined; return; }
      b.gfn = this.pages.next();
      b.state = BufferState.MAPPING;
      this.request(MailboxOp.MAP, b);
      yield undefined;
      return;
    }
    b.state = result === 0 ? BufferState.MAPPED : BufferState.FREE;
    yield undefined;
    if (b.state === BufferState.MAPPED) yield* this.afterMap(b);
  }

  private pickMapped(): Buffer | null {
    const n = this.buffers.length;
    const start = this.pages.prng.below(n);
    for (let i = 0; i < n; i++) {
      const b = this.buffers[(start + i) % n]!;
      if (b.state === BufferState.MAPPED) return b;
    }
    return null;
  }
}
