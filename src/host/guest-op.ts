/**
 * What a vCPU runs: the guest's operations, one at a time, from a workload (the guest's
 * code). The vCPU (vcpu.ts) and the workloads (src/guest/) meet here.
 */

/** Guest operation kinds: the writes first, then what writes nothing (the vCPU tells them apart with one compare). */
export const enum OpKind {
  /** Store a 64-bit value into the page's first 8 bytes. */
  WRITE64 = 1,
  /** Store one byte (`value`) at byte `offset`. */
  STORE8 = 2,
  /** Increment byte `offset` (migration-test's sweep: byte 0). */
  INC8 = 3,
  /** Read the page (no dirty logging involved). */
  READ = 4,
  /**
   * KVM_HC_MAP_GPA_RANGE: convert `value` pages from `gfn` on to private (`private` set) or
   * shared; `offset` is the page-size hint. The result lands in GuestContext.hypercallRet.
   */
  MAP_GPA_RANGE = 5,
  /**
   * The guest changes the memory type its page tables give `value` pages from `gfn` on
   * (the PAT index bits of their PTEs) to `offset`, an X86_MEMTYPE_* (memory-type.ts); on
   * a VM with the CPU cache model the vCPU's accesses to them then take it into account
   * (as far as the EPT memory type lets them). Elsewhere it changes nothing.
   */
  SET_PAT = 6,
  /**
   * WBINVD: the guest writes back and invalidates its caches (a driver handing buffers to a
   * device that does not snoop). It exits to KVM, which really flushes only while
   * non-coherent DMA is registered (kvmEmulateWbinvd), or flushes the KVM_MEM_DMA slots
   * alone; otherwise it is a no-op.
   */
  WBINVD = 7,
}

/** SET_PAT's `offset`: the memory type in its low bits ... */
export const SET_PAT_TYPE = 0xff;
/**
 * ... and this flag when the guest's cpa_flush does not CLFLUSH the range: on a CPU without
 * CLFLUSH (a VMM can hide it, QEMU's `-cpu ...,-clflush`) it flushes with WBINVD on every
 * CPU instead (cpa_flush -> cpa_flush_all, arch/x86/mm/pat/set_memory.c): the next operation.
 */
export const SET_PAT_NO_CLFLUSH = 0x100;
/**
 * ... and this one when the change answers the device's request to return to coherent DMA
 * (GuestContext.coherentSwitch): once it is done, the driver tells the device (CoherentSwitch.DONE).
 */
export const SET_PAT_COHERENT_ACK = 0x200;

/** One guest operation, filled in place by a workload (no allocation per operation). */
export interface GuestOp {
  kind: OpKind;
  gfn: number;
  value: number;
  /** STORE8 and INC8: the byte within the page (bytes 8-15 hold the stamp; 0 for byte 0). */
  offset: number;
  /**
   * A confidential guest's private access (a TDX guest's GPA without the shared bit, an
   * SNP guest's C-bit set); absent or false: shared. A workload that sets it sets it on
   * every operation.
   */
  private?: boolean;
}

/** What a guest can see: the dirty_log_test `iteration` global. */
export interface GuestContext {
  iteration: number;
  /** What the guest's last hypercall returned in RAX (0, or -KVM_ENOSYS, -KVM_EINVAL, or what the VMM left in hypercall.ret). */
  hypercallRet?: number;
  /**
   * A TD (VmConfig.mapGpa 'tdx'): what its last TDG.VP.VMCALL<MapGPA> left in R10, the
   * TDVMCALL status (TDVMCALL_STATUS_*, a u64), and in R11: on RETRY the GPA to call again
   * from, on an error the GPA KVM stopped at, on success the leaf (TDVMCALL_MAP_GPA) as the
   * guest passed it. Unset on other VMs.
   */
  tdvmcallStatus?: bigint;
  tdvmcallR11?: number;
  /**
   * The device asked the guest's driver to go back to coherent DMA (a virtio-gpu
   * configuration change before a migration: switch-to-coherent). Read only on a VM with
   * the CPU cache model.
   */
  coherentSwitch?: boolean;
  /** What the last READ of a mediated device's BAR page returned (the page's first 32-bit word). */
  mmioRead?: number;
}

export interface Workload {
  next(op: GuestOp, ctx: GuestContext): void;
}

/**
 * A workload whose every operation is WRITE64 of the current iteration (dirty_log_test's
 * guest, the hot set): the vCPU's fast path asks it for the page alone. `nextWriteGfn()`
 * draws exactly what `next()` draws, so both give the same run.
 */
export interface Write64Workload extends Workload {
  nextWriteGfn(): number;
}

export function isWrite64Workload(w: Workload): w is Write64Workload {
  return typeof (w as Partial<Write64Workload>).nextWriteGfn === 'function';
}
