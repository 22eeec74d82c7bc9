import { KVM_MEM_GUEST_MEMFD } from '../host/constants.ts';
import type { MemslotConfig, VmConfig } from '../host/layout.ts';
import { MEMORY_TYPES, MEMORY_TYPE_NAMES } from '../host/memory-type.ts';
import type { ConversionDesignName } from '../host/vmm/conversion-design.ts';
import type { EntryMatcher, HostOp, OpExpect, VcpuOp } from './spec.ts';
import {
  type Parsed, hex, parseErrno, parseExitReason, parseGfns, parseInteger, parseRingFlags, show,
} from './syntax.ts';

/**
 * The grammar of litmus operations: `verb arg...` on one line, for vCPUs (guest
 * operations) and for the host (the VMM and KVM's ioctls), and which expectations each
 * operation takes.
 */

export const VCPU_OPS: Record<VcpuOp['kind'] | 'write-pages', string> = {
  write: 'write GFN VALUE [private|shared]',
  'write-pages': 'write-pages GFN COUNT VALUE [private|shared]',
  read: 'read GFN [private|shared]',
  'map-gpa': 'map-gpa GFN COUNT private|shared',
  'set-pat': `set-pat GFN COUNT ${MEMORY_TYPES.map((t) => MEMORY_TYPE_NAMES[t]).join('|')} [no-clflush]`,
  wbinvd: 'wbinvd',
};

export const HOST_OPS: Record<HostOp['kind'], string> = {
  'enable-logging': 'enable-logging [SLOT]',
  'disable-logging': 'disable-logging [SLOT]',
  harvest: 'harvest [vcpuN]',
  reset: 'reset',
  'get-log': 'get-log SLOT',
  'clear-log': 'clear-log SLOT FIRST NUM [all-ones]',
  'write-guest': 'write-guest GFN VALUE',
  copy: 'copy GFN',
  'forge-entry': 'forge-entry vcpuN INDEX SLOT OFFSET [dirty|reset|free|FLAGS]',
  reenter: 'reenter vcpuN',
  stop: 'stop vcpuN',
  release: 'release vcpuN',
  'set-attributes': 'set-attributes GFN COUNT private|shared',
  convert: 'convert GFN COUNT private|shared',
  'punch-hole': 'punch-hole GFN COUNT',
  'vfio-register': 'vfio-register SLOT',
  dma: 'dma IOVA VALUE [snoop|no-snoop]',
  'dma-read': 'dma-read IOVA [snoop|no-snoop]',
  'serve-exits': 'serve-exits',
  'register-noncoherent-dma': 'register-noncoherent-dma',
  'unregister-noncoherent-dma': 'unregister-noncoherent-dma',
  'vfio-file-add': 'vfio-file-add coherent|noncoherent',
  clflush: 'clflush GFN',
  wbinvd: 'wbinvd',
  'migration-read': 'migration-read GFN [flush-first]',
  'bar-grant': 'bar-grant RESOURCE PAGES [vmN]',
  'bar-revoke': 'bar-revoke RESOURCE [vmN]',
  'bar-decode': 'bar-decode off|on',
};

/** Expectation keys as written in files, per operation verb. */
const VCPU_WRITE_KEYS = ['exit', 'retired_before_exit', 'faults', 'logged'];
export const EXPECT_KEYS: Record<string, string[]> = {
  write: VCPU_WRITE_KEYS,
  'write-pages': VCPU_WRITE_KEYS,
  read: ['exit', 'value'],
  'map-gpa': ['exit'],
  'set-pat': ['exit'],
  // A vCPU's WBINVD (the host's `wbinvd` takes written_back and error).
  'guest-wbinvd': ['exit'],
  // zapped: a KVM_MEM_DMA slot forced to WB while it logs.
  'enable-logging': ['zapped', 'error'],
  'disable-logging': ['error'],
  harvest: ['harvested', 'error'],
  reset: ['reset', 'error'],
  'get-log': ['dirty', 'error'],
  'clear-log': ['cleared', 'error'],
  'write-guest': ['logged', 'lost', 'error'],
  copy: ['value', 'error'],
  'forge-entry': ['error'],
  reenter: ['error'],
  stop: ['error'],
  release: ['error'],
  'set-attributes': ['error'],
  convert: ['error'],
  'punch-hole': ['error'],
  'vfio-register': ['error'],
  dma: ['faulted', 'error'],
  'dma-read': ['faulted', 'value', 'error'],
  'serve-exits': ['error'],
  'register-noncoherent-dma': ['zapped', 'error'],
  'unregister-noncoherent-dma': ['zapped', 'error'],
  'vfio-file-add': ['zapped', 'error'],
  clflush: ['written_back', 'error'],
  wbinvd: ['written_back', 'error'],
  'migration-read': ['value', 'error'],
  'bar-grant': ['pfn', 'error'],
  // unmapped: the VMA's entries removed; zapped: KVM's SPTEs the notifier zapped.
  'bar-revoke': ['unmapped', 'zapped', 'error'],
  'bar-decode': ['unmapped', 'zapped', 'error'],
};

/** The VM's type has private memory (the loader sets it when a slot has KVM_MEM_GUEST_MEMFD). */
export function hasPrivateMemory(vm: VmConfig): boolean {
  return vm.privateMem === true;
}

function kindWord(token: string | undefined, text: string): Parsed<boolean> {
  if (token === 'private') return ok(true);
  if (token === 'shared') return ok(false);
  return bad(`'${text}': '${token ?? ''}' is not an access kind (private or shared)`);
}

/** What an operation may refer to. */
export interface OpContext {
  vm: VmConfig;
  design: ConversionDesignName;
}

const ok = <T>(value: T): Parsed<T> => ({ ok: true, value });
const bad = <T>(error: string): Parsed<T> => ({ ok: false, error });

export function verbOf(text: string): string {
  return text.trim().split(/\s+/)[0] ?? '';
}

export function parseVcpuOp(text: string, actor: string, ctx: OpContext): Parsed<VcpuOp> {
  const t = text.trim().split(/\s+/);
  const verb = t[0]!;
  if (!(verb in VCPU_OPS)) {
    if (verb in HOST_OPS) return bad(`'${verb}' is a host operation; ${actor} runs guest operations (one of: ${Object.keys(VCPU_OPS).join(', ')})`);
    return bad(`unknown operation '${verb}' (one of: ${Object.keys(VCPU_OPS).join(', ')})`);
  }
  const usage = VCPU_OPS[verb as keyof typeof VCPU_OPS];
  // set-pat's trailing no-clflush: the guest's cpa_flush leaves the flush to a WBINVD (a CPU without CLFLUSH).
  const noClflush = verb === 'set-pat' && t.at(-1) === 'no-clflush';
  if (noClflush) t.pop();
  const words = usage.split(' ').slice(1).filter((w) => w !== '[no-clflush]');
  // A trailing private|shared is the access's kind (a TDX guest's shared bit); map-gpa requires it.
  const optionalKind = words.at(-1) === '[private|shared]';
  const hasKind = verb === 'map-gpa' || (optionalKind && (t.at(-1) === 'private' || t.at(-1) === 'shared') && t.length - 1 === words.length);
  const want = optionalKind ? words.length - (hasKind ? 0 : 1) : words.length;
  if (t.length - 1 !== want) return bad(`'${text}': ${verb} takes ${want} argument${want === 1 ? '' : 's'} (${usage})`);
  let priv = false;
  if (hasKind) {
    const k = kindWord(t.at(-1), text);
    if (!k.ok) return k;
    priv = k.value;
    if (!hasPrivateMemory(ctx.vm) && (priv || verb === 'map-gpa')) return bad(`'${text}': ${verb === 'map-gpa' ? 'KVM_HC_MAP_GPA_RANGE' : 'a private access'} needs private memory (a slot with flags [GUEST_MEMFD])`);
  }
  if (verb === 'wbinvd') return needCache(text, ctx) ?? ok({ kind: 'wbinvd' });
  const gfn = num(t[1], 'GFN', text);
  if (!gfn.ok) return gfn;
  switch (verb) {
    case 'read': return ok({ kind: 'read', gfn: gfn.value, private: priv });
    case 'write': {
      const value = num(t[2], 'VALUE', text);
      if (value.ok && value.value > 0xffffffff && barPageOf(gfn.value, ctx) !== null) return bad(`'${text}': VALUE: ${hex(gfn.value)} is a BAR page, whose register is 32 bits (at most 0xffffffff)`);
      return value.ok ? ok({ kind: 'write', gfn: gfn.value, value: value.value, count: 1, private: priv }) : value;
    }
    case 'map-gpa': {
      const count = pageCount(t[2], text, ctx);
      return count.ok ? ok({ kind: 'map-gpa', gfn: gfn.value, count: count.value, private: priv }) : count;
    }
    case 'set-pat': {
      const c = needCache(text, ctx);
      if (c) return c;
      const r = slotRange(t.slice(1), text, ctx, false);
      if (!r.ok) return r;
      const type = MEMORY_TYPES.find((m) => MEMORY_TYPE_NAMES[m] === t[3]!.toUpperCase());
      if (type === undefined) return bad(`'${text}': '${t[3]}' is not a memory type (one of: ${MEMORY_TYPES.map((m) => MEMORY_TYPE_NAMES[m]).join(', ')})`);
      return ok({ kind: 'set-pat', ...r.value, type, clflush: !noClflush });
    }
    default: {
      const count = pageCount(t[2], text, ctx);
      if (!count.ok) return count;
      const value = num(t[3], 'VALUE', text);
      if (value.ok && value.value > 0xffffffff && Array.from({ length: count.value }, (_, i) => gfn.value + i).some((g) => barPageOf(g, ctx) !== null)) {
        return bad(`'${text}': VALUE: the pages include BAR pages, whose registers are 32 bits (at most 0xffffffff)`);
      }
      return value.ok ? ok({ kind: 'write', gfn: gfn.value, value: value.value, count: count.value, private: priv }) : value;
    }
  }
}

/** The BAR page of guest frame `gfn` (vm.bar), or null. */
export function barPageOf(gfn: number, ctx: OpContext): number | null {
  const b = ctx.vm.bars?.[0];
  if (b === undefined) return null;
  const page = gfn - b.mmu.baseGfn;
  return page >= 0 && page < b.mmu.barPages ? page : null;
}

/** COUNT: at least 1, at most the VM's pages. */
function pageCount(token: string | undefined, text: string, ctx: OpContext): Parsed<number> {
  const count = num(token, 'COUNT', text);
  if (!count.ok) return count;
  if (count.value < 1) return bad(`'${text}': COUNT must be at least 1`);
  const pages = ctx.vm.slots.reduce((n: number, x: MemslotConfig) => n + x.pages, 0);
  if (count.value > pages) return bad(`'${text}': COUNT ${count.value} is more pages than the VM has (${pages})`);
  return count;
}

/** The CPU cache model's operations need vm.cpu_cache: without it memory types and caches change nothing. */
function needCache(text: string, ctx: OpContext): Parsed<never> | null {
  return ctx.vm.cpuCache ? null : bad(`'${text}': ${verbOf(text)} needs the CPU cache model (vm.cpu_cache: on or self-snoop)`);
}

/** GFN COUNT of pages inside one memslot (with guest_memfd when `gmem`). */
function slotRange(args: string[], text: string, ctx: OpContext, gmem: boolean): Parsed<{ gfn: number; count: number }> {
  const gfn = num(args[0], 'GFN', text);
  if (!gfn.ok) return gfn;
  const count = pageCount(args[1], text, ctx);
  if (!count.ok) return count;
  const s = ctx.vm.slots.find((x) => gfn.value >= x.baseGfn && gfn.value < x.baseGfn + x.pages);
  if (s === undefined) return bad(`'${text}': GFN ${hex(gfn.value)} is in no memslot (${slotsText(ctx.vm.slots)})`);
  if (gmem && (s.flags & KVM_MEM_GUEST_MEMFD) === 0) return bad(`'${text}': slot ${s.id} has no guest_memfd (flags [GUEST_MEMFD])`);
  if (gfn.value + count.value > s.baseGfn + s.pages) return bad(`'${text}': ${hex(gfn.value)}+${count.value} runs past the end of slot ${s.id} (${hex(s.baseGfn + s.pages - 1)})`);
  return ok({ gfn: gfn.value, count: count.value });
}

export function parseHostOp(text: string, ctx: OpContext): Parsed<HostOp> {
  const t = text.trim().split(/\s+/);
  const verb = t[0]!;
  if (!(verb in HOST_OPS)) {
    if (verb in VCPU_OPS) return bad(`'${verb}' is a guest operation; only vcpuN actors run it (host operations: ${Object.keys(HOST_OPS).join(', ')})`);
    return bad(`unknown operation '${verb}' (one of: ${Object.keys(HOST_OPS).join(', ')})`);
  }
  const kind = verb as HostOp['kind'];
  const usage = HOST_OPS[kind];
  const words = usage.split(' ').slice(1);
  const min = words.filter((w) => !w.startsWith('[')).length;
  const args = t.slice(1);
  if (args.length < min || args.length > words.length) {
    return bad(`'${text}': wrong number of arguments (${usage})`);
  }
  const ring = ctx.vm.tracking.kind === 'ring';
  const needRing = (): Parsed<never> | null => ring ? null : bad(`'${text}': ${verb} needs the dirty ring (tracking: dirty-ring)`);
  const needIommu = (): Parsed<never> | null => ctx.vm.iommu ? null : bad(`'${text}': ${verb} needs an assigned device (vm.iommu: type1 or iommufd)`);
  switch (kind) {
    case 'enable-logging':
    case 'disable-logging': {
      if (args.length === 0) return ok({ kind, slot: null });
      const s = slotRef(args[0]!, ctx, text);
      return s.ok ? ok({ kind, slot: s.value }) : s;
    }
    case 'harvest': {
      const r = needRing();
      if (r) return r;
      if (args.length === 0) return ok({ kind, vcpu: null });
      const v = vcpuRef(args[0]!, ctx, text);
      return v.ok ? ok({ kind, vcpu: v.value }) : v;
    }
    case 'reset':
      return ok({ kind });
    case 'get-log': {
      const s = slotRef(args[0]!, ctx, text);
      return s.ok ? ok({ kind, slot: s.value }) : s;
    }
    case 'clear-log': {
      const s = slotRef(args[0]!, ctx, text);
      if (!s.ok) return s;
      const first = num(args[1], 'FIRST', text);
      if (!first.ok) return first;
      const n = num(args[2], 'NUM', text);
      if (!n.ok) return n;
      if (args[3] !== undefined && args[3] !== 'all-ones') return bad(`'${text}': the bitmap is the one just got, or 'all-ones', not '${args[3]}'`);
      return ok({ kind, slot: s.value, first: first.value, num: n.value, allOnes: args[3] === 'all-ones' });
    }
    case 'write-guest':
    case 'copy':
    case 'clflush':
    case 'migration-read': {
      // With the cache model the migration thread reads through it: a copy of memory alone is what no CPU reads.
      if (kind === 'copy' && ctx.vm.cpuCache) return bad(`'${text}': with vm.cpu_cache the migration thread reads through the CPU cache: write migration-read GFN [flush-first]`);
      const c = kind === 'clflush' || kind === 'migration-read' ? needCache(text, ctx) : null;
      if (c) return c;
      const gfn = num(args[0], 'GFN', text);
      if (!gfn.ok) return gfn;
      if (!ctx.vm.slots.some((s) => gfn.value >= s.baseGfn && gfn.value < s.baseGfn + s.pages)) {
        return bad(`'${text}': GFN ${hex(gfn.value)} is in no memslot (${slotsText(ctx.vm.slots)})`);
      }
      if (kind === 'copy' || kind === 'clflush') return ok({ kind, gfn: gfn.value });
      if (kind === 'migration-read') {
        if (args[1] !== undefined && args[1] !== 'flush-first') return bad(`'${text}': '${args[1]}' is not flush-first (clflush-before-read), the only option`);
        return ok({ kind, gfn: gfn.value, flushFirst: args[1] === 'flush-first' });
      }
      const value = num(args[1], 'VALUE', text);
      return value.ok ? ok({ kind, gfn: gfn.value, value: value.value }) : value;
    }
    case 'forge-entry': {
      const r = needRing();
      if (r) return r;
      const v = vcpuRef(args[0]!, ctx, text);
      if (!v.ok) return v;
      const index = num(args[1], 'INDEX', text);
      if (!index.ok) return index;
      // dirty_index and reset_index are u32 in KVM: an entry index past them is no entry.
      if (index.value > 0xffffffff) return bad(`'${text}': INDEX ${index.value} is not a u32 ring index`);
      const field = slotField(args[2]!);
      if (!field.ok) return bad(`'${text}': SLOT: ${field.error}`);
      const offset = num(args[3], 'OFFSET', text);
      if (!offset.ok) return offset;
      const flags = args[4] === undefined ? ok(1) : parseRingFlags(args[4]);
      if (!flags.ok) return bad(`'${text}': ${flags.error}`);
      return ok({ kind, vcpu: v.value, index: index.value, slotField: field.value, offset: offset.value, flags: flags.value });
    }
    case 'reenter':
    case 'stop':
    case 'release': {
      const v = vcpuRef(args[0]!, ctx, text);
      return v.ok ? ok({ kind, vcpu: v.value }) : v;
    }
    case 'set-attributes':
    case 'convert':
    case 'punch-hole': {
      const r = slotRange(args, text, ctx, true);
      if (!r.ok) return r;
      if (kind === 'punch-hole') return ok({ kind, ...r.value });
      const k = kindWord(args[2], text);
      return k.ok ? ok({ kind, ...r.value, private: k.value }) : k;
    }
    case 'vfio-register': {
      const r = needIommu();
      if (r) return r;
      if (ctx.design !== 'rdm') return bad(`'${text}': with vm.conversion_design ${ctx.design} the design attaches the device in its set-up (only rdm registers VFIO's RAM discard listener here)`);
      const s = slotRef(args[0]!, ctx, text);
      if (!s.ok) return s;
      if ((ctx.vm.slots[s.value]!.flags & KVM_MEM_GUEST_MEMFD) === 0) return bad(`'${text}': slot ${args[0]} has no guest_memfd, so no RamDiscardManager to listen to`);
      return ok({ kind, slot: s.value });
    }
    case 'dma':
    case 'dma-read': {
      const r = needIommu();
      if (r) return r;
      const iova = num(args[0], 'IOVA', text);
      if (!iova.ok) return iova;
      const last = args[kind === 'dma' ? 2 : 1];
      if (last !== undefined && last !== 'snoop' && last !== 'no-snoop') return bad(`'${text}': '${last}' is not a snoop attribute (snoop or no-snoop)`);
      const snoop = last !== 'no-snoop';
      // Without the cache model every DMA reaches memory alike: No Snoop would change nothing.
      if (!snoop && !ctx.vm.cpuCache) return bad(`'${text}': no-snoop DMA differs from snooped DMA only with the CPU cache model (vm.cpu_cache: on or self-snoop)`);
      if (kind === 'dma-read') return ok({ kind, iova: iova.value, snoop });
      const value = num(args[1], 'VALUE', text);
      return value.ok ? ok({ kind, iova: iova.value, value: value.value, snoop }) : value;
    }
    case 'serve-exits':
      return ok({ kind });
    case 'register-noncoherent-dma':
    case 'unregister-noncoherent-dma':
      // VFIO registers for a device whose DMA cannot be made to snoop (kvm_vfio_update_coherency): an assigned device.
      return needIommu() ?? ok({ kind });
    case 'vfio-file-add': {
      const w = t[1];
      if (w !== 'coherent' && w !== 'noncoherent') return bad(`'${text}': '${w ?? ''}' is not coherent or noncoherent (whether the device's file enforces cache coherency)`);
      return needIommu() ?? ok({ kind, coherent: w === 'coherent' });
    }
    case 'wbinvd':
      return needCache(text, ctx) ?? ok({ kind });
    case 'bar-grant':
    case 'bar-revoke':
    case 'bar-decode':
      return parseBarOp(kind, args, text, ctx);
  }
}

/** bar-grant RESOURCE PAGES [vmN], bar-revoke RESOURCE [vmN], bar-decode off|on: vm.bar's vendor driver and VFIO. */
function parseBarOp(kind: 'bar-grant' | 'bar-revoke' | 'bar-decode', args: string[], text: string, ctx: OpContext): Parsed<HostOp> {
  const driver = ctx.vm.bars?.[0]?.driver;
  if (driver === undefined) return bad(`'${text}': ${kind} needs a mediated device's BAR (vm.bar)`);
  if (kind === 'bar-decode') {
    const w = args[0];
    if (w !== 'off' && w !== 'on') return bad(`'${text}': '${w ?? ''}' is not off or on (memory decode off: the BAR zapped and faults refused; on: faults validated again)`);
    return ok({ kind, on: w === 'on' });
  }
  const names = driver.resources.map((r) => r.name);
  const resource = names.indexOf(args[0]!);
  if (resource < 0) return bad(`'${text}': there is no BAR resource '${args[0]}' (vm.bar.resources: ${names.join(', ')})`);
  const vmWord = kind === 'bar-grant' ? args[2] : args[1];
  let vm = 0;
  if (vmWord !== undefined) {
    const m = /^vm(\d+)$/.exec(vmWord);
    if (!m) return bad(`'${text}': '${vmWord}' is not a VM sharing the device (write vm0, vm1, ...)`);
    vm = Number(m[1]);
    if (vm >= driver.vms) return bad(`'${text}': there is no ${vmWord} sharing the device (vm.bar.vms is ${driver.vms}: vm0${driver.vms > 1 ? `..vm${driver.vms - 1}` : ''})`);
  }
  if (kind === 'bar-revoke') return ok({ kind, resource, vm });
  const pages = num(args[1], 'PAGES', text);
  if (!pages.ok) return pages;
  const most = driver.resources[resource]!.maxPages;
  if (pages.value < 1 || pages.value > most) return bad(`'${text}': PAGES ${pages.value} is not 1..${most} (resource ${names[resource]} has ${most} BAR page${most === 1 ? '' : 's'})`);
  return ok({ kind, resource, pages: pages.value, vm });
}

function num(token: string | undefined, what: string, text: string): Parsed<number> {
  const n = parseInteger(token);
  return n.ok ? n : bad(`'${text}': ${what}: ${n.error}`);
}

/** `vcpuN` with N < vcpus. */
export function vcpuRef(token: string, ctx: OpContext, text: string): Parsed<number> {
  const m = /^vcpu(\d+)$/.exec(token);
  if (!m) return bad(`'${text}': '${token}' is not a vCPU (write vcpu0, vcpu1, ...)`);
  const v = Number(m[1]);
  if (v >= ctx.vm.vcpus) return bad(`'${text}': there is no ${token} (the VM has ${ctx.vm.vcpus} vCPU${ctx.vm.vcpus === 1 ? '' : 's'})`);
  return ok(v);
}

/** A slot by id, or `AS:ID`; returns the index into vm.slots. */
function slotRef(token: string, ctx: OpContext, text: string): Parsed<number> {
  const m = /^(?:(\d+):)?(\d+)$/.exec(token);
  if (!m) return bad(`'${text}': '${token}' is not a slot id (write 1, or AS:ID such as 1:1)`);
  const asId = m[1] === undefined ? null : Number(m[1]);
  const id = Number(m[2]);
  const found = ctx.vm.slots.map((s, i) => ({ s, i })).filter(({ s }) => s.id === id && (asId === null || s.asId === asId));
  if (found.length === 0) return bad(`'${text}': there is no slot ${token} (${slotsText(ctx.vm.slots)})`);
  if (found.length > 1) return bad(`'${text}': slot ${token} exists in several address spaces; write AS:ID`);
  return ok(found[0]!.i);
}

/** The raw kvm_dirty_gfn.slot field: a number, or `AS:ID`. No check that the slot exists. */
function slotField(token: string): Parsed<number> {
  const m = /^(\d+):(\d+)$/.exec(token);
  if (m) {
    const as = Number(m[1]);
    const id = Number(m[2]);
    if (as > 0xffff || id > 0xffff) return bad(`'${token}': AS and ID are 16 bits each`);
    return ok(((as << 16) | id) >>> 0);
  }
  const n = parseInteger(token);
  if (!n.ok || n.value > 0xffffffff) return bad(`'${token}' is not a slot field (a u32, or AS:ID)`);
  return n;
}

export function slotsText(slots: readonly MemslotConfig[]): string {
  return 'slots: ' + slots.map((s) => `${s.asId ? `${s.asId}:` : ''}${s.id} at ${hex(s.baseGfn)}..${hex(s.baseGfn + s.pages - 1)}`).join(', ');
}

/** The key of EXPECT_KEYS for an actor's verb: `wbinvd` is a guest operation and a host one. */
export function expectVerb(actor: string, verb: string): string {
  return verb === 'wbinvd' && actor !== 'host' ? 'guest-wbinvd' : verb;
}

/** Parses an operation's `expect` mapping; `fail(key, message)` reports a bad field. */
export function parseOpExpect(
  verb: string, raw: Record<string, unknown>, ctx: OpContext, fail: (key: string, message: string) => void,
): OpExpect {
  const allowed = EXPECT_KEYS[verb] ?? [];
  const e: OpExpect = {};
  for (const [key, v] of Object.entries(raw)) {
    if (!allowed.includes(key)) {
      const all = [...new Set(Object.values(EXPECT_KEYS).flat())];
      fail(key, all.includes(key)
        ? `'${key}' does not apply to ${verb} (it takes: ${allowed.join(', ')})`
        : `unknown expectation '${key}' (${verb} takes: ${allowed.join(', ')})`);
      continue;
    }
    const take = <T>(p: Parsed<T>, set: (x: T) => void): void => { if (p.ok) set(p.value); else fail(key, p.error); };
    switch (key) {
      case 'error': take(parseErrno(v), (x) => { e.error = x; }); break;
      case 'exit': take(parseExitReason(v), (x) => { e.exit = x; }); break;
      case 'retired_before_exit': take(parseInteger(v), (x) => { e.retiredBeforeExit = x; }); break;
      case 'faults': take(parseInteger(v), (x) => { e.faults = x; }); break;
      case 'lost': take(parseInteger(v), (x) => { e.lost = x; }); break;
      case 'value': take(parseInteger(v), (x) => { e.value = x; }); break;
      case 'reset': take(parseInteger(v), (x) => { e.reset = x; }); break;
      case 'cleared': take(parseInteger(v), (x) => { e.cleared = x; }); break;
      case 'zapped': take(parseInteger(v), (x) => { e.zapped = x; }); break;
      case 'written_back': take(parseInteger(v), (x) => { e.writtenBack = x; }); break;
      case 'unmapped': take(parseInteger(v), (x) => { e.unmapped = x; }); break;
      case 'pfn': take(parseInteger(v), (x) => { e.pfn = x; }); break;
      case 'logged': take(parseGfns(v), (x) => { e.logged = x; }); break;
      case 'dirty': take(parseGfns(v), (x) => { e.dirty = x; }); break;
      case 'harvested': take(parseHarvested(v, ctx), (x) => { e.harvested = x; }); break;
      case 'faulted':
        if (typeof v === 'boolean') e.faulted = v;
        else fail(key, `expected true or false, got ${show(v)}`);
        break;
    }
  }
  return e;
}

/** A count, or ring entries: a GFN, `{slot, gfn}` (slot id, optional as_id), or `{slot, offset}` (raw slot field). */
function parseHarvested(v: unknown, ctx: OpContext): Parsed<number | EntryMatcher[]> {
  if (typeof v === 'number') return parseInteger(v);
  if (!Array.isArray(v)) return bad(`expected a count or a list of entries, got ${show(v)}`);
  const out: EntryMatcher[] = [];
  for (const [i, item] of v.entries()) {
    const where = `[${i}]`;
    if (typeof item !== 'object' || item === null) {
      const g = parseInteger(item);
      if (!g.ok) return bad(`${where}: ${g.error}`);
      const s = ctx.vm.slots.find((x) => g.value >= x.baseGfn && g.value < x.baseGfn + x.pages);
      if (!s) return bad(`${where}: GFN ${hex(g.value)} is in no memslot; write {slot, offset} for a raw entry`);
      out.push({ slot: s.id, asId: s.asId, gfn: g.value });
      continue;
    }
    const o = item as Record<string, unknown>;
    const extra = Object.keys(o).filter((k) => !['slot', 'as_id', 'gfn', 'offset'].includes(k));
    if (extra.length > 0) return bad(`${where}: unknown field '${extra[0]}' (an entry is {slot, gfn} or {slot, offset})`);
    if (('gfn' in o) === ('offset' in o)) return bad(`${where}: write either {slot, gfn} or {slot, offset}, got ${show(item)}`);
    if ('gfn' in o) {
      const slot = parseInteger(o.slot);
      const gfn = parseInteger(o.gfn);
      const asId = o.as_id === undefined ? ok(null) : parseInteger(o.as_id);
      if (!slot.ok) return bad(`${where}.slot: ${slot.error}`);
      if (!gfn.ok) return bad(`${where}.gfn: ${gfn.error}`);
      if (!asId.ok) return bad(`${where}.as_id: ${asId.error}`);
      out.push({ slot: slot.value, asId: asId.value, gfn: gfn.value });
    } else {
      const field = typeof o.slot === 'string' ? slotField(o.slot) : parseInteger(o.slot);
      const offset = parseInteger(o.offset);
      if ('as_id' in o) return bad(`${where}: with offset, slot is the raw field (AS:ID or as_id << 16 | id); drop as_id`);
      if (!field.ok) return bad(`${where}.slot: ${field.error}`);
      if (!offset.ok) return bad(`${where}.offset: ${offset.error}`);
      out.push({ slotField: field.value, offset: offset.value });
    }
  }
  return ok(out);
}
