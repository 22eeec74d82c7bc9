import { isIP } from 'node:net';
import { UserError } from './errors.ts';

/** A DNS host name (RFC 1123 labels). */
const HOSTNAME = /^(?=.{1,253}$)([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$/;

function isLoopback(host: string): boolean {
  if (host === 'localhost' || host === '::1') return true;
  return isIP(host) === 4 && host.startsWith('127.');
}

/**
 * Parses HOST:PORT (IPv6 in brackets): an IP address or a host name, a port from 0 to
 * 65535 (0: any free port); a non-loopback host needs `allowRemote`. Anything else is the
 * user's mistake, named with the flag.
 */
export function parseEndpoint(flag: string, text: string, allowRemote: boolean): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:[\]]+):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) throw new UserError(`${flag}: '${text}' is not HOST:PORT (e.g. 127.0.0.1:4444)`);
  const bracketed = m[1]!.startsWith('[');
  const host = m[1]!.replace(/^\[|\]$/g, '');
  const ip = isIP(host);
  if (bracketed ? ip !== 6 : ip === 6 || (ip === 0 && (!HOSTNAME.test(host) || /^[\d.]+$/.test(host)))) {
    throw new UserError(`${flag}: '${host}' is not an IP address or host name (e.g. 127.0.0.1:4444, [::1]:4444)`);
  }
  if (!allowRemote && !isLoopback(host)) {
    throw new UserError(`${flag}: '${host}' is not a loopback address; pass --allow-remote to use another network`);
  }
  return { host, port };
}
