import { Command, CommanderError, Option } from 'commander';
import { UserError } from '../util/errors.ts';
import { VMEMLAB_VERSION } from '../version.ts';
import { DEVICE_KEYS } from './device-flags.ts';
import { int } from './flags.ts';
import { DEVICE_KINDS } from '../host/devices/device-config.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../host/iommu/constants.ts';
import { catalogCommand } from './catalog-command.ts';
import { type ScenarioFile, loadScenario, readdress } from '../scenarios/scenario-file.ts';
import { DEFAULT_HOST_WRITE_EVERY, DEFAULT_JOB, MIGRATE_DEFAULTS as M, type MigrateFlags } from './migrate-command.ts';
import type { DestinationFlags } from './destination-command.ts';
import { DEFAULT_HUNT_JOB, HUNT_DEFAULTS, type HuntFlags } from './hunt-command.ts';
import { DIRTY_LOG_TEST_DEFAULTS as D, type DirtyLogTestFlags, MODES, dirtyLogTestCommand } from './dirty-log-test-command.ts';

const collect = (value: string, previous: string[] | undefined): string[] => [...(previous ?? []), value];

/** `vmemlab run` with no scenario: the default job, as if it were a scenario file. */
const DEFAULT_JOB_FILE: ScenarioFile = { path: '(the default job)', kind: 'migrate', values: { ...DEFAULT_JOB }, fieldOfFlag: {} };

/** Options of `run` that only one kind of job reads (commander key -> flag). */
const DIRTY_LOG_TEST_ONLY: Record<string, string> = { iterations: '--iterations', writes: '--writes', randomOrder: '--random-order' };
const MIGRATE_ONLY: Record<string, string> = {
  bandwidth: '--bandwidth', downtimeLimit: '--downtime-limit', maxIterations: '--max-iterations', timeout: '--timeout', policy: '--policy',
  warmup: '--warmup', to: '--to', allowRemote: '--allow-remote', resumeOps: '--resume-ops', batchPages: '--batch-pages',
  pageHistory: '--no-page-history', device: '--device', iommu: '--iommu', dmaEntryLimit: '--dma-entry-limit', onDeviceFault: '--on-device-fault',
  vcpuDirtyLimit: '--vcpu-dirty-limit',
};

/** Defaults of the options both guest-running commands share. */
type GuestDefaults = Record<'vcpus' | 'memory' | 'slots' | 'ringSize' | 'workload' | 'hotFraction' | 'hotShare' | 'writePercent' | 'driver' | 'seed' | 'watchdog' | 'burst', string>
  & { hostWriteEvery?: string };

/** The VM, guest, driver and bug options of `dirty-log-test`, `run` and `migrate`. */
function addGuestOptions(cmd: Command, d: GuestDefaults, modeFlag: '--mode' | '--tracking'): Command {
  return cmd
    .addOption(new Option(`${modeFlag} <mode>`, `dirty tracking: ${MODES.join(', ')} (default: dirty-ring, or the injected bug's mode)`))
    .option('--vcpus <n>', 'vCPUs, each its own worker thread under --driver free', d.vcpus)
    .option('--memory <size>', 'guest memory, e.g. 512MiB, 16GiB', d.memory)
    .option('--slots <n>', 'memslots to split the memory into', d.slots)
    .option('--ring-size <entries>', 'dirty ring entries per vCPU (power of two, 256..65536)', d.ringSize)
    .option('--workload <name>', 'guest workload: random, sweep, hotset, perf', d.workload)
    .option('--hot-fraction <f>', 'hotset: fraction of pages that are hot', d.hotFraction)
    .option('--hot-share <f>', 'hotset: share of writes to hot pages', d.hotShare)
    .option('--write-percent <p>', 'perf: percentage of operations that write', d.writePercent)
    .option('--host-write-every <n>', `one host write (kvm_write_guest, no vCPU) per n guest writes; 0 for none${d.hostWriteEvery === undefined ? ` (default: ${DEFAULT_HOST_WRITE_EVERY})` : ''}`, d.hostWriteEvery)
    .option('--driver <driver>', 'free (worker threads) or deterministic (one thread, seeded scheduler)', d.driver)
    .option('--seed <n>', 'seed for workloads and the scheduler', d.seed)
    .option('--inject <bug>', 'inject a catalogued bug (repeatable; see vmemlab catalog)', collect, [] as string[])
    .option('--watchdog <seconds>', 'stop when no actor progresses for this long', d.watchdog)
    .option('--burst <n>', 'free-run: guest operations between a vCPU\'s step boundaries', d.burst)
    .option('--dirty-limit <rate>', 'hold each vCPU to this dirty page rate from the start (QEMU\'s set-vcpu-dirty-limit): pages per second, or a size per second like 1MB/s; the vCPU sleeps outside guest mode when ahead')
    .option('--op-rate <n>', 'guest operations per second each vCPU runs at most (the guest is that busy; default: as fast as it can)')
    .option('--json', 'print one JSON document instead of text');
}

function addDirtyLogTestOptions(cmd: Command): Command {
  return addGuestOptions(cmd, D, '--mode')
    .option('--iterations <n>', 'collect-and-verify iterations', D.iterations)
    .option('--random-order', 'perf: visit pages in random order')
    .option('--writes <n>', 'guest writes per iteration, all vCPUs together (default: depends on memory and driver)');
}

/** The migration parameters (without defaults on `run`, where a scenario file may set them). */
function addMigrateOptions(cmd: Command): Command {
  return cmd
    .option('--bandwidth <size>', `max-bandwidth per second, e.g. 128MiB, or unlimited (default: ${M.bandwidth})`)
    .option('--downtime-limit <ms>', `switch over when the expected downtime is below this (default: ${M.downtimeLimit})`)
    .option('--max-iterations <n>', `passes before the policy applies (default: ${M.maxIterations})`)
    .option('--timeout <seconds>', `time before the policy applies (default: ${M.timeout})`)
    .option('--policy <policy>', `without convergence: fail or force at the limits; auto-converge (throttle the vCPUs' CPU time) or dirty-limit (hold each vCPU to --vcpu-dirty-limit; needs the dirty ring), both until --timeout (default: ${M.policy})`)
    .option('--vcpu-dirty-limit <rate>', 'the dirty-limit policy\'s quota per vCPU (QEMU\'s vcpu-dirty-limit): pages per second, or a size per second (default: 1MB/s, as QEMU)')
    .option('--warmup <ops>', 'guest writes before migration starts (default: one per page)')
    .option('--batch-pages <n>', `pages per stream frame (default: ${M.batchPages})`)
    .option('--no-page-history', 'do not record each page\'s dirty-tracking events for the lost-write report')
    .option('--to <target>', 'tcp:HOST:PORT, a `vmemlab destination` process (default: an in-process destination)')
    .option('--resume-ops <n>', 'after completion the destination resumes the guest until each vCPU retired n operations, then stops it; 0: it stays paused, as with QEMU\'s -S (default: 1.5 passes over each vCPU\'s share of memory)')
    .option('--allow-remote', 'allow a --to host that is not a loopback address')
    .option('--device <spec>', `a device doing DMA (repeatable): KIND[:key=value,...]; kinds ${DEVICE_KINDS.join(', ')}; keys ${DEVICE_KEYS.join(', ')} (see docs/iommu.md)`, collect)
    .option('--iommu <backend>', 'the IOMMU backend the devices sit behind: type1 (VFIO type1 container) or iommufd (default: type1)')
    .option('--dma-entry-limit <n>', `type1's dma_entry_limit: mappings per container (default: ${VFIO_DEFAULT_DMA_ENTRY_LIMIT})`)
    .option('--on-device-fault <action>', 'continue (count device faults, the run fails at the end) or stop (the migration stops at the first) (default: continue)');
}

export function buildProgram(setExit: (code: number) => void): Command {
  const program = new Command('vmemlab')
    .description('An emulator of a hypervisor\'s memory subsystem: shared guest memory, vCPU worker threads, KVM-faithful dirty tracking.')
    .version(VMEMLAB_VERSION)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(text) });

  addDirtyLogTestOptions(program.command('dirty-log-test')
    .description('KVM\'s dirty_log_test: guests write while the host collects the dirty log; every page is verified each iteration'))
    .action(async (flags: Record<string, unknown>, cmd: Command) => {
      // Only what was given: defaults come after the injected bugs' demonstration settings.
      const given = Object.fromEntries(Object.entries(flags).filter(([k]) => cmd.getOptionValueSource(k) !== 'default'));
      setExit(await dirtyLogTestCommand(given as Partial<DirtyLogTestFlags>));
    });

  addMigrateOptions(addDirtyLogTestOptions(program.command('run')
    .description('run a scenario file (kind: dirty-log-test or migrate); with none, the default job: a 4-vCPU, 1 GiB guest live-migrated with ring tracking to an in-process destination that then resumes it, verified. Flags override either')
    .argument('[scenario]', 'a YAML scenario file (see examples/)')))
    .action(async (scenario: string | undefined, flags: Record<string, unknown>, cmd: Command) => {
      const file = scenario === undefined ? DEFAULT_JOB_FILE : loadScenario(scenario);
      const fromCli = (key: string): boolean => cmd.getOptionValueSource(key) === 'cli';
      const cli = Object.fromEntries(Object.entries(flags).filter(([k]) => fromCli(k)));
      const other = file.kind === 'migrate' ? DIRTY_LOG_TEST_ONLY : MIGRATE_ONLY;
      const misplaced = Object.keys(other).find((k) => cli[k] !== undefined);
      if (misplaced !== undefined) {
        const what = scenario === undefined ? 'the default job is a migration' : `${scenario} is kind: ${file.kind}`;
        throw new UserError(`${other[misplaced]}: ${what}; this option is for ${file.kind === 'migrate' ? 'vmemlab dirty-log-test' : 'vmemlab migrate'}`);
      }
      if (file.kind === 'migrate' && cli['mode'] !== undefined) cli['tracking'] = cli['mode'];
      // A migrate scenario takes its defaults in migrateCommand (after the injected bugs' demonstration settings).
      // Either kind takes its defaults in its command (after the injected bugs' demonstration settings).
      const merged = { inject: [], ...file.values, ...cli };
      const expected = file.expect ? { file: file.path, outcome: file.expect } : undefined;
      try {
        if (file.kind === 'migrate') {
          const { migrateCommand } = await import('./migrate-command.ts');
          setExit(await migrateCommand(merged as unknown as MigrateFlags, expected));
        } else {
          setExit(await dirtyLogTestCommand(merged as unknown as DirtyLogTestFlags, expected));
        }
      } catch (e) {
        if (!(e instanceof UserError)) throw e;
        // The user typed --mode (run's name for it); a migration calls it --tracking.
        const typed = fromCli('mode') ? new UserError(e.message.replace(/--tracking\b/g, '--mode')) : e;
        throw readdress(typed, file, (k) => fromCli(k) || (k === 'tracking' && fromCli('mode')));
      }
    });

  addMigrateOptions(addGuestOptions(program.command('migrate')
    .description('pre-copy live migration of a running, writing VM to an in-process destination, verified page by page'), M, '--tracking'))
    .action(async (flags: Record<string, unknown>, cmd: Command) => {
      const { migrateCommand } = await import('./migrate-command.ts');
      // Only what was given: defaults come after the injected bugs' demonstration settings.
      const given = Object.fromEntries(Object.entries(flags).filter(([k]) => cmd.getOptionValueSource(k) !== 'default'));
      setExit(await migrateCommand(given as Partial<MigrateFlags>));
    });

  program.command('destination')
    .description('receive one migration over TCP (from vmemlab migrate --to tcp:HOST:PORT), then exit; with --resume, run the migrated guest first')
    .requiredOption('--listen <host:port>', 'where to listen, e.g. 127.0.0.1:4444 (port 0 picks one)')
    .option('--allow-remote', 'allow listening on an address that is not loopback')
    .option('--resume', 'after completion, resume the guest on its own vCPUs from the migrated memory, stop it and check it (the guest options below must match the source\'s, as QEMU\'s destination must be started with the source\'s machine options)')
    .option('--vcpus <n>', `--resume: the guest's vCPUs (default: ${M.vcpus})`)
    .option('--workload <name>', `--resume: the guest's workload: random, sweep, hotset, perf (default: ${M.workload})`)
    .option('--hot-fraction <f>', `--resume: hotset: fraction of pages that are hot (default: ${M.hotFraction})`)
    .option('--hot-share <f>', `--resume: hotset: share of writes to hot pages (default: ${M.hotShare})`)
    .option('--write-percent <p>', `--resume: perf: percentage of operations that write (default: ${M.writePercent})`)
    .option('--seed <n>', `--resume: the guest's seed (default: ${M.seed})`)
    .option('--resume-ops <n>', '--resume: operations each vCPU retires before the guest is stopped (default: 1.5 passes over each vCPU\'s share of memory)')
    .option('--watchdog <seconds>', `--resume: stop when no actor progresses for this long (default: ${M.watchdog})`)
    .option('--burst <n>', `--resume: guest operations between a vCPU's step boundaries (default: ${M.burst})`)
    .option('--json', 'print JSON')
    .action(async (flags: DestinationFlags) => {
      const { destinationCommand } = await import('./destination-command.ts');
      setExit(await destinationCommand(flags));
    });

  addMigrateOptions(addGuestOptions(program.command('hunt')
    .description('run many seeds of a migrate scenario under the deterministic driver\'s strategies and under free-run, in parallel; failing runs leave replay files. With no scenario: a 2-vCPU, 16 MiB guest like the default job (or, with --inject, the bug\'s demonstration scenario)')
    .argument('[scenario]', 'a YAML scenario file of kind migrate'), M, '--tracking'))
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
      const huntKeys = ['seeds', 'strategy', 'out', 'all', 'shard', 'workers', 'json', 'watchdog', 'shrink'];
      const cli = Object.fromEntries(Object.entries(flags).filter(([k]) => fromCli(k) && !huntKeys.includes(k)));
      const inject = (flags['inject'] as string[] | undefined) ?? [];
      const base = file ? file.values : inject.length ? {} : DEFAULT_HUNT_JOB;
      const { huntCommand } = await import('./hunt-command.ts');
      try {
        setExit(await huntCommand({ ...base, ...cli, inject: [...((base as { inject?: string[] }).inject ?? []), ...inject] } as Partial<MigrateFlags>, flags as unknown as HuntFlags, scenario));
      } catch (e) {
        if (!(e instanceof UserError) || !file) throw e;
        throw readdress(e, file, fromCli);
      }
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
      const measure = flags.measure === undefined ? null : flags.measure === true ? 8 : int('--measure', flags.measure, 1, 10_000);
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

/** Runs the CLI; returns the exit status (0 verified, 1 a check failed, 2 bad input, 3 did not complete). */
export async function main(argv: string[]): Promise<number> {
  let code = 0;
  const program = buildProgram((c) => { code = c; });
  try {
    await program.parseAsync(argv, { from: 'user' });
    return code;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return 0;
      return 2; // commander already printed "error: ..." naming the option
    }
    if (e instanceof UserError) {
      console.error(`vmemlab: ${e.message}`);
      return 2;
    }
    throw e;
  }
}
