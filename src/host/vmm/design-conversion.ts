import { PageBitmap } from '../dirty-bitmap.ts';
import type { Memslot } from '../memslot.ts';
import type { Steps } from '../../roles/role.ts';
import { CONVERT_OK, type ConversionDesign, conversionTarget } from './conversion-design.ts';
import type { ConvertResult } from './kvm-convert-memory.ts';

/** A range the guest shares as it boots (its bounce buffers), in bytes. */
export interface BootRange { gpa: number; size: number }

/**
 * A conversion design (conversion-design.ts) running a guest, from the VMM's thread
 * (kvmCpuExec). The design converts; this keeps what migration reads in step with it:
 * the RAM block's shared bitmap (Memslot.rdmBitmap), which the migration thread asks as
 * QEMU's ramblock_page_is_discarded asks the RamDiscardManager, and which travels as the
 * attributes record. Design rdm keeps that bitmap itself (RamBlockAttributes); the others
 * keep their own record (a notifier list's bitmap, guest_memfd's shareability, or only
 * KVM's attributes), copied here: cleared before a conversion to private starts, so that
 * migration stops reading those pages first, and copied from the design's record once a
 * conversion ends, failed or not (the VMM's dirty marks resend what became shared).
 */
export class DesignConversion {
  private readonly bitmaps = new Map<Memslot, PageBitmap>();

  get name(): string { return this.design.name; }

  constructor(readonly design: ConversionDesign) {
    for (const slot of design.vm.memory.slots) if (slot.rdmBitmap !== null) this.bitmaps.set(slot, new PageBitmap(slot.pages, slot.rdmBitmap));
  }

  /** The VMM's machine init: the design's set-up (memory private, the device attached), then the ranges the guest shares at boot. */
  *boot(shared: readonly BootRange[]): Steps<ConvertResult> {
    const r = yield* this.design.setup();
    if (r.ret < 0) return r;
    for (const b of shared) {
      const c = yield* this.convert(b.gpa, b.size, false);
      if (c.ret < 0) return c;
    }
    return CONVERT_OK;
  }

  *convert(start: number, size: number, toPrivate: boolean): Steps<ConvertResult> {
    const t = conversionTarget(this.design.vm, start, size, toPrivate);
    if ('result' in t) return yield* this.design.convert(start, size, toPrivate);
    const bitmap = this.bitmaps.get(t.slot);
    if (toPrivate && bitmap !== undefined) for (let p = t.page; p < t.page + t.pages; p++) bitmap.unmark(p);
    const r = yield* this.design.convert(start, size, toPrivate);
    if (bitmap !== undefined) {
      for (let p = t.page; p < t.page + t.pages; p++) {
        if (this.isShared(t.slot, p)) bitmap.mark(p); else bitmap.unmark(p);
      }
    }
    return r;
  }

  /** The design's record of a page (KVM's attributes where it keeps none). */
  private isShared(slot: Memslot, page: number): boolean {
    return this.design.sharedInBookkeeping(slot.baseGfn + page) ?? !this.design.vm.attributes!.isPrivate(slot, page);
  }
}
