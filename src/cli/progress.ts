/**
 * A one-line live status on stderr for long runs. Shown only on a terminal; quiet in CI,
 * with --json, or when stderr is not a TTY.
 */
export class Progress {
  private readonly enabled: boolean;
  private last = 0;
  private shown = false;

  constructor(json: boolean) {
    this.enabled = !json && process.stderr.isTTY === true && !process.env['CI'];
  }

  update(text: string): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (now - this.last < 100) return;
    this.last = now;
    const width = process.stderr.columns ?? 100;
    process.stderr.write(`\r${text.slice(0, width - 1).padEnd(Math.min(width - 1, 80))}`);
    this.shown = true;
  }

  /** Clears the status line before normal output. */
  clear(): void {
    if (!this.shown) return;
    process.stderr.write(`\r${' '.repeat(Math.min((process.stderr.columns ?? 100) - 1, 80))}\r`);
    this.shown = false;
  }
}
