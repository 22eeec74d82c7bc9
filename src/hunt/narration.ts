import { DEVICE_WRITER_BASE, HOST_WRITER_BASE, type PageStamp, describeWriter } from '../host/memslot.ts';
import { hex } from '../util/hex.ts';

/** What explanations are made of, shared by the narrators (src/hunt/narrate-*.ts). */

/** One line of a causal chain. Step numbers are 1-based (the n-th step of the run), as the page history's are. */
export interface ExplanationStep {
  /** The run's step (1-based, as the page history counts); 0: before the run started. */
  step: number;
  /** The role that took the step (vcpu0, migration, host-writer, device0, iommu-service). */
  actor: string;
  text: string;
}

export interface Explanation {
  /** What is explained: the lost page or the DMA record, in one line. */
  subject: string;
  /** The causal chain, oldest first, at most about 20 lines. */
  steps: ExplanationStep[];
  conclusion: string;
}

/** At most this many lines in a chain (the rest is summarized in one line). */
const MAX_LINES = 20;

export { hex };

/** A line of a chain being composed; `order` breaks ties between lines of one step. */
export interface Line extends ExplanationStep { order: number }

export function stampText(s: PageStamp): string {
  return s.writer === 0 ? 'nothing (never written)' : `seq ${s.seq} from ${describeWriter(s.writer)}`;
}

export const isVcpu = (writer: number): boolean => writer > 0 && writer < DEVICE_WRITER_BASE;
export const isDevice = (writer: number): boolean => writer >= DEVICE_WRITER_BASE && writer < HOST_WRITER_BASE;

/** Keeps a chain at MAX_LINES: the first lines and the last, with one line for what is left out. */
export function cap(lines: Line[], what: string): Line[] {
  if (lines.length <= MAX_LINES) return lines;
  const head = lines.slice(0, MAX_LINES - 4);
  const tail = lines.slice(lines.length - 3);
  const skipped = lines.slice(MAX_LINES - 4, lines.length - 3);
  const first = skipped[0]!;
  return [...head, { step: first.step, actor: first.actor, order: first.order, text: `… ${skipped.length} more events on ${what} until step ${skipped.at(-1)!.step}` }, ...tail];
}
