// One deterministic run of a command on its own thread, watched from the main thread. All logic lives in src/.
import { parentPort, workerData } from 'node:worker_threads';
import { runOffThreadTask } from '../src/scenarios/off-thread.ts';

const { task, heartbeat } = workerData.data;
await runOffThreadTask(task, heartbeat, (m) => parentPort!.postMessage(m));
