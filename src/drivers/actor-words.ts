import { LINE_WORDS } from '../host/cache-line.ts';
import type { VmLayout } from '../host/layout.ts';

/**
 * What the free-run driver (free-run.ts, on the VMM thread) and its workers
 * (free-run-worker.ts) share: per-actor words the watchdog and progress display read, one
 * line per actor, and the messages a worker posts.
 */
export const ActorWord = { PROGRESS: 0, WAIT_CODE: 1, WAIT_ARG: 2, WAIT_ARG2: 3, STATUS: 4, SHUTDOWN: 0, START: 1 } as const;
export function actorBase(actor: number): number {
  return (actor + 1) * LINE_WORDS; // line 0 holds SHUTDOWN
}

export interface RoleWorkerData<Spec = unknown> {
  layout: VmLayout;
  bugs: string[];
  /** What the role factory the worker entry hands over (runRoleWorker's `build`) builds. */
  spec: Spec;
  actors: SharedArrayBuffer;
  actor: number;
  /** Guest operations per vCPU burst between step boundaries. */
  burst: number;
  /** Tests only: throw after this many steps, to check that a crash fails the run cleanly. */
  crashAfterSteps?: number;
}

export type WorkerMessage =
  | { type: 'ready' }
  | { type: 'event'; event: unknown }
  | { type: 'done' };
