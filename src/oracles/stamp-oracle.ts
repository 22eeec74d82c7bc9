import { PAGE_SIZE } from '../host/constants.ts';
import type { GuestMemory } from '../host/guest-memory.ts';
import { type Memslot, type PageStamp, describeWriter } from '../host/memslot.ts';
import { type PageHistory, type PageHistoryEvent, describeHistory } from '../host/page-history.ts';

export interface StampMismatch {
  slot: number;
  gfn: number;
  source: PageStamp;
  destination: PageStamp;
  /** The page's last dirty-tracking events on the source, oldest first (when page history is on). */
  history?: PageHistoryEvent[];
}

/**
 * The stamp oracle: after the final copy, with the source paused, every destination page
 * must equal its source page, byte for byte. A mismatch is a lost write; the stamps say
 * who wrote each side last and with which sequence number. `skip`: pages not to compare
 * (a confidential guest's private pages where the design keeps their shared memory).
 */
export function compareMemory(source: GuestMemory, destination: GuestMemory, max = 16, skip?: (slot: Memslot, page: number) => boolean): { pages: number; mismatches: StampMismatch[]; count: number } {
  const mismatches: StampMismatch[] = [];
  let pages = 0;
  let count = 0;
  for (const s of source.slots) {
    const d = destination.slotByField(s.slotField);
    if (!d) throw new Error(`destination has no slot ${s.asId}:${s.id}`);
    for (let page = 0; page < s.pages; page++) {
      if (skip?.(s, page) === true) continue;
      pages++;
      const so = s.byteOffset(page);
      const a = Buffer.from(s.bytes(page).buffer, so, PAGE_SIZE);
      const b = Buffer.from(d.bytes(page).buffer, d.byteOffset(page), PAGE_SIZE);
      if (a.equals(b)) continue;
      count++;
      if (mismatches.length < max) mismatches.push({ slot: s.id, gfn: s.baseGfn + page, source: s.stampOf(page), destination: d.stampOf(page) });
    }
  }
  return { pages, mismatches, count };
}

/** Adds each mismatched page's history (from the source VM's records) to the report. */
export function withHistory<M extends Omit<StampMismatch, 'history'>>(mismatches: M[], source: GuestMemory, history: PageHistory | null): (M & { history?: PageHistoryEvent[] })[] {
  if (history === null) return mismatches;
  return mismatches.map((m) => ({ ...m, history: history.readGfn(source, m.slot, m.gfn) }));
}

export function describeMismatch(m: StampMismatch): string {
  const side = (st: PageStamp): string => st.writer === 0 ? 'never written' : `${describeWriter(st.writer)} seq ${st.seq} (iteration ${st.iteration})`;
  const line = `LOST write: slot ${m.slot} gfn 0x${m.gfn.toString(16)}: source last written by ${side(m.source)}, destination holds ${side(m.destination)}`;
  return m.history ? `${line}\n  page history: ${describeHistory(m.history)}` : line;
}
