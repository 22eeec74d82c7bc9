import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { cli } from './cli-helper.ts';
import { explainDowntime } from '../src/migration/downtime.ts';
import { KVM_BACKUP_BITMAP, KVM_RINGS } from '../src/host/vmm/kvm-ring-source.ts';

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

describe('why the downtime exceeded its limit', () => {
  const base = { estimatedPages: 5242, pagesSent: 0, stopMs: 2, syncMs: 5, sendMs: 2100, destinationMs: 40 };
  it('names the source the final sync found most pages in, and what the estimate saw', () => {
    const t = explainDowntime(2152, 300, 159.97, { ...base, finalSync: [{ source: KVM_RINGS, pages: 1456 }, { source: KVM_BACKUP_BITMAP, pages: 201874 }], pagesSent: 208572 });
    expect(t).toBe('downtime 2152 ms exceeded the 300 ms limit: the final sync found 203330 pages, 201874 of them in the ring\'s backup bitmap (kvm_write_guest with no running vCPU), which QEMU reads only at completion, ' +
      '1456 in the vCPUs\' dirty rings (written since the last sync); the estimate (159.97 ms) saw only the 5242 pages left before the stop ' +
      '(stopping the VM 2.0 ms, final sync 5.0 ms, sending 208572 pages 2100.0 ms, the destination 40.0 ms)');
  });

  it('when the final sync found little, names the phase that took the time', () => {
    const t = explainDowntime(900, 300, 100, { ...base, finalSync: [{ source: KVM_RINGS, pages: 10 }], stopMs: 850, sendMs: 20 });
    expect(t).toMatch(/^downtime 900 ms exceeded the 300 ms limit: stopping the vCPUs and host actors took 850.0 ms; the final sync found 10 pages, the estimate saw 5242/);
  });

  it('says nothing when the downtime was within the limit, or nothing completed', () => {
    expect(explainDowntime(250, 300, 100, { ...base, finalSync: [] })).toBeNull();
    expect(explainDowntime(900, 300, 100, null)).toBeNull();
  });
});
