import { DEVICE_WRITER_BASE } from '../host/memslot.ts';
import { type DmaRecord, describeDmaRecord } from '../oracles/dma-oracle.ts';
import type { MigrationRunResult } from '../scenarios/migration.ts';
import type { At, DmaEv, DmaTracer } from './explain-tracers.ts';
import { type Explanation, type Line, cap, hex, stampText } from './narration.ts';

/** The DMA record's narrator: what the IOVA's IOPTE and the device's IOTLB went through up to the record. */
export function narrateDma(tr: DmaTracer, rec: DmaRecord, r: MigrationRunResult, note: string): Explanation {
  const io = `IOVA ${hex(rec.iova)}`;
  const dev = `device ${rec.device}`;
  const evs = tr.evs;
  const R = evs.find((e) => e.k === 'record');
  const end = R?.step ?? Infinity;
  const lines: Line[] = [];
  const push = (e: At, text: string): void => { lines.push({ step: e.step, actor: e.actor, text, order: lines.length }); };
  const iopte = evs.filter((e): e is Extract<DmaEv, { k: 'iopte' }> => e.k === 'iopte' && e.step <= end);
  const total = r.dma ? r.dma.staleIotlb + r.dma.faults : 0;
  const subject = `${describeDmaRecord(rec)}${total > 1 ? ` (the first of ${total} DMA records)` : ''}`;
  const alsoLost = r.mismatchCount > 0 ? `; the run also lost ${r.mismatchCount} page${r.mismatchCount > 1 ? 's' : ''}, the first gfn ${hex(r.mismatches[0]!.gfn)}` : '';
  if (rec.kind === 'stale-iotlb') {
    const cached = `gfn ${hex(rec.cachedGfn)}`;
    const revoke = iopte.filter((e) => e.wasPresent && !e.present && e.gfn === rec.cachedGfn).at(-1);
    const map = iopte.filter((e) => e.present && e.gfn === rec.cachedGfn && (!revoke || e.step < revoke.step)).at(-1);
    const rs = revoke?.step ?? 0;
    const devWriter = DEVICE_WRITER_BASE + rec.device;
    if (map) push(map, `the IOMMU service mapped ${io} to ${cached}`);
    else if (tr.initial.gfn === rec.cachedGfn) lines.push({ step: 0, actor: 'vmm', order: -1, text: `${io} was mapped to ${cached} before the run started` });
    const before = evs.filter((e): e is Extract<DmaEv, { k: 'write' }> => e.k === 'write' && e.step < rs && e.stamp.writer === devWriter).at(-1);
    if (before) push(before, `${dev} wrote ${cached} by DMA through ${io} (seq ${before.stamp.seq}), with the translation in its IOTLB`);
    if (revoke) push(revoke, `the IOMMU service began unmapping ${io}: it revoked the IOPTE (${cached} no longer mapped for new walks)`);
    const free = iopte.find((e) => e.step > rs && e.gfn < 0 && e.wasGfn === rec.cachedGfn);
    const freeStep = free?.step ?? end;
    const invs = evs.filter((e) => (e.k === 'inv-begin' || e.k === 'inv-done' || e.k === 'inv-ack') && e.step >= rs && e.step <= end);
    for (const e of invs) {
      if (e.k === 'inv-begin') {
        const done = evs.find((x) => x.k === 'inv-done' && x.gen === e.gen);
        push(e, `an IOTLB invalidation began (generation ${e.gen})${done ? ` and completed at step ${done.step}: every active device acknowledged it` : ''}`);
      } else if (e.k === 'inv-ack') push(e, `${dev} acknowledged IOTLB invalidation generation ${e.gen}: it dropped its IOTLB`);
    }
    for (const e of evs) if (e.k === 'mode' && e.step >= rs && e.step <= end) push(e, e.active ? `${dev} resumed DMA` : `${dev} quiesced: it dropped its IOTLB`);
    const invBeforeFree = invs.some((e) => e.k === 'inv-begin' && e.step <= freeStep);
    if (free) push(free, `the unmap freed the IOPTE of ${io} and returned${invBeforeFree ? '' : `, with no IOTLB invalidation since the revoke: ${dev}'s IOTLB still translates ${io} to ${cached}`}`);
    const remap = iopte.find((e) => e.step > freeStep && e.present);
    if (remap) push(remap, `the IOMMU service mapped ${io} to gfn ${hex(remap.gfn)}`);
    const stale = evs.filter((e): e is Extract<DmaEv, { k: 'write' }> => e.k === 'write' && e.step > freeStep && e.step <= end && e.stamp.writer === devWriter);
    for (const w of stale.slice(0, 3)) {
      if (w.step !== end) push(w, `${dev} wrote ${cached} (seq ${w.stamp.seq}) through its stale IOTLB entry for ${io}`);
    }
    if (R) {
      const w = stale.find((x) => x.step === R.step);
      push(R, `${dev} ${rec.write ? `wrote ${cached}${w ? ` (seq ${w.stamp.seq})` : ''}` : `read ${cached}`} through its stale IOTLB entry for ${io}: the DMA oracle recorded it (the IOVA ${rec.currentGfn < 0 ? 'maps nothing' : `maps gfn ${hex(rec.currentGfn)}`} now)`);
    }
    lines.sort((a, b) => a.step - b.step || a.order - b.order);
    const lost = r.mismatches.find((m) => m.gfn === rec.cachedGfn);
    const fate = lost ? `; ${cached} is also lost in migration: the destination holds ${stampText(lost.destination)}, the source ${stampText(lost.source)}` : '';
    const inv = invBeforeFree ? 'an IOTLB invalidation began before the unmap returned, yet the device kept the translation' : `no IOTLB invalidation followed the unmap of ${io}`;
    return {
      subject,
      steps: cap(lines, io).map(({ step, actor, text }) => ({ step, actor, text })),
      conclusion: `${note}${inv}; ${dev} ${rec.write ? 'wrote' : 'read'} ${cached} through the stale translation at step ${R?.step ?? '?'}, after the unmap returned${remap ? ` and ${io} was mapped to gfn ${hex(remap.gfn)}` : ''}${fate || alsoLost}`,
    };
  }
  // A device fault: what the IOVA's IOPTE went through, then the faulting DMA.
  if (iopte.length === 0) {
    lines.push({ step: 0, actor: 'vmm', order: -1, text: tr.initial.present ? `${io} was mapped to gfn ${hex(tr.initial.gfn)} before the run started` : `nothing mapped ${io} when the run started` });
  }
  for (const e of iopte.slice(-8)) {
    push(e, e.present ? `the IOMMU service mapped ${io} to gfn ${hex(e.gfn)}${e.writable ? '' : ' read-only'}`
      : e.gfn >= 0 ? `the IOMMU service began unmapping ${io}: it revoked the IOPTE` : `the unmap freed the IOPTE of ${io}`);
  }
  if (R) push(R, `${dev}'s ${rec.write ? 'write' : 'read'} to ${io} faulted (${rec.kind}): the DMA oracle recorded it`);
  lines.sort((a, b) => a.step - b.step || a.order - b.order);
  const ram = tr.iovaAsGfnIsRam ? ` (read as a guest physical address, ${io} is guest RAM: gfn ${hex(tr.iova)})` : '';
  const state = rec.kind === 'unmapped-iova' ? (iopte.some((e) => e.present) || tr.initial.present ? 'nothing mapped it at the time' : 'nothing had mapped it since the run began') : `it was mapped read-only to gfn ${hex(rec.currentGfn)}`;
  return {
    subject,
    steps: cap(lines, io).map(({ step, actor, text }) => ({ step, actor, text })),
    conclusion: `${note}${dev} ${rec.write ? 'wrote' : 'read'} ${io} at step ${R?.step ?? '?'}: ${state}${ram}${alsoLost}`,
  };
}
