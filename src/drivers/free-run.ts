import type { Transferable, Worker } from 'node:worker_threads';
import { LINE_WORDS } from '../host/cache-line.ts';
import * as Comlink from 'comlink';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import { ActorWord, type RoleWorkerData, type RunControl, actorBase } from './actor-words.ts';
import { describeStep, describeWait } from './describe-wait.ts';
import { spawnWorker } from './spawn.ts';

/** Worker threads get this long to start before the watchdog gives up on them. */
const STARTUP_MS = 30_000;



export interface FreeRunActor {
  name: string;
  data: Omit<RoleWorkerData, 'actors' | 'actor'>;
  /** The run ends when this actor finishes. */
  primary?: boolean;
  /** Objects to transfer to the worker with its data (MessagePorts). */
  transfer?: Transferable[];
}

export type FreeRunOutcome =
  | { status: 'done' }
  | { status: 'watchdog'; report: string }
  | { status: 'crashed'; role: string; message: string }
  | { status: 'cancelled' };

export interface FreeRunOptions {
  /** Stop when no actor progresses for this long. */
  watchdogMs: number;
  onEvent: (actor: string, event: unknown) => void;
  /** Aborting it ends the run at once: every thread is terminated. */
  cancel?: AbortSignal;
  /** Called every poll with the actors' progress counters (for progress display). */
  onTick?: (progress: number[]) => void;
}

/**
 * The free-run driver: one worker thread per role, real parallelism. A watchdog polls
 * every actor's words with two rules: an actor whose heartbeat (bumped after every step,
 * blocked ones too) stops for `watchdogMs` is wedged inside a step: the report names it
 * and where it is, and its thread is terminated with the others; and if no actor's
 * progress moves for `watchdogMs`, the run is stuck: the report says who waits for what.
 * A worker that throws or exits ends the run with its role and message.
 */
export async function runFreeRun(actors: FreeRunActor[], opts: FreeRunOptions): Promise<FreeRunOutcome> {
  const shared = new SharedArrayBuffer((actors.length + 1) * LINE_WORDS * 4);
  const words = new Int32Array(shared);
  const workers: Worker[] = [];
  const names = actors.map((a) => a.name);
  const online = actors.map(() => false);
  let lastChange = Date.now();
  let settled = false;
  /** An exception of the VMM thread's own while it handled a worker's call: vmemlab's fault, thrown once the workers are gone. */
  let thrown: { error: unknown } | null = null;

  const outcome = await new Promise<FreeRunOutcome>((resolve) => {
    let timer: NodeJS.Timeout | undefined;
    const finish = (outcome: FreeRunOutcome): void => {
      if (settled) return;
      settled = true;
      if (timer) clearInterval(timer);
      opts.cancel?.removeEventListener('abort', onCancel); // a signal reused for the next run does not keep this one's workers
      Atomics.store(words, ActorWord.SHUTDOWN, 1);
      void Promise.all(workers.map((w) => w.terminate())).then(() => resolve(outcome));
    };

    const onCancel = (): void => finish({ status: 'cancelled' });
    if (opts.cancel?.aborted) { finish({ status: 'cancelled' }); return; }
    opts.cancel?.addEventListener('abort', onCancel, { once: true });
    // The control plane each worker calls (comlink); the data plane is shared memory.
    const control: RunControl = {
      ready(actor) {
        online[actor] = true;
        if (online.every(Boolean)) {
          // Every role starts together: a migration must not finish before a device's thread is up.
          lastChange = Date.now(); // the watchdog's clock starts now
          // No notify: a futex wake-up pulls the woken threads onto this thread's core
          // (wake-affine), and threads that start together on one core stay together
          // for a while. The workers poll the word instead (every 1 ms).
          Atomics.store(words, ActorWord.START, 1);
        }
      },
      event(actor, event) {
        // Thrown here it would go back to the worker as a rejected call nobody awaits: lost.
        try { opts.onEvent(actors[actor]!.name, event); } catch (error) {
          thrown = { error };
          finish({ status: 'crashed', role: actors[actor]!.name, message: `the VMM thread failed on its event: ${(error as Error).message}` });
        }
      },
      done(actor) { if (actors[actor]!.primary) finish({ status: 'done' }); },
    };
    actors.forEach((a, i) => {
      const w = spawnWorker('role', { ...a.data, actors: shared, actor: i } satisfies RoleWorkerData, a.transfer);
      workers.push(w);
      Comlink.expose(control, nodeEndpoint(w));
      w.on('error', (err: Error) => finish({ status: 'crashed', role: a.name, message: err.message }));
      w.on('exit', (code) => {
        if (!settled && code !== 0) finish({ status: 'crashed', role: a.name, message: `worker exited with code ${code}` });
      });
    });

    let last = -1;
    const started = Date.now();
    const beats = actors.map(() => ({ value: -1, since: 0 }));
    const waits = (skip: number): string[] => actors.flatMap((a, i) => {
      if (i === skip) return [];
      const b = actorBase(i);
      if (Atomics.load(words, b + ActorWord.STATUS) === 1) return [`  ${a.name} has finished`];
      return [`  ${a.name} ${describeWait(Atomics.load(words, b + ActorWord.WAIT_CODE), Atomics.load(words, b + ActorWord.WAIT_ARG), Atomics.load(words, b + ActorWord.WAIT_ARG2), names)}`];
    });
    timer = setInterval(() => {
      const progress = actors.map((_, i) => Atomics.load(words, actorBase(i) + ActorWord.PROGRESS));
      opts.onTick?.(progress);
      const sum = progress.reduce((x, y) => x + y, 0);
      const now = Date.now();
      if (!online.every(Boolean)) {
        if (now - started < STARTUP_MS) return;
        const late = actors.filter((_, i) => !online[i]).map((a) => a.name);
        finish({ status: 'watchdog', report: `watchdog: ${late.join(', ')} did not start within ${STARTUP_MS / 1000} s` });
        return;
      }
      for (let i = 0; i < actors.length; i++) {
        const b = actorBase(i);
        if (Atomics.load(words, b + ActorWord.STATUS) === 1) continue;
        const hb = Atomics.load(words, b + ActorWord.HEARTBEAT);
        const beat = beats[i]!;
        if (hb !== beat.value) { beat.value = hb; beat.since = now; continue; }
        if (now - beat.since < opts.watchdogMs) continue;
        const where = describeStep(actors[i]!.name, Atomics.load(words, b + ActorWord.STEP));
        finish({
          status: 'watchdog',
          report: `watchdog: ${actors[i]!.name} stopped stepping ${((now - beat.since) / 1000).toFixed(1)} s ago, ${where}: its thread no longer answers and is terminated\n${waits(i).join('\n')}`,
        });
        return;
      }
      if (sum !== last) { last = sum; lastChange = now; return; }
      if (now - lastChange < opts.watchdogMs) return;
      finish({ status: 'watchdog', report: `watchdog: no actor made progress for ${(opts.watchdogMs / 1000).toFixed(1)} s\n${waits(-1).join('\n')}` });
    }, Math.min(250, Math.max(20, opts.watchdogMs / 4)));
  });
  if (thrown) throw (thrown as { error: unknown }).error;
  return outcome;
}
