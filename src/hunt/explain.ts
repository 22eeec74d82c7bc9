import type { MigrationRunResult } from '../scenarios/migration.ts';
import { runMigration } from '../scenarios/migration.ts';
import { UserError } from '../util/errors.ts';
import { DmaTracer, type Observer, PageTracer } from './explain-tracers.ts';
import { fingerprint } from './failure.ts';
import { narrateDma } from './narrate-dma.ts';
import { narrateLostWrite } from './narrate-lost-write.ts';
import type { Explanation } from './narration.ts';
import type { ReplayFile } from './replay-file.ts';

export type { Explanation, ExplanationStep } from './narration.ts';

/**
 * Plain-language explanations of a failing deterministic run (issue 5, item 4): the
 * causal chain of its first lost page, or of its first DMA oracle record, in protocol
 * words, step by step. Nothing hooks the hot paths: the recorded schedule is replayed
 * once to learn the subject, then again with a tracer on the VM's tracepoints (what KVM
 * and the VMM say they did to that one page: logged, host write, harvested,
 * re-protected, copied) that, after every step, also reads the page's state (stamp,
 * SPTE, dirty bit, its dirty ring entry, the TLB flush generation and acknowledgements)
 * to see effects no tracepoint reports: a store through a stale TLB entry, a bug's
 * short cut; for DMA it reads the IOPTE of the IOVA, the IOTLB invalidation generation
 * and the device's acknowledgements. A narrator then picks the transitions that tell
 * the story.
 *
 * Step numbers are 1-based (the n-th step of the run), as the page history's are.
 */
export interface ExplainOptions {
  /**
   * What to explain: the first lost page, or the first DMA oracle record. Default: the
   * DMA record when the run has one (a stale IOTLB entry also loses the page it writes),
   * else the lost page.
   */
  subject?: 'auto' | 'lost-write' | 'dma';
}

/** Replays a deterministic replay file twice (learn the subject, then observe it) and explains its failure. */
export async function explainReplay(f: ReplayFile, o: ExplainOptions = {}): Promise<Explanation> {
  const schedule = f.schedule;
  if (schedule === null) {
    throw new UserError('this replay file records a free-run failure: it has no schedule to replay step by step, so it cannot be explained (hunt the scenario with a deterministic strategy and explain that replay)');
  }
  const scenario = { ...f.scenario, seed: f.seed, pageHistory: true };
  const run = (observe?: Observer): Promise<MigrationRunResult> => runMigration(scenario, {
    driver: 'deterministic', replay: schedule, resumeOps: 0, watchdogMs: 10_000, burst: 256,
    prepare: observe ? (vm) => observe.init(vm) : undefined,
    onStep: observe ? (n, role, vm) => observe.step(n + 1, role, vm) : undefined,
  });
  const first = await run();
  const print = fingerprint(first);
  const note = print === f.fingerprint ? '' : '(this replay did not reproduce the recorded run exactly; it explains the replayed run) ';
  const record = first.dma?.records[0];
  const lost = first.mismatches[0];
  const want = o.subject ?? 'auto';
  if (record !== undefined && want !== 'lost-write') {
    const tracer = new DmaTracer(record);
    const second = await run(tracer);
    checkSame(print, second);
    return narrateDma(tracer, record, first, note);
  }
  if (lost !== undefined && want !== 'dma') {
    const tracer = new PageTracer(lost.slot, lost.gfn);
    const second = await run(tracer);
    checkSame(print, second);
    return narrateLostWrite(tracer, lost, first, note);
  }
  if (first.status === 'stuck' && first.errors[0]) {
    // A deadlock: the driver's report says, role by role, what each waits for.
    const [head, ...waits] = first.errors[0].split('\n');
    const at = Number(/at step (\d+)/.exec(head ?? '')?.[1] ?? first.steps ?? 0);
    const steps = waits.map((l) => l.trim()).filter(Boolean).map((l) => {
      const [actor, ...rest] = l.split(' ');
      return { step: at, actor: actor!, text: `${actor} ${rest.join(' ')}` };
    });
    return { subject: f.failure.summary, steps, conclusion: `${note}no role can make progress at step ${at}: each waits for another (${head})` };
  }
  const ended = { passed: 'passed', failed: 'failed', stuck: 'got stuck', crashed: 'crashed' }[first.status];
  const what = first.status === 'passed' ? 'the replay passed: nothing to explain'
    : `no ${want === 'dma' ? 'DMA record' : want === 'lost-write' ? 'lost page' : 'lost page or DMA record'} to explain: the run ${ended}${first.reason ? ` (${first.reason})` : ''}${first.errors[0] ? `: ${first.errors[0].split('\n')[0]}` : ''}`;
  return { subject: f.failure.summary, steps: [], conclusion: note + what };
}

function checkSame(print: string, r: MigrationRunResult): void {
  if (fingerprint(r) !== print) throw new Error('explain: the observed replay diverged from the first replay (an observer changed the run?)');
}

/** The explanation as lines for a terminal. */
export function describeExplanation(e: Explanation): string[] {
  const width = Math.max(0, ...e.steps.map((s) => String(s.step).length));
  const actor = Math.max(0, ...e.steps.map((s) => s.actor.length));
  return [
    `explaining: ${e.subject}`,
    ...e.steps.map((s) => `  step ${String(s.step).padStart(width)}  ${s.actor.padEnd(actor)}  ${s.text}`),
    `conclusion: ${e.conclusion}`,
  ];
}
