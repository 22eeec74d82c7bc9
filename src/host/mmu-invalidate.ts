import { GlobalWord } from './layout.ts';

/** mmu_lock's holder id for KVM's own invalidations (vCPUs hold it as their index + 1). */
export const MMU_LOCK_HOLDER_KVM = 0x10000;

/**
 * KVM's MMU invalidation protocol (virt/kvm/kvm_main.c, kvm_mmu_invalidate_begin/_end;
 * include/linux/kvm_host.h, mmu_invalidate_retry_gfn): whoever changes what a range of
 * gfns maps to (memory attributes, a guest_memfd hole, an MMU notifier) brackets the
 * zap and the change with begin and end; a fault that read `seq` before it looked the
 * page up installs its SPTE only if no invalidation covers the gfn and `seq` has not
 * moved since, otherwise it retries. The check and the install sit under mmu_lock, and
 * so do an invalidation's begin, zap and flush: a fault never installs a translation
 * from a lookup that an invalidation made stale.
 *
 * mmu_lock is a word taken with compare-and-exchange and never waited on: a vCPU that
 * finds it taken returns to the guest and faults again (so it still acknowledges the
 * flush the holder may be waiting for). One invalidation at a time, as kvm->slots_lock
 * serialises attribute changes and guest_memfd holes; the words live in the VM's global
 * block.
 */
export class MmuInvalidate {
  constructor(private readonly global: Int32Array) {}

  /** kvm_mmu_invalidate_begin + kvm_mmu_invalidate_range_add for gfns [start, end). */
  begin(start: number, end: number): void {
    const g = this.global;
    if (Atomics.load(g, GlobalWord.MMU_INVALIDATE_IN_PROGRESS) === 0) {
      Atomics.store(g, GlobalWord.MMU_INVALIDATE_START, start);
      Atomics.store(g, GlobalWord.MMU_INVALIDATE_END, end);
    } else {
      // Nested: the union of the ranges (KVM: min of the starts, max of the ends).
      if (start < Atomics.load(g, GlobalWord.MMU_INVALIDATE_START)) Atomics.store(g, GlobalWord.MMU_INVALIDATE_START, start);
      if (end > Atomics.load(g, GlobalWord.MMU_INVALIDATE_END)) Atomics.store(g, GlobalWord.MMU_INVALIDATE_END, end);
    }
    Atomics.add(g, GlobalWord.MMU_INVALIDATE_IN_PROGRESS, 1);
  }

  /** kvm_mmu_invalidate_end: the sequence moves first, then the count drops (smp_wmb between). */
  end(): void {
    Atomics.add(this.global, GlobalWord.MMU_INVALIDATE_SEQ, 1);
    Atomics.sub(this.global, GlobalWord.MMU_INVALIDATE_IN_PROGRESS, 1);
  }

  /** Takes mmu_lock for `holder` (a vCPU index + 1, or any other non-zero id) if it is free. */
  tryLock(holder: number): boolean {
    return Atomics.compareExchange(this.global, GlobalWord.MMU_LOCK, 0, holder) === 0;
  }

  unlock(): void {
    Atomics.store(this.global, GlobalWord.MMU_LOCK, 0);
  }

  /** Who holds mmu_lock (0: nobody). */
  holder(): number {
    return Atomics.load(this.global, GlobalWord.MMU_LOCK);
  }

  /** kvm->mmu_invalidate_seq, read by a fault before it looks the page up. */
  seq(): number {
    return Atomics.load(this.global, GlobalWord.MMU_INVALIDATE_SEQ);
  }

  inProgress(): number {
    return Atomics.load(this.global, GlobalWord.MMU_INVALIDATE_IN_PROGRESS);
  }

  /** mmu_invalidate_retry_gfn: the fault that read `seq` must retry for `gfn`. */
  retry(seq: number, gfn: number): boolean {
    const g = this.global;
    if (Atomics.load(g, GlobalWord.MMU_INVALIDATE_IN_PROGRESS) !== 0
      && gfn >= Atomics.load(g, GlobalWord.MMU_INVALIDATE_START) && gfn < Atomics.load(g, GlobalWord.MMU_INVALIDATE_END)) return true;
    return Atomics.load(g, GlobalWord.MMU_INVALIDATE_SEQ) !== seq;
  }
}
