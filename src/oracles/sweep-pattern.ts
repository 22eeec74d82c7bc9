import type { GuestMemory } from '../host/guest-memory.ts';
import { HOST_WRITER_BASE, type Memslot, type PageStamp, describeWriter } from '../host/memslot.ts';
import { hex } from '../util/hex.ts';

/**
 * The sweep-pattern oracle: migration-test's check on the destination
 * (tests/qtest/migration-test.c, check_guests_ram). Its guest zeroes byte 0 of every
 * page, then increments those bytes in address order forever, so wherever it stopped,
 * all of them are equal except at one place where the value steps down by one (pages
 * before the sweep were incremented once more than pages from it on), modulo 256. A page
 * the migration lost (stale, or never sent) breaks the pattern. With several vCPUs each
 * sweeps its own slice (SweepWorkload), so each slice is checked on its own.
 *
 * The verdict is check_guests_ram's rule. To name the culprits, each broken slice is
 * also fitted to the nearest valid pattern, and the pages that differ from it are
 * reported (check_guests_ram itself reports the page after a stale one).
 */

/** A vCPU's slice of the flattened page space (slots in order), as createWorkload cuts it. */
export interface SweepSlice { vcpu: number; first: number; count: number }

export function sweepSlices(pages: number, vcpus: number): SweepSlice[] {
  const slice = Math.floor(pages / vcpus);
  const out: SweepSlice[] = [];
  for (let v = 0; v < vcpus; v++) {
    const first = v * slice;
    out.push({ vcpu: v, first, count: Math.max(1, v === vcpus - 1 ? pages - first : slice) });
  }
  return out;
}

/** A page out of line: what it holds, what the nearest valid pattern wants there, its stamp. */
export interface SweepPage { vcpu: number; slot: number; gfn: number; value: number; expected: number; stamp: PageStamp }

export interface SweepSliceResult {
  vcpu: number;
  firstGfn: number;
  lastGfn: number;
  /** check_guests_ram's figures: the first and last byte, where the edge (step-down) was, pages counted bad. */
  firstByte: number;
  lastByte: number;
  edgeGfn: number | null;
  bad: number;
}

export interface SweepCheck {
  ok: boolean;
  pages: number;
  slices: SweepSliceResult[];
  /** Pages that differ from the nearest valid pattern of their slice, in all. */
  outOfLine: number;
  /** The first of them (up to `max`), in address order. */
  offending: SweepPage[];
}

/** Byte 0 of every page in the flattened page space, and where each index lives. */
function pageBytes(memory: GuestMemory): { bytes: Uint8Array; at: (i: number) => [Memslot, number] } {
  const slots = memory.slots;
  const starts: number[] = [];
  let n = 0;
  for (const s of slots) { starts.push(n); n += s.pages; }
  const bytes = new Uint8Array(n);
  let i = 0;
  for (const s of slots) for (let p = 0; p < s.pages; p++) bytes[i++] = s.bytes(p)[s.byteOffset(p)]!;
  const at = (idx: number): [Memslot, number] => {
    let k = slots.length - 1;
    while (starts[k]! > idx) k--;
    return [slots[k]!, idx - starts[k]!];
  };
  return { bytes, at };
}

/** check_guests_ram over one slice: bad pages and where the edge was taken. */
function migrationTestRule(b: Uint8Array, first: number, count: number): { bad: number; edge: number } {
  let last = b[first]!;
  let hitEdge = false;
  let edge = -1;
  let bad = 0;
  for (let i = first + 1; i < first + count; i++) {
    const x = b[i]!;
    if (x !== last) {
      if (((x + 1) & 0xff) === last && !hitEdge) { hitEdge = true; edge = i; } else bad++;
    }
    last = x;
  }
  return { bad, edge };
}

/**
 * The valid pattern nearest to a slice `b[first, first + count)`: `a` before index
 * `split`, `a - 1` from it on; fewest pages out of line, and among those the fewest
 * ahead of the pattern (a lost write leaves a page behind, never ahead). Candidates for
 * `a` come from the two commonest values (each as the value before or after the step);
 * for each, the best split is one pass.
 */
function nearestPattern(b: Uint8Array, first = 0, count = b.length): { a: number; split: number } {
  const freq = new Uint32Array(256);
  for (let i = first; i < first + count; i++) freq[b[i]!]!++;
  let v1 = 0;
  let v2 = -1;
  for (let v = 1; v < 256; v++) if (freq[v]! > freq[v1]!) v1 = v;
  for (let v = 0; v < 256; v++) if (v !== v1 && (v2 < 0 || freq[v]! > freq[v2]!)) v2 = v;
  const outOfLine = count + 1; // outweighs any number of pages ahead
  const cost = (v: number, e: number): number => (v === e ? 0 : v === ((e + 1) & 0xff) ? outOfLine + 1 : outOfLine);
  let best = { a: v1, split: first + count, cost: Infinity };
  for (const a of [v1, (v1 + 1) & 0xff, v2, (v2 + 1) & 0xff]) {
    const below = (a - 1) & 0xff;
    let c = 0; // split at `first`: every page should hold a - 1
    for (let i = first; i < first + count; i++) c += cost(b[i]!, below);
    if (c < best.cost) best = { a, split: first, cost: c };
    for (let i = first; i < first + count; i++) {
      c += cost(b[i]!, a) - cost(b[i]!, below);
      if (c < best.cost) best = { a, split: i + 1, cost: c };
    }
  }
  return { a: best.a, split: best.split };
}

/**
 * Where a sweep over these bytes (one slice, in sweep order) stands: the index of the
 * next page it increments, by the nearest valid pattern (so a lost page does not move it).
 */
export function sweepPosition(bytes: Uint8Array): number {
  return nearestPattern(bytes).split % bytes.length;
}

/** Runs the check on guest memory swept by `vcpus` vCPUs, reporting up to `max` pages. */
/**
 * True when some page's stamp names a host writer: the VMM wrote guest memory (host
 * writes store into byte 0), so the sweep pattern cannot hold and is not checked.
 */
export function hasHostWrites(memory: GuestMemory): boolean {
  for (const s of memory.slots) for (let p = 0; p < s.pages; p++) if (s.stampOf(p).writer >= HOST_WRITER_BASE) return true;
  return false;
}

export function checkSweepPattern(memory: GuestMemory, vcpus: number, max = 10): SweepCheck {
  const { bytes, at } = pageBytes(memory);
  const gfnOf = (i: number): number => { const [s, p] = at(i); return s.baseGfn + p; };
  const slices: SweepSliceResult[] = [];
  const offending: SweepPage[] = [];
  let outOfLine = 0;
  for (const sl of sweepSlices(bytes.length, vcpus)) {
    const end = sl.first + sl.count;
    const rule = migrationTestRule(bytes, sl.first, sl.count);
    slices.push({
      vcpu: sl.vcpu, firstGfn: gfnOf(sl.first), lastGfn: gfnOf(end - 1), firstByte: bytes[sl.first]!, lastByte: bytes[end - 1]!,
      edgeGfn: rule.edge >= 0 ? gfnOf(rule.edge) : null, bad: rule.bad,
    });
    if (rule.bad === 0) continue;
    const { a, split } = nearestPattern(bytes, sl.first, sl.count);
    for (let i = sl.first; i < end; i++) {
      const expected = i < split ? a : (a - 1) & 0xff;
      if (bytes[i] === expected) continue;
      outOfLine++;
      if (offending.length < max) {
        const [s, p] = at(i);
        offending.push({ vcpu: sl.vcpu, slot: s.id, gfn: s.baseGfn + p, value: bytes[i]!, expected, stamp: s.stampOf(p) });
      }
    }
  }
  return { ok: slices.every((s) => s.bad === 0), pages: bytes.length, slices, outOfLine, offending };
}


/** Lines for people: the verdict, then each page out of line. */
export function describeSweepCheck(c: SweepCheck, when: string): string[] {
  const edges = c.slices.map((s) => `vcpu${s.vcpu} ${s.edgeGfn === null ? 'at its slice start' : `at gfn ${hex(s.edgeGfn)}`}`).join(', ');
  if (c.ok) return [`sweep pattern ${when}: OK (${c.pages} pages in ${c.slices.length} slice(s); the sweep stopped: ${edges})`];
  const lines = [`sweep pattern ${when}: BROKEN: ${c.outOfLine} page(s) out of line`];
  for (const s of c.slices) {
    if (s.bad === 0) continue;
    lines.push(`  vcpu${s.vcpu}'s slice gfn ${hex(s.firstGfn)}-${hex(s.lastGfn)}: first_byte = ${hex(s.firstByte)} last_byte = ${hex(s.lastByte)} ` +
      `hit_edge = ${s.edgeGfn === null ? 0 : 1}, ${s.bad} inconsistent step(s) (check_guests_ram)`);
  }
  for (const p of c.offending) {
    const who = p.stamp.writer === 0 ? 'never written' : `last written by ${describeWriter(p.stamp.writer)} (seq ${p.stamp.seq})`;
    lines.push(`  SWEEP page out of line: slot ${p.slot} gfn ${hex(p.gfn)} holds ${hex(p.value)}, the pattern expects ${hex(p.expected)}; ${who}`);
  }
  if (c.outOfLine > c.offending.length) lines.push(`  ... and ${c.outOfLine - c.offending.length} more`);
  return lines;
}
