import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/**
 * A full garbage collection, to give back the SharedArrayBuffers of runs that ended.
 *
 * A run's guest memory, bitmaps and rings are SharedArrayBuffers: tens of MiB outside the
 * JavaScript heap behind a few hundred bytes inside it. A thread that runs one migration
 * after another (a hunt worker) keeps a small heap, so V8 sees no reason for a major
 * collection, and the backing stores of finished runs pile up: 34 MiB per run of a 16 MiB
 * guest, 3.3 GB after 96 runs on one worker. Collecting between runs keeps a worker at its
 * one run's memory. `gc` is exposed on demand with node:v8 setFlagsFromString, so no
 * command line has to carry --expose-gc (Node warns that flags set after start-up may
 * behave unpredictably; --expose-gc only installs the function, as Node's own tests use it).
 */
let collect: (() => void) | null = null;

export function releaseSharedMemory(): void {
  if (collect === null) {
    setFlagsFromString('--expose-gc');
    collect = runInNewContext('gc') as () => void;
  }
  collect();
}
