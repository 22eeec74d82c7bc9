import { CATALOG } from '../bugs/catalog.ts';

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
    console.log('');
  }
  return 0;
}
