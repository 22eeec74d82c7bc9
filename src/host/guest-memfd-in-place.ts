import { EAGAIN, EFAULT, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE } from './constants.ts';
import { PageBitmap } from './dirty-bitmap.ts';
import type { Memslot } from './memslot.ts';
import type { Vm } from './vm.ts';
import type { Steps } from '../roles/role.ts';
import { KvmError } from '../util/errors.ts';

/** What the conversion ioctl returned: 0 or -errno; on EAGAIN, the page that is still held. */
export interface InPlaceConvertResult { ret: number; detail: string; errorPage?: number; convertedWhilePinned: number }

/**
 * A guest_memfd that holds shared and private memory in one file, converted in place
 * (the guest_memfd in-place conversion series: KVM_SET_MEMORY_ATTRIBUTES2 on the
 * guest_memfd fd, proposed in 2025-2026, not in mainline when this was written). The VMM
 * mmaps the file and reaches its shared pages only; a pin on one (VFIO's type1 map pins
 * what it maps, through pin_user_pages on the VMM's mapping) raises the folio's
 * reference count, and a shared -> private conversion fails with EAGAIN while any page
 * of the range has a reference beyond guest_memfd's own: the host must drop every
 * reference before the page becomes private, so VFIO unmaps first.
 *
 * The emulator keeps its two backings (the vCPUs read the one their access kind names);
 * an in-place conversion discards neither, as the page stays in the file.
 */
export class InPlaceGuestMemfd {
  /** Shareability per page (1 = shared); all private at creation. The series keeps ranges; one bit per page here. */
  private readonly shared: PageBitmap;
  /** Extra references per page: pins by GUP users (VFIO's map), which guest_memfd does not own. */
  private readonly refs: Uint16Array;

  constructor(readonly slot: Memslot) {
    if (slot.gmem === null) throw new Error(`InPlaceGuestMemfd: slot ${slot.id} has no guest_memfd (KVM_MEM_GUEST_MEMFD)`);
    this.shared = new PageBitmap(slot.pages);
    this.refs = new Uint16Array(slot.pages);
  }

  /** The shareability state's bytes (the series' per-range state costs less when ranges are long). */
  get stateBytes(): number { return this.shared.words.byteLength; }

  isShared(page: number): boolean { return this.shared.isDirty(page); }

  pins(page: number): number { return this.refs[page]!; }

  /**
   * pin_user_pages on the VMM's mapping of the page: 0, or -EFAULT for a private page
   * (the fault on guest_memfd's mapping refuses it: the host can never pin private memory).
   */
  pin(page: number): number {
    if (!this.shared.isDirty(page)) return -EFAULT;
    this.refs[page]!++;
    return 0;
  }

  unpin(page: number): void {
    if (this.refs[page] === 0) throw new Error(`InPlaceGuestMemfd.unpin: slot ${this.slot.id} page ${page} is not pinned`);
    this.refs[page]!--;
  }

  /**
   * KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd over pages [page, page + count). To
   * private, every page must be free of extra references first (nothing converted
   * otherwise: -EAGAIN naming the first held page). Then KVM's view follows (zap and
   * flush, attributes stored: Vm.setMemoryAttributes), then the file's shareability.
   * `ignorePins` converts held pages anyway (the bug inplace-convert-while-pinned, not
   * catalogued yet); how many it converted so is returned.
   */
  *convert(vm: Vm, page: number, count: number, toPrivate: boolean, ignorePins = false): Steps<InPlaceConvertResult> {
    let held = 0;
    if (toPrivate) {
      for (let p = page; p < page + count; p++) {
        if (this.refs[p] === 0) continue;
        if (!ignorePins) {
          return { ret: -EAGAIN, detail: `KVM_SET_MEMORY_ATTRIBUTES2: EAGAIN: slot ${this.slot.id} page ${p} has ${this.refs[p]} extra reference(s)`, errorPage: p, convertedWhilePinned: 0 };
        }
        held++;
      }
    }
    try {
      yield* vm.setMemoryAttributes({ address: (this.slot.baseGfn + page) * PAGE_SIZE, size: count * PAGE_SIZE, attributes: toPrivate ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0 });
    } catch (e) {
      if (!(e instanceof KvmError)) throw e;
      return { ret: -e.errno, detail: e.message, convertedWhilePinned: 0 };
    }
    for (let p = page; p < page + count; p++) {
      if (toPrivate) this.shared.unmark(p);
      else this.shared.mark(p);
    }
    return { ret: 0, detail: '', convertedWhilePinned: held };
  }
}
