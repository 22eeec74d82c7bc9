// One role on its own thread under the free-run driver: the driver's loop, with the roles
// scenarios build, and the VMM thread's control plane (comlink). All logic lives in src/.
import * as Comlink from 'comlink';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import { parentPort, workerData } from 'node:worker_threads';
import type { RunControl } from '../src/drivers/actor-words.ts';
import { runRoleWorker } from '../src/drivers/free-run-worker.ts';
import { workerRole } from '../src/scenarios/roles.ts';

runRoleWorker(workerData.data, Comlink.wrap<RunControl>(nodeEndpoint(parentPort!)), workerRole);
