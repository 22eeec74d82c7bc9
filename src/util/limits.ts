/**
 * The largest (and smallest) inputs vmemlab accepts, each with why, in one place: the
 * option parsers, the scenario, litmus, replay and shard file readers and the migration
 * stream's destination check against them; `vmemlab --help` and docs/limits.md list them.
 */
export interface Limit {
  /** What is limited, as the messages and the table name it. */
  what: string;
  min: number;
  max: number;
  /** How the bound is written in the table (sizes in binary units). */
  text: string;
  why: string;
}

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

export const LIMITS = {
  memoryBytes: {
    what: 'guest memory', min: 4096, max: 64 * GiB, text: '4 KiB .. 64 GiB',
    why: 'each vCPU keeps a TLB tag per page (4 bytes) and the page history 40 bytes per page; 64 GiB is the largest guest the scale benchmark migrates, with only the working set committed',
  },
  vcpus: { what: 'vCPUs', min: 1, max: 64, text: '1 .. 64', why: 'each vCPU is a worker thread with its own TLB; the deterministic driver records a role per step in one byte' },
  vms: { what: 'VMs sharing a mediated device', min: 1, max: 16, text: '1 .. 16', why: 'each VM\'s vCPUs and VMM are worker threads; 16 VMs of 8 vCPUs stay within the deterministic driver\'s 255 roles' },
  reallocations: { what: 'the vendor driver\'s reallocations', min: 0, max: 100_000, text: '0 .. 100000', why: 'each waits for the guests\' acknowledgement; 10^5 is minutes under the deterministic driver' },
  slots: { what: 'memslots', min: 1, max: 32764, text: '1 .. 32764', why: 'KVM_USER_MEM_SLOTS on x86: KVM_MEM_SLOTS_NUM (32767) less its 3 internal slots' },
  ringEntries: { what: 'dirty ring entries per vCPU', min: 256, max: 65536, text: '256 .. 65536, a power of two', why: 'KVM: at least one page of 16-byte entries, at most KVM_DIRTY_RING_MAX_ENTRIES' },
  writes: {
    what: 'guest writes per iteration', min: 1, max: 100_000_000, text: '1 .. 10^8',
    why: 'an iteration is verified page by page; 10^8 writes is minutes of guest time under the deterministic driver',
  },
  iterations: { what: 'dirty_log_test iterations', min: 1, max: 0xffff, text: '1 .. 65535', why: 'a page stamp holds the iteration in 16 bits' },
  batchPages: { what: 'pages per stream frame', min: 1, max: 1024, text: '1 .. 1024', why: 'a frame must fit the in-process stream ring (4 MiB frames at most)' },
  bandwidth: {
    what: 'migration bandwidth', min: 4096, max: 1024 * GiB, text: '4 KiB/s .. 1 TiB/s, or unlimited',
    why: 'a frame carries at least one page; shrink scales the bandwidth down with the guest, so tiny guests get tiny rates',
  },
  devices: { what: 'devices', min: 0, max: 64, text: '0 .. 64', why: 'each device is a worker thread; the IOMMU keeps a line of words per device' },
  scheduleSteps: {
    what: 'schedule steps in a replay file', min: 0, max: 1 << 28, text: '0 .. 2^28',
    why: 'one byte per step; the longest runs hunt records are a few million steps',
  },
  scenarioFileBytes: { what: 'a scenario or litmus file', min: 0, max: MiB, text: '1 MiB', why: 'a scenario is a page of YAML' },
  replayFileBytes: { what: 'a replay file', min: 0, max: 256 * MiB, text: '256 MiB', why: 'the schedule at its longest, and the scenario' },
  shardFileBytes: { what: 'a hunt shard file', min: 0, max: 64 * MiB, text: '64 MiB', why: 'one JSON line per run, a shard holds a few thousand runs' },
  seeds: { what: 'hunt seeds', min: 1, max: 1_000_000, text: '1 .. 1000000', why: 'a shard file holds a line per run; a million runs of the smallest guest take days on one machine, so a campaign shards them' },
  shards: { what: 'hunt shards', min: 1, max: 4096, text: '1 .. 4096', why: 'merge reads every shard\'s file; more than 4096 is not a count any campaign here has used' },
  idleTimeoutS: { what: 'the destination\'s idle timeout', min: 0, max: 86400, text: 'up to 86400 s', why: 'a day outlasts a frame at the slowest bandwidth cap; Node clamps socket timers past 24.8 days to 1 ms' },
  yamlAliases: { what: 'YAML aliases in a document', min: 0, max: 100, text: '100', why: 'an alias bomb expands exponentially; scenario files need none' },
} as const satisfies Record<string, Limit>;

export type LimitName = keyof typeof LIMITS;

/** The table of limits as text lines (vmemlab --help). */
export function limitLines(): string[] {
  const rows = Object.values(LIMITS) as Limit[];
  const w = Math.max(...rows.map((l) => l.what.length));
  return rows.map((l) => `  ${l.what.padEnd(w)}  ${l.text}`);
}
