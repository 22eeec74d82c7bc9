import { DEFAULT_WORKLOAD, parseWorkloadName } from '../guest/workload.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import { hasHostWrites } from '../oracles/sweep-pattern.ts';
import { serveDestination } from '../migration/tcp.ts';
import { type DestinationRun, defaultResumeOps, resumeDestination } from '../scenarios/resume.ts';
import { UserError } from '../util/errors.ts';
import { fraction, int, positive } from './flags.ts';
import { MIGRATE_DEFAULTS, describeDestination } from './migrate-command.ts';

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

export interface DestinationFlags {
  listen: string; allowRemote?: boolean; json?: boolean;
  /** Resume the guest after completion; the guest options must match the source's. */
  resume?: boolean; vcpus?: string; workload?: string; hotFraction?: string; hotShare?: string; writePercent?: string;
  seed?: string; resumeOps?: string; watchdog?: string; burst?: string;
}

const GUEST_FLAGS: [keyof DestinationFlags, string][] = [
  ['vcpus', '--vcpus'], ['workload', '--workload'], ['hotFraction', '--hot-fraction'], ['hotShare', '--hot-share'],
  ['writePercent', '--write-percent'], ['seed', '--seed'], ['resumeOps', '--resume-ops'], ['watchdog', '--watchdog'], ['burst', '--burst'],
];

/**
 * `vmemlab destination --listen HOST:PORT`: receives one migration, then exits; with
 * `--resume` it first runs the guest on the migrated memory (as a QEMU destination
 * started without -S), stops it and checks it. Like QEMU's destination, it must be
 * started with the source's vCPUs and guest.
 */
export async function destinationCommand(f: DestinationFlags): Promise<number> {
  const json = f.json === true;
  const { host, port } = parseEndpoint('--listen', f.listen, f.allowRemote === true);
  const given = GUEST_FLAGS.find(([k]) => f[k] !== undefined);
  if (!f.resume && given) throw new UserError(`${given[1]}: only with --resume (it describes the guest the destination resumes)`);
  const d = MIGRATE_DEFAULTS;
  const vcpus = int('--vcpus', f.vcpus ?? d.vcpus, 1, 64);
  const workload = {
    ...DEFAULT_WORKLOAD, name: parseWorkloadName(f.workload ?? d.workload, '--workload'),
    hotFraction: fraction('--hot-fraction', f.hotFraction ?? d.hotFraction), hotShare: fraction('--hot-share', f.hotShare ?? d.hotShare),
    writePercent: int('--write-percent', f.writePercent ?? d.writePercent, 0, 100),
  };
  const seed = int('--seed', f.seed ?? d.seed, 0, 0xffffffff);
  const resumeOps = f.resumeOps !== undefined ? int('--resume-ops', f.resumeOps, 0) : undefined;
  const watchdogMs = positive('--watchdog', f.watchdog ?? d.watchdog, 'seconds') * 1000;
  const burst = int('--burst', f.burst ?? d.burst, 1, 1 << 20);

  const served = await serveDestination(host, port, f.resume ? vcpus : 1);
  if (!json) console.log(`destination: listening on ${served.address.address}:${served.address.port}`);
  const r = await served.result;
  const { layout, ...summary } = r;
  let run: DestinationRun | null = null;
  if (r.status === 'completed' && f.resume && layout) {
    const pages = layout.totalPages;
    run = await resumeDestination(layout, {
      workload, seed, opsPerVcpu: resumeOps ?? defaultResumeOps(pages, vcpus), driver: 'free', watchdogMs, burst,
      // The source's host writes (if it had any) land on byte 0: then there is no pattern to check.
      sweepCheck: workload.name === 'sweep' && !hasHostWrites(new GuestMemory(layout)),
    });
  }
  const ok = r.status === 'completed' && (run === null || run.status === 'passed');
  if (json) {
    console.log(JSON.stringify({ ...summary, destination: run }, null, 2));
    return ok ? 0 : 1;
  }
  if (r.status === 'completed') console.log(`destination: migration completed: ${r.pages} pages (${r.normal} normal, ${r.zero} zero) in ${r.frames} frames`);
  else console.log(`destination: migration failed: ${r.error ?? 'the connection closed'}`);
  if (run) {
    for (const line of describeDestination(run)) console.log(`destination: ${line}`);
    console.log(run.status === 'passed' ? 'destination: PASSED: the guest resumed and ran on the migrated memory' : `destination: FAILED (${run.status})`);
  }
  return ok ? 0 : 1;
}
