import { Command, CommanderError } from 'commander';
import { UserError } from '../util/errors.ts';
import { limitLines } from '../util/limits.ts';
import { VMEMLAB_VERSION } from '../version.ts';
import { catalogCommand } from './catalog-command.ts';
import { type ScenarioFile, loadScenario } from '../scenarios/scenario-file.ts';
import { type Layer, flagLayer, resolve } from '../scenarios/settings.ts';
import { wholeNumber } from '../scenarios/options.ts';
import { DEFAULT_JOB, DEFAULT_HUNT_JOB } from '../scenarios/jobs.ts';
import { DESTINATION_DEFAULTS, type DestinationFlags } from './destination-command.ts';
import { DESTINATION_IDLE_S } from '../migration/tcp.ts';
import { HUNT_DEFAULTS, type HuntFlags } from './hunt-command.ts';
import { dirtyLogTestCommand } from './dirty-log-test-command.ts';
import { addScenarioOptions, givenLayer, notFor } from './scenario-options.ts';
import { WORKLOAD_NAMES } from '../guest/workload.ts';

const collect = (value: string, previous: string[] | undefined): string[] => [...(previous ?? []), value];

/** `vmemlab run` with no scenario: the default job, as if it were a scenario file. */
const DEFAULT_JOB_FILE: ScenarioFile = { path: '(the default job)', kind: 'migrate', layer: flagLayer('migrate', DEFAULT_JOB) };

export function buildProgram(setExit: (code: number) => void): Command {
  const program = new Command('vmemlab')
    .description('An emulator of a hypervisor\'s memory subsystem: shared guest memory, vCPU worker threads, KVM-faithful dirty tracking.')
    .version(VMEMLAB_VERSION)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(text) })
    .addHelpText('after', [
      '',
      'Exit status: 0 verified, 1 a check failed (or replay: reproduced), 2 bad input, 3 the run did not complete,',
      '4 an internal error (--debug prints its stack).',
      '',
      'Limits (docs/limits.md says why):',
      ...limitLines(),
    ].join('\n'));

  addScenarioOptions(program.command('dirty-log-test')
    .description('KVM\'s dirty_log_test: guests write while the host collects the dirty log; every page is verified each iteration'), ['dirty-log-test'], '--mode', 'dirty-log-test')
    .action(async (flags: Record<string, unknown>, cmd: Command) => {
      const r = resolve('dirty-log-test', [givenLayer(cmd, flags, ['dirty-log-test'], '--mode')]);
      setExit(await dirtyLogTestCommand(r, flags['json'] === true));
    });

  addScenarioOptions(program.command('run')
    .description('run a scenario file (kind: dirty-log-test, migrate or mdev); with none, the default job: a 4-vCPU, 1 GiB guest held to 1 MB/s of dirtied memory per vCPU, live-migrated with ring tracking to an in-process destination that then resumes it, verified. Flags override either')
    .argument('[scenario]', 'a YAML scenario file (see examples/)'), ['dirty-log-test', 'migrate', 'mdev'], '--mode')
    .action(async (scenario: string | undefined, flags: Record<string, unknown>, cmd: Command) => {
      const file = scenario === undefined ? DEFAULT_JOB_FILE : loadScenario(scenario);
      const misplaced = notFor(file.kind).find(([key]) => cmd.getOptionValueSource(key) === 'cli');
      if (misplaced !== undefined) {
        const what = scenario === undefined ? 'the default job is a migration' : `${scenario} is kind: ${file.kind}`;
        throw new UserError(`${misplaced[1]}: ${what}; this option is for ${misplaced[2].map((k) => `vmemlab ${k}`).join(' and ')}`);
      }
      const r = resolve(file.kind, [file.layer, givenLayer(cmd, flags, [file.kind], '--mode')]);
      const expected = file.expect ? { file: file.path, outcome: file.expect } : undefined;
      const json = flags['json'] === true;
      if (file.kind === 'migrate') {
        const { migrateCommand } = await import('./migrate-command.ts');
        setExit(await migrateCommand(r, json, expected));
      } else if (file.kind === 'mdev') {
        const { mdevCommand } = await import('./mdev-command.ts');
        setExit(await mdevCommand(r, json, expected));
      } else {
        setExit(await dirtyLogTestCommand(r, json, expected));
      }
    });

  addScenarioOptions(program.command('mdev')
    .description('several VMs share one mediated device whose MMIO is mapped on fault: the vendor driver reallocates slices of it between them while their guests drive it; the isolation oracles check every access (docs/mdev.md)'), ['mdev'], '--tracking', 'mdev')
    .action(async (flags: Record<string, unknown>, cmd: Command) => {
      const { mdevCommand } = await import('./mdev-command.ts');
      setExit(await mdevCommand(resolve('mdev', [givenLayer(cmd, flags, ['mdev'], '--tracking')]), flags['json'] === true));
    });

  addScenarioOptions(program.command('migrate')
    .description('pre-copy live migration of a running, writing VM to an in-process destination, verified page by page'), ['migrate'], '--tracking', 'migrate')
    .action(async (flags: Record<string, unknown>, cmd: Command) => {
      const { migrateCommand } = await import('./migrate-command.ts');
      setExit(await migrateCommand(resolve('migrate', [givenLayer(cmd, flags, ['migrate'], '--tracking')]), flags['json'] === true));
    });

  const D = DESTINATION_DEFAULTS;
  program.command('destination')
    .description('receive one migration over TCP (from vmemlab migrate --to tcp:HOST:PORT), then exit; with --resume, run the migrated guest first')
    .requiredOption('--listen <host:port>', 'where to listen, e.g. 127.0.0.1:4444 (port 0 picks one)')
    .option('--allow-remote', 'allow listening on an address that is not loopback')
    .option('--idle-timeout <seconds>', 'drop a connection that sends nothing for this long (before its stream began: the next connection is served; during it: the migration fails)', String(DESTINATION_IDLE_S))
    .option('--resume', 'after completion, resume the guest on its own vCPUs from the migrated memory, stop it and check it (the guest options below must match the source\'s, as QEMU\'s destination must be started with the source\'s machine options)')
    .option('--vcpus <n>', `--resume: the guest's vCPUs (default: ${D.vcpus})`)
    .option('--workload <name>', `--resume: the guest's workload: ${WORKLOAD_NAMES.join(', ')} (default: ${D.workload})`)
    .option('--hot-fraction <f>', `--resume: hotset: fraction of pages that are hot (default: ${D.hotFraction})`)
    .option('--hot-share <f>', `--resume: hotset: share of writes to hot pages (default: ${D.hotShare})`)
    .option('--write-percent <p>', `--resume: perf: percentage of operations that write (default: ${D.writePercent})`)
    .option('--seed <n>', `--resume: the guest's seed (default: ${D.seed})`)
    .option('--resume-ops <n>', '--resume: operations each vCPU retires before the guest is stopped (default: 1.5 passes over each vCPU\'s share of memory)')
    .option('--watchdog <seconds>', `--resume: stop when no actor progresses for this long (default: ${D.watchdogMs / 1000})`)
    .option('--burst <n>', `--resume: guest operations between a vCPU's step boundaries (default: ${D.burst})`)
    .option('--json', 'print JSON')
    .action(async (flags: DestinationFlags) => {
      const { destinationCommand } = await import('./destination-command.ts');
      setExit(await destinationCommand(flags));
    });

  addScenarioOptions(program.command('hunt')
    .description('run many seeds of a migrate scenario under the deterministic driver\'s strategies and under free-run, in parallel; failing runs leave replay files. With no scenario: a 2-vCPU, 16 MiB guest like the default job (or, with --inject, the bug\'s demonstration scenario)')
    .argument('[scenario]', 'a YAML scenario file of kind migrate'), ['migrate'], '--tracking', 'migrate')
    .option('--seeds <n>', 'seeds 1..n per strategy', HUNT_DEFAULTS.seeds)
    .option('--strategy <list>', 'comma-separated: random (uniform), pct (priorities, few deep preemptions), free (worker threads)', HUNT_DEFAULTS.strategy)
    .option('--out <dir>', 'where replay files and the run records (JSON lines) go', HUNT_DEFAULTS.out)
    .option('--all', 'run every seed (detection rates); otherwise each strategy stops at its first failure')
    .option('--shard <i/n>', 'run only this shard of the seeds (seed s belongs to shard ((s - 1) mod n) + 1); combine shards with vmemlab merge', HUNT_DEFAULTS.shard)
    .option('--workers <n>', 'runs in parallel (default: the cores)')
    .option('--shrink', 'shrink each deterministic strategy\'s first failure and write its minimal replay file (.min.vmreplay)')
    .action(async (scenario: string | undefined, flags: Record<string, unknown>, cmd: Command) => {
      const fromCli = (key: string): boolean => cmd.getOptionValueSource(key) === 'cli';
      for (const [key, flag] of [['driver', '--driver'], ['seed', '--seed'], ['resumeOps', '--resume-ops'], ['to', '--to']] as const) {
        if (fromCli(key)) throw new UserError(`${flag}: not for hunt (it runs seeds 1..N of each --strategy, in-process)`);
      }
      const file = scenario === undefined ? null : loadScenario(scenario);
      if (file && file.kind !== 'migrate') throw new UserError(`${scenario}: hunt takes a scenario of kind: migrate (this one is ${file.kind})`);
      const given = givenLayer(cmd, flags, ['migrate'], '--tracking');
      const base: Layer = file ? file.layer : given.values.inject?.length ? { values: {}, where: {} } : flagLayer('migrate', DEFAULT_HUNT_JOB);
      // The bugs of the file and of the command line together.
      const inject = [...(base.values.inject ?? []), ...(given.values.inject ?? [])];
      const both: Layer = { values: { ...given.values, inject: [...new Set(inject)] }, where: { ...given.where, inject: given.where.inject ?? base.where.inject } };
      const { huntCommand } = await import('./hunt-command.ts');
      setExit(await huntCommand(resolve('migrate', [base, both]), flags as unknown as HuntFlags, scenario));
    });

  program.command('replay')
    .description('run a replay file again: a deterministic one reproduces its failure exactly (exit 1), or says it differs (exit 3)')
    .argument('<file>', 'a .vmreplay file written by vmemlab hunt or vmemlab shrink')
    .option('--json', 'print JSON')
    .action(async (file: string, flags: { json?: boolean }) => {
      const { replayCommand } = await import('./hunt-command.ts');
      setExit(await replayCommand(file, flags.json === true));
    });

  program.command('shrink')
    .description('shrink a deterministic replay file: fewer vCPUs, pages, operations and steps while the same failure still occurs; writes the minimal replay file')
    .argument('<file>', 'a .vmreplay file of a deterministic run')
    .option('--out <file>', 'where the minimal replay goes (default: FILE with .min before .vmreplay)')
    .option('--max-runs <n>', 'bound on the runs tried (default 400)')
    .option('--json', 'print JSON')
    .action(async (file: string, flags: { out?: string; maxRuns?: string; json?: boolean }) => {
      const { shrinkCommand } = await import('./hunt-command.ts');
      setExit(await shrinkCommand(file, flags));
    });

  program.command('explain')
    .description('the causal chain of a deterministic replay file\'s failure, step by step, in protocol words')
    .argument('<file>', 'a .vmreplay file of a deterministic run')
    .option('--subject <what>', 'auto (a DMA oracle record if there is one, else the first lost page), lost-write or dma', 'auto')
    .option('--json', 'print JSON')
    .action(async (file: string, flags: { json?: boolean; subject: string }) => {
      const { explainCommand } = await import('./hunt-command.ts');
      setExit(await explainCommand(file, flags.subject, flags.json === true));
    });

  program.command('merge')
    .description('combine the JSON lines of a hunt\'s shards (vmemlab hunt --shard i/n --out DIR) into one report')
    .argument('<files...>', 'hunt-*.jsonl files')
    .option('--json', 'print JSON')
    .action(async (files: string[], flags: { json?: boolean }) => {
      const { mergeCommand } = await import('./hunt-command.ts');
      setExit(mergeCommand(files, flags.json === true));
    });

  program.command('catalog')
    .description('list the bug catalog: each injectable protocol mistake, what it breaks, where it comes from, the command that shows it')
    .option('--measure [seeds]', 'also measure each bug\'s detection rate now, over seeds 1..n (default 8) under the random and pct strategies')
    .option('--json', 'print JSON')
    .action(async (flags: { json?: boolean; measure?: string | true }) => {
      const measure = flags.measure === undefined ? null : flags.measure === true ? 8 : wholeNumber(flags.measure, '--measure', 1, 10_000);
      setExit(await catalogCommand(flags.json === true, measure));
    });

  program.command('litmus')
    .description('run litmus files (YAML: actors, an explicit interleaving, expectations) under the deterministic driver')
    .argument('<files...>', 'litmus files')
    .option('--inject <bug>', 'run them with a catalogued bug injected (repeatable)', collect, [] as string[])
    .option('--json', 'print JSON')
    .action(async (files: string[], flags: { json?: boolean; inject: string[] }) => {
      const { litmusCommand } = await import('./litmus-command.ts');
      setExit(await litmusCommand(files, flags.json === true, flags.inject));
    });
  return program;
}

/** The exit statuses, as `vmemlab --help` lists them. */
export const EXIT = { VERIFIED: 0, CHECK_FAILED: 1, BAD_INPUT: 2, DID_NOT_COMPLETE: 3, INTERNAL_ERROR: 4 } as const;

/**
 * Runs the CLI; returns the exit status (0 verified, 1 a check failed, 2 bad input, 3 did
 * not complete, 4 an internal error: vmemlab's own fault, with its stack only under
 * --debug or VMEMLAB_DEBUG=1).
 */
export async function main(argv: string[]): Promise<number> {
  let code = 0;
  const debug = argv.includes('--debug') || process.env['VMEMLAB_DEBUG'] === '1';
  const program = buildProgram((c) => { code = c; });
  try {
    await program.parseAsync(argv.filter((a) => a !== '--debug'), { from: 'user' });
    return code;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return 0;
      return 2; // commander already printed "error: ..." naming the option
    }
    return reportError(e, debug);
  }
}

/** A failure that escaped a command: the user's mistake (exit 2) or vmemlab's own (exit 4), in one line. */
export function reportError(e: unknown, debug: boolean): number {
  if (e instanceof UserError) {
    console.error(`vmemlab: ${e.message}`);
    return EXIT.BAD_INPUT;
  }
  const err = e instanceof Error ? e : new Error(String(e));
  console.error(`vmemlab: internal error: ${err.message.split('\n')[0]}${debug ? `\n${err.stack ?? ''}` : ' (this is vmemlab\'s fault, not your input: run again with --debug for the stack, and report it)'}`);
  return EXIT.INTERNAL_ERROR;
}
