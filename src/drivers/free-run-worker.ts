import { ActorWord, type InjectedFault, actOnFault, type RoleWorkerData, type RunControl, actorBase } from './actor-words.ts';
import { type Role, Step } from '../roles/role.ts';

/** Builds a worker's role from its data; events it reports go to the VMM thread. */
export type RoleFactory<Spec = unknown> = (data: RoleWorkerData<Spec>, report: (event: unknown) => void) => Role;

/**
 * Worker side of the free-run driver: build the role (with the factory the worker entry
 * hands over: the driver knows no scenarios), loop its steps, park when blocked.
 */
export function runRoleWorker<Spec>(data: RoleWorkerData<Spec>, control: RunControl, build: RoleFactory<Spec>): void {
  const role = build(data, (event) => { void control.event(data.actor, event); });
  void control.ready(data.actor);
  const actors = new Int32Array(data.actors);
  // Wait until every role's thread is up (the driver starts them together), or shutdown.
  while (Atomics.load(actors, ActorWord.START) === 0 && Atomics.load(actors, ActorWord.SHUTDOWN) === 0) Atomics.wait(actors, ActorWord.START, 0, 1);
  runFreeLoop(role, actors, data.actor, data.burst, data.fault);
  void control.done(data.actor, role.progress);
}

/** How long a blocked role re-checks before it parks. */
const SPIN_MS = 0.05;

export function runFreeLoop(role: Role, actors: Int32Array, actor: number, burst: number, fault?: InjectedFault): void {
  const base = actorBase(actor);
  const idle = new Int32Array(new SharedArrayBuffer(4));
  let spins = 0;
  let spinStart = 0;
  let steps = 0;
  for (;;) {
    if (Atomics.load(actors, ActorWord.SHUTDOWN) !== 0) return;
    if (role.stepCode !== undefined) Atomics.store(actors, base + ActorWord.STEP, role.stepCode);
    if (fault !== undefined && steps === fault.afterSteps) actOnFault(role.name, fault);
    const s = role.runBurst ? role.runBurst(burst) : role.step();
    Atomics.store(actors, base + ActorWord.HEARTBEAT, ++steps);
    if (s === Step.PROGRESS) {
      Atomics.store(actors, base + ActorWord.PROGRESS, role.progress);
      // What it waited for is over: a stale wait would mislead the watchdog's report.
      if (spins !== 0) Atomics.store(actors, base + ActorWord.WAIT_CODE, 0);
      spins = 0;
      continue;
    }
    if (s === Step.DONE) {
      Atomics.store(actors, base + ActorWord.PROGRESS, role.progress);
      Atomics.store(actors, base + ActorWord.STATUS, 1);
      return;
    }
    const w = role.wait;
    Atomics.store(actors, base + ActorWord.WAIT_CODE, w.code);
    Atomics.store(actors, base + ActorWord.WAIT_ARG, w.arg);
    Atomics.store(actors, base + ActorWord.WAIT_ARG2, w.arg2);
    // Spin a little before parking: a futex wake-up tends to pull the woken thread onto
    // the waker's core (wake-affine), which serialises a producer and its consumer.
    if (spins++ === 0) spinStart = performance.now();
    if (spins < 32 || performance.now() - spinStart < SPIN_MS) continue;
    // Park on the word the role waits for (woken by its writer), re-checking every 1 ms;
    // roles that wait on a condition with no single word sleep 0.2 ms.
    if (w.park) Atomics.wait(w.park.array, w.park.index, w.park.value, 1);
    else Atomics.wait(idle, 0, 0, 0.2);
  }
}
