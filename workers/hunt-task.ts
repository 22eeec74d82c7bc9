// One hunt run per piscina task. All logic lives in src/.
export { runHuntTask as default } from '../src/hunt/hunt-run.ts';
