/**
 * A token bucket: `rate` tokens per second, at most `capacity` saved up. Pacing with it
 * holds a long run to the rate exactly (whatever is taken beyond the refill waits),
 * while a short burst of up to `capacity` goes at once. Time comes from the caller
 * (the wall clock under free-run, the step clock under the deterministic driver), so the
 * same limit gives the same pacing in both.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;

  constructor(readonly rate: number, readonly capacity: number, nowMs: number) {
    if (!(rate > 0) || !(capacity >= 1)) throw new RangeError(`token bucket: rate ${rate}, capacity ${capacity}`);
    this.tokens = capacity;
    this.last = nowMs;
  }

  /** Tokens available at `nowMs` (refilled up to the capacity). */
  available(nowMs: number): number {
    if (nowMs > this.last) {
      this.tokens = Math.min(this.capacity, this.tokens + ((nowMs - this.last) * this.rate) / 1000);
      this.last = nowMs;
    }
    return this.tokens;
  }

  /**
   * Takes one token if there is one. It refills first every time: refilling only when
   * empty would credit, later, the time the bucket spent full (about 2 % too many tokens
   * when measured).
   */
  tryTake(clock: { nowMs(): number }): boolean {
    if (this.available(clock.nowMs()) >= 1) { this.tokens -= 1; return true; }
    return false;
  }

  take(n: number): void { this.tokens -= n; }

  /** Milliseconds from the last refill until `n` tokens are there. */
  msUntil(n: number): number {
    return this.tokens >= n ? 0 : ((n - this.tokens) * 1000) / this.rate;
  }
}

/**
 * A bucket that saves up `ms` milliseconds of its rate (at least one token): enough to
 * ride out a thread's scheduling gaps on a busy machine without losing its rate.
 */
export function bucketFor(rate: number, nowMs: number, ms = 50): TokenBucket {
  return new TokenBucket(rate, Math.max(1, (rate * ms) / 1000), nowMs);
}
