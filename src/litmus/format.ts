import type { LitmusOutcome } from './run.ts';

export interface LitmusFormatOptions {
  /** Include the trace: 'failed' (default) only for failed tests, 'always', or 'never'. */
  log?: 'failed' | 'always' | 'never';
}

/** A litmus outcome as text: a PASS/FAIL line, the failures, and the trace. */
export function formatLitmusOutcome(o: LitmusOutcome, options: LitmusFormatOptions = {}): string {
  const lines = [`${o.passed ? 'PASS' : 'FAIL'} ${o.file}: ${o.name}`];
  for (const f of o.failures) lines.push(`  ${f}`);
  const log = options.log ?? 'failed';
  if (log === 'always' || (log === 'failed' && !o.passed)) {
    lines.push('  trace:');
    for (const l of o.log) lines.push(`    ${l}`);
  }
  return lines.join('\n');
}
