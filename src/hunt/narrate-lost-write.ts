import { HOST_WRITER_BASE, describeWriter } from '../host/memslot.ts';
import type { StampMismatch } from '../oracles/stamp-oracle.ts';
import type { MigrationRunResult } from '../scenarios/migration.ts';
import type { PageEventName } from '../host/page-history.ts';
import { COPY_COMPLETION, HARVEST_BITMAP, HostWriteLog, ProtectBy } from '../host/tracepoints.ts';
import type { At, PageEv, PageTracer } from './explain-tracers.ts';
import { type Explanation, type Line, cap, hex, isDevice, isVcpu, stampText } from './narration.ts';

/*
 * The lost write's narrator: from one page's events, the causal chain that lost its last
 * write (the copy, the re-protect before the write, the write, what became of its log).
 */

type WriteEv = Extract<PageEv, { k: 'write' }>;
type HistEv = Extract<PageEv, { k: 'event' }>;
type AckEv = Extract<PageEv, { k: 'ack' }>;

/**
 * How a write reached the page: a vCPU's store through a stale TLB entry (its SPTE is
 * write-protected), right after its own write-protect fault, or through a writable SPTE
 * with no fault (so nothing logged it); a host write; a device's DMA.
 */
type WriteMode = 'stale' | 'fault' | 'writable' | 'host' | 'dma' | 'other';

function writeModes(evs: readonly PageEv[]): Map<WriteEv, WriteMode> {
  const faulted = new Set<string>();
  const modes = new Map<WriteEv, WriteMode>();
  for (const e of evs) {
    if (e.k === 'spte' && e.writable) faulted.add(e.actor);
    if (e.k !== 'write') continue;
    const w = e.stamp.writer;
    const vcpu = `vcpu${w - 1}`;
    modes.set(e, w >= HOST_WRITER_BASE ? 'host' : isDevice(w) ? 'dma' : !isVcpu(w) ? 'other'
      : !e.spte ? 'stale' : faulted.has(vcpu) ? 'fault' : 'writable');
    if (isVcpu(w)) faulted.delete(vcpu);
  }
  return modes;
}

interface Narration {
  evs: readonly PageEv[];
  g: string;
  /** The last copy, the re-protect before the first lost write, the first lost write, the write the destination holds, the write that filled a stale TLB entry. */
  C: HistEv | undefined;
  P: HistEv | undefined;
  W1: WriteEv | undefined;
  Wd: WriteEv | undefined;
  fill: WriteEv | undefined;
  /** The stale writer's last flush acknowledgement before the first lost write. */
  staleAck: AckEv | undefined;
  modes: Map<WriteEv, WriteMode>;
  /** What followed each re-protect shown: the remote TLB flush, or none. */
  flush: Map<HistEv, string>;
  /**
   * With the CPU cache model, the migration thread's write-back reads that hit a line older
   * than memory (the stale read oracle), else null: a copy then sent what the cache held,
   * which the page's stamp in memory does not show.
   */
  staleCopies: number | null;
}

export function narrateLostWrite(tr: PageTracer, m: StampMismatch, r: MigrationRunResult, note: string): Explanation {
  const g = `gfn ${hex(m.gfn)}`;
  const evs = tr.evs;
  const writes = evs.filter((e): e is WriteEv => e.k === 'write');
  const hist = (name: PageEventName): HistEv[] => evs.filter((e): e is HistEv => e.k === 'event' && e.event === name);
  const modes = writeModes(evs);
  const C = hist('copied').at(-1);
  const copyStep = C?.step ?? 0;
  // The first lost write: the first write after the last copy.
  const W1 = writes.find((w) => w.step > copyStep);
  const upTo = W1?.step ?? Infinity;
  const protects = hist('re-protected');
  const P = protects.filter((p) => p.step < upTo).at(-1);
  const from = P?.step ?? 0;
  const dst = m.destination;

  const sel = new Set<PageEv>();
  if (P) sel.add(P);
  // Between that re-protect and the first lost write: the last event of each kind.
  const lastOf = new Map<string, PageEv>();
  for (const e of evs) {
    if (e.step <= from || e.step >= upTo) continue;
    if (e.k === 'event' && e.event !== 'host-write') lastOf.set(`event:${e.event}`, e);
    else if (e.k === 'spte' && e.writable) lastOf.set('spte', e);
    else if (e.k === 'bit' && !e.set) lastOf.set('bit', e);
    else if (e.k === 'ring') lastOf.set(`ring:${e.what}`, e);
  }
  for (const e of lastOf.values()) sel.add(e);
  // The write the destination holds; for a stale write, the write that filled its TLB entry.
  const Wd = writes.filter((w) => w.step <= copyStep && w.stamp.writer === dst.writer && w.stamp.seq === dst.seq).at(-1);
  if (Wd) sel.add(Wd);
  let fill: WriteEv | undefined;
  let staleAck: AckEv | undefined;
  if (W1 && modes.get(W1) === 'stale') {
    const vcpu = W1.stamp.writer - 1;
    staleAck = evs.filter((e): e is AckEv => e.k === 'ack' && e.vcpu === vcpu && e.step < W1.step).at(-1);
    // Its TLB was empty after that acknowledgement: its next write to the page walked the SPTE and filled the entry.
    fill = writes.find((w) => w.stamp.writer === W1.stamp.writer && w.step > (staleAck?.step ?? 0) && w.step < W1.step && w.spte);
    if (fill) sel.add(fill);
  }
  // From the first lost write on: everything that happened to the page.
  for (const e of evs) {
    if (e.step >= upTo && (e.k === 'write' || e.k === 'event' || e.k === 'spte' || e.k === 'bit' || e.k === 'ring')) sel.add(e);
  }
  const flush = new Map<HistEv, string>();
  for (const p of protects) if (sel.has(p)) flush.set(p, flushAfter(evs, p, protects.find((q) => q.step > p.step)?.step ?? Infinity));

  const n: Narration = { evs, g, C, P, W1, Wd, fill, staleAck, modes, flush, staleCopies: r.cache ? r.cache.staleReads.migration : null };
  const lines = cap(compose(evs.filter((e) => sel.has(e)), n), g);
  const more = r.mismatchCount > 1 ? ` (the first of ${r.mismatchCount} lost pages)` : '';
  return {
    subject: `lost write: slot ${m.slot} ${g}: the source holds ${stampText(m.source)}, the destination ${stampText(dst)}${more}`,
    steps: lines.map(({ step, actor, text }) => ({ step, actor, text })),
    conclusion: `${note}${fateOf(n)}; the destination holds ${stampText(dst)}, the source ${stampText(m.source)}`,
  };
}

/** The remote TLB flush that followed a re-protect (before the next one), in words. */
function flushAfter(evs: readonly PageEv[], p: HistEv, next: number): string {
  const begin = evs.find((e): e is Extract<PageEv, { k: 'flush-begin' }> => e.k === 'flush-begin' && e.step >= p.step && e.step < next);
  if (!begin) return ', but no remote TLB flush followed';
  const done = evs.find((e) => e.k === 'flush-done' && e.gen === begin.gen);
  return `; a remote TLB flush followed (generation ${begin.gen}, step ${begin.step})${done ? ` and completed at step ${done.step}` : ', and had not completed when the run ended'}`;
}

/** What became of the lost write: nothing logged it, or its log was lost before a harvest, or it was never copied. */
function fateOf(n: Narration): string {
  const { g, C, W1 } = n;
  if (C === undefined) return `the migration never copied ${g}`;
  if (W1 === undefined) {
    if (n.staleCopies !== null && n.staleCopies > 0) {
      return `nothing wrote ${g} after its last copy at step ${C.step}: that copy read a line the CPU cache held from before a write that went around it (a UC or WC store, or no-snoop DMA), and sent it (page aliasing; the migration thread read stale data ${n.staleCopies} times)`;
    }
    return `nothing wrote ${g} after its last copy at step ${C.step}, yet the destination differs`;
  }
  const after = n.evs.filter((e) => e.step > C.step);
  const log = after.find((e) => (e.k === 'event' && e.event === 'logged') || (e.k === 'bit' && e.set));
  if (log === undefined) {
    return isDevice(W1.stamp.writer)
      ? `no dirty source reported ${g} after its copy (KVM's log does not see DMA, and no IOMMU or device log made the migration copy it again)`
      : `no later log reported ${g}`;
  }
  const harvest = after.find((e) => e.step >= log.step && e.k === 'event' && e.event === 'harvested');
  if (harvest !== undefined) return `${g} was logged at step ${log.step} and harvested at step ${harvest.step}, but never copied again`;
  const gone = after.find((e) => e.step > log.step && (e.k === 'ring' || (e.k === 'bit' && !e.set) || (e.k === 'event' && e.event === 're-protected')));
  const why = gone === undefined ? 'no later sync collected it before the migration completed'
    : gone.k === 'ring' ? gone.what === 'overwritten' ? `its dirty ring entry was overwritten at step ${gone.step}` : `its dirty ring entry was marked collected without being recorded at step ${gone.step}`
    : gone.k === 'event' ? `${gone.detail} ${gone.code === ProtectBy.CLEAR_DIRTY_LOG ? 'cleared its dirty bit and ' : ''}re-protected it at step ${gone.step} first`
    : `its dirty bit was cleared at step ${gone.step} first`;
  return `${g} was logged at step ${log.step} but never harvested: ${why}`;
}

/**
 * One line per step, in the protocol's words; after the first lost write, runs of plain
 * writes of the same kind become one line.
 */
function compose(evs: PageEv[], n: Narration): Line[] {
  const groups: PageEv[][] = [];
  for (const e of evs) {
    const last = groups.at(-1);
    if (last && last[0]!.step === e.step) last.push(e);
    else groups.push([e]);
  }
  const lines: Line[] = [];
  const add = (at: At, text: string): void => { lines.push({ step: at.step, actor: at.actor, text, order: lines.length }); };
  let run: WriteEv[] = [];
  const endRun = (): void => {
    if (run.length === 1) for (const t of phrase(run, n)) add(run[0]!, t);
    else if (run.length > 1) {
      const last = run.at(-1)!;
      const who = [...new Set(run.map((w) => describeWriter(w.stamp.writer)))].join(' and ');
      const mode = n.modes.get(run[0]!);
      const how = mode === 'stale' ? ' through stale TLB entries' : mode === 'writable' ? ' through the writable SPTE' : mode === 'dma' ? ' by DMA' : '';
      add(last, `${who} wrote ${n.g}${how} ${run.length} more times from step ${run[0]!.step}, the last (${stampText(last.stamp)}) at this step`);
    }
    run = [];
  };
  for (const grp of groups) {
    const w = grp.length === 1 && grp[0]!.k === 'write' ? grp[0] as WriteEv : undefined;
    if (w !== undefined && n.W1 !== undefined && w.step > n.W1.step) {
      if (run.length > 0 && n.modes.get(run[0]!) !== n.modes.get(w)) endRun();
      run.push(w);
      continue;
    }
    endRun();
    for (const t of phrase(grp, n)) add(grp[0]!, t);
  }
  endRun();
  return lines;
}

/** The events of one step (one role's step), as sentences. */
function phrase(grp: PageEv[], n: Narration): string[] {
  const { g } = n;
  const ev = (name: PageEventName): HistEv | undefined => grp.find((e): e is HistEv => e.k === 'event' && e.event === name);
  const out: string[] = [];
  const actor = grp[0]!.actor;
  const logged = ev('logged');
  const hostWrite = ev('host-write');
  const harvested = ev('harvested');
  const prot = ev('re-protected');
  const copied = ev('copied');
  const spte = grp.find((e) => e.k === 'spte') as Extract<PageEv, { k: 'spte' }> | undefined;
  const bit = grp.find((e) => e.k === 'bit') as Extract<PageEv, { k: 'bit' }> | undefined;
  const write = grp.find((e) => e.k === 'write') as WriteEv | undefined;
  if (spte?.writable && !hostWrite && /^vcpu\d+$/.test(actor)) {
    out.push(`${actor} took a write-protect fault on ${g}: KVM made its SPTE writable${logged ? ` and logged it ${sinkText(logged.code)}` : ' (the slot does not log dirty pages)'}`);
  } else if (logged && !hostWrite) {
    out.push(`KVM logged ${g} ${sinkText(logged.code)} (${logged.detail})`);
  }
  if (write) out.push(writeText(write, n, hostWrite));
  else if (hostWrite) out.push(`a host write to ${g} (${hostWrite.detail})`);
  const getProtects = prot?.code === ProtectBy.GET_DIRTY_LOG;
  if (harvested) {
    const how = harvested.code === HARVEST_BITMAP ? `KVM_GET_DIRTY_LOG reported ${g} dirty` : `the migration harvested ${g} from the ${harvested.detail}`;
    out.push(getProtects ? `${how} and re-protected it${n.flush.get(prot!) ?? ''}` : `${how}${prot ? '' : ' (not re-protected yet)'}`);
  }
  if (prot && !(harvested && getProtects)) {
    const late = n.C && n.W1 && prot.step > n.W1.step && n.W1.step > n.C.step ? `, after its copy at step ${n.C.step} and the write at step ${n.W1.step}: that write is forgotten` : '';
    out.push(`${protectText(prot.code as ProtectBy, g)}${late}${n.flush.get(prot) ?? ''}`);
  } else if (bit && !bit.set && !prot && !harvested) {
    out.push(`${g}'s dirty bit was cleared without write-protecting the page: its SPTE stays writable`);
  } else if (spte && !spte.writable && !prot) {
    out.push(`${g}'s SPTE was write-protected`);
  }
  if (copied) {
    const when = copied.code === COPY_COMPLETION ? 'at completion' : `(${copied.detail})`;
    out.push(n.staleCopies === null ? `the migration copied ${g} ${when}: it sent ${stampText(copied.stamp)}`
      : `the migration copied ${g} ${when}, reading it write-back through the CPU cache (memory held ${stampText(copied.stamp)})`);
  }
  for (const e of grp) {
    if (e.k !== 'ring') continue;
    out.push(e.what === 'overwritten'
      ? `vcpu${e.vcpu}'s dirty ring wrapped: the entry for ${g} was overwritten before userspace harvested it`
      : `the entry for ${g} in vcpu${e.vcpu}'s dirty ring was marked collected without being recorded`);
  }
  return out;
}

function protectText(by: ProtectBy, g: string): string {
  switch (by) {
    case ProtectBy.RESET_DIRTY_RINGS: return `KVM_RESET_DIRTY_RINGS re-protected ${g}`;
    case ProtectBy.CLEAR_DIRTY_LOG: return `KVM_CLEAR_DIRTY_LOG cleared the dirty bit of ${g} and re-protected it`;
    case ProtectBy.GET_DIRTY_LOG: return `KVM_GET_DIRTY_LOG re-protected ${g}`;
    case ProtectBy.ENABLE_LOGGING: return `enabling dirty logging write-protected ${g}`;
  }
}

/** Where a LOGGED event put the page: the ring of vCPU `ringOf`, or the bitmap (-1). */
function sinkText(ringOf: number): string {
  return ringOf >= 0 ? `in vcpu${ringOf}'s dirty ring` : 'in the dirty bitmap';
}

function writeText(w: WriteEv, n: Narration, hostWrite: HistEv | undefined): string {
  const { g } = n;
  const who = describeWriter(w.stamp.writer);
  const tags: string[] = [];
  if (w === n.Wd) tags.push('the destination holds this write');
  if (w === n.W1) tags.push('the first write after the last copy');
  let how = '';
  switch (n.modes.get(w)) {
    case 'stale': {
      const since = n.P && n.P.step < w.step ? ` has been write-protected since step ${n.P.step}` : ' is write-protected';
      const flushes = n.evs.filter((e) => e.k === 'flush-begin' && e.step >= (n.P?.step ?? 0) && e.step < w.step);
      const acked = flushes.length === 0
        ? `${who} has acknowledged no TLB flush since ${n.staleAck ? `step ${n.staleAck.step}` : 'the run began'} (none began after the re-protect)`
        : `${who} had not yet acknowledged the TLB flush begun at step ${flushes.at(-1)!.step}`;
      how = ` through its stale writable TLB entry: the SPTE${since}, but ${acked}, so the write took no fault and nothing logged it`;
      break;
    }
    case 'fault': how = ' after its fault (the access retried)'; break;
    case 'writable': {
      if (w === n.fill) { how = ' through its writable SPTE, caching a writable translation in its TLB'; break; }
      if (w !== n.W1) { how = ' through the writable SPTE'; break; }
      const since = n.evs.filter((e) => e.k === 'spte' && e.writable && e.step < w.step).at(-1);
      how = ` through the still-writable SPTE${since ? ` (writable since step ${since.step})` : ''}: no fault, so nothing logged this write`;
      break;
    }
    case 'host': how = hostWrite ? ` with kvm_write_guest: ${hostWriteText(hostWrite.code as HostWriteLog)}` : ''; break;
    case 'dma': how = ' by DMA'; break;
    default: break;
  }
  return `${who} wrote ${g} (seq ${w.stamp.seq})${how}${tags.length ? ` (${tags.join('; ')})` : ''}`;
}

function hostWriteText(how: HostWriteLog): string {
  switch (how) {
    case HostWriteLog.UNTRACKED: return 'without mark_page_dirty_in_slot, so not logged';
    case HostWriteLog.RING: return 'logged in the running vCPU\'s dirty ring';
    case HostWriteLog.BITMAP: return 'logged in the dirty bitmap';
    case HostWriteLog.DROPPED: return 'no running vCPU and no backup bitmap, so not logged';
  }
}
