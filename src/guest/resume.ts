import type { GuestMemory } from '../host/guest-memory.ts';
import { sweepPosition, sweepSlices } from '../oracles/sweep-pattern.ts';
import { Prng } from '../util/prng.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload } from '../host/guest-op.ts';
import { type WorkloadOptions, createWorkload } from './workload.ts';

/**
 * The guest on a destination that resumes after a migration: the same workload,
 * continuing from the migrated memory. vmemlab does not migrate vCPU registers, so what
 * a guest keeps in them is recovered from memory where the guest's own data allows it:
 * migration-test's sweep continues at the page where it stopped, which is where byte 0
 * steps down (by the nearest valid sweep pattern, so that a page the migration lost
 * stays the only page out of line, as it would with the registers migrated; the slice
 * start when all bytes are equal). Guests driven by a PRNG continue with a fresh stream
 * (nothing can tell its draws from the source's).
 */
export function resumeWorkload(
  o: WorkloadOptions, memory: GuestMemory, vcpu: number, vcpus: number, seed: number,
): Workload {
  const ranges = memory.slots.map((s) => ({ baseGfn: s.baseGfn, pages: s.pages }));
  if (o.name !== 'sweep') return createWorkload(o, ranges, vcpu, vcpus, Prng.derive(seed, RESUME_STREAM));
  const w = createWorkload(o, ranges, vcpu, vcpus, seed);
  // The slice as createWorkload cuts it; its pages' gfns in order come from the workload itself.
  const { count } = sweepSlices(ranges.reduce((n, r) => n + r.pages, 0), vcpus)[vcpu]!;
  const op: GuestOp = { kind: OpKind.STORE8, gfn: 0, value: 0, offset: 0 };
  const ctx: GuestContext = { iteration: 0 };
  const gfns = new Float64Array(count);
  for (let i = 0; i < count; i++) { w.next(op, ctx); gfns[i] = op.gfn; } // the zeroing pass: one op per page
  const byte0 = (gfn: number): number => {
    const s = memory.findSlot(gfn)!;
    return s.bytes(gfn - s.baseGfn)[s.byteOffset(gfn - s.baseGfn)]!;
  };
  const bytes = new Uint8Array(count);
  for (let i = 0; i < count; i++) bytes[i] = byte0(gfns[i]!);
  const at = sweepPosition(bytes);
  for (let i = 0; i < at; i++) w.next(op, ctx); // into the incrementing passes, up to the stopped page
  return w;
}

/** Salt for the PRNG stream of a resumed guest (Prng.derive's second argument). */
const RESUME_STREAM = 0x7e5e;
