import { afterEach, vi } from 'vitest';
import { main } from '../src/cli/main.ts';

/** Runs the CLI in-process and captures what it prints (console and stderr). */
export async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  vi.spyOn(console, 'log').mockImplementation((...a: unknown[]) => { out.push(a.join(' ')); });
  vi.spyOn(console, 'error').mockImplementation((...a: unknown[]) => { err.push(a.join(' ')); });
  const stderrWrite = vi.spyOn(process.stderr, 'write').mockImplementation((s: string | Uint8Array) => { err.push(String(s)); return true; });
  try {
    const code = await main(args);
    return { code, out: out.join('\n'), err: err.join('') };
  } finally {
    stderrWrite.mockRestore();
  }
}

afterEach(() => { vi.restoreAllMocks(); });
