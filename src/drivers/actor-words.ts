import { LINE_WORDS } from '../host/cache-line.ts';
import type { VmLayout } from '../host/layout.ts';

/**
 * What the free-run driver (free-run.ts, on the VMM thread) and its workers
 * (free-run-worker.ts) share: per-actor words the watchdog and progress display read, one
 * line per actor; and RunControl, what a worker calls on the VMM thread through comlink.
 *
 * PROGRESS: the role's progress count; WAIT_*: what its last blocked step waited for;
 * STATUS: 1 when finished; HEARTBEAT: bumped after every step, blocked ones too (an actor
 * whose heartbeat stops is stuck inside a step: wedged); STEP: the role's stepCode as its
 * current step began. Line 0: SHUTDOWN and START.
 */
export const ActorWord = { PROGRESS: 0, WAIT_CODE: 1, WAIT_ARG: 2, WAIT_ARG2: 3, STATUS: 4, HEARTBEAT: 5, STEP: 6, SHUTDOWN: 0, START: 1 } as const;

/** Tests only: a fault to inject into one role's thread after some steps: it throws, or loops for ever inside a step. */
export interface InjectedFault { afterSteps: number; kind: 'crash' | 'wedge' }

/** Tests only: what an injected fault does when its step comes, under either driver: throw, or never return. */
export function actOnFault(role: string, fault: InjectedFault): never {
  if (fault.kind === 'crash') throw new Error(`injected crash in ${role} after ${fault.afterSteps} steps`);
  for (;;) { /* an injected wedge: a step that never returns */ }
}
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
  /** Tests only: a crash or a wedge after some steps, to check that the run fails cleanly and says which. */
  fault?: InjectedFault;
}

/**
 * The control plane from a worker to the VMM thread (comlink: the VMM thread exposes
 * it, each worker calls it). A worker's calls are posted at once and never awaited: a
 * role's thread spins in its loop and would not service the replies. What must reach a
 * running worker (shutdown, stop, throttle, dirty limits) goes through shared words
 * instead, which it reads at its step boundaries; per-page and per-write traffic always
 * stays in shared memory.
 */
export interface RunControl {
  /** The worker built its role and waits for the start word. */
  ready(actor: number): void;
  /** Something the role reports (a migration pass, an IOMMU error, a collector iteration). */
  event(actor: number, event: unknown): void;
  /** The role finished; `progress` is its last progress count. */
  done(actor: number, progress: number): void;
}
