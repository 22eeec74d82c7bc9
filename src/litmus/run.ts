import { type InjectionReport, injectionReport } from '../bugs/acted.ts';
import { findBug } from '../bugs/catalog.ts';
import { injectedBugs } from '../bugs/injected.ts';
import { DeterministicDriver, ReplayScheduler } from '../drivers/deterministic.ts';
import { Step, type Wait, WaitCode } from '../roles/role.ts';
import { describeWait } from '../drivers/describe-wait.ts';
import { EXIT_REASON_NAMES, KVM_EXIT_MMIO, KVM_MEM_READONLY, PAGE_SIZE } from '../host/constants.ts';
import { CacheStat } from '../host/cpu-cache.ts';
import { VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE } from '../host/iommu/constants.ts';
import { MEMORY_TYPE_NAMES, type MemoryType, kvmEmulateWbinvd } from '../host/memory-type.ts';
import { GlobalWord, VcpuRunState, VcpuWord, type VmLayout, createVmLayout } from '../host/layout.ts';
import { Phase, Vcpu } from '../host/vcpu.ts';
import { VmmControl } from '../host/vmm/vmm-control.ts';
import { Vm, memslotFlagNames } from '../host/vm.ts';
import type { Memslot } from '../host/memslot.ts';
import { NoTracepoints, type PageDirtied } from '../host/tracepoints.ts';
import { ExitHandler } from '../host/vmm/exit-handler.ts';
import { OpKind, SET_PAT_NO_CLFLUSH, SET_PAT_TYPE } from '../host/guest-op.ts';
import { KvmError, UserError } from '../util/errors.ts';
import { PassthroughDma } from '../host/devices/passthrough-dma.ts';
import { ConversionInjection } from '../host/vmm/conversion-bugs.ts';
import { discardsSharedMemory } from '../host/vmm/conversion-design.ts';
import { injectedConversionDesign } from '../host/vmm/conversion-designs.ts';
import { DesignConversion } from '../host/vmm/design-conversion.ts';
import { GuestMemfdRam } from '../host/vmm/kvm-convert-memory.ts';
import { vfioContainer } from '../host/vmm/vfio-ram-discard-listener.ts';
import { ConversionOracle, checkPrivateMemory, describePrivateMemoryFinding } from '../oracles/private-memory-oracle.ts';
import { runAlone } from '../roles/role.ts';
import { type Mismatch, checkFinal, checkOp } from './expectations.ts';
import { HostRole } from './host-role.ts';
import { type ConfidentialHost, HostOperations } from './host-operations.ts';
import {
  type OpRecord, elide, gfnsText, guestOpCount, logEventText, newRecord, slotName,
} from './observations.ts';
import { ScriptWorkload } from './script-workload.ts';
import {
  STALE_READERS, type StaleCounts, accessText, machineCheckLines, spteTypeText, staleCounts, staleReadLines,
  vcpuReadValue,
} from './cache.ts';
import type { InterleavingEntry, LitmusSpec } from './spec.ts';
import { hex } from './syntax.ts';
import { type BarStepBefore, barFindingCounts, barLayout, barStepBefore, barStepText, barText, newBarFindingLines } from './bar.ts';
import { BarMmuWord } from '../host/bar-layouts.ts';

export interface LitmusOutcome {
  file: string;
  name: string;
  passed: boolean;
  /** One line per expectation that did not hold, or per step that could not run. */
  failures: string[];
  /** A readable trace: each interleaving step and what it did. */
  log: string[];
  /** How often each injected bug acted (vm.acts), and why not when it never did. */
  injections: InjectionReport[];
}

export interface LitmusRunOptions {
  /** Bugs from the catalog to inject, on top of the file's own `bugs`. */
  bugs?: readonly string[];
}

/**
 * Runs a litmus test: every actor on this thread, stepped exactly as the interleaving
 * says (through the deterministic driver's stepRole), checking each operation's
 * expectations when it finishes and the final ones at the end.
 */
export function runLitmus(spec: LitmusSpec, options: LitmusRunOptions = {}): LitmusOutcome {
  return new LitmusRun(spec, options.bugs ?? []).run();
}

interface StepReport {
  blocked: boolean;
  exited: boolean;
  stopped: boolean;
  crashed: boolean;
  text: string;
}

const INDENT = '      ';

class LitmusRun {
  private readonly vm: Vm;
  private readonly vmm: VmmControl;
  private readonly exits: ExitHandler;
  private readonly vcpus: Vcpu[];
  private readonly workloads: ScriptWorkload[];
  private readonly host = new HostRole();
  private readonly hostIndex: number;
  private readonly driver: DeterministicDriver;
  private readonly roleNames: string[];
  private readonly bugs: string[];
  /** Operation records per actor (vCPUs 0..n-1, then the host), next to start, and in flight. */
  private readonly records: OpRecord[][];
  private readonly next: number[];
  private readonly active: (OpRecord | null)[];
  /** Where observations made during the current step go. */
  private stepping: OpRecord | null = null;
  private stepEvents: string[] = [];
  private readonly failures: string[] = [];
  private readonly log: string[] = [];
  private readonly hostOps: HostOperations;
  /** A confidential VM's VMM side and the private memory oracle, or null. */
  private readonly cvm: ConfidentialHost | null = null;
  private entry: InterleavingEntry | null = null;

  constructor(private readonly spec: LitmusSpec, extraBugs: readonly string[]) {
    this.bugs = [...new Set([...spec.bugs, ...extraBugs])];
    for (const b of this.bugs) findBug(b, `${spec.file}: bugs`);
    const injected = injectedBugs(this.bugs);
    const t = spec.vm.tracking;
    const tracking = t.kind === 'ring' && injected.noBackupBitmap ? { ...t, withBitmap: false } : t;
    let layout: VmLayout;
    try {
      // Each run builds the BAR's shared layouts afresh (the spec's are the loader's, which a run would change).
      layout = createVmLayout({ ...spec.vm, tracking, ...(spec.bar !== undefined ? { bars: [barLayout(spec.bar)] } : {}) });
    } catch (e) {
      // KVM_SET_USER_MEMORY_REGION refusing a slot the loader let through: the file's mistake, in one line.
      if (e instanceof KvmError) throw new UserError(`${spec.file}: vm.slots: ${e.message}`);
      throw e;
    }
    this.vm = new Vm(layout, injected.kernel);
    this.vm.populate();
    // The faults and dirty-log pushes of the running operation, from KVM's tracepoints.
    const run = this;
    this.vm.tracepoints.attach(new class extends NoTracepoints {
      override writeFault(): void { if (run.stepping) run.stepping.faults++; }
      override pageDirtied(e: PageDirtied): void { run.stepping?.logs.push(e); run.stepEvents.push(logEventText(e)); }
    }());
    if (this.vm.attributes !== null || this.vm.iommu !== null) this.cvm = this.confidentialHost(injected.conversion);
    this.vmm = new VmmControl(this.vm);
    // The file is the VMM: it says when exits are answered (reenter), so none is answered here on its own.
    this.exits = new ExitHandler(this.vmm);
    const cvm = this.cvm;
    if (cvm?.ram) {
      // As kvm_cpu_exec's watch: each conversion an exit asked for is checked once it succeeded.
      this.exits.onConvert = { before: () => {}, after: (gpa, size, ok) => { if (ok) cvm.oracle.converted(cvm.ram!, gpa, size); } };
    }
    const idleSlot = this.vm.memory.slots[0]!;
    const attributes = this.vm.attributes;
    this.workloads = spec.vcpuOps.map(() => new ScriptWorkload(idleSlot.baseGfn, () => attributes?.isPrivate(idleSlot, 0) ?? false, this.vm.cache !== null));
    this.vcpus = this.workloads.map((w, i) => new Vcpu(this.vm, i, w));
    this.hostIndex = this.vcpus.length;
    this.driver = new DeterministicDriver([...this.vcpus, this.host], new ReplayScheduler(new Uint8Array(0)));
    this.roleNames = [...this.vcpus.map((v) => v.name), 'host'];
    this.hostOps = new HostOperations(this.vm, this.vmm, this.exits, injected, this.cvm);
    this.records = [...spec.vcpuOps.map((ops) => ops.map(newRecord)), spec.hostOps.map(newRecord)];
    this.next = this.records.map(() => 0);
    this.active = this.records.map(() => null);
  }

  /**
   * QEMU's side of a VM with private memory or an assigned device: each guest_memfd slot's
   * RAM block starts private (kvm_set_phys_mem), the private memory oracle witnesses the
   * RamDiscardManagers and the conversions from the start, and VFIO's container and the
   * device wait for the file's vfio-register and dma operations. With another conversion
   * design, the design does the set-up (bootDesign) and converts; the RAM blocks'
   * RamBlockAttributes then only read the shared bitmaps DesignConversion keeps.
   */
  private confidentialHost(bugs: ConversionInjection['bugs']): ConfidentialHost {
    const vm = this.vm;
    const injection = new ConversionInjection(bugs, vm.acts);
    const oracle = new ConversionOracle(vm);
    const report = (d: string): void => { this.hostOps.current?.notes.push(`QEMU reports: ${d}`); };
    const name = this.spec.design;
    const design = name === 'rdm' ? null
      : new DesignConversion(injectedConversionDesign(name, vm, injection, report));
    let ram: GuestMemfdRam | null = null;
    if (vm.attributes !== null) {
      ram = new GuestMemfdRam(vm, injection);
      if (design === null) {
        runAlone(ram.setupPrivate(), 'litmus: guest_memfd memory made private');
        runAlone(oracle.attach(ram), 'litmus: the private memory oracle registers');
      }
    }
    const container = vm.iommu === null || design !== null ? null : vfioContainer(vm.iommu, { injection, report });
    return { ram, container, dma: vm.iommu === null ? null : new PassthroughDma(vm), oracle, design };
  }

  /**
   * The design's set-up (guest_memfd memory private, the device attached), as the VMM's
   * machine init runs it before any vCPU; the file shares nothing at boot (it converts).
   * Returns false, with the design's error as the failure, when the set-up fails.
   */
  private bootDesign(): boolean {
    const design = this.cvm?.design;
    if (!design) return true;
    const name = design.design.name;
    const r = runAlone(design.boot([]), `litmus: the ${name} design's set-up`);
    if (r.ret >= 0) {
      this.log.push(`the ${name} design's set-up: guest_memfd memory private, the device attached`);
      return true;
    }
    this.failures.push(`${this.spec.file}: vm.conversion_design: the ${name} design's set-up failed: ${r.error || `ret ${r.ret}`}; the run stops here`);
    this.log.push(`the ${name} design's set-up failed`);
    return false;
  }

  /**
   * A VM with the CPU cache model has no private memory, so VFIO's memory listener maps all
   * of its RAM for the assigned device at IOVA = GPA before the guest runs
   * (vfio_listener_region_add, one mapping per memslot, read-only for a read-only slot), as
   * QEMU does for a device without a vIOMMU. Returns false, with the map's error as the
   * failure, when one fails.
   */
  private mapGuestRam(): boolean {
    const iommu = this.vm.iommu;
    if (this.vm.cache === null || iommu === null) return true;
    for (const s of this.spec.vm.slots) {
      const prot = VFIO_DMA_MAP_FLAG_READ | ((s.flags & KVM_MEM_READONLY) !== 0 ? 0 : VFIO_DMA_MAP_FLAG_WRITE);
      const r = iommu.mapDma(s.baseGfn * PAGE_SIZE, s.pages * PAGE_SIZE, s.baseGfn * PAGE_SIZE, prot);
      if (r.ret < 0) {
        this.failures.push(`${this.spec.file}: vm.iommu: VFIO cannot map slot ${slotName(s)} at IOVA = GPA: ${r.detail}; the run stops here`);
        this.log.push('VFIO could not map guest RAM');
        return false;
      }
    }
    this.log.push(`VFIO maps guest RAM for the device at IOVA = GPA: ${this.spec.vm.slots.length} mapping(s), one per memslot`);
    return true;
  }

  /**
   * The VMM mmaps vm0's BAR (vfio_pci_mmap): a VM_PFNMAP VMA with nothing mapped, the
   * fault handler maps on demand. With map-whole-bar-without-validate the device has no
   * validate callback and the whole BAR is mapped 1:1 from pfn 0 now.
   */
  private mmapBar(): void {
    const bar = this.vm.bars[0];
    if (bar === undefined) return;
    bar.mapping.mmapWholeBar();
    const mapped = bar.mapping.presentIn(0, bar.mapping.barPages);
    this.log.push(mapped === 0 ? `the VMM mmaps vm0's BAR (${bar.mapping.barPages} pages): nothing is mapped until a fault validates it`
      : `the VMM mmaps vm0's BAR (${bar.mapping.barPages} pages): no validate callback, so ${mapped} BAR page(s) are mapped 1:1 from pfn 0 at once`);
  }

  /** The stale read oracle's counts now, or null without the cache model. */
  private staleNow(): StaleCounts | null {
    return this.vm.cache === null ? null : staleCounts(this.vm.cache);
  }

  /** The oracle's findings since `before` (its count then), as trace text. */
  private newFindings(before: number): string[] {
    const o = this.cvm?.oracle;
    if (o === undefined || o.count === before) return [];
    const shown = o.findings.slice(Math.min(before, o.findings.length));
    const out = shown.map((f) => `ORACLE: ${describePrivateMemoryFinding(f)}`);
    if (o.count - before > shown.length) out.push(`ORACLE: ${o.count - before - shown.length} more finding(s)`);
    return out;
  }

  run(): LitmusOutcome {
    const s = this.spec;
    this.log.push(`${s.name} (${s.file})`);
    this.log.push(`vm: ${this.vm.memory.slots.map((m) => `slot ${slotName(m)} GFNs ${hex(m.baseGfn)}..${hex(m.endGfn - 1)}${slotKindText(this.vm, m)}`).join(', ')}; `
      + `${this.vcpus.length} vCPU${this.vcpus.length === 1 ? '' : 's'}; ${trackingText(this.vm)}`
      + (s.design !== 'rdm' ? `; conversion design ${s.design}` : '')
      + (s.vm.cpuCache ? `; CPU cache model${s.vm.cpuCache.selfSnoop ? ' with self-snoop' : ''}` : '')
      + (s.vm.dmaSlotLogging === 'refuse' ? '; KVM refuses dirty logging on a KVM_MEM_DMA slot' : '')
      + (s.bar !== undefined ? `; ${barText(s.bar)}` : '')
      + (this.bugs.length > 0 ? `; injected bugs: ${this.bugs.join(', ')}` : ''));
    if (this.bugs.includes('ring-full-exit-unhandled')) {
      this.log.push('note: ring-full-exit-unhandled changes nothing here: in a litmus test the file is the VMM and says how exits are handled');
    }
    this.mmapBar();
    let stopped = !this.bootDesign() || !this.mapGuestRam();
    for (const e of s.interleaving) {
      if (stopped) break;
      this.entry = e;
      if (!(e.vcpu === null ? this.hostEntry(e) : this.vcpuEntry(e, e.vcpu))) { stopped = true; break; }
    }
    this.entry = null;
    if (stopped) {
      this.log.push('the run stopped early: operations in flight and final expectations were not checked');
    } else {
      this.endOfRun();
    }
    const injections = injectionReport(this.vm, this.bugs);
    for (const i of injections) this.log.push(`injected bug ${i.bug}: ${i.acted > 0 ? `acted ${i.acted} time${i.acted === 1 ? '' : 's'}` : `never acted (${i.idle})`}`);
    this.log.push(`${this.driver.stepCount} steps in all (${this.failures.length === 0 ? 'passed' : `${this.failures.length} failure${this.failures.length === 1 ? '' : 's'}`})`);
    return { file: s.file, name: s.name, passed: this.failures.length === 0, failures: this.failures, log: this.log, injections };
  }

  private endOfRun(): void {
    for (let a = 0; a < this.records.length; a++) {
      for (const r of this.records[a]!) {
        if (r.finished) continue;
        if (r.started) {
          this.log.push(`at the end ${r.op.where} '${r.op.text}' is still in flight (${this.inFlightText(a)}); its expectations are checked as it stands`);
          this.report(`end of run: ${r.op.where} '${r.op.text}' (still in flight)`, checkOp(r));
        } else {
          this.failures.push(`${this.spec.file}: ${r.op.where} '${r.op.text}' was never run (no interleaving step reaches it)`);
        }
      }
    }
    const cvm = this.cvm;
    if (cvm?.ram && !this.host.busy && this.vm.mmuInvalidate.inProgress() === 0) {
      // No conversion under way: the rules that hold between conversions.
      const before = cvm.oracle.count;
      // In place, a private page keeps its memory in guest_memfd's one file: nothing is discarded.
      for (const f of checkPrivateMemory(this.vm, cvm.ram, { discards: discardsSharedMemory(this.spec.design) }).findings) cvm.oracle.record(f);
      for (const l of this.newFindings(before)) this.log.push(`at the end: ${l}`);
    }
    const stale = this.staleNow();
    const staleBy = stale === null ? [] : STALE_READERS.filter((r) => stale[r] > 0);
    if (this.spec.expect.stale === undefined && staleBy.length > 0) {
      this.failures.push(`${this.spec.file}: the stale read oracle found: ${staleBy.map((r) => `${stale![r]} by ${r}`).join(', ')} (write expect.stale to expect them)`);
    }
    const mces = this.vm.machineChecks().count;
    if (this.spec.expect.machineChecks === undefined && mces > 0) {
      this.failures.push(`${this.spec.file}: the machine check oracle found: ${mces} cacheable access${mces === 1 ? '' : 'es'} to device memory, the first at ${hex(this.vm.machineChecks().firstGfn!)} (write expect.machine_checks to expect them)`);
    }
    const bar = this.vm.bars[0];
    if (bar !== undefined) {
      // The isolation oracles' sweep (KvmBarMmu.audit): an SPTE still breaching isolation that no access used yet counts too.
      const before = barFindingCounts(bar);
      const swept = bar.mmu.audit();
      this.log.push(`at the end: the isolation oracles sweep vm0's BAR SPTEs: ${swept === 0 ? 'none breaches isolation' : `${bar.mmu.stat(BarMmuWord.AUDIT_FOUND)} SPTE(s) breach isolation, no access having used them yet`}`);
      for (const l of newBarFindingLines(bar, before)) this.log.push(`at the end: ${l}`);
      const found = bar.mmu.findings().filter((f) => f.count > 0);
      if (this.spec.expect.bar?.findings === undefined && found.length > 0) {
        this.failures.push(`${this.spec.file}: the isolation oracles found: ${found.map((f) => `${f.count} ${f.kind} (the first at BAR page ${f.firstPage})`).join(', ')} (write expect.bar.findings to expect them)`);
      }
    }
    const findings = cvm === null ? [] : [...cvm.oracle.kinds];
    if (this.spec.expect.findings === undefined && findings.length > 0) {
      this.failures.push(`${this.spec.file}: the private memory oracle found: ${cvm!.oracle.findings.map(describePrivateMemoryFinding).join('; ')} (write expect.findings to expect them)`);
    }
    const mismatches = checkFinal(this.spec.expect, { vm: this.vm, collected: this.hostOps.collected, copies: this.hostOps.copies, ram: cvm?.ram ?? null, findings });
    for (const m of mismatches) this.failures.push(`${this.spec.file}: ${m.what}: expected ${m.expected}, actual: ${m.actual}`);
    const x = this.spec.expect;
    const checked = [x.pages && 'pages', x.collected && 'collected', x.copies && 'copies', x.staleCopies && 'stale_copies',
      x.sptes && 'sptes', x.lostHostWrites !== undefined && 'lost_host_writes', x.flushes !== undefined && 'flushes',
      x.attributes && 'attributes', x.rdm && 'rdm', x.iommu && 'iommu', x.privatePages && 'private_pages', x.findings && 'findings',
      x.cache && 'cache', x.stale && 'stale', x.machineChecks !== undefined && 'machine_checks', x.bar && 'bar'].filter(Boolean);
    if (checked.length > 0) {
      this.log.push(`final: collected ${gfnsText([...this.hostOps.collected].sort((a, b) => a - b))}; checked ${checked.join(', ')}: ${mismatches.length === 0 ? 'as expected' : `${mismatches.length} mismatch${mismatches.length === 1 ? '' : 'es'}`}`);
    }
  }

  private inFlightText(actor: number): string {
    if (actor === this.hostIndex) return `host ${describeWait(this.host.wait.code, this.host.wait.arg, this.host.wait.arg2, this.roleNames)}`;
    const exit = this.vmm.parkedExit(actor);
    return exit >= 0 ? `vcpu${actor} sits in exit ${EXIT_REASON_NAMES[exit] ?? exit}` : `vcpu${actor} is in the middle of it`;
  }

  private where(e: InterleavingEntry): string {
    return `${this.spec.file}: ${e.where} '${e.text}'`;
  }

  private report(at: string, mismatches: Mismatch[]): void {
    for (const m of mismatches) this.failures.push(`${this.spec.file}: ${at}: expected ${m.what}: ${m.expected}, actual: ${m.actual}`);
  }

  /** Marks an operation finished and checks its expectations. */
  private finish(actor: number, r: OpRecord): void {
    r.finished = true;
    this.active[actor] = null;
    if (actor < this.hostIndex) this.workloads[actor]!.disarm();
    const e = this.entry;
    r.entry = e ? `${e.where} '${e.text}'` : 'end of run';
    this.report(`${r.entry}: ${r.op.where} '${r.op.text}'`, checkOp(r));
  }

  /** The actor's operation in flight, or its next one started; null when it has none left. */
  private current(actor: number, arm: boolean): OpRecord | null {
    const cur = this.active[actor];
    if (cur !== null || !arm) return cur;
    const r = this.records[actor]![this.next[actor]!];
    if (r === undefined) return null;
    this.next[actor]!++;
    r.started = true;
    this.active[actor] = r;
    if (actor < this.hostIndex) this.workloads[actor]!.arm(r.op.op as never);
    else this.host.start(this.hostOps.run(r));
    return r;
  }

  private noOpLeft(e: InterleavingEntry, actor: number): boolean {
    const n = this.records[actor]!.length;
    this.failures.push(`${this.where(e)}: ${e.actor} has no operation left to run (its script has ${n}); the run stops here${this.laterText(e)}`);
    this.log.push(`[${e.index}] ${e.text}: no operation left`);
    return false;
  }

  private laterText(e: InterleavingEntry): string {
    const left = this.spec.interleaving.length - e.index - 1;
    return left > 0 ? ` (${left} later step${left === 1 ? ' is' : 's are'} not run)` : '';
  }

  /** `vcpuN` or `vcpuN.step`. Returns false when the run cannot go on. */
  private vcpuEntry(e: InterleavingEntry, v: number): boolean {
    const wasActive = this.active[v] !== null;
    const r = this.current(v, true);
    if (r === null && e.mode === 'op') return this.noOpLeft(e, v);
    this.log.push(`[${e.index}] ${e.text}: ${r ? `${r.op.text} (${r.op.where})${wasActive ? ', continued' : ''}` : 'no operation left: idle'}${notes(e, wasActive ? null : r)}`);
    const limit = e.mode === 'step' || r === null ? 1 : guestOpCount(r) * 8 + 16;
    const lines: string[] = [];
    try {
      for (let n = 0; n < limit; n++) {
        const s = this.stepVcpu(v);
        lines.push(s.text);
        if (s.crashed) return false;
        if (s.blocked) return this.blocked(e, r, this.vcpus[v]!.wait, e.actor, lines);
        if (e.mode === 'step' || r === null || r.finished || s.exited || s.stopped) return this.notBlocked(e);
      }
    } finally {
      for (const l of elide(lines, 14)) this.log.push(INDENT + l);
    }
    this.failures.push(`${this.where(e)}: ${r!.op.where} '${r!.op.text}' did not finish within ${limit} steps`);
    return false;
  }

  /** `host`, `host.step` or `host with vcpuN...`. Returns false when the run cannot go on. */
  private hostEntry(e: InterleavingEntry): boolean {
    const wasActive = this.active[this.hostIndex] !== null;
    const r = this.current(this.hostIndex, true);
    if (r === null) return this.noOpLeft(e, this.hostIndex);
    this.log.push(`[${e.index}] ${e.text}: ${r.op.text} (${r.op.where})${wasActive ? ', continued' : ''}${notes(e, wasActive ? null : r)}`);
    const lines: string[] = [];
    let assists = 0;
    try {
      for (let n = 0; n < 100_000; n++) {
        const s = this.stepHost(r);
        if (s.text !== '') lines.push(s.text);
        if (s.crashed) return false;
        if (r.finished) return this.notBlocked(e);
        if (s.blocked) {
          const w = this.host.wait;
          if (w.code === WaitCode.FLUSH_ACK && e.assist.includes(w.arg) && assists < 1000) {
            assists++;
            const vs = this.stepVcpu(w.arg);
            lines.push(`vcpu${w.arg} steps to answer: ${vs.text}`);
            if (vs.crashed) return false;
            if (vs.blocked) return this.blocked(e, r, this.vcpus[w.arg]!.wait, `vcpu${w.arg}`, lines);
            continue;
          }
          return this.blocked(e, r, w, 'host', lines);
        }
        if (e.mode === 'step') return this.notBlocked(e);
      }
    } finally {
      for (const l of elide(lines, 14)) this.log.push(INDENT + l);
    }
    this.failures.push(`${this.where(e)}: ${r.op.where} '${r.op.text}' did not finish within 100000 steps`);
    return false;
  }

  /** The entry's actor could not act. A failure that stops the run, unless the file expects it. */
  private blocked(e: InterleavingEntry, r: OpRecord | null, w: Wait, who: string, lines: string[]): boolean {
    const what = `${who} ${describeWait(w.code, w.arg, w.arg2, this.roleNames)}`;
    if (e.blocked !== undefined) {
      const okay = e.blocked === true || (typeof e.blocked === 'number' && w.code === WaitCode.FLUSH_ACK && w.arg === e.blocked);
      lines.push(okay ? '(blocked, as expected)' : 'BLOCKED, not as expected');
      if (!okay) this.failures.push(`${this.where(e)}: expected blocked: ${blockedText(e.blocked)}, actual: ${what}`);
      return true;
    }
    let hint = '';
    if (w.code === WaitCode.FLUSH_ACK) hint = ` (step vcpu${w.arg} first, or write 'host with vcpu${w.arg}' to let it answer)`;
    else if (w.code === WaitCode.VCPU_EXIT) hint = ` (the host must 'reenter ${who}' first)`;
    else if (w.code === WaitCode.VCPU_RELEASE) hint = ` (the host must 'release ${who}' first)`;
    const op = r ? `${r.op.where} '${r.op.text}'` : who;
    this.failures.push(`${this.where(e)}: ${op} cannot go on: ${what}${hint}; the run stops here${this.laterText(e)}`);
    lines.push('BLOCKED: the run stops here');
    return false;
  }

  private notBlocked(e: InterleavingEntry): boolean {
    if (e.blocked !== undefined && e.blocked !== false) {
      this.failures.push(`${this.where(e)}: expected blocked: ${blockedText(e.blocked)}, actual: it did not block`);
    }
    return true;
  }

  private crash(who: string, err: unknown): StepReport {
    const msg = err instanceof Error ? err.message : String(err);
    const e = this.entry;
    this.failures.push(`${this.spec.file}: ${e ? `${e.where} '${e.text}'` : 'end of run'}: ${who} crashed: ${msg}; the run stops here${e ? this.laterText(e) : ''}`);
    return { blocked: false, exited: false, stopped: false, crashed: true, text: `CRASH: ${msg}` };
  }

  private word(v: number, w: number): number {
    return this.vmm.word(v, w);
  }

  /** One step of vCPU `v`, with what it did in words; updates the record of its operation. */
  private stepVcpu(v: number): StepReport {
    const vcpu = this.vcpus[v]!;
    const wl = this.workloads[v]!;
    const r = this.active[v] ?? null;
    const before = {
      state: vcpu.runState, phase: vcpu.phase, pending: vcpu.opPending, retired: vcpu.retired,
      ack: this.word(v, VcpuWord.FLUSH_ACK), exits: this.word(v, VcpuWord.EXITS),
    };
    this.stepping = r;
    this.stepEvents = [];
    const found = this.cvm?.oracle.count ?? 0;
    const stale = this.staleNow();
    const mces = this.vm.machineChecks().count;
    const cache = this.vm.cache;
    const writebacks = cache?.stat(CacheStat.WRITEBACKS) ?? 0;
    const bar = this.vm.bars[0];
    const barBefore: BarStepBefore | null = bar === undefined ? null : barStepBefore(bar);
    const barFound = bar === undefined ? null : barFindingCounts(bar);
    let s: Step;
    try {
      s = this.driver.stepRole(v);
    } catch (err) {
      return this.crash(`vcpu${v}`, err);
    } finally {
      this.stepping = null;
    }
    if (s === Step.BLOCKED) {
      return { blocked: true, exited: false, stopped: false, crashed: false, text: `blocked: vcpu${v} ${describeWait(vcpu.wait.code, vcpu.wait.arg, vcpu.wait.arg2, this.roleNames)}` };
    }
    const parts: string[] = [];
    if (before.state === VcpuRunState.EXITED) parts.push('re-enters KVM_RUN');
    else if (before.state === VcpuRunState.STOPPED) parts.push('resumes');
    else if (before.state === VcpuRunState.CREATED) parts.push('enters guest mode');
    const ack = this.word(v, VcpuWord.FLUSH_ACK);
    const acked = ack !== before.ack;
    if (acked) parts.push(`acknowledges TLB flush ${ack} (drops its TLB)`);
    const exited = this.word(v, VcpuWord.EXITS) !== before.exits;
    const reason = exited ? this.word(v, VcpuWord.EXIT_REASON) : -1;
    const stopped = before.state !== VcpuRunState.STOPPED && vcpu.runState === VcpuRunState.STOPPED;
    const fetched = !before.pending;
    const idle = fetched && wl.lastIdle;
    const g = vcpu.op.gfn;
    const priv = vcpu.op.private === true;
    const kind = this.vm.attributes === null ? '' : priv ? 'private ' : 'shared ';
    /** What a read sees: guest_memfd for a private access, with the cache model what its memory type read, else the shared memory. */
    const readValue = (): number => cache !== null ? vcpuReadValue(this.vm, vcpu.slot!, vcpu.page) : (priv ? vcpu.slot!.gmem! : vcpu.slot!).readU64(vcpu.page);
    /** With the cache model: the access's memory type, and where it went. */
    const how = (store: boolean): string => cache === null ? '' : ` (${accessText(this.vm, vcpu.slot!, vcpu.page, store)})`;
    const retiredNow = vcpu.retired > before.retired;
    // An access to a BAR page (outside every memslot): KVM's BAR MMU, its fault in two halves, a refusal.
    const barPage = bar !== undefined && !idle && (vcpu.op.kind === OpKind.READ || vcpu.op.kind === OpKind.WRITE64) && this.vm.memory.findSlot(g) === undefined
      && this.vm.barAt(g) === bar ? g - bar.mmu.baseGfn : null;
    const barRead = barPage !== null && vcpu.op.kind === OpKind.READ && retiredNow ? vcpu.ctx.mmioRead : undefined;
    if (barPage !== null && !stopped) {
      const write = vcpu.op.kind !== OpKind.READ;
      parts.push(barStepText(bar!, barPage, write, vcpu.op.value, barBefore!, { retired: retiredNow, exited, read: barRead }));
      if (exited) parts.push(`exits with ${EXIT_REASON_NAMES[reason] ?? reason}`);
    } else if (vcpu.op.kind === OpKind.MAP_GPA_RANGE) {
      parts.push(exited ? `KVM_HC_MAP_GPA_RANGE ${hex(g)}+${vcpu.op.value} to ${priv ? 'private' : 'shared'}: exits with ${EXIT_REASON_NAMES[reason] ?? reason}`
        : retiredNow ? `KVM_HC_MAP_GPA_RANGE ${hex(g)}+${vcpu.op.value} retires, RAX = ${vcpu.ctx.hypercallRet ?? 0}` : 'hypercall');
    } else if (exited && reason !== KVM_EXIT_MMIO) {
      parts.push(`exits with ${EXIT_REASON_NAMES[reason] ?? reason}${vcpu.opPending ? ` before its ${kind}${vcpu.op.kind === OpKind.READ ? 'read of' : 'write to'} ${hex(g)} retires` : ''}`);
    } else if (stopped) {
      parts.push('stops (outside guest mode)');
    } else {
      const phase = fetched || acked ? Phase.TRANSLATE : before.phase;
      const mmio = exited ? ': KVM_EXIT_MMIO' : '';
      switch (phase) {
        case Phase.TRANSLATE:
          if (idle) parts.push('idle');
          else if (vcpu.op.kind === OpKind.WBINVD) {
            const written = cache!.stat(CacheStat.WRITEBACKS) - writebacks;
            const dmaSlot = this.vm.dmaSlots().length > 0;
            const why = kvmEmulateWbinvd(this.vm) ? 'non-coherent DMA is registered' : 'a slot has KVM_MEM_DMA';
            parts.push(!kvmEmulateWbinvd(this.vm) && !dmaSlot ? 'WBINVD: no non-coherent DMA, KVM skips it (nothing flushed), retires'
              : this.vm.bugs.wbinvdNoop ? `WBINVD: ${why}, but KVM skips it all the same (wbinvd-noop: nothing flushed), retires`
                : kvmEmulateWbinvd(this.vm) ? `WBINVD: ${why}, KVM executes it (${written} dirty line(s) written back), retires`
                  : `WBINVD: ${why}: KVM flushes that slot's lines alone (${written} dirty line(s) written back), retires`);
          } else if (vcpu.op.kind === OpKind.SET_PAT) {
            parts.push(`the guest maps ${hex(g)}+${vcpu.op.value} ${MEMORY_TYPE_NAMES[(vcpu.op.offset & SET_PAT_TYPE) as MemoryType]} (its PAT); ${(vcpu.op.offset & SET_PAT_NO_CLFLUSH) !== 0 ? 'cpa_flush leaves the flush to a WBINVD' : `cpa_flush flushes their lines (${cache!.stat(CacheStat.WRITEBACKS) - writebacks} written back)`}, retires`);
          } else if (vcpu.op.kind === OpKind.READ) parts.push(exited ? `read ${hex(g)}: no memslot${mmio}` : `${kind}reads ${hex(g)} = ${readValue()}${how(false)}, retires`);
          else parts.push(exited ? `write ${hex(g)}: no memslot${mmio}` : `${kind}write ${hex(g)} = ${vcpu.op.value}: TLB ${vcpu.phase === Phase.STORE ? 'hit' : 'miss'}`);
          break;
        case Phase.WALK:
          parts.push(exited ? `walk ${hex(g)}: read-only memslot${mmio}` : `walk ${hex(g)}: SPTE ${vcpu.phase === Phase.STORE ? 'writable, TLB filled' : 'write-protected'}`);
          break;
        case Phase.FAULT:
          parts.push(this.vm.attributes === null ? `write-protect fault on ${hex(g)}: SPTE made writable${cache === null ? '' : `, memory type ${spteTypeText(vcpu.slot!.spte[vcpu.page]!)}`}`
            : vcpu.phase === Phase.FAULT ? `${kind}fault on ${hex(g)}: mmu_lock is held, it faults again`
              : `${kind}fault on ${hex(g)}: SPTE installed (or, an MMU invalidation under way, the access retries)`);
          break;
        case Phase.STORE:
          parts.push(`${kind}stores ${hex(g)} = ${vcpu.op.value}${how(true)}, retires`);
          // Only private memory has attributes for a store to be stale against (a VM may have a device and none).
          if (retiredNow && this.vm.attributes !== null) this.cvm?.oracle.storeRetired(v, g, priv);
          break;
      }
    }
    parts.push(...this.stepEvents, ...this.newFindings(found), ...staleReadLines(stale, this.staleNow()), ...machineCheckLines(mces, this.vm.machineChecks().count, hex(g)));
    if (bar !== undefined) parts.push(...newBarFindingLines(bar, barFound!));
    if (retiredNow && !idle && r !== null) {
      r.retired++;
      if (r.op.op.kind === 'read') r.value = barPage !== null ? barRead : readValue();
    }
    if (exited && r !== null) {
      r.exits.push({ reason, retired: r.retired });
      if (reason === KVM_EXIT_MMIO) r.dropped++;
    }
    if (r !== null && r.retired + r.dropped >= guestOpCount(r)) this.finish(v, r);
    return { blocked: false, exited, stopped, crashed: false, text: parts.join('; ') };
  }

  /** One step of the host's current operation. */
  private stepHost(r: OpRecord): StepReport {
    const genBefore = Atomics.load(this.vm.global, GlobalWord.FLUSH_GEN);
    const notesBefore = r.notes.length;
    const found = this.cvm?.oracle.count ?? 0;
    const stale = this.staleNow();
    const bar = this.vm.bars[0];
    const barFound = bar === undefined ? null : barFindingCounts(bar);
    this.stepping = r;
    this.stepEvents = [];
    let s: Step;
    try {
      s = this.driver.stepRole(this.hostIndex);
    } finally {
      this.stepping = null;
    }
    const parts = [...r.notes.slice(notesBefore), ...this.stepEvents, ...this.newFindings(found), ...staleReadLines(stale, this.staleNow()),
      ...(bar === undefined ? [] : newBarFindingLines(bar, barFound!))];
    const gen = Atomics.load(this.vm.global, GlobalWord.FLUSH_GEN);
    if (gen !== genBefore) parts.push(`starts TLB flush ${gen}`);
    if (s === Step.DONE) {
      const thrown = this.host.thrown;
      if (thrown !== undefined) {
        if (!(thrown instanceof KvmError)) {
          const c = this.crash('host', thrown);
          return { ...c, text: [...parts, c.text].join('; ') };
        }
        r.error = thrown;
        parts.push(`fails: ${thrown.message}`);
      }
      this.finish(this.hostIndex, r);
    } else if (s === Step.BLOCKED) {
      parts.push(`waits: host ${describeWait(this.host.wait.code, this.host.wait.arg, this.host.wait.arg2, this.roleNames)}`);
    }
    return { blocked: s === Step.BLOCKED, exited: false, stopped: false, crashed: false, text: parts.join('; ') };
  }
}

/** The file's notes for a step and for the operation it starts. */
function notes(e: InterleavingEntry, r: OpRecord | null): string {
  const n = [e.note, r?.op.note].filter((x): x is string => x !== undefined && x.trim() !== '');
  return n.length > 0 ? ` -- ${n.join('; ')}` : '';
}

function blockedText(b: boolean | number): string {
  return typeof b === 'number' ? `waiting for vcpu${b}` : `${b}`;
}

/** A slot's flags and kind for the trace's vm line: nothing for a plain RAM slot. */
function slotKindText(vm: Vm, m: Memslot): string {
  const flags = vm.flags(m);
  const kinds = [...(flags !== 0 ? [memslotFlagNames(flags)] : []), ...(m.hostMmio ? ['device memory'] : [])];
  return kinds.length > 0 ? ` (${kinds.join(', ')})` : '';
}

function trackingText(vm: Vm): string {
  const t = vm.tracking;
  if (t.kind === 'ring') return `dirty ring, ${t.entries} entries per vCPU (soft limit ${t.entries - 64})${t.withBitmap ? ' with a backup bitmap' : ''}`;
  if (!t.manualProtect) return 'dirty log (legacy GET_DIRTY_LOG)';
  return `dirty log with manual protect (GET + CLEAR)${t.initiallySet ? ', initially set' : ''}`;
}
