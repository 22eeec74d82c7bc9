import { Prng } from '../../util/prng.ts';
import { type DeviceConfig, usesIommu } from './device-config.ts';

/**
 * Where each device's buffers live. The guest's driver gives each IOVA device a window
 * of IOVAs above the guest's RAM (as a guest IOMMU driver allocates IOVAs unrelated to
 * the GPAs behind them), so a GPA used as an IOVA maps nothing. Each window has one page
 * more than the device has buffers: that page is never mapped (stray DMAs go there).
 */
export interface IovaWindow { base: number; pages: number }

/** Guest frames [baseGfn, baseGfn + pages). */
export interface GuestRange { readonly baseGfn: number; readonly pages: number }

/** The guest range a device's buffers come from, and when the guest hands them over. */
export interface DeviceArea extends GuestRange {
  /**
   * The guest's driver hands the buffers over once vCPU `vcpu` has retired `ops`
   * operations (its set-up: render-guest.ts); the device does no DMA before. Absent: at once.
   */
  readonly handover?: { readonly vcpu: number; readonly ops: number };
}

export function iovaWindows(devices: readonly DeviceConfig[], gfnEnd: number): { windows: (IovaWindow | null)[]; iovaPages: number } {
  let next = Math.ceil(gfnEnd / 1024) * 1024 + 1024;
  const windows = devices.map((d) => {
    if (!usesIommu(d.kind)) return null;
    const w = { base: next, pages: d.buffers + 1 };
    next += w.pages;
    return w;
  });
  return { windows, iovaPages: next };
}

/** One past the highest guest frame of any slot. */
export function gfnEnd(slots: readonly { baseGfn: number; pages: number }[]): number {
  return slots.reduce((m, s) => Math.max(m, s.baseGfn + s.pages), 0);
}

/** The guest pages a device's buffers come from, from its own seeded stream. */
export class BufferPages {
  readonly prng: Prng;
  private cursor: number;
  private readonly gfns: number[];

  /** `memory`: the guest RAM buffers come from (all of it, or a confidential guest's shared bounce buffers). */
  constructor(private readonly config: DeviceConfig, device: number, seed: number, memory: { readonly slots: readonly GuestRange[] }) {
    this.prng = new Prng(Prng.derive(seed, 4000 + device));
    // Every page of every slot, as gfns (the devices' view of RAM: GPAs).
    this.gfns = [];
    for (const s of memory.slots) this.gfns.push(s.baseGfn, s.pages);
    this.cursor = this.prng.below(this.totalPages());
  }

  private totalPages(): number {
    let n = 0;
    for (let i = 1; i < this.gfns.length; i += 2) n += this.gfns[i]!;
    return n;
  }

  private gfnAt(index: number): number {
    for (let i = 0; i < this.gfns.length; i += 2) {
      const pages = this.gfns[i + 1]!;
      if (index < pages) return this.gfns[i]! + index;
      index -= pages;
    }
    throw new Error('page index out of range');
  }

  /** The next buffer page: uniform at random, or the next consecutive page. */
  next(): number {
    const total = this.totalPages();
    if (this.config.pattern === 'random') return this.gfnAt(this.prng.below(total));
    const g = this.gfnAt(this.cursor);
    this.cursor = (this.cursor + 1) % total;
    return g;
  }

  /** The buffers mapped before the guest runs (the VMM maps them; the device starts from the same list). */
  initial(): number[] {
    return Array.from({ length: this.config.buffers }, () => this.next());
  }
}
