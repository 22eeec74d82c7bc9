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
    console.log(`  try:       vmemlab dirty-log-test --inject ${b.name}${b.modes[0] !== 'dirty-ring' ? ` --mode ${b.modes[0]}` : ''} --driver deterministic`);
    console.log('');
  }
  return 0;
}
