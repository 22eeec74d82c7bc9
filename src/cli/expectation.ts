import { type Outcome, describeOutcome, meetsExpectation } from '../scenarios/outcome.ts';

/** A scenario file's `expect:` and where it came from. */
export interface Expected {
  file: string;
  outcome: Outcome;
}

export interface ExpectationCheck {
  expected: string;
  outcome: string;
  met: boolean;
  /** The line `vmemlab run` prints after the verdict. */
  line: string;
}

export function checkExpectation(e: Expected, o: Outcome): ExpectationCheck {
  const met = meetsExpectation(o, e.outcome);
  const expected = describeOutcome(e.outcome);
  const outcome = describeOutcome(o);
  const line = met
    ? `as ${e.file} expects: ${expected}`
    : `NOT as ${e.file} expects: it expects ${expected}, the run ended ${outcome}`;
  return { expected, outcome, met, line };
}
