import { z } from 'zod';
import { CONVERSION_DESIGNS } from '../host/vmm/conversion-design.ts';
import { BAR_PREFETCH, BAR_REFUSAL_ACTIONS } from '../host/bar-layouts.ts';
import { BAR_FINDING_NAMES } from '../host/mmio/kvm-bar-mmu.ts';
import { CPU_CACHE_MODES, DMA_SLOT_LOGGING } from '../scenarios/options.ts';
import { LINE_STATES } from './cache.ts';
import { fieldPath, show } from './syntax.ts';

/**
 * The shape of a litmus file, checked with zod before anything is interpreted. Values
 * with a grammar of their own (operations, GFN lists, sizes, errno and exit names) are
 * taken as they come here and parsed in load.ts, which reports problems the same way.
 */

/** A strict object whose unknown fields are reported with the fields it does take. */
function strict<T extends z.ZodRawShape>(shape: T) {
  const known = Object.keys(shape).join(', ');
  return z.strictObject(shape, {
    error: (iss) => iss.code === 'unrecognized_keys' ? `unknown field (fields here: ${known})` : undefined,
  });
}

const numberOrText = z.union([z.number(), z.string()]);
const count = z.int().min(0);

export const OpEntrySchema = z.union([
  z.string(),
  strict({
    op: z.string(),
    expect: z.record(z.string(), z.unknown()).optional(),
    /** Free text, shown in the trace. */
    note: z.string().optional(),
  }),
]);

export const SlotSchema = strict({
  id: z.int().min(0).max(0xffff),
  as_id: z.int().min(0).max(0xffff).optional(),
  base_gfn: numberOrText,
  pages: z.int().min(1, { error: (iss) => `a slot needs at least one page, got ${show(iss.input)}` }),
  /** KVM_MEM_* flags: a number, or names (KVM_MEM_READONLY / readonly). */
  flags: z.union([z.int().min(0), z.array(z.string())]).optional(),
  /** Device memory (a GPU's VRAM BAR), not RAM: vmx_get_mt_mask types it UC (vm.cpu_cache). */
  host_mmio: z.boolean().optional(),
});

export const TRACKING_MODES = ['dirty-log', 'clear-log', 'dirty-ring'] as const;

export const TrackingSchema = z.union([
  z.enum(TRACKING_MODES),
  strict({
    mode: z.enum(TRACKING_MODES),
    /** clear-log: KVM_DIRTY_LOG_INITIALLY_SET. */
    initially_set: z.boolean().optional(),
    /** dirty-ring: entries per vCPU ring. */
    entries: z.int().optional(),
    /** dirty-ring: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP. */
    backup_bitmap: z.boolean().optional(),
  }),
]);

export const InterleavingEntrySchema = z.union([
  z.string(),
  strict({
    run: z.string(),
    expect: strict({ blocked: z.union([z.boolean(), z.string()]).optional() }).optional(),
    note: z.string().optional(),
  }),
]);

export const FinalExpectSchema = strict({
  pages: z.record(z.string(), numberOrText).optional(),
  collected: z.array(numberOrText).optional(),
  copies: z.record(z.string(), numberOrText).optional(),
  stale_copies: z.array(numberOrText).optional(),
  sptes: z.record(z.string(), z.enum(['writable', 'protected'])).optional(),
  lost_host_writes: count.optional(),
  flushes: count.optional(),
  attributes: z.record(z.string(), z.enum(['private', 'shared'])).optional(),
  rdm: z.record(z.string(), z.enum(['private', 'shared'])).optional(),
  /** IOVA page -> the GFN mapped there, or `unmapped`. */
  iommu: z.record(z.string(), numberOrText).optional(),
  private_pages: z.record(z.string(), numberOrText).optional(),
  findings: z.array(z.string()).optional(),
  /** vm.cpu_cache: GFN -> the state of the page's first line. */
  cache: z.record(z.string(), z.enum(LINE_STATES)).optional(),
  /** vm.cpu_cache: the stale read oracle's counts, by reader, and write-backs over newer data (overwrite). */
  stale: strict({ cpu: count.optional(), device: count.optional(), migration: count.optional(), overwrite: count.optional() }).optional(),
  /** vm.cpu_cache: the machine check oracle's count (cacheable accesses to device memory). */
  machine_checks: count.optional(),
  /** vm.bar: vm0's BAR at the end, after the isolation oracles' sweep. */
  bar: strict({
    /** BAR page -> the pfn KVM's SPTE maps, or `none`. */
    sptes: z.record(z.string(), numberOrText).optional(),
    /** BAR page -> the pfn the VMM's VMA entry maps, or `none`. */
    ptes: z.record(z.string(), numberOrText).optional(),
    /** pfn -> the first 32-bit word of that page of the device's MMIO. */
    mmio: z.record(z.string(), numberOrText).optional(),
    /** The isolation oracles' counts (kinds not written: 0). */
    findings: strict(Object.fromEntries(BAR_FINDING_NAMES.map((k) => [k, count.optional()])) as Record<(typeof BAR_FINDING_NAMES)[number], z.ZodOptional<typeof count>>).optional(),
    /** KVM killed the VM for a refused access (vm.bar.on_refused_access: kill-vm). */
    dead: z.boolean().optional(),
  }).optional(),
});

/** A resource of the device: `pages` BAR pages (its most), read-write unless `writable: false`. */
export const BarResourceSchema = strict({
  name: z.string().min(1),
  pages: z.int().min(1).max(64),
  writable: z.boolean().optional(),
});

/** vm.bar: a mediated device's virtual BAR mapped on fault (docs/mdev.md), vm0 of `vms` VMs sharing the device. */
export const BarSchema = strict({
  /** The guest frame of BAR page 0: outside every memslot. */
  base_gfn: numberOrText,
  /** Laid out in order from BAR page 0. */
  resources: z.array(BarResourceSchema).min(1).max(16),
  /** The device's physical MMIO pages; by default every VM could hold every resource at its most. */
  mmio_pages: z.int().min(1).max(1024).optional(),
  /** The VMs sharing the device (vm0 runs; the host can give the others slices). */
  vms: z.int().min(1).max(16).optional(),
  prefetch: z.enum(BAR_PREFETCH).optional(),
  on_refused_access: z.enum(BAR_REFUSAL_ACTIONS).optional(),
});

export const IOMMU_BACKENDS = ['type1', 'iommufd'] as const;

/** The IOMMU a device is assigned through: a backend, or a backend with type1's dma_entry_limit. */
export const IommuSchema = z.union([
  z.enum(IOMMU_BACKENDS),
  strict({ backend: z.enum(IOMMU_BACKENDS), dma_entry_limit: z.int().min(1).optional() }),
]);

export const LitmusFileSchema = strict({
  name: z.string().min(1),
  description: z.string().optional(),
  bugs: z.array(z.string()).optional(),
  vm: strict({
    /** One slot (id 1 at GFN 0x100, as dirty_log_test lays it out) of this size. */
    memory: numberOrText.optional(),
    slots: z.array(SlotSchema).min(1).optional(),
    vcpus: z.int().min(1).max(64).optional(),
    /** An IOMMU with one assigned device (VFIO maps through it; IOVA = GPA). */
    iommu: IommuSchema.optional(),
    /** How the host converts guest_memfd memory (conversion-design.ts); rdm, QEMU's, unless given. */
    conversion_design: z.enum(CONVERSION_DESIGNS).optional(),
    /** A CPU cache model in front of guest memory (host/cpu-cache.ts): on, or on with a self-snooping CPU; off or absent: none. */
    cpu_cache: z.enum(CPU_CACHE_MODES).optional(),
    /** What KVM does when dirty logging starts on a KVM_MEM_DMA slot: force-wb (the default) or refuse. */
    dma_slot_logging: z.enum(DMA_SLOT_LOGGING).optional(),
    /** A mediated device's virtual BAR mapped on fault (docs/mdev.md). */
    bar: BarSchema.optional(),
  }),
  tracking: TrackingSchema,
  actors: z.record(z.string(), z.array(OpEntrySchema)),
  interleaving: z.array(InterleavingEntrySchema).min(1),
  expect: FinalExpectSchema.optional(),
});

export type LitmusFile = z.infer<typeof LitmusFileSchema>;
export type RawOpEntry = z.infer<typeof OpEntrySchema>;
export type RawSlot = z.infer<typeof SlotSchema>;
export type RawBar = z.infer<typeof BarSchema>;

/** zod issues as lines `field.path: what is wrong (the bad value)`. */
export function issueLines(issues: readonly z.core.$ZodIssue[], prefix: readonly PropertyKey[] = []): string[] {
  const out: string[] = [];
  for (const iss of issues) {
    const path = [...prefix, ...iss.path];
    const input = (iss as { input?: unknown }).input;
    switch (iss.code) {
      case 'invalid_union': {
        const branch = bestBranch(iss.errors);
        if (branch) out.push(...issueLines(branch, path));
        else out.push(`${fieldPath(path)}: expected ${unionAlternatives(iss.errors)}, got ${show(input)}`);
        break;
      }
      case 'unrecognized_keys':
        for (const k of iss.keys) out.push(`${fieldPath([...path, k])}: ${iss.message}`);
        break;
      case 'invalid_type':
        out.push(input === undefined
          ? `${fieldPath(path)}: missing (expected ${typeName(iss.expected)})`
          : `${fieldPath(path)}: expected ${typeName(iss.expected)}, got ${show(input)}`);
        break;
      case 'invalid_value':
        out.push(`${fieldPath(path)}: ${show(input)} is not one of: ${iss.values.map(String).join(', ')}`);
        break;
      case 'too_small':
      case 'too_big': {
        const bound = iss.code === 'too_small' ? iss.minimum : iss.maximum;
        const custom = iss.message.startsWith('Too ') ? null : iss.message;
        const what = iss.origin === 'array' ? (iss.code === 'too_small' && Number(bound) === 1 ? 'not be empty' : `have at ${iss.code === 'too_small' ? 'least' : 'most'} ${bound} entries`)
          : iss.origin === 'string' ? (iss.code === 'too_small' ? 'not be empty' : `be at most ${bound} characters`)
            : `be at ${iss.code === 'too_small' ? 'least' : 'most'} ${bound}`;
        out.push(`${fieldPath(path)}: ${custom ?? `must ${what}, got ${show(input)}`}`);
        break;
      }
      default:
        out.push(`${fieldPath(path)}: ${iss.message}${input === undefined ? '' : ` (got ${show(input)})`}`);
    }
  }
  return out;
}

function typeName(expected: string): string {
  return expected === 'int' ? 'a whole number' : expected === 'record' || expected === 'object' ? 'a mapping' : expected === 'array' ? 'a list' : `a ${expected}`;
}

/** The union branch that got furthest: the one that did not fail on the value's type itself. */
function bestBranch(branches: readonly (readonly z.core.$ZodIssue[])[]): readonly z.core.$ZodIssue[] | null {
  const fitting = branches.filter((b) => !b.some((i) => i.path.length === 0 && (i.code === 'invalid_type' || i.code === 'invalid_value')));
  return fitting.length === 1 ? fitting[0]! : null;
}

function unionAlternatives(branches: readonly (readonly z.core.$ZodIssue[])[]): string {
  const names = new Set<string>();
  for (const b of branches) {
    for (const i of b) {
      if (i.path.length !== 0) continue;
      if (i.code === 'invalid_type') names.add(typeName(i.expected));
      else if (i.code === 'invalid_value') names.add(`one of ${i.values.map(String).join(', ')}`);
    }
  }
  return [...names].join(' or ') || 'something else';
}
