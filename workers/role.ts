// One role on its own thread under the free-run driver: the driver's loop, with the roles
// scenarios build. All logic lives in src/.
import { parentPort, workerData } from 'node:worker_threads';
import { runRoleWorker } from '../src/drivers/free-run-worker.ts';
import { workerRole } from '../src/scenarios/roles.ts';

runRoleWorker(workerData.data, (message) => parentPort!.postMessage(message), workerRole);
