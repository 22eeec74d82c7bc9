import type { Memslot } from '../host/memslot.ts';
import type { KvmError } from '../util/errors.ts';
import type { PageDirtied } from '../host/tracepoints.ts';
import type { EntryMatcher, LitmusOp } from './spec.ts';
import { hex } from './syntax.ts';

/** A ring entry as userspace harvested it; `slot`/`gfn` only when it names a real page. */
export interface HarvestedEntry {
  slotField: number;
  offset: number;
  slot?: Memslot;
  gfn?: number;
}

/** What the runner saw of one operation while it ran. */
export interface OpRecord {
  op: LitmusOp;
  started: boolean;
  finished: boolean;
  /** The interleaving step in which it finished (or was last run). */
  entry: string;
  faults: number;
  /** mark_page_dirty_in_slot's pushes (the pageDirtied tracepoint). */
  logs: PageDirtied[];
  /** Exits taken during the operation, with how many of its guest operations had retired. */
  exits: { reason: number; retired: number }[];
  /** Guest operations retired, and dropped by an MMIO exit (not retried). */
  retired: number;
  dropped: number;
  value?: number;
  /** dma / dma-read: whether the IOMMU faulted. */
  faulted?: boolean;
  harvested?: HarvestedEntry[];
  reset?: number;
  dirty?: number[];
  cleared?: number;
  /** register- / unregister-noncoherent-dma, vfio-file-add: SPTEs zapped. */
  zapped?: number;
  /** clflush / wbinvd: dirty lines written back. */
  writtenBack?: number;
  /** bar-revoke / bar-decode: the VMA's entries removed. */
  unmapped?: number;
  /** bar-grant: the slice's first pfn. */
  pfn?: number;
  error?: KvmError;
  /** Free text for the trace. */
  notes: string[];
}

export function newRecord(op: LitmusOp): OpRecord {
  return { op, started: false, finished: false, entry: '', faults: 0, logs: [], exits: [], retired: 0, dropped: 0, notes: [] };
}

/** Guest operations a vCPU operation consists of. */
export function guestOpCount(r: OpRecord): number {
  const op = r.op.op;
  return op.kind === 'write' ? op.count : 1;
}

export function slotName(s: { id: number; asId: number }): string {
  return s.asId === 0 ? `${s.id}` : `${s.asId}:${s.id}`;
}

export function entryText(e: HarvestedEntry): string {
  if (e.slot !== undefined && e.gfn !== undefined) return `slot ${slotName(e.slot)} gfn ${hex(e.gfn)}`;
  return `slot ${fieldText(e.slotField)} offset ${e.offset} (no such page)`;
}

export function matcherText(m: EntryMatcher): string {
  if ('gfn' in m) return `slot ${m.asId ? `${m.asId}:` : ''}${m.slot} gfn ${hex(m.gfn)}`;
  return `slot ${fieldText(m.slotField)} offset ${m.offset}`;
}

function fieldText(f: number): string {
  return f >>> 16 === 0 ? `${f}` : `${f >>> 16}:${f & 0xffff}`;
}

export function entryMatches(m: EntryMatcher, e: HarvestedEntry): boolean {
  if ('gfn' in m) {
    return e.slot !== undefined && e.slot.id === m.slot && (m.asId === null || e.slot.asId === m.asId) && e.gfn === m.gfn;
  }
  return e.slotField === m.slotField && e.offset === m.offset;
}

export function logEventText(e: PageDirtied): string {
  switch (e.where) {
    case 'ring': return `logs ${hex(e.gfn)} in vcpu${e.vcpu}'s ring (entry ${e.entry})${e.softFull ? '; the ring is now soft-full' : ''}`;
    case 'bitmap': return `logs ${hex(e.gfn)} in slot ${slotName(e.slot)}'s dirty bitmap`;
    case 'lost': return `${hex(e.gfn)} is NOT logged: no running vCPU and no backup bitmap (KVM warns)`;
  }
}

/** At most `max` items, with the middle elided. */
export function elide(items: string[], max = 8): string[] {
  if (items.length <= max) return items;
  const half = Math.floor(max / 2);
  return [...items.slice(0, half), `... ${items.length - 2 * half} more ...`, ...items.slice(-half)];
}

export function gfnsText(gfns: readonly number[]): string {
  if (gfns.length === 0) return '[]';
  // Runs of consecutive pages read better as ranges.
  const parts: string[] = [];
  for (let i = 0; i < gfns.length;) {
    let j = i;
    while (j + 1 < gfns.length && gfns[j + 1] === gfns[j]! + 1) j++;
    parts.push(j - i >= 2 ? `${hex(gfns[i]!)}..${hex(gfns[j]!)}` : j === i ? hex(gfns[i]!) : `${hex(gfns[i]!)}, ${hex(gfns[j]!)}`);
    i = j + 1;
  }
  return `[${parts.join(', ')}]`;
}
