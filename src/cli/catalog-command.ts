import { CATALOG, type MigrateDemo } from '../bugs/catalog.ts';

/** The demonstration settings as the flags they stand for. */
export function demoFlags(d: MigrateDemo): string {
  const flag = (k: string): string => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
  return Object.entries(d).flatMap(([k, v]) => (Array.isArray(v) ? v : [v]).map((x) => `${flag(k)} ${x}`)).join(' ');
}

export function catalogCommand(json: boolean): number {
  if (json) {
    console.log(JSON.stringify(CATALOG, null, 2));
    return 0;
  }
  for (const b of CATALOG) {
    console.log(`${b.name}  (modes: ${b.modes.join(', ')})`);
    console.log(`  wrong:     ${b.wrong}`);
    console.log(`  effect:    ${b.effect}`);
    console.log(`  caught by: ${b.detectedBy}`);
    console.log(`  reference: ${b.reference}`);
    for (const c of b.commands) console.log(`  try:       vmemlab ${c} --inject ${b.name} --driver deterministic`);
    if (b.migrateDemo && b.commands.includes('migrate')) console.log(`  migrate defaults with it: ${demoFlags(b.migrateDemo)}`);
    console.log('');
  }
  return 0;
}
