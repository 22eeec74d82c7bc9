// Loads a TypeScript piscina task module from sources (tests, development): see src/hunt/pool.ts.
import { workerData } from 'node:worker_threads';
import { tsImport } from 'tsx/esm/api';

const mod = await tsImport(workerData.taskEntry, import.meta.url);
export default mod.default;
