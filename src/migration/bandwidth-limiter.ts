/** Bandwidth is accounted in 100 ms windows, as QEMU's rate limiter does (migration_rate_exceeded). */
export const WINDOW_MS = 100;

/**
 * max-bandwidth, per 100 ms window. What a frame sent beyond a window's budget is owed
 * by the next windows (vmemlab sends whole frames where QEMU's buffer is page by page),
 * so a limit below one frame per window still holds on average.
 */
export class BandwidthLimiter {
  private windowStart = 0;
  private windowBytes = 0;

  /** `bytesPerSecond` 0: unlimited. */
  constructor(readonly bytesPerSecond: number) {}

  charge(bytes: number): void {
    this.windowBytes += bytes;
  }

  /** 0 when a frame may go at `nowMs`, else the ms until the next window. */
  waitMs(nowMs: number): number {
    if (this.bytesPerSecond <= 0) return 0;
    const budget = (this.bytesPerSecond * WINDOW_MS) / 1000;
    if (nowMs - this.windowStart >= WINDOW_MS) {
      const windows = Math.floor((nowMs - this.windowStart) / WINDOW_MS);
      this.windowStart += windows * WINDOW_MS;
      this.windowBytes = Math.max(0, this.windowBytes - windows * budget);
    }
    return this.windowBytes < budget ? 0 : this.windowStart + WINDOW_MS - nowMs;
  }
}
