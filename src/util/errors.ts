/**
 * A mistake in what the user gave us (a flag, a file, a field). The CLI prints the
 * message alone, without a stack trace, and exits 2.
 */
export class UserError extends Error {
  override readonly name = 'UserError';
}

/** The errno an emulated ioctl failed with, e.g. EINVAL for a misaligned CLEAR. */
export class KvmError extends Error {
  override readonly name = 'KvmError';
  constructor(
    readonly errno: number,
    readonly ioctl: string,
    detail: string,
  ) {
    super(`${ioctl}: ${errnoName(errno)}: ${detail}`);
  }
}

export function errnoName(errno: number): string {
  return ({ 2: 'ENOENT', 5: 'EIO', 6: 'ENXIO', 11: 'EAGAIN', 14: 'EFAULT', 16: 'EBUSY', 17: 'EEXIST', 22: 'EINVAL', 28: 'ENOSPC', 95: 'EOPNOTSUPP' } as Record<number, string>)[errno] ?? `errno ${errno}`;
}
