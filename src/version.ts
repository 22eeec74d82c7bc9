import { existsSync, readFileSync } from 'node:fs';

/** vmemlab's version, from package.json (two levels up from src/, three from dist/src/). */
function readVersion(): string {
  for (const up of ['../package.json', '../../package.json']) {
    const url = new URL(up, import.meta.url);
    if (existsSync(url)) {
      const pkg = JSON.parse(readFileSync(url, 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'vmemlab' && pkg.version) return pkg.version;
    }
  }
  return '0.0.0';
}

export const VMEMLAB_VERSION = readVersion();
