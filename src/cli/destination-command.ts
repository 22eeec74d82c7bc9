import { serveDestination } from '../migration/tcp.ts';
import { UserError } from '../util/errors.ts';

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

/** `vmemlab destination --listen HOST:PORT`: receives one migration, then exits. */
export async function destinationCommand(listen: string, allowRemote: boolean, json: boolean): Promise<number> {
  const { host, port } = parseEndpoint('--listen', listen, allowRemote);
  const served = await serveDestination(host, port);
  if (!json) console.log(`destination: listening on ${served.address.address}:${served.address.port}`);
  const r = await served.result;
  if (json) console.log(JSON.stringify(r, null, 2));
  else if (r.status === 'completed') console.log(`destination: migration completed: ${r.pages} pages (${r.normal} normal, ${r.zero} zero) in ${r.frames} frames`);
  else console.log(`destination: migration failed: ${r.error ?? 'the connection closed'}`);
  return r.status === 'completed' ? 0 : 1;
}
