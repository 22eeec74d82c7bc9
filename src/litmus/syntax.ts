import {
  EEXIST, EFAULT, EINVAL, EIO, ENOENT, ENOSPC, ENXIO, EOPNOTSUPP, EXIT_REASON_NAMES, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_RUN_EIO,
} from '../host/constants.ts';
import { hex } from '../util/hex.ts';

/**
 * The small lexical pieces of litmus files: numbers (decimal or 0x hex), GFN lists with
 * ranges, errno and exit-reason names. Parsers return a value or an error text (without
 * the field path, which the caller adds).
 */
export type Parsed<T> = { ok: true; value: T } | { ok: false; error: string };

const ok = <T>(value: T): Parsed<T> => ({ ok: true, value });
const bad = <T>(error: string): Parsed<T> => ({ ok: false, error });

/** A non-negative integer written as a YAML number, or as text in decimal or 0x hex. */
export function parseInteger(v: unknown): Parsed<number> {
  if (typeof v === 'number') {
    return Number.isSafeInteger(v) && v >= 0 ? ok(v) : bad(`${show(v)} is not a whole number >= 0`);
  }
  if (typeof v === 'string') {
    const t = v.trim().replace(/_/g, '');
    const n = /^0x[0-9a-f]+$/i.test(t) ? Number.parseInt(t.slice(2), 16) : /^\d+$/.test(t) ? Number(t) : NaN;
    if (Number.isSafeInteger(n)) return ok(n);
    return bad(`${show(v)} is not a number (write it in decimal or 0x hex)`);
  }
  return bad(`expected a number, got ${show(v)}`);
}

/** A list of GFNs; items are numbers or inclusive ranges written `0x100..0x10f`. */
export function parseGfnList(v: unknown): Parsed<number[]> {
  if (!Array.isArray(v)) return bad(`expected a list of GFNs, got ${show(v)}`);
  const out: number[] = [];
  for (const item of v) {
    if (typeof item === 'string' && item.includes('..')) {
      const [a, b, ...rest] = item.split('..');
      const lo = parseInteger(a);
      const hi = parseInteger(b);
      if (rest.length > 0 || !lo.ok || !hi.ok || hi.value < lo.value) {
        return bad(`${show(item)} is not a GFN range (write it like 0x100..0x10f)`);
      }
      if (hi.value - lo.value > 1 << 20) return bad(`${show(item)} is too long a range`);
      for (let g = lo.value; g <= hi.value; g++) out.push(g);
      continue;
    }
    const g = parseInteger(item);
    if (!g.ok) return bad(g.error);
    out.push(g.value);
  }
  return ok(out);
}

/** A count, or an exact ordered list of GFNs. */
export function parseGfns(v: unknown): Parsed<number | number[]> {
  if (typeof v === 'number') return parseInteger(v);
  return parseGfnList(v);
}

export const ERRNO: Record<string, number> = { ENOENT, ENXIO, EINVAL, ENOSPC, EEXIST, EFAULT, EOPNOTSUPP, EIO };

export function parseErrno(v: unknown): Parsed<number> {
  if (v === 'none' || v === null || v === false) return ok(0);
  if (typeof v === 'string' && ERRNO[v.toUpperCase()] !== undefined) return ok(ERRNO[v.toUpperCase()]!);
  if (typeof v === 'number' && Number.isSafeInteger(v) && v > 0) return ok(v);
  return bad(`unknown errno ${show(v)} (one of: none, ${Object.keys(ERRNO).join(', ')})`);
}

export function errnoText(errno: number): string {
  if (errno === 0) return 'none';
  return Object.entries(ERRNO).find(([, n]) => n === errno)?.[0] ?? `errno ${errno}`;
}

export function parseExitReason(v: unknown): Parsed<number | 'none'> {
  if (v === 'none' || v === null || v === false) return ok('none');
  if (typeof v === 'number' && EXIT_REASON_NAMES[v] !== undefined) return ok(v);
  if (typeof v === 'string') {
    const want = v.trim().toUpperCase();
    // vmemlab's mark for KVM_RUN failing with EIO (the VM is dead) goes by its constant's name too.
    if (want === 'KVM_RUN_EIO') return ok(KVM_RUN_EIO);
    for (const [n, name] of Object.entries(EXIT_REASON_NAMES)) {
      const upper = name.toUpperCase();
      if (upper === want || upper === `KVM_EXIT_${want}`) return ok(Number(n));
    }
  }
  return bad(`unknown exit reason ${show(v)} (one of: none, ${Object.values(EXIT_REASON_NAMES).join(', ')}, KVM_RUN_EIO)`);
}

export function exitText(reason: number | 'none'): string {
  if (reason === 'none') return 'none';
  return EXIT_REASON_NAMES[reason] ?? `exit ${reason}`;
}

/** kvm_dirty_gfn flags: `dirty`, `reset`, `free` (0), or a number. */
export function parseRingFlags(v: unknown): Parsed<number> {
  if (v === 'dirty') return ok(KVM_DIRTY_GFN_F_DIRTY);
  if (v === 'reset' || v === 'harvested') return ok(KVM_DIRTY_GFN_F_RESET);
  if (v === 'free') return ok(0);
  const n = parseInteger(v);
  if (n.ok && n.value <= 0xffffffff) return n;
  return bad(`${show(v)} is not ring entry flags (dirty, reset, free or a number)`);
}

export { hex };

/** A value as it would appear in a message: strings quoted, the rest as JSON. */
export function show(v: unknown): string {
  if (typeof v === 'string') return `'${v}'`;
  if (v === undefined) return 'nothing';
  try {
    const s = JSON.stringify(v);
    return s.length > 60 ? `${s.slice(0, 57)}...` : s;
  } catch {
    return String(v);
  }
}

/** A field path such as `actors.vcpu0[2].expect`. */
export function fieldPath(segments: readonly PropertyKey[]): string {
  let out = '';
  for (const s of segments) {
    if (typeof s === 'number') out += `[${s}]`;
    else out += out === '' ? String(s) : `.${String(s)}`;
  }
  return out === '' ? '(top level)' : out;
}
