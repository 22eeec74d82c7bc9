// One hunt run per piscina task. All logic lives in src/.
import { type HuntRun, type HuntTask, runHuntTask } from '../src/hunt/hunt-run.ts';
import { releaseSharedMemory } from '../src/util/release-shared-memory.ts';

export default async function huntTask(t: HuntTask): Promise<HuntRun> {
  // What earlier runs on this worker left (their guest memory), before this run allocates its own.
  releaseSharedMemory();
  const heldBytes = process.memoryUsage().arrayBuffers;
  return { ...await runHuntTask(t), heldBytes };
}
