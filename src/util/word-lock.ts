/**
 * A lock word in shared memory, 0 free and 1 held, for a critical section of a few loads
 * and stores that never spans a step: a thread that finds it taken sleeps on the word for
 * at most a millisecond and tries again (a free-running holder lets go at once; under the
 * deterministic driver it is never found taken).
 */
export function lockWord(words: Int32Array, at: number): void {
  while (Atomics.compareExchange(words, at, 0, 1) !== 0) Atomics.wait(words, at, 1, 1);
}

export function unlockWord(words: Int32Array, at: number): void {
  Atomics.store(words, at, 0);
  Atomics.notify(words, at, 1);
}
