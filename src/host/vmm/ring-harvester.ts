import { KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET } from '../constants.ts';
import { type DirtyRing, GfnWord } from '../dirty-ring.ts';
import { Acted, type InjectionCounters } from '../injections.ts';

const F = GfnWord.FLAGS, SLOT = GfnWord.SLOT, OFF_LO = GfnWord.OFF_LO, OFF_HI = GfnWord.OFF_HI;
const ENTRY_WORDS = GfnWord.WORDS;

/**
 * Userspace's side of the rings: one fetch index per ring, as QEMU's
 * kvm_dirty_ring_reap_one and the selftest's dirty_ring_collect_one keep.
 */
export class DirtyRingHarvester {
  readonly fetch: number[];

  /** `skipped` counts the entries harvest-skips-entry dropped (its "acted" counter). */
  constructor(rings: number, private readonly skipped?: InjectionCounters) {
    this.fetch = new Array<number>(rings).fill(0);
  }

  /**
   * Collects up to `max` entries of `ring` in order: while flags == DIRTY (load-acquire),
   * read slot and offset, hand them to `onEntry`, set flags = RESET (store-release).
   * `skipEvery` > 0 injects harvest-skips-entry: every skipEvery-th entry is marked
   * collected without being recorded.
   */
  harvest(ring: DirtyRing, max: number, onEntry: (slotField: number, offset: number) => void, skipEvery = 0): number {
    // ring.flagsAt, slotAt, offsetAt and markHarvested, with the entry's position computed once.
    const gfns = ring.gfns;
    const mask = ring.mask;
    let fi = this.fetch[ring.vcpu]!;
    let n = 0;
    while (n < max) {
      const e = (fi & mask) * ENTRY_WORDS;
      if (Atomics.load(gfns, e + F) !== KVM_DIRTY_GFN_F_DIRTY) break;
      if (skipEvery === 0 || (fi + 1) % skipEvery !== 0) {
        onEntry(gfns[e + SLOT]! >>> 0, (gfns[e + OFF_LO]! >>> 0) + (gfns[e + OFF_HI]! >>> 0) * 4294967296);
      } else {
        this.skipped?.acted(Acted.HARVEST_SKIPS_ENTRY);
      }
      Atomics.store(gfns, e + F, KVM_DIRTY_GFN_F_RESET);
      fi = (fi + 1) | 0;
      n++;
    }
    this.fetch[ring.vcpu] = fi;
    return n;
  }
}

