import { expect } from 'vitest';
import { parseLitmus, runLitmus } from '../src/litmus/index.ts';
import { UserError } from '../src/util/errors.ts';

/** Runs a litmus file given as text (named `name` in messages), with `bugs` injected. */
export function run(source: string, name = 'inline.yaml', bugs: string[] = []) {
  return runLitmus(parseLitmus(source, name), { bugs });
}

/** The message of the UserError `fn` throws (the test fails if it throws none, or another error). */
export function userError(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(UserError);
    return (e as Error).message;
  }
  throw new Error('expected a UserError');
}
