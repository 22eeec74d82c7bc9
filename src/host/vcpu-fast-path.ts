import { KVM_MEMORY_ATTRIBUTE_PRIVATE } from './constants.ts';
import { GlobalWord, REGION_PAGES_SHIFT } from './layout.ts';
import { type Memslot, PAGE_WORDS, REGION_PAGE_MASK, stampWord } from './memslot.ts';
import type { Vm } from './vm.ts';
import { type GuestContext, type GuestOp, OpKind, type Workload, type Write64Workload } from './guest-op.ts';

/*
 * The vCPU's fast paths: guest operations that hit the TLB, run back to back with no
 * step boundary between them (the steady-state write path, docs/architecture.md).
 * Apart from Vcpu's phases so that the code the write-path benchmark measures is this
 * one small file; Vcpu.runBurst calls them between operations.
 */

/**
 * OpKind, the memslot region geometry and Phase.WALK as constants of this file, so that the hot
 * paths compare with and shift by immediates whatever the compiler (a const enum or a
 * constant imported from another module is a property or binding load when each file is
 * compiled on its own, as tsx does). Checked against the originals when the
 * module loads (Phase.WALK by vcpu.ts, which defines it).
 */
const enum K { WRITE64 = 1, STORE8 = 2, INC8 = 3, READ = 4, MAP_GPA_RANGE = 5, REGION_SHIFT = 19, REGION_MASK = (1 << 19) - 1, PAGE_WORDS = 1024, WALK = 1, PRIVATE = 8 }
if (
  (K.PRIVATE as number) !== KVM_MEMORY_ATTRIBUTE_PRIVATE ||
  (K.WRITE64 as number) !== OpKind.WRITE64 || (K.STORE8 as number) !== OpKind.STORE8 || (K.INC8 as number) !== OpKind.INC8
  || (K.READ as number) !== OpKind.READ || (K.MAP_GPA_RANGE as number) !== OpKind.MAP_GPA_RANGE || (K.REGION_SHIFT as number) !== REGION_PAGES_SHIFT
  || (K.REGION_MASK as number) !== REGION_PAGE_MASK || (K.PAGE_WORDS as number) !== PAGE_WORDS
) throw new Error('vcpu-fast-path.ts: constants out of step with workload.ts / layout.ts');

/** The phase a TLB miss leaves the operation in (Phase.WALK; vcpu.ts checks it). */
export const FAST_PATH_MISS_PHASE: number = K.WALK;

/** The vCPU state the fast paths read and advance (a Vcpu). */
export interface VcpuFastState {
  readonly vm: Vm;
  readonly index: number;
  readonly op: GuestOp;
  readonly ctx: GuestContext;
  readonly workload: Workload;
  /** The workload again when it only writes WRITE64 of the iteration, else undefined. */
  readonly writes: Write64Workload | undefined;
  readonly tlb: Int32Array;
  readonly tlbGen: number;
  /**
   * On a VM with private memory, KVM's attribute byte per page (VM-wide): private
   * accesses and reads are left to the phases (which check them against it), and every
   * store here is checked by the stale-store probe. Null elsewhere.
   */
  readonly attributeBytes: Uint8Array | null;
  seq: number;
  ops: number;
  progress: number;
  opIteration: number;
  opPending: boolean;
  slot: Memslot | undefined;
  page: number;
  phase: number;
}

/**
 * The private memory oracle's probe: a store retired through a shared translation of a
 * page whose attribute says private (KVM_SET_MEMORY_ATTRIBUTES must zap and flush before
 * it changes the attribute). Counted with the first frame, in shared words.
 */
export function countStaleStore(global: Int32Array, gfn: number): void {
  Atomics.add(global, GlobalWord.STALE_STORES, 1);
  Atomics.compareExchange(global, GlobalWord.STALE_STORE_FIRST_GFN, 0, gfn + 1);
}

/** runWriteHits' RAM view before it has found a region (never written: the gfn range is empty). */
const NO_RAM: Uint32Array = new Uint32Array(0);

/**
 * runBurst's fast path: whole operations, TRANSLATE then STORE back to back, for as
 * long as they are reads or writes that hit the TLB, up to `limit` of them. These are
 * exactly the actions advance() takes for such operations (a burst has no boundary
 * between phases); the per-operation bookkeeping lives in locals and is written back
 * once. The first operation that needs more is left fetched and pending: after a TLB
 * miss, translated and in phase WALK, as TRANSLATE leaves it; at an address outside
 * every slot, in phase TRANSLATE, for advance() to take the exit. Returns the
 * operations retired.
 */
export function runTlbHits(v: VcpuFastState, limit: number): number {
  const op = v.op;
  const ctx = v.ctx;
  const workload = v.workload;
  const memory = v.vm.memory;
  const tlb = v.tlb;
  const tag = v.tlbGen + 1;
  const writer = v.index + 1;
  const iteration = ctx.iteration;
  const stamp = stampWord(writer, iteration);
  let seq = v.seq;
  let slot = v.slot;
  let page = v.page;
  let n = 0;
  // The slot of the previous operation, for translating without findSlot while the
  // guest stays in it (findSlot would return it without changing its own cache, which
  // it set on the lookup that found it): its gfn range, TLB offset, and its RAM view
  // when the slot is one region.
  let cur: Memslot | undefined;
  let curBase = 0;
  let curEnd = 0;
  let curTlb = 0;
  let curWords: Uint32Array | undefined;
  let missSlot: Memslot | undefined;
  let missPage = 0;
  const attrs = v.attributeBytes;
  while (n < limit) {
    workload.next(op, ctx);
    // A hypercall is no memory access: left pending in TRANSLATE for advance(). So are,
    // with private memory, a private access and a read (checked against the attribute there).
    if ((op.kind as number) === K.MAP_GPA_RANGE || (attrs !== null && (op.private === true || (op.kind as number) === K.READ))) { v.opPending = true; break; }
    const gfn = op.gfn;
    if (!(gfn >= curBase && gfn < curEnd)) {
      const found = memory.findSlot(gfn);
      if (found === undefined) { v.opPending = true; break; }
      cur = found;
      curBase = found.baseGfn;
      curEnd = found.endGfn;
      curTlb = found.firstPage - curBase;
      curWords = found.u32.length === 1 ? found.u32[0] : undefined;
    }
    const s = cur!;
    const p = gfn - curBase;
    const kind: number = op.kind;
    if (kind === K.READ) {
      s.readU64(p);
    } else {
      if (tlb[gfn + curTlb] !== tag) {
        // A TLB miss: what TRANSLATE does for it, and on to WALK.
        v.opPending = true;
        missSlot = s;
        missPage = p;
        break;
      }
      if (kind === K.WRITE64) {
        // Memslot.writeU64Stamped, written out so that it is inlined whatever the
        // compiler's inlining budget: the same four stores in the same order.
        const w = curWords ?? s.u32[p >>> K.REGION_SHIFT]!;
        const i = (p & K.REGION_MASK) * K.PAGE_WORDS;
        const value = op.value;
        w[i] = value >>> 0;
        w[i + 1] = value < 4294967296 && value > -4294967296 ? 0 : (value / 4294967296) >>> 0;
        w[i + 2] = stamp;
        w[i + 3] = ++seq;
      } else {
        const bytes = s.bytes(p);
        const at = s.byteOffset(p) + op.offset;
        bytes[at] = kind === K.INC8 ? (bytes[at]! + 1) & 0xff : op.value;
        s.stamp(p, writer, ++seq, iteration);
      }
      if (attrs !== null && (attrs[gfn + curTlb]! & K.PRIVATE) !== 0) countStaleStore(v.vm.global, gfn);
    }
    slot = s;
    page = p;
    n++;
  }
  if (limit > 0) v.opIteration = iteration;
  v.seq = seq;
  v.ops += n;
  v.progress += n;
  if (missSlot !== undefined) {
    v.slot = missSlot;
    v.page = missPage;
    v.phase = K.WALK;
  } else {
    v.slot = slot;
    v.page = page;
  }
  return n;
}

/**
 * runTlbHits for a Write64Workload: the same actions, with the operation reduced to its
 * gfn (kind and value are WRITE64 and the iteration for all of them) and the memory
 * reduced to one region of one slot at a time, whose gfn range, TLB offset and RAM
 * view live in locals. Leaves the first operation that needs more fetched and pending
 * exactly as runTlbHits does.
 */
export function runWriteHits(v: VcpuFastState, limit: number): number {
  const source = v.writes!;
  const memory = v.vm.memory;
  const tlb = v.tlb;
  const tag = v.tlbGen + 1;
  const iteration = v.ctx.iteration;
  const stamp = stampWord(v.index + 1, iteration);
  const lo = iteration >>> 0;
  const hi = iteration < 4294967296 && iteration > -4294967296 ? 0 : (iteration / 4294967296) >>> 0;
  let seq = v.seq;
  let n = 0;
  // The region of the previous write: gfns [base, end), RAM view w, TLB index offset.
  let slot: Memslot | undefined;
  let base = 0;
  let end = 0;
  let tlbOffset = 0;
  let w = NO_RAM;
  let gfn = 0;
  let pending = false;
  const attrs = v.attributeBytes;
  while (n < limit) {
    gfn = source.nextWriteGfn();
    if (!(gfn >= base && gfn < end)) {
      const found = memory.findSlot(gfn);
      if (found === undefined) { pending = true; slot = undefined; break; }
      const region = (gfn - found.baseGfn) >>> K.REGION_SHIFT;
      slot = found;
      base = found.baseGfn + (region << K.REGION_SHIFT);
      end = Math.min(found.endGfn, base + (1 << K.REGION_SHIFT));
      tlbOffset = found.firstPage - found.baseGfn;
      w = found.u32[region]!;
    }
    if (tlb[gfn + tlbOffset] !== tag) { pending = true; break; }
    const i = (gfn - base) * K.PAGE_WORDS;
    w[i] = lo;
    w[i + 1] = hi;
    w[i + 2] = stamp;
    w[i + 3] = ++seq;
    // With private memory: the probe (a Write64Workload's writes are all shared).
    if (attrs !== null && (attrs[gfn + tlbOffset]! & K.PRIVATE) !== 0) countStaleStore(v.vm.global, gfn);
    n++;
  }
  if (limit > 0) v.opIteration = iteration;
  v.seq = seq;
  v.ops += n;
  v.progress += n;
  if (n > 0 || pending) {
    const op = v.op;
    op.kind = OpKind.WRITE64;
    op.gfn = gfn;
    op.value = iteration;
  }
  if (pending) {
    v.opPending = true;
    if (slot !== undefined) {
      // A TLB miss: translated, on to WALK (as TRANSLATE leaves it).
      v.slot = slot;
      v.page = gfn - slot.baseGfn;
      v.phase = K.WALK;
    }
  } else if (slot !== undefined) {
    v.slot = slot;
    v.page = gfn - slot.baseGfn;
  }
  return n;
}
