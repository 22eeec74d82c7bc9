import type { DeviceKind } from '../host/devices/device-config.ts';
import type { TrackingMode } from '../host/vmm/dirty-log.ts';
import { UserError } from '../util/errors.ts';
import type { BugName } from '../host/injections.ts';

export type { TrackingMode };

export interface CatalogEntry {
  name: BugName;
  /** What the code does wrong, in protocol words. */
  wrong: string;
  /** What goes wrong because of it. */
  effect: string;
  /** The real-world code or report it comes from. */
  reference: string;
  /** Tracking modes in which it can occur; the first is the default for demonstrations (none: it does not depend on dirty tracking). */
  modes: TrackingMode[];
  /** Needs host writes (kvm_write_guest without a vCPU) to show. */
  needsHostWrites?: boolean;
  /** Lives in a device of one of these kinds: the scenario needs one. */
  devices?: DeviceKind[];
  /** Not a correctness bug: it costs (extra pages sent), and the oracles stay clean. */
  costOnly?: boolean;
  /** What catches it. */
  detectedBy: string;
  /** The commands whose scenario exercises it. */
  commands: ('dirty-log-test' | 'migrate' | 'mdev')[];
  /** Why a run can pass with the bug injected: what never happened, so the bug never acted. */
  neverActed: string;
}

const BOTH: CatalogEntry['commands'] = ['dirty-log-test', 'migrate'];

/** The bug catalog: named, injectable protocol mistakes (docs/architecture.md, principle 6). */
export const CATALOG: readonly CatalogEntry[] = [
  {
    name: 'skip-tlb-shootdown',
    wrong: 'Re-protection (GET, CLEAR, ring reset) clears SPTE writable bits but never flushes remote TLBs.',
    effect: 'A vCPU keeps writing through a stale writable TLB entry; those writes are never logged and are lost.',
    reference: 'KVM kvm_flush_remote_tlbs after write-protecting (virt/kvm/kvm_main.c, kvm_vm_ioctl_reset_dirty_pages); Documentation/virt/kvm/api.rst',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'dirty_log_test oracle: a clean page holds the current iteration',
    commands: BOTH,
    neverActed: 'no re-protection (GET, CLEAR or ring reset) needed a remote TLB flush while a vCPU was in guest mode',
  },
  {
    name: 'ring-full-ignored',
    wrong: 'The vCPU does not exit with KVM_EXIT_DIRTY_RING_FULL at the soft limit and keeps pushing.',
    effect: 'The ring wraps and overwrites entries userspace has not harvested; those pages are never reported.',
    reference: 'virt/kvm/dirty_ring.c kvm_dirty_ring_soft_full / KVM_REQ_DIRTY_RING_SOFT_FULL; the WARN_ON in kvm_dirty_ring_push',
    modes: ['dirty-ring'],
    detectedBy: 'dirty_log_test oracle: a clean page holds the current iteration',
    commands: BOTH,
    neverActed: 'no ring reached its soft limit',
  },
  {
    name: 'harvest-skips-entry',
    wrong: 'Userspace marks a ring entry collected (flags = RESET) without recording its page (every 16th entry).',
    effect: 'KVM resets and re-protects the page as if it had been collected; its dirtiness is lost.',
    reference: 'QEMU kvm_dirty_ring_reap_one and the selftest dirty_ring_collect_one: harvest in order, never skip',
    modes: ['dirty-ring'],
    detectedBy: 'dirty_log_test oracle: a clean page holds the current iteration',
    commands: BOTH,
    neverActed: 'no ring had 16 entries harvested (it drops every 16th)',
  },
  {
    name: 'clear-without-protect',
    wrong: 'KVM_CLEAR_DIRTY_LOG clears the bitmap bits but does not write-protect the pages.',
    effect: 'Cleared pages stay writable, so their next writes fault no more and are never logged.',
    reference: 'KVM kvm_clear_dirty_log_protect -> kvm_arch_mmu_enable_log_dirty_pt_masked (virt/kvm/kvm_main.c)',
    modes: ['clear-log'],
    detectedBy: 'dirty_log_test oracle: a clean page holds the current iteration',
    commands: BOTH,
    neverActed: 'no KVM_CLEAR_DIRTY_LOG cleared a dirty bit',
  },
  {
    name: 'untracked-host-write',
    wrong: 'A host write-guest path stores into guest memory without mark_page_dirty_in_slot.',
    effect: 'The page changes without ever being logged dirty.',
    reference: 'kvm_write_guest -> mark_page_dirty_in_slot; paravirt clock and device emulation writes (arch/x86/kvm)',
    modes: ['dirty-log', 'clear-log', 'dirty-ring'],
    needsHostWrites: true,
    detectedBy: 'dirty_log_test oracle: a clean page holds the current iteration',
    commands: BOTH,
    neverActed: 'no host write (kvm_write_guest with no vCPU) landed in a slot that logs dirty pages',
  },
  {
    name: 'no-backup-bitmap',
    wrong: 'The VMM uses the dirty ring without KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP while KVM writes guest memory with no running vCPU.',
    effect: 'mark_page_dirty_in_slot has no ring to push to and no bitmap: the write is silently lost (KVM WARNs).',
    reference: 'KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (Linux 6.3); CVE-2021-4095 (NULL vCPU in mark_page_dirty_in_slot)',
    modes: ['dirty-ring'],
    needsHostWrites: true,
    detectedBy: 'dirty_log_test oracle: a clean page holds the current iteration; KVM warning counter',
    commands: BOTH,
    neverActed: 'no host write (kvm_write_guest with no vCPU) landed in a slot that logs dirty pages',
  },
  {
    name: 'ring-full-exit-unhandled',
    wrong: 'The VMM does not harvest and reset when a vCPU exits with KVM_EXIT_DIRTY_RING_FULL.',
    effect: 'The vCPU re-exits on every KVM_RUN and the guest stops making progress.',
    reference: 'QEMU kvm_cpu_exec: KVM_EXIT_DIRTY_RING_FULL -> kvm_dirty_ring_reap',
    modes: ['dirty-ring'],
    detectedBy: 'dirty_log_test: the watchdog (free-run) or deadlock detection (deterministic); migrate: the guest-progress check (a vCPU in the same ring-full exit across frames of a pass)',
    commands: BOTH,
    neverActed: 'no vCPU exited with KVM_EXIT_DIRTY_RING_FULL',
  },
  {
    name: 'copy-before-reset',
    wrong: 'The migration thread copies the harvested pages before KVM_RESET_DIRTY_RINGS re-protects them.',
    effect: 'A write between the copy and the reset goes through a still-writable SPTE, is never logged, and is never sent.',
    reference: 'docs/reference.md §2, the ordering rule; QEMU migration_bitmap_sync -> kvm_dirty_ring_reap before ram_save_iterate copies',
    modes: ['dirty-ring'],
    detectedBy: 'stamp oracle: a destination page differs from its source page',
    commands: ['migrate'],
    neverActed: 'no pass copied harvested pages before their deferred KVM_RESET_DIRTY_RINGS',
  },
  {
    name: 'copy-before-clear',
    wrong: 'With manual protect, the migration thread copies a 64-page chunk before KVM_CLEAR_DIRTY_LOG re-protects it.',
    effect: 'A write between the copy and the clear is dropped with the cleared bit and never sent.',
    reference: 'QEMU migration_clear_memory_region_dirty_bitmap: clear each chunk just before sending it',
    modes: ['clear-log'],
    detectedBy: 'stamp oracle: a destination page differs from its source page',
    commands: ['migrate'],
    neverActed: 'no 64-page chunk was copied before a KVM_CLEAR_DIRTY_LOG that cleared dirty bits',
  },
  {
    name: 'skip-final-sync',
    wrong: 'Completion stops the vCPUs and sends what is left without a final sync of the dirty log.',
    effect: 'Pages dirtied after the last sync (and host writes in the backup bitmap) never reach the destination.',
    reference: 'QEMU ram_save_complete -> migration_bitmap_sync_precopy(last_stage); KVM api.rst: collect the backup bitmap last',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'stamp oracle: a destination page differs from its source page',
    commands: ['migrate'],
    neverActed: 'the migration never reached completion',
  },
  {
    name: 'untracked-dma',
    wrong: 'A device writes guest memory on a path no dirty source records: the mdev\'s vfio_dma_rw writes without marking the page in the container\'s dirty bitmap, or a device with DMA logging does not log the write.',
    effect: 'Migration never learns the page changed; the destination keeps the old contents.',
    reference: 'drivers/vfio/vfio_iommu_type1.c vfio_iommu_type1_dma_rw_chunk (bitmap_set of the written pages while dirty tracking is on); VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    devices: ['mdev', 'dma-engine'],
    detectedBy: 'stamp oracle: a destination page differs from its source page (its last writer is the device)',
    commands: ['migrate'],
    neverActed: 'no device wrote by DMA while a DMA dirty source was tracking',
  },
  {
    name: 'stale-iotlb-after-unmap',
    wrong: 'The IOMMU unmap returns without invalidating the device IOTLBs (no invalidation descriptor and wait, no VHOST_IOTLB_INVALIDATE).',
    effect: 'The driver maps the freed IOVA to another page; the device still translates it to the old page and DMAs there: data lands in memory the device no longer owns.',
    reference: 'iommu_unmap -> iommu_iotlb_sync (drivers/iommu/iommu.c); VT-d device-IOTLB invalidation with a wait descriptor; vhost VHOST_IOTLB_INVALIDATE',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    devices: ['dma-engine'],
    detectedBy: 'DMA oracle: a DMA through a cached translation after its unmap returned',
    commands: ['migrate'],
    neverActed: 'no IOMMU unmap happened (the guest driver never recycled an IOVA)',
  },
  {
    name: 'gpa-as-iova',
    wrong: 'The mdev\'s vendor driver hands vfio_dma_rw the buffer\'s guest physical address where it takes an IOVA (GPA/IOVA confusion).',
    effect: 'With a guest IOMMU the IOVA space is not the GPA space: the access faults (nothing is mapped there) or lands in another buffer.',
    reference: 'drm/i915/gvt kvmgt: GPA vs IOVA in the DMA paths (kvmgt_rw_gpa, intel_gvt_dma_map_guest_page); vfio_dma_rw takes an IOVA',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    devices: ['mdev'],
    detectedBy: 'DMA oracle: device faults on IOVAs nothing maps',
    commands: ['migrate'],
    neverActed: 'the mdev never used vfio_dma_rw on a buffer whose IOVA differs from its GPA',
  },
  {
    name: 'read-pin-dirties',
    wrong: 'Pins do not tell reads from writes (today\'s vfio_pin_pages): a page the device only reads is reported dirty while pinned, as the seeds\' separate read and write pins would avoid.',
    effect: 'Not a correctness bug: every read-pinned page is sent again in every pass, so migration sends more and converges later.',
    reference: 'drivers/vfio/vfio_iommu_type1.c vfio_iommu_type1_pin_pages (marks pinned pages dirty); docs/reference.md §6',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    devices: ['mdev'],
    costOnly: true,
    detectedBy: 'nothing (correct, only costly): compare pages reported by VFIO_IOMMU_DIRTY_PAGES and pages sent with and without it (npm run bench -- --only iommu/migration)',
    commands: ['migrate'],
    neverActed: 'no read-only pin was taken while type1 dirty tracking was on',
  },
  {
    name: 'convert-without-unmap',
    wrong: 'A conversion to private clears the RamDiscardManager\'s bits but never notifies its listeners (no notify_discard): VFIO keeps the range mapped.',
    effect: 'The device still reaches the page after the guest made it private: its DMA writes shared memory that was discarded (lost), or memory reused for something else.',
    reference: 'QEMU system/ram-block-attributes.c ram_block_attributes_state_change -> ram_block_attributes_notify_discard; hw/vfio/listener.c vfio_ram_discard_notify_discard; docs/reference.md §7',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory oracle: shared memory discarded while the IOMMU still mapped it (discarded-while-mapped), an IOMMU mapping left on a private page (mapping-left); in litmus runs also a device DMA into discarded memory (dma-after-discard)',
    commands: ['migrate'],
    neverActed: 'no conversion to private met a registered RAM discard listener (nothing was shared and mapped)',
  },
  {
    name: 'discard-before-unmap',
    wrong: 'kvm_convert_memory discards the shared memory (ram_block_discard_range) before the listeners unmap it.',
    effect: 'Between the two the device can still DMA into memory that was already discarded: the write lands in freed memory and is lost, or survives in a private page\'s shared backing.',
    reference: 'QEMU accel/kvm/kvm-all.c kvm_convert_memory: KVM_SET_MEMORY_ATTRIBUTES, then ram_block_attributes_state_change, then ram_block_discard_range; docs/reference.md §7',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory oracle: shared memory discarded while the IOMMU still mapped it (discarded-while-mapped); in litmus runs also a device DMA into discarded memory (dma-after-discard)',
    commands: ['migrate'],
    neverActed: 'no conversion to private had shared pages that a RAM discard listener had mapped',
  },
  {
    name: 'map-before-shared',
    wrong: 'A conversion to shared notifies the listeners (VFIO maps) before KVM_SET_MEMORY_ATTRIBUTES made the range shared.',
    effect: 'Until the attributes change, the device reaches a page KVM still holds private: a DMA then writes memory the guest has not shared.',
    reference: 'QEMU accel/kvm/kvm-all.c kvm_convert_memory (attributes first, then the RamDiscardManager); docs/reference.md §7, "mapping before the page is shared"',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory oracle: a listener told to populate a page KVM says is private (populated-while-private)',
    commands: ['migrate'],
    neverActed: 'no conversion to shared populated pages while a RAM discard listener was registered',
  },
  {
    name: 'attributes-before-zap',
    wrong: 'KVM_SET_MEMORY_ATTRIBUTES stores the new attributes before it zaps the SPTEs of the old kind and flushes remote TLBs.',
    effect: 'In between, a vCPU keeps accessing through its stale translation: a shared store lands in a page that is already private (or a private one in a shared page), and is discarded with it.',
    reference: 'virt/kvm/kvm_main.c kvm_vm_set_mem_attributes: kvm_handle_gfn_range(pre_set_range: invalidate_begin + zap), xa_store, then post_set_range (invalidate_end)',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'the stale-store probe: a vCPU store retired through a translation of the kind the page\'s attribute no longer says (the private memory oracle\'s stale-store in litmus runs)',
    commands: ['migrate'],
    neverActed: 'no KVM_SET_MEMORY_ATTRIBUTES found a mapping of the old kind to zap',
  },
  {
    name: 'rdm-bitmap-drift',
    wrong: 'RamBlockAttributes leaves its bits set when a wholly shared range turns private (bitmap_clear forgotten on that path), while its listeners are notified.',
    effect: 'The bitmap drifts from KVM\'s attributes: a listener that registers later (a hot-plugged device) replays the stale bits and maps private pages; a later conversion to shared finds the range "populated" and maps nothing.',
    reference: 'QEMU system/ram-block-attributes.c ram_block_attributes_state_change (bitmap_clear before ram_block_attributes_notify_discard); ram_block_attributes_rdm_replay_populated',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory oracle: the RamDiscardManager disagrees with KVM (rdm-drift); a late listener told to populate private pages (populated-while-private)',
    commands: ['migrate'],
    neverActed: 'no wholly shared range was converted to private',
  },
  {
    name: 'split-huge-mapping',
    wrong: 'VFIO\'s RAM discard listener maps shared memory in 2 MiB chunks instead of one mapping per 4 KiB granule.',
    effect: 'A later 4 KiB conversion to private must unmap part of a chunk: type1 refuses to split a mapping (EINVAL), QEMU only reports it, and the private page stays mapped for the device.',
    reference: 'QEMU hw/vfio/listener.c vfio_ram_discard_notify_populate ("map in granularity"); drivers/vfio/vfio_iommu_type1.c vfio_dma_do_unmap (EINVAL on a split)',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory oracle: shared memory discarded while a 2 MiB mapping still covered it (discarded-while-mapped), an IOMMU mapping left on a private page (mapping-left); in litmus runs also a device DMA into discarded memory (dma-after-discard)',
    commands: ['migrate'],
    neverActed: 'no populate mapped more than one granule at once (every shared range was 4 KiB)',
  },
  {
    name: 'migrate-private-pages',
    wrong: 'The migration thread sends every dirty page, including pages the RamDiscardManager has discarded (a confidential guest\'s private pages).',
    effect: 'Migration reads discarded memory (which populates it again, and with in-place guest_memfd would touch private memory) and sends what it found.',
    reference: 'QEMU migration/ram.c ramblock_dirty_bitmap_clear_discarded_pages ("even reading these pages ... might result in undesired behavior"); the 2024 QEMU bug in which the clear was ineffective and migration touched all guest RAM',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory probe: the migration thread read a page whose shared memory is discarded',
    commands: ['migrate'],
    neverActed: 'no private page was dirty when the migration thread sent (the guest converted nothing to private, or every private page was clean)',
  },
  {
    name: 'inplace-convert-while-pinned',
    wrong: 'With in-place conversion (--conversion-design in-place), the VMM converts shared memory to private without VFIO unmapping it first, and guest_memfd lets the conversion through although VFIO\'s pin still holds the page.',
    effect: 'The device keeps its mapping, and its pin, of a page that is now private: its DMA reaches private memory, and the page can never be freed while the pin lasts.',
    reference: 'the guest_memfd in-place conversion series (KVM_SET_MEMORY_ATTRIBUTES2 refuses shared -> private with EAGAIN while a folio has references beyond guest_memfd\'s own); the seed discussion "Enable shared device assignment" (VFIO must unmap before the conversion, map after)',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'private memory oracle: a page converted to private still mapped in the IOMMU (mapping-left), checked after each conversion and on the stopped source',
    commands: ['migrate'],
    neverActed: 'no conversion to private found a page VFIO had pinned (the device\'s buffers were never converted back while mapped)',
  },
  {
    name: 'no-zap-on-noncoherent-transition',
    wrong: 'When the first device doing non-coherent DMA registers (kvm_arch_register_noncoherent_dma, 0 -> 1), KVM does not zap the SPTEs: those built before keep WB + IPAT.',
    effect: 'The guest\'s write-combining mapping of its buffers is ignored on every page already mapped: its stores stay in the CPU cache, and the device, which does not snoop, reads older data from memory.',
    reference: 'arch/x86/kvm/x86.c kvm_noncoherent_dma_assignment_start_or_stop (kvm_zap_gfn_range over all gfns); arch/x86/kvm/vmx/vmx.c vmx_get_mt_mask',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'stale read oracle: a device\'s no-snoop DMA read a line that was dirty in the CPU cache (outcome stale-data)',
    commands: ['migrate'],
    neverActed: 'no SPTE was present when non-coherent DMA was registered',
  },
  {
    name: 'migrate-noncoherent-without-flush',
    wrong: 'With a device doing non-coherent DMA, the migration thread reads each page write-back without flushing it from the CPU caches first (--noncoherent-migration clflush-before-read skips its clflush).',
    effect: 'A line the migration thread cached in an earlier pass, which the guest\'s WC stores or the device\'s no-snoop DMA went around, is what it reads and sends: the destination gets stale data (page aliasing).',
    reference: 'the seed discussion on honouring guest memory types ("live migration reads all guest memory WB and can send stale data"; the clflush-before-read proposal); Intel SDM vol. 3A 12.12.4, aliasing',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'stamp oracle (lost writes), with the stale read oracle naming the migration thread',
    commands: ['migrate'],
    neverActed: 'no page was read while non-coherent DMA was registered',
  },
  {
    name: 'missing-migration-blocker',
    wrong: 'The device model of a device doing non-coherent DMA registers no migration blocker (QEMU\'s virtio-gpu with virgl registers "virgl is not yet migratable"), and nothing else is done about its memory.',
    effect: 'The migration runs, reading write-back what the guest and the device wrote behind the CPU cache: stale lines may be sent.',
    reference: 'QEMU hw/display/virtio-gpu-gl.c / virtio-gpu-base.c (migrate_add_blocker for virgl)',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'the blocker oracle: a migration started although a device doing non-coherent DMA needed a blocker (outcome blocker-ignored)',
    commands: ['migrate'],
    neverActed: 'the scenario has no device doing non-coherent DMA, or its policy is not block',
  },
  {
    name: 'wbinvd-noop',
    wrong: 'KVM skips the guest\'s WBINVD even while non-coherent DMA is registered (need_emulate_wbinvd answers no), as it rightly does without it.',
    effect: 'A guest that flushes with WBINVD (cpa_flush on a CPU without CLFLUSH, as its driver maps buffers it used through WB write-combining) keeps dirty lines cached: their later write-back overwrites what the guest then wrote WC and the device wrote, and the device reads what the cache still holds back.',
    reference: 'arch/x86/kvm/x86.c kvm_emulate_wbinvd_noskip / need_emulate_wbinvd (kvm_arch_has_noncoherent_dma); arch/x86/mm/pat/set_memory.c cpa_flush',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'the CPU cache model: a write-back over newer data in memory, or a no-snoop DMA read of a line still dirty in the cache (outcome stale-data)',
    commands: ['migrate'],
    neverActed: 'the guest executed no WBINVD while non-coherent DMA was registered (--workload render-wbinvd does)',
  },
  {
    name: 'noncoherent-unbalanced',
    wrong: 'kvm_vfio_update_coherency decides from the VFIO file just added instead of all of them: a coherent device added after a non-coherent one unregisters non-coherent DMA, and KVM\'s count no longer matches the devices.',
    effect: 'KVM stops honouring the guest\'s PAT (every SPTE is zapped and rebuilt WB + IPAT) while the non-coherent device still works: the guest\'s WC stores land in the CPU cache, and the device reads older data from memory.',
    reference: 'virt/kvm/vfio.c kvm_vfio_update_coherency (list_for_each_entry over kv->file_list); arch/x86/kvm/x86.c kvm_arch_unregister_noncoherent_dma',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'stale read oracle: a device\'s no-snoop DMA read a line that was dirty in the CPU cache (outcome stale-data)',
    commands: ['migrate'],
    neverActed: 'no coherent device was added after a non-coherent one (--noncoherent-request vfio with two devices, the coherent one second)',
  },
  {
    name: 'dma-slot-with-dirty-logging',
    wrong: 'KVM lets dirty logging start on a KVM_MEM_DMA slot and keeps honouring the guest\'s PAT there, where the two flags should exclude each other (forcing WB with a zap, or refusing).',
    effect: 'The guest keeps writing its buffers write-combining, behind the CPU cache, while the migration thread reads them write-back: a line it cached in one pass is stale in the next, and the destination gets old data. The host switching its device to snooping does not help.',
    reference: 'the 2020 RFC "KVM: x86: honor guest memory type" (KVM_MEM_DMA) and Sean Christopherson\'s review (make it exclusive with KVM_MEM_LOG_DIRTY_PAGES, forcing WB when migration starts)',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'stamp oracle (lost writes), with the stale read oracle naming the migration thread',
    commands: ['migrate'],
    neverActed: 'dirty logging never started on a KVM_MEM_DMA slot (--noncoherent-request kvm-mem-dma with --blob ram)',
  },
  {
    name: 'mmio-mapped-wb',
    wrong: 'vmx_get_mt_mask has no clause for host MMIO: a memslot backed by device memory (a GPU\'s VRAM blob) gets RAM\'s memory type, WB + IPAT while no non-coherent DMA is registered.',
    effect: 'The guest\'s accesses to the device memory are cacheable whatever its PAT says: a machine check on real hardware.',
    reference: 'arch/x86/kvm/vmx/vmx.c vmx_get_mt_mask ("Force UC for host MMIO regions, as allowing the guest to access MMIO with cacheable accesses will result in Machine Checks"); kvm_is_mmio_pfn',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'machine check oracle: a cacheable (WB) access to device memory (outcome machine-check)',
    commands: ['migrate'],
    neverActed: 'no SPTE of a device-memory slot was built (--blob kvm-only-vram)',
  },
  {
    name: 'vmm-touches-kvm-only-slot',
    wrong: 'The migration treats a KVM_MEM_KVM_ONLY slot (a GPU blob only KVM maps; the device saves it as its own state) as RAM: it logs, reads and sends its pages.',
    effect: 'The VMM reads memory it has no business mapping (GPU state, device memory); on a real host there is no mapping to read, or what it reads is not what the device will restore.',
    reference: 'Yan Zhao\'s proposal of slots only KVM maps, in the seed discussion on honouring guest memory types (a virgl GPU buffer is GPU state that virglrenderer saves itself)',
    modes: ['dirty-ring', 'dirty-log', 'clear-log'],
    detectedBy: 'KVM-only slot oracle: the VMM\'s migration read a page of a KVM-only slot (outcome kvm-only-touched)',
    commands: ['migrate'],
    neverActed: 'the VM has no KVM-only slot (--blob kvm-only-ram or kvm-only-vram)',
  },
  {
    name: 'reassign-without-zap',
    wrong: 'The vendor driver frees a VM\'s slice of the device MMIO (to give it to another VM) without unmap_mapping_range first.',
    effect: 'The VM\'s mapping and KVM\'s SPTEs still point at the slice: the VM reaches MMIO that now belongs to another VM.',
    reference: 'The 2016 thread "KVM: MMU: support VMAs that got remap_pfn_range-ed": "whoever called remap_pfn_range is also going to call unmap_mapping_range before the underlying pages are freed"',
    modes: [],
    detectedBy: 'isolation oracles: an access through a mapping to a page that changed hands (stale-spte), or another VM\'s page (cross-vm-access)',
    commands: ['mdev'],
    neverActed: 'no slice the VM had faulted in was reclaimed',
  },
  {
    name: 'no-invalidate-retry',
    wrong: 'KVM installs a BAR SPTE from a pfn it looked up without mmu_invalidate_retry_gfn: an invalidation since the lookup goes unnoticed.',
    effect: 'An SPTE built from an entry the vendor was zapping survives the zap: the VM keeps reaching a slice after it was freed and given away.',
    reference: 'arch/x86/kvm/mmu/mmu.c: kvm_mmu_faultin_pfn reads mmu_invalidate_seq before the lookup, is_page_fault_stale / mmu_invalidate_retry_gfn under mmu_lock',
    modes: [],
    detectedBy: 'isolation oracles: stale-spte or cross-vm-access at an access through the SPTE',
    commands: ['mdev'],
    neverActed: 'no BAR fault raced an invalidation (a lookup before a zap, the install after it)',
  },
  {
    name: 'prefetch-unvalidated-mmio',
    wrong: 'KVM prefetches the BAR pages around a fault as if they were RAM: pages nothing validated get SPTEs with pfns guessed contiguous from the faulting one.',
    effect: 'The VM reaches MMIO the vendor never gave it (another VM\'s doorbells, an unallocated slice), and the vendor never hears of the mapping.',
    reference: 'arch/x86/kvm/mmu/mmu.c direct_pte_prefetch (PTE_PREFETCH_NUM): only refcounted pages (kvm_mmu_prefetch_sptes), never PFNMAP; the prefetch objection in the 2016 thread',
    modes: [],
    detectedBy: 'isolation oracles: unvalidated-mapping (and cross-vm-access) at an access through a prefetched SPTE',
    commands: ['mdev'],
    neverActed: 'no BAR fault had a neighbour without a mapping in its prefetch group',
  },
  {
    name: 'prefetch-during-invalidation',
    wrong: 'KVM\'s prefetch of mapped BAR pages (--bar-prefetch mapped) ignores an invalidation in progress over them.',
    effect: 'Between invalidate_range_start and the zap of the entries, a prefetch rebuilds an SPTE the notifier just zapped; it outlives the slice.',
    reference: 'include/linux/kvm_host.h mmu_invalidate_retry_gfn (mmu_invalidate_in_progress and the range); mm/memory.c zap_page_range_single: the notifier\'s start comes before the entries go',
    modes: [],
    detectedBy: 'isolation oracles: stale-spte or cross-vm-access at an access through the prefetched SPTE',
    commands: ['mdev'],
    neverActed: 'no prefetch ran while an invalidation covered one of its neighbours (it needs --bar-prefetch mapped)',
  },
  {
    name: 'ignore-readonly-pfnmap',
    wrong: 'KVM builds a writable SPTE from a read-only PFNMAP entry (the write check of hva_to_pfn_remapped left out).',
    effect: 'The guest writes MMIO the vendor mapped read-only (its status page), unseen by the vendor.',
    reference: 'virt/kvm/kvm_main.c hva_to_pfn_remapped: fixup_user_fault with FAULT_FLAG_WRITE, and the pte\'s write bit checked before a writable pfn is returned',
    modes: [],
    detectedBy: 'isolation oracles: read-only-write at a write through the SPTE',
    commands: ['mdev'],
    neverActed: 'no guest wrote a read-only BAR page it had mapped (--mdev-guest scribbler does)',
  },
  {
    name: 'zap-misses-a-mapping',
    wrong: 'The vendor driver unmaps a slice it takes back one page short (unmap_mapping_range over pages - 1).',
    effect: 'The last page\'s entry and SPTE survive the reclaim: the VM keeps reaching it after it went to another VM.',
    reference: 'The 2016 thread: KVM learns of a mapping\'s end only through the MMU notifier, so every mapping of a freed page must be unmapped; vfio_pci_zap_bars zaps the whole BAR',
    modes: [],
    detectedBy: 'isolation oracles: stale-spte or cross-vm-access at an access to the page left mapped',
    commands: ['mdev'],
    neverActed: 'no reclaimed slice had its last page faulted in',
  },
  {
    name: 'refused-access-reads-zeros',
    wrong: 'An access the vendor refused completes: KVM returns zeros for a read and drops a write, instead of failing KVM_RUN.',
    effect: 'The VM runs on, reading zeros from MMIO it may not touch; nothing stops it and nothing is reported.',
    reference: 'The 2016 design ("VM will crash to prevent malicious access"); today the fault handler\'s SIGBUS makes KVM_RUN fail with EFAULT (KVM_EXIT_MEMORY_FAULT) and QEMU stops the VM',
    modes: [],
    detectedBy: 'isolation oracles: refused-access-completed',
    commands: ['mdev'],
    neverActed: 'no BAR access was refused (--mdev-guest eager touches the BAR before its allocation)',
  },
  {
    name: 'map-whole-bar-without-validate',
    wrong: 'The device gives no validate callback although its slices are allocated at run time: its whole BAR is mapped 1:1 at mmap time.',
    effect: 'Every VM reaches the device\'s MMIO from pfn 0 on: other VMs\' slices, whatever it was allocated.',
    reference: 'Early vfio-mdev: without validate_map_request the whole BAR is mapped 1:1 (remap_pfn_range at mmap), which only a static partition makes safe',
    modes: [],
    detectedBy: 'isolation oracles: unvalidated-mapping and cross-vm-access at the first accesses',
    commands: ['mdev'],
    neverActed: 'the BAR was mapped statically (--bar-mapping static), where the slices are the VM\'s own',
  },
];

/**
 * The bugs of memory types and non-coherent DMA: their demonstrations are a guest
 * rendering through a no-snoop device with the CPU cache model, independent of KVM's
 * dirty tracking mode. test/noncoherent-migration.test.ts shows each step by step.
 */
export const NONCOHERENT_BUGS: readonly BugName[] = [
  'no-zap-on-noncoherent-transition', 'migrate-noncoherent-without-flush', 'missing-migration-blocker', 'wbinvd-noop', 'noncoherent-unbalanced',
  'dma-slot-with-dirty-logging', 'mmio-mapped-wb', 'vmm-touches-kvm-only-slot',
];

/**
 * The confidential-VM bugs: their demonstrations are confidential guests (`--confidential
 * shared`), and they do not depend on KVM's dirty tracking mode (any mode shows them).
 * test/cvm-bugs.test.ts (test/cvm-designs-migration.test.ts for the in-place design's) and the
 * litmus files examples/litmus/1*-*.yaml catch each too.
 */
export const CONFIDENTIAL_BUGS: readonly BugName[] = [
  'convert-without-unmap', 'discard-before-unmap', 'map-before-shared', 'attributes-before-zap', 'rdm-bitmap-drift', 'split-huge-mapping',
  'migrate-private-pages', 'inplace-convert-while-pinned',
];

/**
 * The bugs of mediated-device MMIO mapped on fault: their demonstrations are several VMs
 * sharing one device (`vmemlab mdev`), independent of dirty tracking.
 * test/mdev-bugs.test.ts catches each; examples/litmus/25-*.yaml to 32-*.yaml pin their orderings.
 */
export const MDEV_BUGS: readonly BugName[] = [
  'reassign-without-zap', 'no-invalidate-retry', 'prefetch-unvalidated-mmio', 'prefetch-during-invalidation', 'ignore-readonly-pfnmap',
  'zap-misses-a-mapping', 'refused-access-reads-zeros', 'map-whole-bar-without-validate',
];

export type { BugName };

export function findBug(name: string, where: string): CatalogEntry {
  const e = CATALOG.find((b) => b.name === name);
  if (!e) throw new UserError(`${where}: unknown bug '${name}' (see 'vmemlab catalog'; one of: ${CATALOG.map((b) => b.name).join(', ')})`);
  return e;
}
