import { GlobalWord } from '../layout.ts';
import type { ConversionInjection } from './conversion-bugs.ts';
import { HostActor } from '../host-actor.ts';
import type { Vm } from '../vm.ts';
import { type Steps, WaitCode, waitFor } from '../../roles/role.ts';
import type { ConversionDesignName, ConversionStats } from './conversion-design.ts';
import { injectedConversionDesign } from './conversion-designs.ts';
import { type BootRange, DesignConversion } from './design-conversion.ts';
import { ExitHandler, type MemoryConverter } from './exit-handler.ts';
import { GuestMemfdRam } from './kvm-convert-memory.ts';
import { wholeSection } from './ram-block-attributes.ts';
import { vfioContainer, vfioRamDiscardRegisterListener } from './vfio-ram-discard-listener.ts';
import { VmmControl } from './vmm-control.ts';
import { markVmmDirty } from './vmm-dirty-source.ts';

/** What the VMM's conversion thread reports: a conversion that stopped the VM, VFIO refusing to register, what the conversion oracle found. */
export type KvmCpuExecEvent =
  | { kind: 'vm-stopped'; vcpu: number; error: string }
  | { kind: 'vfio-register-failed'; slot: number; error: string }
  | { kind: 'boot-failed'; error: string }
  /** What QEMU only prints (error_report) and goes on: a failed unmap in a design's VFIO. */
  | { kind: 'design-error'; detail: string }
  | { kind: 'design-stats'; name: ConversionDesignName; stats: ConversionStats }
  | { kind: 'conversion-finding'; finding: string; count: number };

/** Who watches the conversions from the VMM's thread (the private memory oracle), as a tracepoint consumer would. */
export interface ConversionWatch {
  /** Before anything is converted: observe `ram` and witness its listeners. */
  attach(ram: GuestMemfdRam): Steps;
  /** After each conversion that succeeded, of [gpa, gpa + size). */
  converted(ram: GuestMemfdRam, gpa: number, size: number): void;
  /** The findings not taken yet, described (the first few), and how many there are in all. */
  take(): string[];
  readonly count: number;
}

/**
 * The userspace half of a confidential guest's vCPU threads (QEMU's kvm_cpu_exec, the
 * exits a conversion makes): KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE) and
 * KVM_EXIT_MEMORY_FAULT are served with kvm_convert_memory, then the vCPU re-enters.
 * QEMU's vCPU threads do this each for itself; vmemlab serves every vCPU from one role,
 * which sleeps on the exit doorbell in between.
 *
 * First, VFIO's listener registers with each guest_memfd RAM block's RamDiscardManager
 * (vfio_listener_region_add -> ram_discard_manager_register_listener): its replay maps
 * what is shared already (the bounce buffers the guest shared at boot).
 *
 * `watch` (the private memory oracle) sees every conversion from here; what it finds is
 * reported as it is found. `injection` carries the run's injected conversion bugs.
 *
 * It is a host actor: the VM's stop (migration's completion) waits until a conversion
 * under way has finished, as QEMU's pause_all_vcpus waits for each vCPU thread to leave
 * kvm_cpu_exec, and no conversion starts while the VM is stopped. A conversion that fails
 * stops the VM (vm_stop(RUN_STATE_INTERNAL_ERROR)): the vCPU stays in its exit.
 */
export interface KvmCpuExecOptions {
  injection: ConversionInjection;
  watch: ConversionWatch | null;
  report: (e: KvmCpuExecEvent) => void;
  /**
   * A conversion design other than QEMU's (conversion-design.ts), which converts instead
   * of kvm_convert_memory; its state lives in this thread, so the VMM boots the guest
   * here (the design's set-up, then `boot`'s ranges shared) while the vCPUs wait
   * (GlobalWord.VM_START_PENDING). Without one, the guest was booted before the run.
   */
  design?: { name: Exclude<ConversionDesignName, 'rdm'>; boot: readonly BootRange[] };
}

export function* kvmCpuExec(vm: Vm, o: KvmCpuExecOptions): Steps {
  const { injection, watch, report } = o;
  const ram = new GuestMemfdRam(vm, injection);
  const exits = new ExitHandler(new VmmControl(vm));
  const g = vm.global;
  const reportFindings = (): void => {
    if (watch !== null) for (const finding of watch.take()) report({ kind: 'conversion-finding', finding, count: watch.count });
  };
  exits.onConvert = {
    before: () => { Atomics.add(g, GlobalWord.CONVERSIONS_STARTED, 1); },
    after: (gpa, size, ok) => {
      // A failed conversion may have changed part of the range all the same: migration looks at it again.
      markVmmDirty(vm, gpa, size);
      if (ok) watch?.converted(ram, gpa, size);
      // Finished either way: a read racing it is excused only while it runs (precopy.ts pagesOf).
      Atomics.add(g, GlobalWord.CONVERSIONS_DONE, 1);
      reportFindings();
    },
  };
  const design = o.design === undefined ? null
    : new DesignConversion(injectedConversionDesign(o.design.name, vm, injection, (detail) => report({ kind: 'design-error', detail })));
  // What the design did, told as the VM stops (the VMM pauses for migration's completion).
  const actor = new HostActor(g, design === null ? {} : { quiesce: () => report({ kind: 'design-stats', name: design.design.name, stats: design.design.stats() }) });
  yield* actor.gate();
  let converter: MemoryConverter = ram;
  if (o.design !== undefined && design !== null) {
    // Nothing else runs yet (the vCPUs and migration wait for vm_start): no marks, no probe to excuse.
    const booted = yield* design.boot(o.design.boot);
    converter = design;
    if (booted.ret < 0) { report({ kind: 'boot-failed', error: booted.error || `ret ${booted.ret}` }); return yield* stopped(exits.vmm, actor, g, true); }
    vmStart(g);
  } else {
    if (watch !== null) yield* watch.attach(ram);
    if (vm.iommu !== null) {
      const container = vfioContainer(vm.iommu, { injection });
      for (const [slot, rdm] of ram.blocks) {
        const r = yield* vfioRamDiscardRegisterListener(container, rdm, wholeSection(slot));
        if (!r.ok) { report({ kind: 'vfio-register-failed', slot: slot.id, error: r.error }); return yield* stopped(exits.vmm, actor, g); }
      }
    }
  }
  reportFindings();
  for (;;) {
    yield* actor.gate();
    const rung = Atomics.load(g, GlobalWord.EXIT_DOORBELL); // before the look: an exit after it wakes us
    if (exits.hypercall() === null && exits.memoryFault() === null) {
      yield waitFor(WaitCode.VCPU_EXITS, 0, 0, { array: g, index: GlobalWord.EXIT_DOORBELL, value: rung });
      continue;
    }
    const failed = (yield* exits.serviceHypercalls(converter)) ?? (yield* exits.serviceMemoryFaults(converter));
    reportFindings();
    if (failed !== null) { report({ kind: 'vm-stopped', ...failed }); return yield* stopped(exits.vmm, actor, g); }
    yield undefined;
  }
}

/**
 * An internal error stops the VM for good (QEMU's vm_stop(RUN_STATE_INTERNAL_ERROR)):
 * every vCPU stops, nothing is served any more, but pauses are still honoured (migration,
 * which may still move the stopped VM, waits for them).
 */
function* stopped(vmm: VmmControl, actor: HostActor, g: Int32Array, booting = false): Steps {
  vmm.stopOnInternalError();
  // A guest that never booted is stopped all the same: its vCPUs see the stop as they are let in.
  if (booting) vmStart(g);
  for (;;) {
    yield* actor.gate();
    yield waitFor(WaitCode.VCPU_EXITS, 0, 0, { array: g, index: GlobalWord.EXIT_DOORBELL, value: Atomics.load(g, GlobalWord.EXIT_DOORBELL) });
  }
}

/** vm_start: the vCPUs enter the guest, and migration may begin. */
function vmStart(g: Int32Array): void {
  Atomics.store(g, GlobalWord.VM_START_PENDING, 0);
  Atomics.notify(g, GlobalWord.VM_START_PENDING);
}
