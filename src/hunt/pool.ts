import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import type { HuntRun, HuntTask } from './hunt-run.ts';

/**
 * The hunt's worker pool (piscina): one run per task, one task per worker at a time.
 * Built code runs the compiled task entry; sources load the `.ts` entry through a tiny
 * `.mjs` bootstrap and tsx, as src/drivers/spawn.ts does for role workers (worker threads do not inherit the tsx loader from the main thread's `--import`).
 */
export class HuntPool {
  private readonly pool: Piscina<HuntTask, HuntRun>;

  constructor(readonly workers: number = availableParallelism()) {
    const here = import.meta.url;
    const fromSources = new URL(here).pathname.endsWith('.ts'); // a loader may add a query to the URL
    this.pool = new Piscina<HuntTask, HuntRun>({
      filename: fromSources ? new URL('../../workers/ts-task-bootstrap.mjs', here).href : new URL('../../workers/hunt-task.js', here).href,
      workerData: fromSources ? { taskEntry: new URL('../../workers/hunt-task.ts', here).href } : undefined,
      minThreads: workers, maxThreads: workers, concurrentTasksPerWorker: 1,
      // Runs under free-run start their own role workers and wait for their messages: keep each worker's event loop running.
      atomics: 'disabled',
    });
  }

  run(task: HuntTask, signal?: AbortSignal): Promise<HuntRun> {
    return this.pool.run(task, { signal });
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}
