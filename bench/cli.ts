// The vmemlab CLI from sources (bench/examples.ts runs it as a child process per run).
import { main } from '../src/cli/main.ts';

process.exitCode = await main(process.argv.slice(2));
