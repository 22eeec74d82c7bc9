import { describe, expect, it } from 'vitest';
import { ENXIO, EINVAL } from '../src/host/constants.ts';
import { GlobalWord } from '../src/host/layout.ts';
import { KvmVfio } from '../src/host/kvm-vfio.ts';
import { KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET, KvmVirtioDevice } from '../src/host/kvm-virtio-device.ts';
import { runMigration } from '../src/scenarios/migration.ts';
import { failureOf } from '../src/scenarios/outcome.ts';
import { migrationSetup } from '../src/scenarios/settings.ts';
import { KvmError } from '../src/util/errors.ts';
import { MANUAL, complete, makeVm, refusedMigration } from './helpers.ts';

/**
 * The ways a VMM can tell KVM that a device does non-coherent DMA, so that KVM honours the
 * guest's PAT (the seed discussion's proposals, side by side): VFIO for an assigned device,
 * a VM capability, the KVM virtio device's NONCOHERENT_SET; or nobody.
 */
const count = (vm: ReturnType<typeof makeVm>): number => Atomics.load(vm.global, GlobalWord.NONCOHERENT_DMA_COUNT);
const errno = (f: () => unknown): number => { try { f(); } catch (e) { if (e instanceof KvmError) return e.errno; throw e; } return 0; };

describe('the KVM virtio device (KVM_DEV_TYPE_VIRTIO)', () => {
  it('NONCOHERENT_SET registers non-coherent DMA once (set-only: a second set changes nothing); its release unregisters', () => {
    const vm = makeVm({ tracking: MANUAL, pages: 8 });
    const d = new KvmVirtioDevice(vm);
    expect(complete(d.setAttr(KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET)), 'the 0 -> 1 transition zapped every SPTE').toBe(8);
    expect(complete(d.setAttr(KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET))).toBe(0);
    expect([count(vm), d.isNoncoherent]).toEqual([1, true]);
    complete(d.release());
    expect([count(vm), d.isNoncoherent]).toEqual([0, false]);
    expect(complete(d.release()), 'released once').toBe(0);
    expect(count(vm)).toBe(0);
  });

  it('a release without NONCOHERENT_SET unregisters nothing; unknown attributes and a released device are ENXIO', () => {
    const vm = makeVm({ tracking: MANUAL, pages: 8 });
    complete(vm.registerNoncoherentDma()); // VFIO's, for another device
    const d = new KvmVirtioDevice(vm);
    expect(errno(() => complete(d.setAttr(KVM_DEV_VIRTIO_NONCOHERENT, 'KVM_DEV_VIRTIO_NONCOHERENT_CLEAR')))).toBe(ENXIO);
    complete(d.release());
    expect(count(vm), 'VFIO\'s registration stands').toBe(1);
    expect(errno(() => complete(d.setAttr(KVM_DEV_VIRTIO_NONCOHERENT, KVM_DEV_VIRTIO_NONCOHERENT_SET)))).toBe(ENXIO);
  });
});

describe('KVM\'s VFIO device (kvm_vfio_update_coherency)', () => {
  it('registers once while any file cannot enforce coherency, whatever the order; a coherent file alone registers nothing', () => {
    for (const order of [[false, true, false], [true, false, true]]) {
      const vm = makeVm({ tracking: MANUAL, pages: 8 });
      const kv = new KvmVfio(vm);
      const zapped = order.map((coherent) => complete(kv.fileAdd(coherent)));
      expect(zapped.filter((z) => z > 0), `order ${order}: one 0 -> 1 transition`).toEqual([8]);
      expect([count(vm), kv.registered]).toEqual([1, true]);
    }
    const vm = makeVm({ tracking: MANUAL, pages: 8 });
    complete(new KvmVfio(vm).fileAdd(true));
    expect(count(vm)).toBe(0);
  });

  it('noncoherent-unbalanced: a coherent file added after a non-coherent one unregisters (1 -> 0, every SPTE zapped), and the bug says it acted', () => {
    const vm = makeVm({ tracking: MANUAL, pages: 8, bugs: { noncoherentUnbalanced: true } });
    const kv = new KvmVfio(vm, true);
    complete(kv.fileAdd(false));
    vm.populate();
    expect(complete(kv.fileAdd(true))).toBe(8);
    expect([count(vm), kv.registered]).toEqual([0, false]);
    expect(vm.acts.count('noncoherent-unbalanced')).toBe(1);
  });
});

describe('the VM capability', () => {
  it('registers non-coherent DMA for the VM\'s life; a second enable is EINVAL and changes nothing', () => {
    const vm = makeVm({ tracking: MANUAL, pages: 8 });
    expect(complete(vm.enableCapNoncoherentDma())).toBe(8);
    expect(errno(() => complete(vm.enableCapNoncoherentDma()))).toBe(EINVAL);
    expect(count(vm)).toBe(1);
  });
});

describe('the ways side by side, on the render guest', () => {
  const base = { cpuCache: 'on', workload: 'render', memoryBytes: '4MiB', vcpus: '2', devices: ['dma-engine:snoop=false,every=4,buffers=32,remap-every=0'], driver: 'deterministic', noncoherentMigration: 'clflush-before-read' };
  const run = (request: string) => runMigration(migrationSetup({ ...base, noncoherentRequest: request } as never).scenario, { driver: 'deterministic', watchdogMs: 10_000, burst: 64 });

  for (const request of ['capability', 'kvm-virtio-device']) {
    it(`${request}: KVM honours the guest's WC mapping as with VFIO's registration, and the migration moves every write`, async () => {
      const r = await run(request);
      expect(r.status, `${r.reason ?? ''}`).toBe('passed');
      expect(r.cache!.staleReads).toEqual({ cpu: 0, device: 0, migration: 0, firstGfn: null });
    });
  }

  it('none (the seeds\' problem): KVM ignores the guest\'s PAT, the WC buffers are cached, and the device reads stale data', async () => {
    const r = await run('none');
    expect(failureOf(r)?.kind).toBe('stale-data');
    expect(r.cache!.staleReads.device).toBeGreaterThan(0);
  });

  it('a way to request honouring without a device doing non-coherent DMA is refused, naming the setting', () => {
    expect(refusedMigration({ noncoherentRequest: 'capability' })).toBe('--noncoherent-request: capability is how KVM learns of a device doing non-coherent DMA; no device has snoop=false');
    expect(refusedMigration({ noncoherentRequest: 'sometimes' })).toBe('--noncoherent-request: unknown way to request honouring \'sometimes\' (one of: vfio, capability, kvm-virtio-device, kvm-mem-dma, none)');
  });
});
