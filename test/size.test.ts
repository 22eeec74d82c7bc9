import { describe, expect, it } from 'vitest';
import { formatSize, parseSize } from '../src/util/size.ts';
import { UserError } from '../src/util/errors.ts';

describe('parseSize', () => {
  it.each([
    ['4096', 4096], ['512MiB', 512 * 2 ** 20], ['16GiB', 16 * 2 ** 30], ['1g', 2 ** 30], ['64 KiB', 65536], ['1.5GiB', 1.5 * 2 ** 30],
  ])('%s is %d bytes', (text, bytes) => {
    expect(parseSize(text, '--memory')).toBe(bytes);
  });

  it.each(['', 'abc', '12QB', '-1MiB', '0.3'])('rejects %j naming the option and the value', (text) => {
    expect(() => parseSize(text, '--memory')).toThrow(UserError);
    expect(() => parseSize(text, '--memory')).toThrow(new RegExp(`^--memory: '${text.replace('.', '\\.')}'`));
  });

  it('formats round sizes with binary units', () => {
    expect(formatSize(2 ** 30)).toBe('1GiB');
    expect(formatSize(3 * 2 ** 20)).toBe('3MiB');
  });
});
