import { DMA_QUIESCED, DeviceWord, IommuWord, deviceBase } from './iommu-layout.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';

/**
 * Device IOTLB invalidation: the same protocol as the vCPUs' remote TLB flush
 * (tlb-shootdown.ts). The initiator bumps the invalidation generation; every device that
 * may hold translations (DMA active) must acknowledge it, dropping its IOTLB, before the
 * invalidation is complete: only then may an unmap return, or a dirty bit read-and-clear
 * count as done. A quiesced device counts as acknowledged; it re-reads the generation
 * before it translates again. (VT-d's device-IOTLB invalidation descriptors with a wait
 * descriptor, vhost's VHOST_IOTLB_INVALIDATE, ATS invalidation completions.)
 */
export class IotlbInvalidation {
  constructor(private readonly words: Int32Array, private readonly devices: number) {}

  begin(): number {
    Atomics.add(this.words, IommuWord.INVALIDATIONS, 1);
    return (Atomics.add(this.words, IommuWord.INV_GEN, 1) + 1) | 0;
  }

  /** The first device still holding translations older than `gen`, or -1. */
  pendingDevice(gen: number): number {
    for (let d = 0; d < this.devices; d++) {
      const b = deviceBase(d);
      if (Atomics.load(this.words, b + DeviceWord.MODE) === DMA_QUIESCED) continue;
      if (((Atomics.load(this.words, b + DeviceWord.INV_ACK) - gen) | 0) >= 0) continue;
      return d;
    }
    return -1;
  }

  /** Invalidates every device IOTLB and waits for the acknowledgements. */
  *invalidateAll(): Steps {
    const gen = this.begin();
    yield undefined;
    for (;;) {
      const d = this.pendingDevice(gen);
      if (d < 0) return;
      const index = deviceBase(d) + DeviceWord.INV_ACK;
      yield waitFor(WaitCode.IOTLB_ACK, d, gen, { array: this.words, index, value: Atomics.load(this.words, index) });
    }
  }
}
