import { PAGE_SIZE } from '../constants.ts';
import { PageBitmap } from '../dirty-bitmap.ts';
import { RDM_OK, type RamBlock, type RamDiscardResult, type RamSection, intersectSection } from './ram-block-attributes.ts';
import type { ConversionListener } from './vfio-conversion-listener.ts';
import type { Steps } from '../../roles/role.ts';
import { hex } from '../../util/hex.ts';

/**
 * The seed's option 1: a conversion notifier list of a guest_memfd RAM block, apart from
 * the RamDiscardManager, in the style of QEMU's NotifierWithReturnList
 * (include/qemu/notify.h: notifier_with_return_list_notify stops at the first error).
 * The VMM calls it after KVM_SET_MEMORY_ATTRIBUTES; VFIO is one listener.
 *
 * Why a list of its own: a RamDiscardManager means "discarded memory must not be touched"
 * (migration skips it, virtio-mem owns the block's manager), while private memory is
 * populated memory the host may not read. With a separate list the block keeps its
 * RamDiscardManager free for virtio-mem, and nobody reads private as "discarded".
 *
 * Like RamBlockAttributes it keeps one bit per 4 KiB page (1 = shared), because a
 * listener that registers late (a hot-plugged device) must be told what is shared
 * already. Unlike it, listeners hear of maximal runs of pages that change (a range that
 * is partly converted is one notification per run, not one per page), and a listener's
 * error undoes the run for the listeners already told and leaves the bits as they were,
 * so the bitmap never says shared where a listener mapped nothing.
 */
export class ConversionNotifierList {
  private readonly shared: PageBitmap;
  /** Listeners in registration order, each with the section it registered for. */
  private readonly list: { listener: ConversionListener; section: RamSection }[] = [];

  constructor(readonly block: RamBlock) {
    this.shared = new PageBitmap(block.pages);
  }

  get bitmapBytes(): number { return this.shared.words.byteLength; }

  isShared(page: number): boolean { return this.shared.isDirty(page); }

  /** Registers a listener for `section` and replays the shared runs inside it; a replay error unregisters it again. */
  *register(listener: ConversionListener, section: RamSection): Steps<RamDiscardResult> {
    const entry = { listener, section: { ...section } };
    this.list.push(entry);
    for (const run of this.runs(0, this.block.pages, (p) => this.shared.isDirty(p))) {
      const s = intersectSection(entry.section, run.first * PAGE_SIZE, run.count * PAGE_SIZE);
      if (s === null) continue;
      const r = yield* listener.notifyToShared(s);
      if (r.ret !== 0) {
        yield* this.unregister(listener);
        return { ret: r.ret, detail: `conversion notifier: replay to a new listener failed: ${r.detail}` };
      }
    }
    return RDM_OK;
  }

  /** The listener drops its shared pages (one notification of its whole section), then leaves the list. */
  *unregister(listener: ConversionListener): Steps {
    const i = this.list.findIndex((e) => e.listener === listener);
    if (i < 0) throw new Error('ConversionNotifierList.unregister: the listener is not registered');
    yield* listener.notifyToPrivate({ ...this.list[i]!.section });
    this.list.splice(this.list.indexOf(this.list[i]!), 1);
  }

  /**
   * After KVM_SET_MEMORY_ATTRIBUTES over pages [page, page + count) of the block: every
   * run of pages whose kind changed, to every listener whose section meets it. To shared:
   * the bits are set once every listener agreed. To private: the bits are cleared, then
   * the listeners are told (they cannot refuse).
   */
  *notify(page: number, count: number, toPrivate: boolean): Steps<RamDiscardResult> {
    if (!Number.isSafeInteger(page) || !Number.isSafeInteger(count) || page < 0 || count <= 0 || page + count > this.block.pages) {
      throw new RangeError(`ConversionNotifierList.notify: pages ${page}+${count} are not inside the ${this.block.pages}-page RAM block`);
    }
    for (const run of this.runs(page, page + count, (p) => this.shared.isDirty(p) === toPrivate)) {
      const offset = run.first * PAGE_SIZE;
      const size = run.count * PAGE_SIZE;
      if (toPrivate) {
        for (let p = run.first; p < run.first + run.count; p++) this.shared.unmark(p);
        for (const { listener, section } of [...this.list]) {
          const s = intersectSection(section, offset, size);
          if (s !== null) yield* listener.notifyToPrivate(s);
        }
        continue;
      }
      const told: { listener: ConversionListener; s: RamSection }[] = [];
      for (const { listener, section } of [...this.list]) {
        const s = intersectSection(section, offset, size);
        if (s === null) continue;
        const r = yield* listener.notifyToShared(s);
        if (r.ret !== 0) {
          for (const t of told) yield* t.listener.notifyToPrivate(t.s);
          return { ret: r.ret, detail: `conversion notifier: ${hex(offset)}+${hex(size)} to shared: ${r.detail}` };
        }
        told.push({ listener, s });
      }
      for (let p = run.first; p < run.first + run.count; p++) this.shared.mark(p);
    }
    return RDM_OK;
  }

  /** Maximal runs of pages in [from, to) for which `pick` holds, lowest first (computed before any is acted on). */
  private runs(from: number, to: number, pick: (page: number) => boolean): { first: number; count: number }[] {
    const out: { first: number; count: number }[] = [];
    let first = -1;
    for (let p = from; p <= to; p++) {
      const inRun = p < to && pick(p);
      if (inRun && first < 0) first = p;
      else if (!inRun && first >= 0) { out.push({ first, count: p - first }); first = -1; }
    }
    return out;
  }
}
