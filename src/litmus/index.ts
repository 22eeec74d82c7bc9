export { loadLitmus, parseLitmus } from './load.ts';
export { type LitmusOutcome, type LitmusRunOptions, runLitmus } from './run.ts';
export { type LitmusFormatOptions, formatLitmusOutcome } from './format.ts';
export type { LitmusSpec } from './spec.ts';
