import { spteWritable } from '../host/spte.ts';
import { GlobalWord } from '../host/layout.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import type { GuestMemfdRam } from '../host/vmm/kvm-convert-memory.ts';
import {
  type OpRecord, entryMatches, entryText, gfnsText, guestOpCount, matcherText,
} from './observations.ts';
import type { BarExpect, FinalExpect, GfnsMatcher } from './spec.ts';
import type { Vm, VmBar } from '../host/vm.ts';
import { errnoText, exitText, hex } from './syntax.ts';
import { STALE_READERS, firstLineState, latestValue, staleCounts } from './cache.ts';

/** One expectation that did not hold: which, what was expected, what happened. */
export interface Mismatch {
  what: string;
  expected: string;
  actual: string;
}

function gfnsMismatch(what: string, want: GfnsMatcher, got: number[]): Mismatch | null {
  if (typeof want === 'number') {
    return want === got.length ? null : { what, expected: `${want} page${want === 1 ? '' : 's'}`, actual: `${got.length} ${gfnsText(got)}` };
  }
  const same = want.length === got.length && want.every((g, i) => g === got[i]);
  return same ? null : { what, expected: gfnsText(want), actual: gfnsText(got) };
}

/** Checks an operation's expectations against what was recorded for it. */
export function checkOp(r: OpRecord): Mismatch[] {
  const x = r.op.expect;
  const out: Mismatch[] = [];
  const push = (m: Mismatch | null): void => { if (m) out.push(m); };
  const num = (what: string, want: number | undefined, got: number | undefined, none = 'nothing'): void => {
    if (want !== undefined && want !== got) push({ what, expected: `${want}`, actual: got === undefined ? none : `${got}` });
  };
  const wantErr = x.error ?? 0;
  const gotErr = r.error?.errno ?? 0;
  if (wantErr !== gotErr) {
    push({ what: 'error', expected: errnoText(wantErr), actual: r.error ? r.error.message : 'none (it succeeded)' });
  }
  if (r.error) return out; // nothing else was measured
  if (x.exit !== undefined) {
    const got = r.exits[0]?.reason ?? 'none';
    if (got !== x.exit) push({ what: 'exit', expected: exitText(x.exit), actual: exitText(got) });
  }
  if (x.retiredBeforeExit !== undefined) {
    const first = r.exits[0];
    if (first === undefined) push({ what: 'retired_before_exit', expected: `${x.retiredBeforeExit}`, actual: `no exit (${r.retired} of ${guestOpCount(r)} retired)` });
    else num('retired_before_exit', x.retiredBeforeExit, first.retired);
  }
  num('faults', x.faults, r.faults);
  if (x.logged !== undefined) {
    push(gfnsMismatch('logged', x.logged, r.logs.filter((e) => e.where !== 'lost').map((e) => e.gfn)));
  }
  num('lost', x.lost, r.logs.filter((e) => e.where === 'lost').length);
  num('value', x.value, r.value, 'no value (the read did not retire)');
  if (x.faulted !== undefined && x.faulted !== r.faulted) push({ what: 'faulted', expected: `${x.faulted}`, actual: r.faulted === undefined ? 'no DMA' : `${r.faulted}` });
  if (x.harvested !== undefined) {
    const got = r.harvested ?? [];
    if (typeof x.harvested === 'number') {
      if (x.harvested !== got.length) push({ what: 'harvested', expected: `${x.harvested} entries`, actual: `${got.length} entries` });
    } else {
      const want = x.harvested;
      const same = want.length === got.length && want.every((m, i) => entryMatches(m, got[i]!));
      if (!same) push({ what: 'harvested', expected: `[${want.map(matcherText).join(', ')}]`, actual: `[${got.map(entryText).join(', ')}]` });
    }
  }
  num('reset', x.reset, r.reset);
  if (x.dirty !== undefined) push(gfnsMismatch('dirty', x.dirty, r.dirty ?? []));
  num('cleared', x.cleared, r.cleared);
  num('zapped', x.zapped, r.zapped);
  num('written_back', x.writtenBack, r.writtenBack);
  num('unmapped', x.unmapped, r.unmapped);
  num('pfn', x.pfn, r.pfn);
  return out;
}

const kind = (priv: boolean): string => (priv ? 'private' : 'shared');

/** What the run left behind, for the final expectations. */
export interface FinalState {
  vm: Vm;
  collected: Set<number>;
  copies: Map<number, number>;
  /** A confidential VM's RAM blocks (the RamDiscardManager bits), or null. */
  ram?: GuestMemfdRam | null;
  /** The private memory oracle's finding kinds over the run. */
  findings?: readonly string[];
}

export function staleCopies(s: FinalState): number[] {
  const out: number[] = [];
  for (const [gfn, v] of s.copies) {
    const slot = s.vm.memory.findSlot(gfn)!;
    if (latestValue(s.vm, slot, gfn - slot.baseGfn) !== v) out.push(gfn);
  }
  return out.sort((a, b) => a - b);
}

export function checkFinal(x: FinalExpect, s: FinalState): Mismatch[] {
  const out: Mismatch[] = [];
  const mem = s.vm.memory;
  const page = (gfn: number): { slot: NonNullable<ReturnType<typeof mem.findSlot>>; page: number } => {
    const slot = mem.findSlot(gfn)!;
    return { slot, page: gfn - slot.baseGfn };
  };
  for (const { gfn, value } of x.pages ?? []) {
    const p = page(gfn);
    const got = p.slot.readU64(p.page);
    if (got !== value) out.push({ what: `expect.pages[${hex(gfn)}]`, expected: `${value}`, actual: `${got}` });
  }
  if (x.collected !== undefined) {
    const got = [...s.collected].sort((a, b) => a - b);
    const m = gfnsMismatch('expect.collected', x.collected, got);
    if (m) out.push(m);
  }
  for (const { gfn, value } of x.copies ?? []) {
    const got = s.copies.get(gfn);
    if (got !== value) out.push({ what: `expect.copies[${hex(gfn)}]`, expected: `${value}`, actual: got === undefined ? 'never copied' : `${got}` });
  }
  if (x.staleCopies !== undefined) {
    const m = gfnsMismatch('expect.stale_copies', x.staleCopies, staleCopies(s));
    if (m) out.push(m);
  }
  for (const { gfn, writable } of x.sptes ?? []) {
    const p = page(gfn);
    const got = spteWritable(p.slot, p.page);
    if (got !== writable) out.push({ what: `expect.sptes[${hex(gfn)}]`, expected: writable ? 'writable' : 'protected', actual: got ? 'writable' : 'protected' });
  }
  if (x.lostHostWrites !== undefined && x.lostHostWrites !== s.vm.lostHostWrites()) {
    out.push({ what: 'expect.lost_host_writes', expected: `${x.lostHostWrites}`, actual: `${s.vm.lostHostWrites()}` });
  }
  for (const { gfn, private: want } of x.attributes ?? []) {
    const p = page(gfn);
    const got = s.vm.attributes?.isPrivate(p.slot, p.page) ?? false;
    if (got !== want) out.push({ what: `expect.attributes[${hex(gfn)}]`, expected: kind(want), actual: kind(got) });
  }
  for (const { gfn, shared } of x.rdm ?? []) {
    const p = page(gfn);
    const got = s.ram?.rdmOf(p.slot)?.isPopulated(p.page * PAGE_SIZE, PAGE_SIZE) ?? false;
    if (got !== shared) out.push({ what: `expect.rdm[${hex(gfn)}]`, expected: kind(!shared), actual: kind(!got) });
  }
  for (const { gfn, value } of x.privatePages ?? []) {
    const p = page(gfn);
    const got = p.slot.gmem!.readU64(p.page);
    if (got !== value) out.push({ what: `expect.private_pages[${hex(gfn)}]`, expected: `${value}`, actual: `${got}` });
  }
  const table = s.vm.iommu?.table;
  for (const { iova, gfn } of x.iommu ?? []) {
    const got = table !== undefined && table.inRange(iova) && table.present(iova) ? table.gfn(iova) : null;
    if (got !== gfn) out.push({ what: `expect.iommu[${hex(iova)}]`, expected: gfn === null ? 'unmapped' : hex(gfn), actual: got === null ? 'unmapped' : hex(got) });
  }
  if (x.findings !== undefined) {
    const got = [...new Set(s.findings ?? [])].sort();
    if (got.join() !== x.findings.join()) out.push({ what: 'expect.findings', expected: `[${x.findings.join(', ')}]`, actual: `[${got.join(', ')}]` });
  }
  const cache = s.vm.cache;
  for (const { gfn, state } of x.cache ?? []) {
    const p = page(gfn);
    const got = firstLineState(cache!, p.slot, p.page);
    if (got !== state) out.push({ what: `expect.cache[${hex(gfn)}]`, expected: state, actual: got });
  }
  if (x.stale !== undefined) {
    const got = staleCounts(cache!);
    for (const r of STALE_READERS) {
      const want = x.stale[r];
      if (want !== undefined && want !== got[r]) out.push({ what: `expect.stale.${r}`, expected: `${want}`, actual: `${got[r]}` });
    }
  }
  const mces = s.vm.machineChecks().count;
  if (x.machineChecks !== undefined && x.machineChecks !== mces) {
    out.push({ what: 'expect.machine_checks', expected: `${x.machineChecks}`, actual: `${mces}` });
  }
  const bar = s.vm.bars[0];
  if (x.bar !== undefined && bar !== undefined) out.push(...checkBar(x.bar, bar));
  const flushes = Atomics.load(s.vm.global, GlobalWord.FLUSHES);
  if (x.flushes !== undefined && x.flushes !== flushes) {
    out.push({ what: 'expect.flushes', expected: `${x.flushes}`, actual: `${flushes}` });
  }
  return out;
}

/** expect.bar against vm0's BAR at the end (after the oracles' sweep). */
function checkBar(x: BarExpect, bar: VmBar): Mismatch[] {
  const out: Mismatch[] = [];
  const pfnText = (p: number | null): string => (p === null ? 'none' : `pfn ${p}`);
  for (const { page, pfn } of x.sptes ?? []) {
    const got = bar.mmu.spte(page)?.pfn ?? null;
    if (got !== pfn) out.push({ what: `expect.bar.sptes[${page}]`, expected: pfnText(pfn), actual: pfnText(got) });
  }
  for (const { page, pfn } of x.ptes ?? []) {
    const got = bar.mapping.pte(page)?.pfn ?? null;
    if (got !== pfn) out.push({ what: `expect.bar.ptes[${page}]`, expected: pfnText(pfn), actual: pfnText(got) });
  }
  for (const { pfn, value } of x.mmio ?? []) {
    const got = bar.driver.mmio.read32(pfn);
    if (got !== value) out.push({ what: `expect.bar.mmio[${pfn}]`, expected: `${value}`, actual: `${got}` });
  }
  if (x.findings !== undefined) {
    for (const f of bar.mmu.findings()) {
      const want = x.findings[f.kind];
      if (want !== f.count) out.push({ what: `expect.bar.findings.${f.kind}`, expected: `${want}`, actual: `${f.count}${f.firstPage !== null ? ` (the first at BAR page ${f.firstPage})` : ''}` });
    }
  }
  if (x.dead !== undefined && x.dead !== bar.mmu.dead) out.push({ what: 'expect.bar.dead', expected: `${x.dead}`, actual: `${bar.mmu.dead}` });
  return out;
}
