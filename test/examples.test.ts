import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { cli } from './cli-helper.ts';
import { KVM_BACKUP_BITMAP } from '../src/host/vmm/kvm-ring-source.ts';

const DIR = fileURLToPath(new URL('../examples/', import.meta.url));
const EXAMPLES = readdirSync(DIR).filter((f) => f.endsWith('.yaml')).sort();

/**
 * Every shipped example states its expected outcome and reaches it, as shipped. Examples
 * under free-run are rate-limited with a wide margin (a guest dirtying a small fraction of
 * the bandwidth, or a bug demonstrated under the deterministic driver), so the outcome is
 * a property of the scenario, not of the machine (BENCHMARKS.md: each 20 times in a row,
 * with and without a CPU burner).
 */
describe('the shipped examples', () => {
  it('there are examples of every kind', () => {
    expect(EXAMPLES.length).toBeGreaterThanOrEqual(12);
    expect(EXAMPLES.filter((f) => f.startsWith('devices-')).length).toBeGreaterThanOrEqual(5);
  });

  for (const f of EXAMPLES) {
    it(`${f}: states its expected outcome, and a run reaches it`, async () => {
      const text = readFileSync(DIR + f, 'utf8');
      expect(text, 'the description says what to expect').toMatch(/Expected outcome: /);
      expect(text).toMatch(/^expect: /m);
      const r = await cli('run', DIR + f, '--json');
      expect(r.err, f).toBe('');
      const doc = JSON.parse(r.out);
      expect(doc.expectation, `${f}: ${doc.expectation?.line}; ${doc.reason ?? ''} ${(doc.errors ?? []).join('; ')}`).toMatchObject({ met: true });
      if (f.startsWith('devices-')) {
        expect(doc.dma.devices[0].dmaWrites, `${f}: the device wrote guest memory`).toBeGreaterThan(0);
      }
      if (f === 'backup-bitmap-downtime.yaml') {
        const c = doc.info.completion;
        const backup = c.finalSync.find((s: { source: string }) => s.source === KVM_BACKUP_BITMAP).pages;
        expect(backup, 'host writes waited in the backup bitmap').toBeGreaterThan(c.estimatedPages);
        if (doc.info.downtimeExceeded !== null) expect(doc.info.downtimeExceeded).toMatch(/in the ring's backup bitmap \(kvm_write_guest with no running vCPU\), which QEMU reads only at completion/);
      }
    });
  }
});
