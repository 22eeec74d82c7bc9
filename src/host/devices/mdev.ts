import { LockHolder } from '../iommu/domain-lock.ts';
import { Acted } from '../injections.ts';
import { IOPTE_PRESENT } from '../iommu/io-page-table.ts';
import { DeviceWord, IoPte } from '../iommu/iommu-layout.ts';
import type { Vm } from '../vm.ts';
import type { Steps } from '../../roles/role.ts';
import { DmaRecordKind } from '../iommu/dma-records.ts';
import type { DeviceArea, IovaWindow } from './dma-buffers.ts';
import { type Buffer, DmaDevice } from './dma-device.ts';
import type { DeviceConfig } from './device-config.ts';

/** How an mdev reaches a buffer, by the buffer's index: a write pin, a read pin, or vfio_dma_rw. */
export const enum MdevAccess { WRITE_PIN = 0, READ_PIN = 1, DMA_RW = 2 }
export function mdevAccess(buffer: number): MdevAccess { return buffer % 3; }

/**
 * A mediated device behind the emulated IOMMU (a vGPU's vendor driver): it pins some
 * buffers by IOVA (vfio_pin_pages; write pins for buffers it writes, read pins, as the
 * seeds propose, for buffers it only reads) and DMAs to them through the pinned page;
 * it reaches the others with vfio_dma_rw, which translates each access under the
 * container's lock and marks the pages it writes dirty. It unpins a buffer before its
 * unmap (the VFIO_IOMMU_NOTIFY_DMA_UNMAP contract).
 */
export class Mdev extends DmaDevice {
  /** The gfn each pinned buffer's pin returned, by buffer index (-1: not pinned). */
  private readonly pinned: Int32Array;

  constructor(vm: Vm, index: number, config: DeviceConfig, seed: number, window: IovaWindow, sharedArea: DeviceArea | null = null) {
    super(vm, index, config, seed, window, sharedArea);
    this.pinned = new Int32Array(config.buffers).fill(-1);
  }

  protected override *afterMap(b: Buffer): Steps {
    const i = b.index;
    const access = mdevAccess(i);
    if (access === MdevAccess.DMA_RW) return;
    yield* this.iommu.lock.acquire(LockHolder.DEVICE + this.index);
    const gfn = this.iommu.pinPage(b.iova, access === MdevAccess.WRITE_PIN);
    this.iommu.lock.release();
    if (gfn >= 0) { this.pinned[i] = gfn; Atomics.add(this.words, this.base + DeviceWord.PINS, 1); }
    yield undefined;
  }

  protected override *beforeUnmap(b: Buffer): Steps {
    const i = b.index;
    if (this.pinned[i]! < 0) return;
    yield* this.iommu.lock.acquire(LockHolder.DEVICE + this.index);
    this.iommu.unpinPage(b.iova, mdevAccess(i) === MdevAccess.WRITE_PIN);
    this.iommu.lock.release();
    this.pinned[i] = -1;
    yield undefined;
  }

  protected *dma(b: Buffer, write: boolean): Steps {
    const i = b.index;
    const access = mdevAccess(i);
    const pinned = this.pinned[i]!;
    if (access !== MdevAccess.DMA_RW && pinned >= 0) {
      // Through the pinned page: no translation, no marking (the pin keeps the page dirty).
      if (write && access === MdevAccess.WRITE_PIN) this.store(pinned);
      else this.load(pinned);
      yield undefined;
      return;
    }
    if (access !== MdevAccess.DMA_RW) { yield undefined; return; } // its pin is still to come
    // gpa-as-iova: the vendor driver hands vfio_dma_rw the buffer's GPA where it takes an IOVA.
    if (this.vm.bugs.gpaAsIova && b.gfn !== b.iova) this.vm.acts.acted(Acted.GPA_AS_IOVA);
    yield* this.dmaRw(this.vm.bugs.gpaAsIova ? b.gfn : b.iova, write);
  }

  protected stray(): void {
    // Outside any lock: a stray access is refused before it touches memory.
    this.fault(DmaRecordKind.UNMAPPED, this.strayIova, true);
  }

  /** vfio_dma_rw: translate under the container's lock, access the page, mark it dirty if written. */
  *dmaRw(iova: number, write: boolean): Steps {
    const iommu = this.iommu;
    yield* iommu.lock.acquire(LockHolder.DEVICE + this.index);
    const t = iommu.table;
    Atomics.add(this.words, this.base + DeviceWord.DMA_RW, 1);
    if (!t.inRange(iova) || (t.flags(iova) & IOPTE_PRESENT) === 0) {
      iommu.lock.release();
      this.fault(DmaRecordKind.UNMAPPED, iova, write);
      yield undefined;
      return;
    }
    if (write && (t.flags(iova) & IoPte.WRITE) === 0) {
      iommu.lock.release();
      this.fault(DmaRecordKind.READ_ONLY, iova, write);
      yield undefined;
      return;
    }
    const gfn = t.gfn(iova);
    if (write) {
      this.store(gfn);
      if (!this.vm.bugs.untrackedDma) iommu.markType1(iova);
      else if (iommu.type1Tracking) this.vm.acts.acted(Acted.UNTRACKED_DMA);
    } else this.load(gfn);
    iommu.lock.release();
    yield undefined;
  }
}
