import { UserError } from './errors.ts';

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|localhost|::1|\[::1\])$/;

/** Parses HOST:PORT (IPv6 in brackets); a non-loopback host needs `allowRemote`. */
export function parseEndpoint(flag: string, text: string, allowRemote: boolean): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) throw new UserError(`${flag}: '${text}' is not HOST:PORT (e.g. 127.0.0.1:4444)`);
  const host = m[1]!.replace(/^\[|\]$/g, '');
  if (!allowRemote && !LOOPBACK.test(m[1]!)) {
    throw new UserError(`${flag}: '${host}' is not a loopback address; pass --allow-remote to use another network`);
  }
  return { host, port };
}
