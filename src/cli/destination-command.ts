import { DEFAULT_WORKLOAD } from '../guest/workload.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import { hasHostWrites } from '../oracles/sweep-pattern.ts';
import { DESTINATION_IDLE_S, serveDestination } from '../migration/tcp.ts';
import { type DestinationRun, defaultResumeOps, resumeDestination } from '../scenarios/resume.ts';
import { type SettingKey, parsePositive } from '../scenarios/options.ts';
import { flagLayer, resolve } from '../scenarios/settings.ts';
import { UserError } from '../util/errors.ts';
import { LIMITS } from '../util/limits.ts';
import { describeDestination } from './migrate-command.ts';
import { parseEndpoint } from '../util/endpoint.ts';

export interface DestinationFlags {
  listen: string; allowRemote?: boolean; json?: boolean;
  /** Resume the guest after completion; the guest options must match the source's. */
  resume?: boolean; vcpus?: string; workload?: string; hotFraction?: string; hotShare?: string; writePercent?: string;
  seed?: string; resumeOps?: string; watchdog?: string; burst?: string; idleTimeout?: string;
}

/** The guest options --resume takes: commander key, and the scenario setting it is (options.ts). */
const GUEST_FLAGS: [keyof DestinationFlags, SettingKey][] = [
  ['vcpus', 'vcpus'], ['workload', 'workload'], ['hotFraction', 'hotFraction'], ['hotShare', 'hotShare'],
  ['writePercent', 'writePercent'], ['seed', 'seed'], ['resumeOps', 'resumeOps'], ['watchdog', 'watchdogMs'], ['burst', 'burst'],
];

/** The guest a destination resumes by default: a migration's (the source's defaults). */
export const DESTINATION_DEFAULTS = resolve('migrate', []).s;

/**
 * `vmemlab destination --listen HOST:PORT`: receives one migration, then exits; with
 * `--resume` it first runs the guest on the migrated memory (as a QEMU destination
 * started without -S), stops it and checks it. Like QEMU's destination, it must be
 * started with the source's vCPUs and guest.
 */
export async function destinationCommand(f: DestinationFlags): Promise<number> {
  const json = f.json === true;
  const { host, port } = parseEndpoint('--listen', f.listen, f.allowRemote === true);
  const typed = GUEST_FLAGS.filter(([k]) => f[k] !== undefined);
  if (!f.resume && typed.length > 0) throw new UserError(`--${typed[0]![0].replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}: only with --resume (it describes the guest the destination resumes)`);
  const { s } = resolve('migrate', [flagLayer('migrate', Object.fromEntries(typed.map(([k, key]) => [key, f[k]])))]);
  const vcpus = s.vcpus;
  const workload = { ...DEFAULT_WORKLOAD, name: s.workload, hotFraction: s.hotFraction, hotShare: s.hotShare, writePercent: s.writePercent };
  const { seed, resumeOps, watchdogMs, burst } = s;

  const idleS = f.idleTimeout === undefined ? DESTINATION_IDLE_S : parsePositive(f.idleTimeout, '--idle-timeout', 'seconds');
  if (idleS > LIMITS.idleTimeoutS.max) throw new UserError(`--idle-timeout: '${f.idleTimeout}' is more than ${LIMITS.idleTimeoutS.max} seconds (${LIMITS.idleTimeoutS.why})`);
  const served = await serveDestination(host, port, { vcpus: f.resume ? vcpus : 1, idleMs: idleS * 1000 }).catch((e: NodeJS.ErrnoException) => {
    // The address is taken or not ours to bind: the user's to change, not a fault of vmemlab's.
    if (e.code === 'EADDRINUSE' || e.code === 'EACCES' || e.code === 'EADDRNOTAVAIL') throw new UserError(`--listen: ${f.listen}: cannot listen there (${e.code})`);
    throw e;
  });
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
