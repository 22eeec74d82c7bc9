// One role on its own thread under the free-run driver. All logic lives in src/.
import { parentPort, workerData } from 'node:worker_threads';
import { runRoleWorker } from '../src/drivers/free-run-worker.ts';

runRoleWorker(workerData.data, (message) => parentPort!.postMessage(message));
