import type { Raw, SettingKey } from './options.ts';

/**
 * `vmemlab run` with no scenario: a 4-vCPU, 1 GiB guest writing a 2 % hot set, each vCPU
 * held to QEMU's default vcpu-dirty-limit (1 MB/s), migrated with the dirty ring to an
 * in-process destination that resumes it; the rest as `migrate`. Held to 1 MB/s per vCPU
 * the guest dirties a sixteenth of what even a busy 2-core machine sends, so it converges
 * and completes within its downtime limit whatever the machine.
 */
export const DEFAULT_JOB: Partial<Record<SettingKey, Raw>> = { vcpus: '4', memoryBytes: '1GiB', workload: 'hotset', tracking: 'dirty-ring', dirtyLimit: '1MB/s' };

/**
 * `vmemlab hunt` with no scenario (and no --inject): the default job's guest scaled down
 * to 2 vCPUs and 16 MiB, so that each deterministic run takes well under a second, with
 * host writes, so that hunting exercises the ring's backup bitmap too.
 */
export const DEFAULT_HUNT_JOB: Partial<Record<SettingKey, Raw>> = { vcpus: '2', memoryBytes: '16MiB', workload: 'hotset', tracking: 'dirty-ring', hostWriteEvery: '64' };
