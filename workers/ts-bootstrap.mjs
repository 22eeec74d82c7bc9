// Runs a TypeScript worker entry from sources (tests, development): see src/drivers/spawn.ts.
import { workerData } from 'node:worker_threads';
import { tsImport } from 'tsx/esm/api';

await tsImport(workerData.entry, import.meta.url);
