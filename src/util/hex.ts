/**
 * A GPA, IOVA, offset or size as the kernel and QEMU print it (0x...). A value that is no
 * such number (negative, fractional, not finite: what a user or a hostile peer can pass)
 * is shown as it is, so a message never reads 0x-1000.
 */
export function hex(n: number): string {
  return Number.isInteger(n) && n >= 0 ? `0x${n.toString(16)}` : String(n);
}
