import {
  GlobalWord, IN_GUEST_MODE, OUTSIDE_GUEST_MODE, VCPU_BLOCK_WORDS, VcpuWord, type VmLayout,
} from './layout.ts';

/**
 * KVM's remote TLB flush (kvm_flush_remote_tlbs): the initiator bumps a global flush
 * generation; every vCPU in guest mode must acknowledge it (drop its TLB) before the
 * flush is complete. A vCPU outside guest mode counts as acknowledged: it re-reads the
 * generation when it enters. Both sides use sequentially consistent Atomics, so either
 * the initiator sees the vCPU in guest mode or the vCPU sees the new generation (the
 * same Dekker pattern as KVM's vcpu->mode and requests).
 */
export class TlbShootdown {
  private readonly global: Int32Array;
  private readonly vcpus: Int32Array;
  readonly nVcpus: number;

  constructor(layout: VmLayout) {
    this.global = new Int32Array(layout.global);
    this.vcpus = new Int32Array(layout.vcpus);
    this.nVcpus = layout.config.vcpus;
  }

  /** Starts a flush; returns the generation every vCPU in guest mode must acknowledge. */
  begin(): number {
    Atomics.add(this.global, GlobalWord.FLUSHES, 1);
    return (Atomics.add(this.global, GlobalWord.FLUSH_GEN, 1) + 1) | 0;
  }

  /** The first vCPU still holding translations older than `gen`, or -1 when the flush is done. */
  pendingVcpu(gen: number): number {
    for (let i = 0; i < this.nVcpus; i++) {
      const base = i * VCPU_BLOCK_WORDS;
      if (Atomics.load(this.vcpus, base + VcpuWord.MODE) === OUTSIDE_GUEST_MODE) continue;
      if (((Atomics.load(this.vcpus, base + VcpuWord.FLUSH_ACK) - gen) | 0) >= 0) continue;
      return i;
    }
    return -1;
  }

  /** Some vCPU is in guest mode (and may hold translations a flush would drop). */
  anyInGuestMode(): boolean {
    for (let i = 0; i < this.nVcpus; i++) {
      if (Atomics.load(this.vcpus, i * VCPU_BLOCK_WORDS + VcpuWord.MODE) !== OUTSIDE_GUEST_MODE) return true;
    }
    return false;
  }

  /** Where to park while waiting for vCPU `i` to acknowledge (its ack word). */
  ackWord(i: number): { array: Int32Array; index: number } {
    return { array: this.vcpus, index: i * VCPU_BLOCK_WORDS + VcpuWord.FLUSH_ACK };
  }
}

export { IN_GUEST_MODE, OUTSIDE_GUEST_MODE };
