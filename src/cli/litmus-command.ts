import { formatLitmusOutcome, loadLitmus, runLitmus } from '../litmus/index.ts';
import type { LitmusOutcome } from '../litmus/index.ts';

/** Runs litmus files; exit 0 when every expectation held, 1 when one did not. */
export async function litmusCommand(files: string[], json: boolean, bugs: string[] = []): Promise<number> {
  const specs = files.map((f) => loadLitmus(f)); // all bad files are reported before anything runs
  const outcomes: LitmusOutcome[] = specs.map((s) => runLitmus(s, { bugs }));
  if (json) {
    console.log(JSON.stringify(outcomes, null, 2));
  } else {
    for (const o of outcomes) console.log(formatLitmusOutcome(o));
    const failed = outcomes.filter((o) => !o.passed).length;
    console.log(`${outcomes.length - failed} passed, ${failed} failed`);
  }
  return outcomes.every((o) => o.passed) ? 0 : 1;
}
