import { type Transferable, Worker } from 'node:worker_threads';

/**
 * Starts a worker entry from `workers/`. Built code (dist/) runs the compiled `.js`
 * entry; sources (tests, development) cannot hand a `.ts` file to `new Worker`, so a
 * tiny `.mjs` bootstrap loads the `.ts` entry through tsx (worker threads do not inherit the tsx loader from the main thread's `--import`).
 */
export function spawnWorker(entry: string, workerData: unknown, transferList: Transferable[] = []): Worker {
  const here = import.meta.url;
  if (new URL(here).pathname.endsWith('.ts')) { // sources (a loader may add a query to the URL)
    const ts = new URL(`../../workers/${entry}.ts`, here).href;
    return new Worker(new URL('../../workers/ts-bootstrap.mjs', here), { workerData: { entry: ts, data: workerData }, transferList });
  }
  return new Worker(new URL(`../../workers/${entry}.js`, here), { workerData: { data: workerData }, transferList });
}
