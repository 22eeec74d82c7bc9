import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { UserError } from './errors.ts';
import { LIMITS, type LimitName } from './limits.ts';
import { parse } from 'yaml';

/**
 * Reads a file the user named, bounded: only a regular file (not /dev/zero, a FIFO or a
 * directory), at most the limit's bytes (read to one byte past it, so a file that grows
 * while it is read is caught too). Every failure is one line naming the file.
 */
export function readUserFile(path: string, what: string, limit: LimitName): Buffer {
  const max = LIMITS[limit].max;
  let fd: number;
  try { fd = openSync(path, 'r'); } catch (e) { throw new UserError(`${path}: cannot read the ${what} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`); }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new UserError(`${path}: not a regular file (${st.isDirectory() ? 'a directory' : 'a device, FIFO or socket'}); the ${what} must be one`);
    if (st.size > max) throw new UserError(`${path}: ${st.size} bytes; ${LIMITS[limit].what} is at most ${max} bytes (${LIMITS[limit].why})`);
    // Sized by the file (a 2 KB replay does not zero 256 MiB), grown only if it grows while read.
    let buf = Buffer.allocUnsafe(st.size + 1);
    let n = 0;
    for (;;) {
      if (n === buf.length) buf = Buffer.concat([buf, Buffer.allocUnsafe(Math.min(buf.length, max + 1 - n))]);
      const got = readSync(fd, buf, n, buf.length - n, null);
      if (got === 0) break;
      n += got;
      if (n > max) throw new UserError(`${path}: more than ${max} bytes; ${LIMITS[limit].what} is at most that`);
    }
    return buf.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

/** Keys that would reach an object's prototype if code ever copied them onto one. */
const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);

/**
 * Refuses prototype-polluting keys anywhere in a parsed document (`__proto__` under a
 * device would be silently dropped or, worse, kept); `where` names the document.
 */
export function checkKeys(doc: unknown, where: string, path: string[] = []): void {
  if (doc === null || typeof doc !== 'object' || ArrayBuffer.isView(doc)) return; // bytes (a replay's schedule) have no keys to check
  for (const key of Object.keys(doc)) {
    if (FORBIDDEN_KEYS.has(key)) throw new UserError(`${where}: ${[...path, key].join('.')}: '${key}' is not a field (a key that names an object's prototype is refused)`);
    checkKeys((doc as Record<string, unknown>)[key], where, [...path, key]);
  }
}

/** YAML text to plain data with the alias limit; a parse error is one line naming `where`. */
export function parseYaml(text: string, where: string): unknown {
  let doc: unknown;
  try {
    doc = parse(text, { maxAliasCount: LIMITS.yamlAliases.max, uniqueKeys: true, logLevel: 'error' });
  } catch (e) {
    const m = (e as Error).message.split('\n')[0]!;
    if (/alias/i.test(m)) throw new UserError(`${where}: more than ${LIMITS.yamlAliases.max} YAML alias expansions (${LIMITS.yamlAliases.why})`);
    throw new UserError(`${where}: not valid YAML: ${m}`);
  }
  checkKeys(doc, where);
  return doc;
}
