import { type TrackingMode, trackingFor } from '../host/vmm/dirty-log.ts';
import { parseDocument } from 'yaml';
import { findBug } from '../bugs/catalog.ts';
import {
  KVM_HC_MAP_GPA_RANGE, KVM_MEM_DMA, KVM_MEM_GUEST_MEMFD, KVM_MEM_KVM_ONLY, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE,
} from '../host/constants.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../host/iommu/constants.ts';
import { PRIVATE_MEMORY_FINDING_KINDS } from '../oracles/private-memory-oracle.ts';
import { checkRingSize } from '../host/dirty-ring.ts';
import type { DirtyTracking, MemslotConfig, VmConfig } from '../host/layout.ts';
import type { ConversionDesignName } from '../host/vmm/conversion-design.ts';
import { UserError } from '../util/errors.ts';
import { LIMITS } from '../util/limits.ts';
import { checkKeys, readUserFile } from '../util/user-file.ts';
import { parseSize } from '../util/size.ts';
import { type OpContext, expectVerb, parseHostOp, parseOpExpect, parseVcpuOp, slotsText, vcpuRef, verbOf } from './operations.ts';
import { type LitmusFile, LitmusFileSchema, type RawOpEntry, issueLines } from './schema.ts';
import type { BarExpect, FinalExpect, HostOp, InterleavingEntry, LitmusOp, LitmusSpec, VcpuOp } from './spec.ts';
import { fieldPath, hex, parseGfnList, parseInteger, show } from './syntax.ts';
import { cpuCacheConfig } from './cache.ts';
import { type BarSpec, barLayout } from './bar.ts';
import { BAR_FINDING_NAMES, type BarFindingName } from '../host/mmio/kvm-bar-mmu.ts';
import type { MmioResource } from '../host/bar-layouts.ts';

/** Reads and checks a litmus file; throws UserError naming the file and field on bad input. */
export function loadLitmus(path: string): LitmusSpec {
  return parseLitmus(readUserFile(path, 'litmus file', 'scenarioFileBytes').toString('utf8'), path);
}

/** Checks litmus text; `file` names it in messages. */
export function parseLitmus(text: string, file: string): LitmusSpec {
  const doc = parseDocument(text, { prettyErrors: true, logLevel: 'error' });
  if (doc.errors.length > 0) {
    throw new UserError(doc.errors.map((e) => `${file}: ${e.message.split('\n')[0]!.replace(/:$/, '')}`).join('\n'));
  }
  let data: unknown;
  try { data = doc.toJS({ maxAliasCount: LIMITS.yamlAliases.max }); } catch (e) {
    throw new UserError(`${file}: more than ${LIMITS.yamlAliases.max} YAML alias expansions (${LIMITS.yamlAliases.why}): ${(e as Error).message.split('\n')[0]}`);
  }
  checkKeys(data, file);
  const parsed = LitmusFileSchema.safeParse(data ?? {}, { reportInput: true });
  if (!parsed.success) {
    throw new UserError(issueLines(parsed.error.issues).map((l) => `${file}: ${l}`).join('\n'));
  }
  return new SpecBuilder(file).build(parsed.data);
}

/** Turns a well-shaped file into a LitmusSpec, collecting every problem it finds. */
class SpecBuilder {
  private readonly problems: string[] = [];

  constructor(private readonly file: string) {}

  private fail(path: readonly PropertyKey[] | string, message: string): void {
    this.problems.push(`${this.file}: ${typeof path === 'string' ? path : fieldPath(path)}: ${message}`);
  }

  build(f: LitmusFile): LitmusSpec {
    const bugs = f.bugs ?? [];
    bugs.forEach((b, i) => {
      try { findBug(b, `${this.file}: ${fieldPath(['bugs', i])}`); } catch (e) { this.problems.push((e as Error).message); }
    });
    const slots = this.slots(f);
    const vcpus = this.vcpuCount(f);
    const tracking = this.tracking(f);
    const vm: VmConfig = { slots, vcpus, tracking };
    if (slots.some((x) => (x.flags & KVM_MEM_GUEST_MEMFD) !== 0)) {
      // A confidential VM type (KVM_X86_SW_PROTECTED_VM): private memory, and KVM_HC_MAP_GPA_RANGE exits to the VMM.
      vm.privateMem = true;
      vm.exitHypercalls = 1 << KVM_HC_MAP_GPA_RANGE;
    }
    if (f.vm.iommu !== undefined) {
      const o = typeof f.vm.iommu === 'string' ? { backend: f.vm.iommu } : f.vm.iommu;
      if (o.backend === 'iommufd' && 'dma_entry_limit' in o && o.dma_entry_limit !== undefined) this.fail('vm.iommu.dma_entry_limit', 'only type1 has a dma_entry_limit (iommufd has no entry limit)');
      const end = slots.reduce((n, x) => Math.max(n, x.baseGfn + x.pages), 0);
      vm.iommu = {
        backend: o.backend, dmaEntryLimit: ('dma_entry_limit' in o ? o.dma_entry_limit : undefined) ?? VFIO_DEFAULT_DMA_ENTRY_LIMIT,
        iovaPages: Math.max(1, end), devices: 1, tracking: ['iommu'],
      };
    }
    const design = this.design(f, vm);
    this.cpuCache(f, vm);
    this.dmaSlotLogging(f, vm);
    const bar = this.bar(f, vm);
    if (this.problems.length > 0) throw new UserError(this.problems.join('\n'));

    const ctx: OpContext = { vm, design };
    const actors = Object.keys(f.actors);
    const vcpuOps: LitmusOp<VcpuOp>[][] = Array.from({ length: vcpus }, () => []);
    let hostOps: LitmusOp<HostOp>[] = [];
    for (const actor of actors) {
      const entries = f.actors[actor]!;
      if (actor === 'host') {
        hostOps = this.ops(actor, entries, (text) => parseHostOp(text, ctx), ctx);
        this.checkClearBitmaps(hostOps, slots);
        this.checkNoncoherentCount(hostOps);
        continue;
      }
      const m = /^vcpu(\d+)$/.exec(actor);
      if (!m) { this.fail(['actors', actor], `unknown actor (actors are host and ${vcpus === 1 ? 'vcpu0' : `vcpu0..vcpu${vcpus - 1}`})`); continue; }
      const v = Number(m[1]);
      if (v >= vcpus) { this.fail(['actors', actor], `there is no ${actor}: vm.vcpus is ${vcpus}`); continue; }
      vcpuOps[v] = this.ops(actor, entries, (text) => parseVcpuOp(text, actor, ctx), ctx);
    }
    const interleaving = f.interleaving.map((e, i) => this.entry(e, i, actors, ctx));
    const expect = this.finalExpect(f, slots, bar);
    if (this.problems.length > 0) throw new UserError(this.problems.join('\n'));
    return {
      file: this.file, name: f.name, description: (f.description ?? '').trim(), bugs, vm, design,
      ...(bar !== null ? { bar } : {}), actors, vcpuOps, hostOps, interleaving: interleaving as InterleavingEntry[], expect,
    };
  }

  /**
   * vm.bar: a mediated device's BAR, vm0's of `vms` VMs sharing the device. Its resources
   * are laid out in order from BAR page 0; its GFNs lie outside every memslot (a vCPU's
   * access there goes through KVM's BAR MMU). vm.bars gets its layout.
   */
  private bar(f: LitmusFile, vm: VmConfig): BarSpec | null {
    const b = f.vm.bar;
    if (b === undefined) return null;
    const start = this.problems.length;
    const base = parseInteger(b.base_gfn);
    if (!base.ok) this.fail('vm.bar.base_gfn', base.error);
    const resources: MmioResource[] = [];
    let at = 0;
    b.resources.forEach((r, i) => {
      const path = ['vm', 'bar', 'resources', i, 'name'];
      if (!/^[A-Za-z][\w-]*$/.test(r.name) || /^vm\d+$/.test(r.name)) this.fail(path, `${show(r.name)} is not a resource name (a word of letters, digits, - and _, not vmN)`);
      const dup = resources.findIndex((x) => x.name === r.name);
      if (dup >= 0) this.fail(path, `${show(r.name)} is already vm.bar.resources[${dup}]`);
      resources.push({ name: r.name, barOffset: at, maxPages: r.pages, writable: r.writable ?? true });
      at += r.pages;
    });
    const barPages = at;
    if (barPages > 256) this.fail('vm.bar.resources', `${barPages} BAR pages in all is more than 256`);
    const vms = b.vms ?? 2;
    const mmioPages = b.mmio_pages ?? Math.min(1024, vms * barPages);
    if (base.ok) {
      const end = base.value + barPages;
      const range = `${hex(base.value)}..${hex(end - 1)}`;
      if (end > 2 ** 40) this.fail('vm.bar.base_gfn', `${hex(base.value)}: the BAR's GFNs ${range} run past the 52-bit guest physical address space`);
      const hit = vm.slots.find((s) => base.value < s.baseGfn + s.pages && s.baseGfn < end);
      if (hit) this.fail('vm.bar.base_gfn', `${hex(base.value)}: the BAR's GFNs ${range} overlap slot ${hit.id} (GFNs ${hex(hit.baseGfn)}..${hex(hit.baseGfn + hit.pages - 1)}); a BAR lies outside every memslot`);
    }
    // A BAR access KVM refuses is KVM_EXIT_MEMORY_FAULT, which a confidential VM's VMM takes for a conversion request.
    if (vm.privateMem) this.fail('vm.bar', 'a mediated device\'s BAR is not modelled with private memory: it needs slots without GUEST_MEMFD');
    if (this.problems.length > start || !base.ok) return null;
    const spec: BarSpec = {
      baseGfn: base.value, resources, barPages, mmioPages, vms,
      prefetch: b.prefetch ?? 'off', onRefusal: b.on_refused_access ?? 'memory-fault',
    };
    vm.bars = [barLayout(spec)];
    return spec;
  }

  private slots(f: LitmusFile): MemslotConfig[] {
    const { memory, slots } = f.vm;
    if ((memory === undefined) === (slots === undefined)) {
      this.fail('vm', memory === undefined ? 'give the guest memory: memory (like 1MiB) or slots' : 'give memory or slots, not both');
      return [];
    }
    if (memory !== undefined) {
      let bytes: number;
      try {
        bytes = parseSize(memory, `${this.file}: vm.memory`);
      } catch (e) {
        this.problems.push((e as Error).message);
        return [];
      }
      if (bytes < PAGE_SIZE || bytes % PAGE_SIZE !== 0) {
        this.fail('vm.memory', `${show(memory)} is not a whole number of 4 KiB pages`);
        return [];
      }
      if (bytes > LIMITS.memoryBytes.max) {
        this.fail('vm.memory', `${show(memory)} is more than ${LIMITS.memoryBytes.text.split(' .. ')[1]} of guest memory (${LIMITS.memoryBytes.why})`);
        return [];
      }
      // One slot, id 1 at GFN 0x100, as dirty_log_test lays out a one-slot guest.
      return [{ id: 1, asId: 0, baseGfn: 0x100, pages: bytes / PAGE_SIZE, flags: 0 }];
    }
    const out: (MemslotConfig & { at: number })[] = [];
    const cache = cpuCacheConfig(f.vm.cpu_cache ?? 'off') !== undefined;
    slots!.forEach((s, i) => {
      const base = parseInteger(s.base_gfn);
      if (!base.ok) { this.fail(['vm', 'slots', i, 'base_gfn'], base.error); return; }
      const flags = this.slotFlags(s.flags, ['vm', 'slots', i, 'flags']);
      // Both change only the memory type of the slot's SPTEs (vmx_get_mt_mask), which nothing but the cache model acts on.
      if ((flags & KVM_MEM_DMA) !== 0 && !cache) this.fail(['vm', 'slots', i, 'flags'], 'KVM_MEM_DMA (KVM honours the guest\'s PAT in the slot) needs the CPU cache model (vm.cpu_cache: on or self-snoop)');
      if (s.host_mmio === true && !cache) this.fail(['vm', 'slots', i, 'host_mmio'], 'device memory (vmx_get_mt_mask types it UC) needs the CPU cache model (vm.cpu_cache: on or self-snoop)');
      const asId = s.as_id ?? 0;
      const dup = out.find((o) => o.id === s.id && o.asId === asId);
      if (dup) { this.fail(['vm', 'slots', i, 'id'], `slot ${s.id} (as_id ${asId}) is already vm.slots[${dup.at}]`); return; }
      const cfg = { id: s.id, asId, baseGfn: base.value, pages: s.pages, flags, ...(s.host_mmio === true ? { hostMmio: true } : {}), at: i };
      const end = cfg.baseGfn + cfg.pages;
      // vmemlab has one GFN space for all address spaces, so no two slots may overlap.
      const hit = out.find((o) => cfg.baseGfn < o.baseGfn + o.pages && o.baseGfn < end);
      if (hit) {
        this.fail(['vm', 'slots', i], `slot ${s.id} (GFNs ${hex(cfg.baseGfn)}..${hex(end - 1)}) overlaps slot ${hit.id} (vm.slots[${hit.at}], GFNs ${hex(hit.baseGfn)}..${hex(hit.baseGfn + hit.pages - 1)})`);
        return;
      }
      out.push(cfg);
    });
    const total = out.reduce((n, x) => n + x.pages, 0);
    if (total * PAGE_SIZE > LIMITS.memoryBytes.max) this.fail('vm.slots', `${total} pages in all is more than ${LIMITS.memoryBytes.text.split(' .. ')[1]} of guest memory (${LIMITS.memoryBytes.why})`);
    return out.map(({ at: _at, ...s }) => s);
  }

  private slotFlags(flags: number | string[] | undefined, path: PropertyKey[]): number {
    if (flags === undefined) return 0;
    const names: Record<string, number> = {
      KVM_MEM_READONLY, READONLY: KVM_MEM_READONLY,
      KVM_MEM_LOG_DIRTY_PAGES, LOG_DIRTY_PAGES: KVM_MEM_LOG_DIRTY_PAGES,
      KVM_MEM_GUEST_MEMFD, GUEST_MEMFD: KVM_MEM_GUEST_MEMFD,
      KVM_MEM_DMA, DMA: KVM_MEM_DMA,
      KVM_MEM_KVM_ONLY, KVM_ONLY: KVM_MEM_KVM_ONLY,
    };
    const known = KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD | KVM_MEM_DMA | KVM_MEM_KVM_ONLY;
    let bits = 0;
    if (typeof flags === 'number') bits = flags;
    else {
      flags.forEach((n, i) => {
        const b = names[n.toUpperCase()];
        if (b === undefined) this.fail([...path, i], `unknown memslot flag ${show(n)} (one of: KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD, KVM_MEM_DMA, KVM_MEM_KVM_ONLY)`);
        else bits |= b;
      });
    }
    if (bits & KVM_MEM_LOG_DIRTY_PAGES) this.fail(path, 'KVM_MEM_LOG_DIRTY_PAGES is set by the host operation enable-logging, not here');
    if ((bits & KVM_MEM_GUEST_MEMFD) && (bits & KVM_MEM_READONLY)) this.fail(path, 'KVM_MEM_GUEST_MEMFD with KVM_MEM_READONLY (KVM refuses the pair: EINVAL)');
    // As createVmLayout refuses them: a guest_memfd slot is private memory, not a device's buffer.
    for (const [b, name] of [[KVM_MEM_DMA, 'KVM_MEM_DMA'], [KVM_MEM_KVM_ONLY, 'KVM_MEM_KVM_ONLY']] as const) {
      if ((bits & KVM_MEM_GUEST_MEMFD) && (bits & b)) this.fail(path, `KVM_MEM_GUEST_MEMFD with ${name} (KVM refuses the pair: EINVAL)`);
    }
    if (bits & ~(known | KVM_MEM_LOG_DIRTY_PAGES)) this.fail(path, `unknown flag bits in ${show(flags)}`);
    return bits & known;
  }

  /** vm.conversion_design: a design other than QEMU's converts guest_memfd memory for an assigned device, so it needs both. */
  private design(f: LitmusFile, vm: VmConfig): ConversionDesignName {
    const design = f.vm.conversion_design ?? 'rdm';
    if (design === 'rdm') return design;
    if (!vm.slots.some((s) => (s.flags & KVM_MEM_GUEST_MEMFD) !== 0)) this.fail('vm.conversion_design', `${design} converts guest_memfd memory: the VM needs a slot with flags [GUEST_MEMFD]`);
    if (vm.iommu === undefined) this.fail('vm.conversion_design', `${design} attaches an assigned device: the VM needs vm.iommu (type1 or iommufd)`);
    return design;
  }

  /** vm.cpu_cache: the cache model, which vmemlab does not model with private memory. */
  private cpuCache(f: LitmusFile, vm: VmConfig): void {
    const cache = cpuCacheConfig(f.vm.cpu_cache ?? 'off');
    if (cache === undefined) return;
    if (vm.privateMem) { this.fail('vm.cpu_cache', 'the CPU cache model is not modelled with private memory: it needs slots without GUEST_MEMFD'); return; }
    vm.cpuCache = cache;
  }

  /** vm.dma_slot_logging: what KVM does when dirty logging starts on a KVM_MEM_DMA slot, so the VM needs one. */
  private dmaSlotLogging(f: LitmusFile, vm: VmConfig): void {
    const rule = f.vm.dma_slot_logging;
    if (rule === undefined) return;
    if (!vm.slots.some((s) => (s.flags & KVM_MEM_DMA) !== 0)) this.fail('vm.dma_slot_logging', `${rule} is what KVM does when dirty logging starts on a KVM_MEM_DMA slot: the VM needs a slot with flags [KVM_MEM_DMA]`);
    vm.dmaSlotLogging = rule;
  }

  /** expect.bar: SPTEs and VMA entries by BAR page (a pfn, or none), MMIO words by pfn, the oracles' counts. */
  private barExpect(x: NonNullable<NonNullable<LitmusFile['expect']>['bar']>, bar: BarSpec): BarExpect {
    const out: BarExpect = {};
    const pages = (field: 'sptes' | 'ptes', m: Record<string, number | string> | undefined): { page: number; pfn: number | null }[] | undefined => {
      if (m === undefined) return undefined;
      const list: { page: number; pfn: number | null }[] = [];
      for (const [k, v] of Object.entries(m)) {
        const p = parseInteger(k);
        const path = `expect.bar.${field}[${k}]`;
        if (!p.ok) { this.fail(path, `${show(k)} is not a BAR page (0..${bar.barPages - 1})`); continue; }
        if (p.value >= bar.barPages) { this.fail(path, `BAR page ${p.value} is outside the ${bar.barPages}-page BAR (0..${bar.barPages - 1})`); continue; }
        if (v === 'none') { list.push({ page: p.value, pfn: null }); continue; }
        const pfn = parseInteger(v);
        if (!pfn.ok || pfn.value >= bar.mmioPages) { this.fail(path, `${show(v)}: expected the pfn mapped there (0..${bar.mmioPages - 1}), or none`); continue; }
        list.push({ page: p.value, pfn: pfn.value });
      }
      return list;
    };
    const sptes = pages('sptes', x.sptes);
    if (sptes) out.sptes = sptes;
    const ptes = pages('ptes', x.ptes);
    if (ptes) out.ptes = ptes;
    if (x.mmio !== undefined) {
      out.mmio = [];
      for (const [k, v] of Object.entries(x.mmio)) {
        const pfn = parseInteger(k);
        const path = `expect.bar.mmio[${k}]`;
        if (!pfn.ok || pfn.value >= bar.mmioPages) { this.fail(path, `${pfn.ok ? `pfn ${pfn.value}` : show(k)} is not a pfn of the device's MMIO (0..${bar.mmioPages - 1})`); continue; }
        const value = parseInteger(v);
        if (!value.ok || value.value > 0xffffffff) { this.fail(path, value.ok ? `${show(v)} is more than a 32-bit register holds` : value.error); continue; }
        out.mmio.push({ pfn: pfn.value, value: value.value });
      }
    }
    if (x.findings !== undefined) {
      const given = x.findings as Partial<Record<BarFindingName, number>>;
      out.findings = Object.fromEntries(BAR_FINDING_NAMES.map((k) => [k, given[k] ?? 0])) as Record<BarFindingName, number>;
    }
    if (x.dead === true && bar.onRefusal !== 'kill-vm') this.fail('expect.bar.dead', 'only a VM whose refused accesses kill it dies (vm.bar.on_refused_access: kill-vm)');
    if (x.dead !== undefined) out.dead = x.dead;
    return out;
  }

  private vcpuCount(f: LitmusFile): number {
    if (f.vm.vcpus !== undefined) return f.vm.vcpus;
    let n = 1;
    for (const a of Object.keys(f.actors)) {
      const m = /^vcpu(\d+)$/.exec(a);
      if (m && Number(m[1]) < 64) n = Math.max(n, Number(m[1]) + 1);
    }
    return n;
  }

  private tracking(f: LitmusFile): DirtyTracking {
    const t = typeof f.tracking === 'string' ? { mode: f.tracking } : f.tracking;
    const o = t as { mode: string; initially_set?: boolean; entries?: number; backup_bitmap?: boolean };
    const only = (field: keyof typeof o, mode: string): void => {
      if (o[field] !== undefined && o.mode !== mode) this.fail(['tracking', field], `only applies to mode ${mode}, not ${o.mode}`);
    };
    only('initially_set', 'clear-log');
    only('entries', 'dirty-ring');
    only('backup_bitmap', 'dirty-ring');
    if (o.mode === 'dirty-ring') {
      const entries = o.entries ?? 4096;
      const err = checkRingSize(entries);
      if (err) this.fail(['tracking', 'entries'], `${err} (a power of two from 256 to 65536)`);
      return trackingFor('dirty-ring', { ringEntries: entries, hostWrites: o.backup_bitmap ?? false });
    }
    return trackingFor(o.mode as TrackingMode, { ringEntries: 0, hostWrites: false, initiallySet: o.initially_set ?? false });
  }

  private ops<T extends VcpuOp | HostOp>(
    actor: string, entries: RawOpEntry[],
    parse: (text: string) => { ok: true; value: T } | { ok: false; error: string }, ctx: OpContext,
  ): LitmusOp<T>[] {
    const out: LitmusOp<T>[] = [];
    entries.forEach((e, i) => {
      const path = ['actors', actor, i];
      const text = (typeof e === 'string' ? e : e.op).trim();
      if (text === '') { this.fail(path, 'empty operation'); return; }
      const p = parse(text);
      if (!p.ok) { this.fail(path, p.error); return; }
      const expect = typeof e === 'string' || e.expect === undefined ? {}
        : parseOpExpect(expectVerb(actor, verbOf(text)), e.expect, ctx, (key, msg) => this.fail([...path, 'expect', key], msg));
      const op: LitmusOp<T> = { actor, index: i, where: fieldPath(path), text, op: p.value, expect };
      if (typeof e !== 'string' && e.note !== undefined) op.note = e.note;
      out.push(op);
    });
    return out;
  }

  /** clear-log without all-ones passes the bitmap of the last get-log of that slot: there must be one. */
  private checkClearBitmaps(ops: LitmusOp<HostOp>[], slots: MemslotConfig[]): void {
    const got = new Set<number>();
    for (const o of ops) {
      if (o.op.kind === 'get-log') got.add(o.op.slot);
      if (o.op.kind === 'clear-log' && !o.op.allOnes && !got.has(o.op.slot)) {
        this.fail(o.where, `'${o.text}' passes the bitmap of the last get-log of slot ${slots[o.op.slot]!.id}, and no get-log comes before it (write 'all-ones' to clear every page of the range)`);
      }
    }
  }

  /** The host runs its script in order, so the non-coherent DMA count at each operation is known: VFIO only unregisters what it registered. */
  private checkNoncoherentCount(ops: LitmusOp<HostOp>[]): void {
    let count = 0;
    for (const o of ops) {
      if (o.op.kind === 'register-noncoherent-dma') count++;
      if (o.op.kind !== 'unregister-noncoherent-dma') continue;
      if (count === 0) this.fail(o.where, `'${o.text}': no non-coherent DMA is registered before it (KVM would take the count below 0; kvm_vfio_update_coherency unregisters only what it registered)`);
      else count--;
    }
  }

  private entry(e: LitmusFile['interleaving'][number], i: number, actors: string[], ctx: OpContext): InterleavingEntry | null {
    const path = ['interleaving', i];
    const text = (typeof e === 'string' ? e : e.run).trim();
    const m = /^([A-Za-z_][\w-]*)(\.[A-Za-z]+)?(?:\s+with\s+(.+))?$/.exec(text);
    if (!m) {
      this.fail(path, `${show(text)} is not an interleaving step (write ACTOR, ACTOR.step or host with vcpuN)`);
      return null;
    }
    const [, actor, suffix, withList] = m as unknown as [string, string, string | undefined, string | undefined];
    if (!actors.includes(actor)) {
      this.fail(path, `unknown actor '${actor}' (actors: ${actors.join(', ') || 'none'})`);
      return null;
    }
    if (suffix !== undefined && suffix !== '.step') {
      this.fail(path, `unknown step form '${actor}${suffix}' (write ${actor} to run its next operation, or ${actor}.step for one step)`);
      return null;
    }
    const mode = suffix === '.step' ? 'step' : 'op';
    const vcpu = actor === 'host' ? null : Number(actor.slice(4));
    const assist: number[] = [];
    if (withList !== undefined) {
      if (actor !== 'host' || mode !== 'op') {
        this.fail(path, `'with' lets vCPUs step while the host's operation waits for them; it only goes with 'host'`);
        return null;
      }
      for (const w of withList.split(/[\s,]+/).filter((x) => x !== '')) {
        if (w === 'all') { for (let v = 0; v < ctx.vm.vcpus; v++) assist.push(v); continue; }
        const v = vcpuRef(w, ctx, text);
        if (!v.ok) { this.fail(path, v.error); return null; }
        assist.push(v.value);
      }
    }
    const entry: InterleavingEntry = { index: i, where: fieldPath(path), text, actor, vcpu, mode, assist };
    if (typeof e !== 'string' && e.note !== undefined) entry.note = e.note;
    const blocked = typeof e === 'string' ? undefined : e.expect?.blocked;
    if (blocked !== undefined) {
      if (typeof blocked === 'boolean') entry.blocked = blocked;
      else {
        const v = vcpuRef(blocked, ctx, text);
        if (!v.ok) { this.fail([...path, 'expect', 'blocked'], `${show(blocked)}: expected true, false or the vCPU waited for (vcpuN)`); return null; }
        entry.blocked = v.value;
      }
    }
    return entry;
  }

  private finalExpect(f: LitmusFile, slots: MemslotConfig[], bar: BarSpec | null): FinalExpect {
    const x = f.expect;
    const out: FinalExpect = {};
    if (!x) return out;
    if (x.bar !== undefined) {
      if (f.vm.bar === undefined) this.fail('expect.bar', 'the VM has no mediated device\'s BAR (vm.bar)');
      else if (bar !== null) out.bar = this.barExpect(x.bar, bar);
    }
    const inSlot = (g: number): boolean => slots.some((s) => g >= s.baseGfn && g < s.baseGfn + s.pages);
    const gfnMap = <T, U = number | boolean>(field: string, m: Record<string, T> | undefined, value: (v: T, path: string) => U | null) => {
      if (m === undefined) return undefined;
      const list: { gfn: number; v: U }[] = [];
      for (const [k, v] of Object.entries(m)) {
        const g = parseInteger(k);
        if (!g.ok) { this.fail(['expect', field, k], `${show(k)} is not a GFN`); continue; }
        const path = `expect.${field}[${hex(g.value)}]`;
        if (!inSlot(g.value)) { this.fail(path, `GFN ${hex(g.value)} is in no memslot (${slotsText(slots)})`); continue; }
        const val = value(v, path);
        if (val !== null) list.push({ gfn: g.value, v: val });
      }
      return list;
    };
    const int = (v: number | string, path: string): number | null => {
      const p = parseInteger(v);
      if (!p.ok) { this.fail(path, p.error); return null; }
      return p.value;
    };
    const gfns = (field: string, v: (number | string)[] | undefined): number[] | undefined => {
      if (v === undefined) return undefined;
      const p = parseGfnList(v);
      if (!p.ok) { this.fail(['expect', field], p.error); return undefined; }
      return [...new Set(p.value)].sort((a, b) => a - b);
    };
    const pages = gfnMap('pages', x.pages, int);
    if (pages) out.pages = pages.map(({ gfn, v }) => ({ gfn, value: v as number }));
    const copies = gfnMap('copies', x.copies, int);
    if (copies) out.copies = copies.map(({ gfn, v }) => ({ gfn, value: v as number }));
    const sptes = gfnMap('sptes', x.sptes, (v) => v === 'writable');
    if (sptes) out.sptes = sptes.map(({ gfn, v }) => ({ gfn, writable: v as boolean }));
    const collected = gfns('collected', x.collected);
    if (collected) out.collected = collected;
    const stale = gfns('stale_copies', x.stale_copies);
    if (stale) out.staleCopies = stale;
    if (x.lost_host_writes !== undefined) out.lostHostWrites = x.lost_host_writes;
    if (x.flushes !== undefined) out.flushes = x.flushes;
    const gmemSlot = (g: number): boolean => slots.some((s) => g >= s.baseGfn && g < s.baseGfn + s.pages && (s.flags & KVM_MEM_GUEST_MEMFD) !== 0);
    const privateOnly = (field: string, m: Record<string, unknown> | undefined): void => {
      if (m === undefined) return;
      for (const k of Object.keys(m)) {
        const g = parseInteger(k);
        if (g.ok && !gmemSlot(g.value) && inSlot(g.value)) this.fail(`expect.${field}[${hex(g.value)}]`, `GFN ${hex(g.value)} is in a slot without guest_memfd (flags [GUEST_MEMFD])`);
      }
    };
    privateOnly('attributes', x.attributes);
    privateOnly('rdm', x.rdm);
    privateOnly('private_pages', x.private_pages);
    const attributes = gfnMap('attributes', x.attributes, (v) => v === 'private');
    if (attributes) out.attributes = attributes.map(({ gfn, v }) => ({ gfn, private: v as boolean }));
    const rdm = gfnMap('rdm', x.rdm, (v) => v === 'shared');
    if (rdm) out.rdm = rdm.map(({ gfn, v }) => ({ gfn, shared: v as boolean }));
    const privatePages = gfnMap('private_pages', x.private_pages, int);
    if (privatePages) out.privatePages = privatePages.map(({ gfn, v }) => ({ gfn, value: v as number }));
    if (x.iommu !== undefined) {
      if (!f.vm.iommu) this.fail('expect.iommu', 'the VM has no IOMMU (vm.iommu: type1 or iommufd)');
      out.iommu = [];
      for (const [k, v] of Object.entries(x.iommu)) {
        const iova = parseInteger(k);
        if (!iova.ok) { this.fail(['expect', 'iommu', k], `${show(k)} is not an IOVA page`); continue; }
        if (v === 'unmapped') { out.iommu.push({ iova: iova.value, gfn: null }); continue; }
        const g = parseInteger(v);
        if (!g.ok) { this.fail(`expect.iommu[${hex(iova.value)}]`, `${show(v)}: expected the GFN mapped there, or unmapped`); continue; }
        out.iommu.push({ iova: iova.value, gfn: g.value });
      }
    }
    const needCache = (field: string): void => {
      if (cpuCacheConfig(f.vm.cpu_cache ?? 'off') === undefined) this.fail(`expect.${field}`, 'the VM has no CPU cache model (vm.cpu_cache: on or self-snoop)');
    };
    if (x.cache !== undefined) needCache('cache');
    const cache = gfnMap('cache', x.cache, (v) => v);
    if (cache) out.cache = cache.map(({ gfn, v }) => ({ gfn, state: v }));
    if (x.stale !== undefined) {
      needCache('stale');
      out.stale = x.stale;
    }
    if (x.machine_checks !== undefined) {
      needCache('machine_checks');
      out.machineChecks = x.machine_checks;
    }
    if (x.findings !== undefined) {
      x.findings.forEach((k, i) => {
        if (!(PRIVATE_MEMORY_FINDING_KINDS as readonly string[]).includes(k)) this.fail(['expect', 'findings', i], `unknown finding ${show(k)} (one of: ${PRIVATE_MEMORY_FINDING_KINDS.join(', ')})`);
      });
      out.findings = [...new Set(x.findings)].sort();
    }
    return out;
  }
}
