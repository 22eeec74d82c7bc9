import { HostActor } from '../host-actor.ts';
import type { Vm } from '../vm.ts';
import { PAGE_SIZE } from '../constants.ts';
import { LockHolder } from './domain-lock.ts';
import { IommuWord, MailboxOp, MailboxWord, deviceBase } from './iommu-layout.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';

/** An ioctl the service failed, for the run's report. */
export interface IommuServiceEvent { kind: 'iommu-error'; device: number; detail: string }

/**
 * The IOMMU service: its own role (a worker under free-run) that owns map and unmap.
 * Devices' drivers put requests in their mailbox and ring the doorbell; the service
 * serves them one at a time, each to its end (an unmap waits for the device IOTLB
 * invalidation), and answers with the ioctl's return value. It pauses with the other
 * host actors, between requests only, so an unmap in flight finishes (and its dirty bits
 * are collected) before the final sync.
 */
export function* iommuService(vm: Vm, report: (e: IommuServiceEvent) => void): Steps {
  const iommu = vm.iommu;
  if (iommu === null) throw new Error('the IOMMU service needs a VM with an IOMMU');
  const w = iommu.words;
  const devices = iommu.layout.config.devices;
  const actor = new HostActor(vm.global);
  for (;;) {
    yield* actor.gate();
    const bell = Atomics.load(w, IommuWord.DOORBELL); // read before the scan: a later request wakes us
    let served = false;
    for (let d = 0; d < devices; d++) {
      const b = deviceBase(d);
      const seq = Atomics.load(w, b + MailboxWord.REQ_SEQ);
      if (seq === Atomics.load(w, b + MailboxWord.RESP_SEQ)) continue;
      const op = w[b + MailboxWord.OP]!;
      const iova = w[b + MailboxWord.IOVA]! * PAGE_SIZE;
      const size = w[b + MailboxWord.PAGES]! * PAGE_SIZE;
      let ret: number;
      if (op === MailboxOp.MAP) {
        yield* iommu.lock.acquire(LockHolder.SERVICE);
        const r = iommu.mapDma(iova, size, w[b + MailboxWord.GFN]! * PAGE_SIZE, w[b + MailboxWord.PROT]!);
        iommu.lock.release();
        if (r.ret < 0) report({ kind: 'iommu-error', device: d, detail: r.detail });
        ret = r.ret;
      } else if (op === MailboxOp.UNMAP) {
        const r = yield* iommu.unmapDma(iova, size);
        if (r.ret < 0) report({ kind: 'iommu-error', device: d, detail: r.detail });
        ret = r.ret < 0 ? r.ret : 0;
      } else {
        ret = -22;
        report({ kind: 'iommu-error', device: d, detail: `unknown mailbox request ${op}` });
      }
      w[b + MailboxWord.RESULT] = ret;
      Atomics.store(w, b + MailboxWord.RESP_SEQ, seq);
      Atomics.notify(w, b + MailboxWord.RESP_SEQ);
      served = true;
      yield undefined;
    }
    if (!served) yield waitFor(WaitCode.IOMMU_REQUEST, 0, 0, { array: w, index: IommuWord.DOORBELL, value: bell });
  }
}
