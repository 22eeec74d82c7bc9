import { describe, expect, it } from 'vitest';
import { explainDowntime } from '../src/migration/downtime.ts';
import { KVM_BACKUP_BITMAP, KVM_RINGS } from '../src/host/vmm/kvm-ring-source.ts';
import { KVM_DIRTY_BITMAP } from '../src/host/vmm/kvm-bitmap-source.ts';

/** The report's words when a completed migration's downtime exceeded its limit (migration/downtime.ts). */
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

  it('at exactly the limit says nothing (the limit is met); one ms over, it explains', () => {
    const c = { ...base, finalSync: [{ source: KVM_RINGS, pages: 10 }] };
    expect(explainDowntime(300, 300, 100, c)).toBeNull();
    expect(explainDowntime(301, 300, 100, c)).toMatch(/^downtime 301 ms exceeded the 300 ms limit: /);
  });

  it('names every kind of source in its own words, the largest first, and only those that found pages', () => {
    const t = explainDowntime(1000, 300, 10, { ...base, estimatedPages: 10, finalSync: [
      { source: KVM_DIRTY_BITMAP, pages: 30 }, { source: 'iommufd-hwpt', pages: 50 }, { source: KVM_RINGS, pages: 0 }, { source: 'type1', pages: 20 },
    ] });
    expect(t).toBe('downtime 1000 ms exceeded the 300 ms limit: the final sync found 100 pages, 50 of them reported by iommufd-hwpt, 30 in KVM\'s dirty bitmap (written since the last sync), 20 reported by type1; ' +
      'the estimate (10.00 ms) saw only the 10 pages left before the stop (stopping the VM 2.0 ms, final sync 5.0 ms, sending 0 pages 2100.0 ms, the destination 40.0 ms)');
  });

  it('one source alone is named alone', () => {
    expect(explainDowntime(1000, 300, 10, { ...base, estimatedPages: 10, finalSync: [{ source: KVM_BACKUP_BITMAP, pages: 99 }] }))
      .toMatch(/found 99 pages, 99 of them in the ring's backup bitmap \(kvm_write_guest with no running vCPU\), which QEMU reads only at completion; the estimate/);
  });

  it('when the final sync found no more than the estimate saw, the slowest phase is named, whichever it is', () => {
    const c = (o: Partial<typeof base>) => ({ ...base, stopMs: 1, syncMs: 1, sendMs: 1, destinationMs: 1, ...o, finalSync: [{ source: KVM_RINGS, pages: 5242 }] });
    expect(explainDowntime(900, 300, 100, c({ syncMs: 800 }))).toMatch(/: the final sync took 800\.0 ms; the final sync found 5242 pages, the estimate saw 5242 \(/);
    expect(explainDowntime(900, 300, 100, c({ sendMs: 800, pagesSent: 7 }))).toMatch(/: sending the last 7 pages took 800\.0 ms \(the estimate was 100\.00 ms at the measured bandwidth\); /);
    expect(explainDowntime(900, 300, 100, c({ destinationMs: 800 }))).toMatch(/: the destination took 800\.0 ms to apply them and acknowledge; /);
  });
});
