import { IommuWord } from './iommu-layout.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';

/** Who holds the domain lock: the service, the migration thread, or device n (LockHolder.DEVICE + n). */
export const LockHolder = { SERVICE: 1, MIGRATION: 2, VMM: 3, DEVICE: 16 } as const;

export function lockHolderName(holder: number): string {
  if (holder >= LockHolder.DEVICE) return `device ${holder - LockHolder.DEVICE}`;
  return ['nobody', 'the IOMMU service', 'the migration thread', 'the VMM'][holder] ?? `holder ${holder}`;
}

/**
 * The domain's lock: type1's iommu->lock, taken by map, unmap, pin, dma_rw and the
 * dirty bitmap query; iommufd's IOVA and page-table locks play the same part. Roles never
 * block a thread: `acquire` is a step that waits on the lock word when it is taken, and
 * every critical section is within one step.
 */
export class DomainLock {
  constructor(private readonly words: Int32Array) {}

  tryAcquire(holder: number): boolean {
    return Atomics.compareExchange(this.words, IommuWord.LOCK, 0, holder + 1) === 0;
  }

  release(): void {
    Atomics.store(this.words, IommuWord.LOCK, 0);
    Atomics.notify(this.words, IommuWord.LOCK);
  }

  *acquire(holder: number): Steps {
    for (;;) {
      const held = Atomics.load(this.words, IommuWord.LOCK);
      if (held === 0 && this.tryAcquire(holder)) return;
      yield waitFor(WaitCode.IOMMU_LOCK, held, 0, { array: this.words, index: IommuWord.LOCK, value: held });
    }
  }
}
