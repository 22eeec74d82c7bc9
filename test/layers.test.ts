import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

/**
 * The layering holds: every import in src/ goes to the same layer or one below, and no
 * files import each other in a circle. docs/architecture.md draws the layers; this list is
 * the same, lowest first. A layer is a folder (host/vmm is the userspace VMM on top of the
 * kernel files of host/).
 */
const LAYERS: string[][] = [
  ['util', 'version.ts'],
  ['roles'],
  ['host', 'host/iommu', 'host/devices', 'host/mmio'],
  ['host/vmm'],
  ['oracles'],
  ['guest'],
  ['migration'],
  ['bugs'],
  ['drivers'],
  ['scenarios'],
  ['litmus'],
  ['hunt'],
  ['cli'],
];

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const SRC = join(ROOT, 'src');

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? tsFiles(p) : p.endsWith('.ts') ? [p] : [];
  });
}

/** The layer of a file under src/: its folder, or for a file at the top, its name. */
function unitOf(file: string): string {
  const rel = relative(SRC, file).split('/');
  if (rel.length === 1) return rel[0]!;
  if (rel[0] === 'host' && rel.length > 2) return `host/${rel[1]}`;
  return rel[0]!;
}

function layerOf(file: string): number {
  const unit = unitOf(file);
  const i = LAYERS.findIndex((l) => l.includes(unit));
  if (i < 0) throw new Error(`src/${relative(SRC, file)}: its folder '${unit}' is in no layer of test/layers.test.ts`);
  return i;
}

const IMPORT = /(?:^|\n)\s*(?:import|export)\s[^'"]*?from\s*['"](\.{1,2}\/[^'"]+)['"]|import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g;

function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  return [...text.matchAll(IMPORT)].map((m) => normalize(join(dirname(file), m[1] ?? m[2]!)));
}

describe('the layers of src/', () => {
  const files = tsFiles(SRC);
  const graph = new Map(files.map((f) => [f, importsOf(f).filter((t) => t.startsWith(SRC))]));

  it('every folder is in a layer', () => {
    for (const f of files) expect(() => layerOf(f)).not.toThrow();
  });

  it('no import runs upward', () => {
    const upward: string[] = [];
    for (const [f, targets] of graph) {
      for (const t of targets) {
        if (layerOf(t) > layerOf(f)) upward.push(`src/${relative(SRC, f)} (${unitOf(f)}) imports src/${relative(SRC, t)} (${unitOf(t)}, a higher layer)`);
      }
    }
    expect(upward).toEqual([]);
  });

  it('no files import each other in a circle', () => {
    // Tarjan's strongly connected components over the file graph.
    const index = new Map<string, number>();
    const low = new Map<string, number>();
    const stack: string[] = [];
    const onStack = new Set<string>();
    const circles: string[][] = [];
    let n = 0;
    const visit = (v: string): void => {
      index.set(v, n); low.set(v, n); n++;
      stack.push(v); onStack.add(v);
      for (const w of graph.get(v) ?? []) {
        if (!graph.has(w)) continue;
        if (!index.has(w)) { visit(w); low.set(v, Math.min(low.get(v)!, low.get(w)!)); }
        else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
      if (low.get(v) === index.get(v)) {
        const comp: string[] = [];
        for (;;) { const w = stack.pop()!; onStack.delete(w); comp.push(`src/${relative(SRC, w)}`); if (w === v) break; }
        if (comp.length > 1) circles.push(comp.sort());
      }
    };
    for (const f of graph.keys()) if (!index.has(f)) visit(f);
    expect(circles).toEqual([]);
  });

  it('the check sees a forbidden import (it reads imports as the files write them)', () => {
    const host = join(SRC, 'host', 'vm.ts');
    expect(importsOf(host).some((t) => t.endsWith(join('roles', 'role.ts')))).toBe(true);
    expect(layerOf(join(SRC, 'cli', 'main.ts'))).toBeGreaterThan(layerOf(host));
  });
});
