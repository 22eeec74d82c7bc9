/** What the watchdog saw of a wedged deterministic run. */
export interface Wedged {
  /** `vcpu1 stopped stepping 10.0 s ago, inside step 201; its worker was terminated`. */
  summary: string;
  steps: number;
  seconds: number;
}

export interface WedgeWatch {
  /** Hand it to the run (`heartbeat` of runMigration, runDirtyLogTest, runRoles). */
  heartbeat: SharedArrayBuffer;
  /** Stops watching; what it saw if the run was wedged. */
  stop(): Wedged | null;
}

/** The heartbeat's word [2]: where the run is. */
const PHASE = 2;
const enum HeartbeatPhase { QUEUED = 0, STARTED = 1, OVER = 2 }

/** The run's side: it started stepping (a queued run is not a wedged one). */
export function heartbeatStarted(heartbeat: SharedArrayBuffer): void {
  Atomics.store(new Int32Array(heartbeat), PHASE, HeartbeatPhase.STARTED);
}

/** The run's side: stepping is over (what follows, the memory comparison, takes no steps and is not a wedge). */
export function heartbeatStopped(heartbeat: SharedArrayBuffer): void {
  Atomics.store(new Int32Array(heartbeat), PHASE, HeartbeatPhase.OVER);
}

/**
 * The watchdog of a deterministic run stepping on another thread. The driver publishes its
 * steps and the role stepping (DeterministicDriver.heartbeat: [0] steps, [1] the role, [2]
 * 0 queued, 1 started, 2 stepping over); a run whose steps stop for `watchdogMs` once it
 * started is wedged inside that role's step, and `onWedged` ends it (terminates its thread).
 * The driver steps one role at a time, so every other role waits for the wedged one.
 */
export function watchWedged(names: readonly string[], watchdogMs: number, onWedged: () => void): WedgeWatch {
  const heartbeat = new SharedArrayBuffer(12);
  const hb = new Int32Array(heartbeat);
  let last = -1;
  let since = 0;
  let startedAt = 0;
  let wedged: Wedged | null = null;
  const timer = setInterval(() => {
    const phase = Atomics.load(hb, PHASE);
    if (phase === HeartbeatPhase.QUEUED) return;
    if (phase === HeartbeatPhase.OVER) { clearInterval(timer); return; } // the rest of the run takes no steps
    const now = Date.now();
    if (startedAt === 0) startedAt = now;
    const steps = Atomics.load(hb, 0);
    if (steps !== last) { last = steps; since = now; return; }
    // Before its first step a run builds its VM: give it the startup time free-run gives a worker.
    if (now - since < (steps === 0 ? Math.max(watchdogMs, 30_000) : watchdogMs)) return;
    const role = names[Atomics.load(hb, 1)] ?? `role ${Atomics.load(hb, 1)}`;
    wedged = { summary: `${role} stopped stepping ${((now - since) / 1000).toFixed(1)} s ago, inside step ${steps + 1}; its worker was terminated`, steps, seconds: (now - startedAt) / 1000 };
    clearInterval(timer);
    onWedged();
  }, Math.min(250, Math.max(20, watchdogMs / 4)));
  timer.unref();
  return { heartbeat, stop: () => { clearInterval(timer); return wedged; } };
}
