import { type CatalogEntry, type TrackingMode, findBug } from '../bugs/catalog.ts';
import { PAGE_SIZE } from '../host/constants.ts';
import { checkRingSize } from '../host/dirty-ring.ts';
import { UserError } from '../util/errors.ts';
import { parseSize } from '../util/size.ts';

/** Flag parsers shared by the commands; every mistake names the flag and the value. */
export const MODES: readonly TrackingMode[] = ['dirty-log', 'clear-log', 'dirty-ring'];

export function int(flag: string, text: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const n = Number(text);
  if (!/^\s*\d+\s*$/.test(text) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UserError(`${flag}: '${text}' is not a whole number from ${min} to ${max}`);
  }
  return n;
}

export function fraction(flag: string, text: string): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isFinite(n) || n <= 0 || n > 1) throw new UserError(`${flag}: '${text}' is not a fraction in (0, 1]`);
  return n;
}

export function positive(flag: string, text: string, unit: string): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isFinite(n) || n <= 0) throw new UserError(`${flag}: '${text}' is not a positive number of ${unit}`);
  return n;
}

/** The most pages per second a dirty limit may name: more than any vCPU here can dirty. */
export const MAX_DIRTY_RATE = 10_000_000;
/** The most guest operations per second an operation rate may name: more than a vCPU here retires. */
export const MAX_OP_RATE = 100_000_000;

/**
 * A dirty page rate: pages per second (`1000`), or a size per second as QEMU writes its
 * dirty limits (`1MB/s`, `4MiB/s`; MB is 2^20 bytes, as in QEMU's dirtylimit). Returns
 * 4 KiB pages per second, at least 1.
 */
export function dirtyRate(flag: string, text: string | number): number {
  const t = String(text).trim();
  const sized = /^(.*\S)\s*\/\s*s$/i.exec(t);
  let pages: number;
  if (sized) {
    const bytes = Number.isFinite(Number(sized[1])) ? NaN : parseSizeOr(sized[1]!);
    pages = bytes / PAGE_SIZE;
  } else pages = t === '' ? NaN : Number(t);
  if (!Number.isFinite(pages) || pages < 1 || pages > MAX_DIRTY_RATE) {
    throw new UserError(`${flag}: '${text}' is not a dirty page rate from 1 to ${MAX_DIRTY_RATE} pages per second (write pages per second, or a size per second like 1MB/s)`);
  }
  return Math.round(pages);
}

function parseSizeOr(text: string): number {
  try { return parseSize(text, ''); } catch { return NaN; }
}

export function memory(flag: string, text: string): number {
  const bytes = parseSize(text, flag);
  if (bytes % PAGE_SIZE !== 0 || bytes === 0) throw new UserError(`${flag}: '${text}' is not a whole, non-zero number of 4 KiB pages`);
  return bytes;
}

export function ringSize(flag: string, text: string): number {
  const n = int(flag, text, 1);
  const err = checkRingSize(n);
  if (err) throw new UserError(`${flag}: ${err}`);
  return n;
}

/** The injected bugs and the tracking mode: the mode defaults to the first bug's. */
export function bugsAndMode(command: 'dirty-log-test' | 'migrate', inject: string[], modeFlag: string, mode: string | undefined): { bugs: CatalogEntry[]; mode: TrackingMode } {
  const bugs = inject.map((name) => findBug(name, '--inject'));
  for (const b of bugs) {
    if (!b.commands.includes(command)) throw new UserError(`--inject ${b.name}: this bug shows in ${b.commands.map((c) => `'vmemlab ${c}'`).join(' and ')}, not in 'vmemlab ${command}'`);
  }
  let m: TrackingMode;
  if (mode !== undefined) {
    if (!(MODES as readonly string[]).includes(mode)) throw new UserError(`${modeFlag}: unknown mode '${mode}' (one of: ${MODES.join(', ')})`);
    m = mode as TrackingMode;
  } else {
    m = bugs[0]?.modes[0] ?? 'dirty-ring';
  }
  for (const b of bugs) {
    if (!b.modes.includes(m)) throw new UserError(`--inject ${b.name}: this bug does not occur with ${modeFlag} ${m} (it needs ${b.modes.join(' or ')})`);
  }
  return { bugs, mode: m };
}
