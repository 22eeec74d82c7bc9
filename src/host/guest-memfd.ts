import { EINVAL, EOPNOTSUPP, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE_SIZE } from './constants.ts';
import type { Memslot } from './memslot.ts';
import { SPTE_PRIVATE } from './spte.ts';
import type { Vm } from './vm.ts';
import { KvmError } from '../util/errors.ts';
import type { Steps } from '../roles/role.ts';
import { hex } from '../util/hex.ts';

/**
 * fallocate(2) on a memslot's guest_memfd (virt/kvm/guest_memfd.c, kvm_gmem_fallocate),
 * bound at file offset 0 of the slot. The checks are the kernel's, in its order.
 * PUNCH_HOLE discards private pages (kvm_gmem_punch_hole): begin an MMU invalidation and
 * zap the range's private SPTEs, flush, truncate the pages (they read back as zeros),
 * end the invalidation; a vCPU that faults meanwhile retries, and afterwards maps the
 * zeroed page. Without PUNCH_HOLE it allocates, which here changes nothing: the
 * backing is all there (and reads zeros until written).
 */
export function* kvmGmemFallocate(vm: Vm, slot: Memslot, mode: number, offset: number, len: number): Steps {
  const call = `fallocate(guest_memfd of slot ${slot.id})`;
  const gmem = slot.gmem;
  if (gmem === null) throw new KvmError(EINVAL, call, `slot ${slot.id} has no guest_memfd (KVM_MEM_GUEST_MEMFD)`);
  if ((mode & FALLOC_FL_KEEP_SIZE) === 0) throw new KvmError(EOPNOTSUPP, call, `mode ${hex(mode)} without FALLOC_FL_KEEP_SIZE`);
  if ((mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)) !== 0) throw new KvmError(EOPNOTSUPP, call, `mode ${hex(mode)}`);
  // vfs_fallocate: a negative offset or an empty length.
  if (!Number.isInteger(offset) || !Number.isInteger(len) || offset < 0 || len <= 0) throw new KvmError(EINVAL, call, `offset ${offset}, len ${len}`);
  if (offset % PAGE_SIZE !== 0 || len % PAGE_SIZE !== 0) {
    throw new KvmError(EINVAL, call, `offset ${hex(offset)} or len ${hex(len)} is not page aligned`);
  }
  const size = slot.pages * PAGE_SIZE;
  if ((mode & FALLOC_FL_PUNCH_HOLE) === 0) {
    if (offset + len > size) throw new KvmError(EINVAL, call, `${hex(offset)}+${hex(len)} passes the file's end (${hex(size)})`);
    return;
  }
  // truncate_inode_pages_range stops at the file's end.
  const first = offset / PAGE_SIZE;
  const count = Math.min(len / PAGE_SIZE, slot.pages - first);
  if (count <= 0) return;
  const start = slot.baseGfn + first;
  yield* vm.invalidateGfnRange(start, start + count, SPTE_PRIVATE);
  gmem.zeroPages(first, count);
  yield undefined;
  vm.mmuInvalidate.end();
}
