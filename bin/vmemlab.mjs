#!/usr/bin/env node
// The vmemlab command: runs the compiled CLI from dist/ (built by `npm install` via prepare).
import { existsSync } from 'node:fs';

const entry = new URL('../dist/src/cli/main.js', import.meta.url);
if (!existsSync(entry)) {
  console.error('vmemlab: dist/ is missing; run `npm install` (or `npm run build`) in the vmemlab folder first');
  process.exit(2);
}
const { main } = await import(entry.href);
process.exitCode = await main(process.argv.slice(2));
