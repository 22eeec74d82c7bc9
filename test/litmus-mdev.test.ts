import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MDEV_BUGS } from '../src/bugs/catalog.ts';
import { KVM_RUN_EIO } from '../src/host/constants.ts';
import { formatLitmusOutcome, loadLitmus, parseLitmus, runLitmus } from '../src/litmus/index.ts';
import { parseExitReason } from '../src/litmus/syntax.ts';
import { run, userError } from './litmus-helpers.ts';

/**
 * Litmus files with a mediated device's BAR mapped on fault (vm.bar, docs/mdev.md): each of
 * examples 25-32 pins the ordering that makes one bug of `vmemlab mdev` act, passes as
 * shipped and fails with that bug; the new fields, operations and expectations, and their
 * bad input.
 */
const DIR = 'examples/litmus';
const text = (f: string): string => readFileSync(join(DIR, f), 'utf8');

/** Each file and the bug it pins, with a failure that bug must cause. */
const FILES: [string, string, string][] = [
  ['25-reclaim-unmaps-before-free.yaml', 'reassign-without-zap', "actors.vcpu0[1] 'read 0x1001': expected exit: KVM_EXIT_MEMORY_FAULT, actual: none"],
  ['26-install-rechecks-invalidation.yaml', 'no-invalidate-retry', "actors.vcpu0[0] 'write 0x1001 7': expected exit: KVM_EXIT_MEMORY_FAULT, actual: none"],
  ['27-no-prefetch-of-pfnmap.yaml', 'prefetch-unvalidated-mmio', 'expect.bar.sptes[2]: expected none, actual: pfn 1'],
  ['28-prefetch-skips-invalidated.yaml', 'prefetch-during-invalidation', 'expect.bar.findings.unvalidated-mapping: expected 0, actual: 5 (the first at BAR page 1)'],
  ['29-readonly-pfnmap-stays-readonly.yaml', 'ignore-readonly-pfnmap', 'expect.bar.findings.read-only-write: expected 0, actual: 1 (the first at BAR page 0)'],
  ['30-reclaim-unmaps-every-page.yaml', 'zap-misses-a-mapping', "actors.host[1] 'bar-revoke vram': expected unmapped: 2, actual: 1"],
  ['31-refused-access-kills-vm.yaml', 'refused-access-reads-zeros', 'expect.bar.findings.refused-access-completed: expected 0, actual: 1 (the first at BAR page 1)'],
  ['32-mapped-only-after-validate.yaml', 'map-whole-bar-without-validate', 'expect.bar.ptes[0]: expected none, actual: pfn 0'],
];

/**
 * The other mediated-device bugs each file catches too, because they break the same
 * isolation in the same ordering: every file that expects a refusal fails with
 * refused-access-reads-zeros, every access with map-whole-bar-without-validate, every fault
 * with PFNMAP neighbours not yet mapped with prefetch-unvalidated-mmio, and every file that
 * takes a slice back with the vendor's two reclaim bugs (the entries it counts unmapped).
 */
const ALSO: Record<string, string[]> = {
  '25-reclaim-unmaps-before-free.yaml': ['prefetch-unvalidated-mmio', 'zap-misses-a-mapping', 'refused-access-reads-zeros', 'map-whole-bar-without-validate'],
  '26-install-rechecks-invalidation.yaml': ['reassign-without-zap', 'zap-misses-a-mapping', 'refused-access-reads-zeros', 'map-whole-bar-without-validate'],
  '27-no-prefetch-of-pfnmap.yaml': ['refused-access-reads-zeros', 'map-whole-bar-without-validate'],
  '28-prefetch-skips-invalidated.yaml': ['reassign-without-zap', 'prefetch-unvalidated-mmio', 'zap-misses-a-mapping', 'refused-access-reads-zeros', 'map-whole-bar-without-validate'],
  '29-readonly-pfnmap-stays-readonly.yaml': ['prefetch-unvalidated-mmio', 'refused-access-reads-zeros', 'map-whole-bar-without-validate'],
  '30-reclaim-unmaps-every-page.yaml': ['reassign-without-zap', 'prefetch-unvalidated-mmio', 'refused-access-reads-zeros', 'map-whole-bar-without-validate'],
  '31-refused-access-kills-vm.yaml': ['map-whole-bar-without-validate'],
  '32-mapped-only-after-validate.yaml': ['prefetch-unvalidated-mmio'],
};


describe('the mediated-device litmus files, one per bug of vmemlab mdev', () => {
  it('cover every bug of the mediated device, each once', () => {
    expect(FILES.map(([, bug]) => bug).sort()).toEqual([...MDEV_BUGS].sort());
  });

  it.each(FILES)('%s passes as shipped, and says so step by step', (f) => {
    const spec = loadLitmus(join(DIR, f));
    const o = runLitmus(spec);
    expect(o.failures).toEqual([]);
    expect(o.passed).toBe(true);
    for (let i = 0; i < spec.interleaving.length; i++) expect(o.log.some((l) => l.startsWith(`[${i}] `))).toBe(true);
    expect(o.log[1]).toContain("a mediated device's BAR at GFNs 0x1000..");
    expect(o.log).toContain('at the end: the isolation oracles sweep vm0\'s BAR SPTEs: none breaches isolation');
    // The description cites the kernel's functions.
    expect(spec.description).toMatch(/validate_map_request|mmu_invalidate_retry_gfn|unmap_mapping_range|hva_to_pfn_remapped|kvm_vm_dead|direct_pte_prefetch/);
  });

  it.each(FILES)('%s fails with %s injected, which acted', (f, bug, message) => {
    const o = runLitmus(loadLitmus(join(DIR, f)), { bugs: [bug] });
    expect(o.passed).toBe(false);
    expect(o.failures.some((l) => l.startsWith(`${join(DIR, f)}: `) && l.includes(message)), o.failures.join('\n')).toBe(true);
    expect(o.injections.map((i) => [i.bug, i.acted > 0])).toEqual([[bug, true]]);
    expect(o.log.some((l) => l.startsWith(`injected bug ${bug}: acted `))).toBe(true);
  });

  it.each(FILES)('%s with each other mediated-device bug: passes, or fails only where that bug acted (the ALSO list)', (f, own) => {
    const spec = loadLitmus(join(DIR, f));
    const caught: string[] = [];
    for (const bug of MDEV_BUGS.filter((b) => b !== own)) {
      const o = runLitmus(spec, { bugs: [bug] });
      if (o.passed) continue;
      caught.push(bug);
      expect(o.injections[0]!.acted, `${f} fails with ${bug}, which never acted: ${o.failures.join('; ')}`).toBeGreaterThan(0);
    }
    expect(caught.sort()).toEqual([...ALSO[f]!].sort());
  });

  it('a spec runs the same twice: each run builds the BAR afresh', () => {
    const spec = loadLitmus(join(DIR, '25-reclaim-unmaps-before-free.yaml'));
    expect(runLitmus(spec, { bugs: ['reassign-without-zap'] }).passed).toBe(false);
    const again = runLitmus(spec);
    expect(again.failures).toEqual([]);
    expect(runLitmus(spec).log).toEqual(again.log);
  });
});

describe('BAR accesses and the host\'s BAR operations in the trace', () => {
  it('a fault in two steps, the install after a zap retries, then the refusal (file 26)', () => {
    const trace = formatLitmusOutcome(runLitmus(loadLitmus(join(DIR, '26-install-rechecks-invalidation.yaml'))), { log: 'always' });
    expect(trace).toContain('write to BAR page 1 (0x1001): no SPTE; kvm_mmu_faultin_pfn reads mmu_invalidate_seq, follow_pfn finds nothing; the fault handler validates (validate_map_request) and remap_pfn_range maps pfn 0');
    expect(trace).toContain('BAR page 1 (0x1001): under mmu_lock, mmu_invalidate_retry_gfn: an invalidation ran or runs since the lookup: RET_PF_RETRY, nothing installed, it faults again');
    expect(trace).toContain('kvm_mmu_faultin_pfn finds no usable entry; fixup_user_fault: the fault handler refuses: not-allocated (EFAULT): SIGBUS, KVM_RUN fails with EFAULT; exits with KVM_EXIT_MEMORY_FAULT');
    expect(trace).toContain('invalidate_range_end: mmu_invalidate_seq moves on; faults may install again; the slice is freed: another VM may be given it');
  });

  it('a reclaim stepped by the interleaving: the notifier\'s start and flush, then the entries (file 28)', () => {
    const trace = formatLitmusOutcome(runLitmus(loadLitmus(join(DIR, '28-prefetch-skips-invalidated.yaml'))), { log: 'always' });
    expect(trace).toContain("invalidate_range_start: KVM's mmu_invalidate_begin over GFNs 0x1001..0x1004, 2 SPTE(s) zapped; starts TLB flush 1");
    expect(trace).toContain("[5] host.step: bar-revoke vram (actors.host[2]), continued\n          the TLB flush is complete; the VMA's entries are still there");
    expect(trace).toContain('SPTE installed: pfn 2; 6 neighbour(s) left (not mapped, or under invalidation)');
  });

  it('with a bug, the oracle\'s findings are lines in the step that made them and at the end\'s sweep', () => {
    const o = runLitmus(loadLitmus(join(DIR, '25-reclaim-unmaps-before-free.yaml')), { bugs: ['reassign-without-zap'] });
    expect(o.log).toContain('      reads BAR page 1 (0x1001) through its SPTE (pfn 0) = 7, retires; ORACLE: cross-vm-access (the first of its kind at BAR page 1); ORACLE: stale-spte (the first of its kind at BAR page 1)');
    expect(o.log).toContain('at the end: the isolation oracles sweep vm0\'s BAR SPTEs: 1 SPTE(s) breach isolation, no access having used them yet');
  });

  it('findings a file does not expect fail it; a file can expect the findings a bug causes', () => {
    const src = text('30-reclaim-unmaps-every-page.yaml');
    const o = run(src.replace('    findings: {}\n', ''), 'inline.yaml', ['zap-misses-a-mapping']);
    expect(o.failures).toContain('inline.yaml: the isolation oracles found: 2 cross-vm-access (the first at BAR page 2), 2 stale-spte (the first at BAR page 2) (write expect.bar.findings to expect them)');
    const expected = src
      .replace('findings: {}', 'findings: {cross-vm-access: 2, stale-spte: 2}')
      .replace('{unmapped: 2, zapped: 1}', '{unmapped: 1, zapped: 0}')
      .replace("{op: write 0x1002 8, expect: {exit: KVM_EXIT_MEMORY_FAULT}}", "{op: write 0x1002 8, expect: {exit: none}}")
      .replace('sptes: {1: none, 2: none}', 'sptes: {1: none, 2: 1}')
      .replace('ptes: {1: none, 2: none}', 'ptes: {1: none, 2: 1}')
      .replace('mmio: {1: 7}', 'mmio: {1: 8}');
    expect(run(expected, 'inline.yaml', ['zap-misses-a-mapping']).failures).toEqual([]);
  });

  it('the EIO mark is written by its name in EXIT_REASON_NAMES (any case) or as KVM_RUN_EIO', () => {
    expect(parseExitReason('KVM_RUN: EIO (the VM is dead)')).toEqual({ ok: true, value: KVM_RUN_EIO });
    expect(parseExitReason('KVM_RUN_EIO')).toEqual({ ok: true, value: KVM_RUN_EIO });
    expect(parseExitReason('kvm_run: eio (the vm is dead)')).toEqual({ ok: true, value: KVM_RUN_EIO });
    const src = text('31-refused-access-kills-vm.yaml').replace('{exit: KVM_RUN_EIO}', "{exit: 'KVM_RUN: EIO (the VM is dead)'}");
    expect(run(src).failures).toEqual([]);
    expect(run(src.replace('    on_refused_access: kill-vm\n', '').replace('    dead: true\n', '')).failures)
      .toEqual(["inline.yaml: end of run: actors.vcpu0[0] 'read 0x1001' (still in flight): expected exit: KVM_RUN: EIO (the VM is dead), actual: KVM_EXIT_MEMORY_FAULT"]);
  });
});

describe('host operations on the BAR: grants, revocations, memory decode', () => {
  const base = `name: bar ops
vm:
  memory: 1MiB
  bar: {base_gfn: 0x1000, resources: [{name: status, pages: 1, writable: false}, {name: vram, pages: 4}], mmio_pages: 4, vms: 3}
tracking: dirty-log
`;

  it('memory decode off zaps the whole BAR and refuses faults; on again, the next fault is validated', () => {
    const o = run(`${base}actors:
  vcpu0:
    - {op: write 0x1002 5, expect: {exit: none}}
    - {op: write 0x1002 6, expect: {exit: KVM_EXIT_MEMORY_FAULT}}
    - {op: read 0x1002, expect: {exit: none, value: 6}}
  host:
    - {op: bar-grant vram 2, expect: {pfn: 0}}
    - {op: bar-decode off, expect: {unmapped: 2, zapped: 1}}
    - bar-decode on
    - reenter vcpu0
interleaving: [host, vcpu0, host with vcpu0, vcpu0, host, host, vcpu0, vcpu0]
expect:
  bar: {sptes: {2: 1}, ptes: {1: 0, 2: 1}, mmio: {1: 6}, findings: {}}
`);
    expect(o.failures).toEqual([]);
    expect(o.log.join('\n')).toContain('the fault handler refuses: decode-off (EFAULT)');
    expect(o.log.join('\n')).toContain('memory decode on: faults are validated again');
  });

  it('a grant of a resource held, or with no run of free pfns, and a revocation of what the VM does not hold, fail with their errno', () => {
    const o = run(`${base}actors:
  host:
    - {op: bar-grant vram 2, expect: {pfn: 0}}
    - {op: bar-grant vram 1, expect: {error: EEXIST}}
    - {op: bar-grant vram 3 vm1, expect: {error: ENOSPC}}
    - {op: bar-grant vram 2 vm2, expect: {pfn: 2}}
    - {op: bar-revoke vram vm2, expect: {unmapped: 0, zapped: 0}}
    - {op: bar-revoke vram vm2, expect: {error: ENOENT}}
    - {op: bar-grant vram 2 vm1, expect: {pfn: 2}}
interleaving: [host, host, host, host, host, host, host]
expect: {bar: {findings: {}}}
`);
    expect(o.failures).toEqual([]);
    expect(o.log.join('\n')).toContain('fails: the vendor driver\'s grant: EEXIST: vm0 holds vram already (pfns 0..1)');
    expect(o.log.join('\n')).toContain('fails: the vendor driver\'s grant: ENOSPC: no 3 contiguous free MMIO pages (the largest run is 2)');
    expect(o.log.join('\n')).toContain('the vendor driver takes vram back from vm2 (not run here: nothing of it mapped): pfns 2..3 freed');
  });

  it('a VM KVM killed stays dead: re-entering it fails with EIO, and its vCPU stays in the exit', () => {
    const src = text('31-refused-access-kills-vm.yaml')
      .replace('    - {op: bar-grant vram 2, expect: {pfn: 0}}\n', '    - {op: bar-grant vram 2, expect: {pfn: 0}}\n    - {op: reenter vcpu0, expect: {error: EIO}}\n')
      .replace('  - host              # the grant, too late\n', '  - host\n  - host\n  - {run: vcpu0, expect: {blocked: true}}\n');
    const o = run(src);
    expect(o.failures).toEqual([]);
    expect(o.log.join('\n')).toContain('vcpu0: the VM is dead (kvm_vm_dead): KVM_RUN fails with EIO');
  });

  it('map-whole-bar-without-validate maps at set-up, and the trace says so', () => {
    const o = runLitmus(loadLitmus(join(DIR, '32-mapped-only-after-validate.yaml')), { bugs: ['map-whole-bar-without-validate'] });
    expect(o.log).toContain("the VMM mmaps vm0's BAR (5 pages): no validate callback, so 5 BAR page(s) are mapped 1:1 from pfn 0 at once");
    expect(runLitmus(loadLitmus(join(DIR, '32-mapped-only-after-validate.yaml'))).log)
      .toContain("the VMM mmaps vm0's BAR (5 pages): nothing is mapped until a fault validates it");
  });
});

describe('bad vm.bar fields, BAR operations and expectations: one line naming the file, the field and the value', () => {
  const f25 = text('25-reclaim-unmaps-before-free.yaml');
  const edit = (from: string, to: string): string => {
    const out = f25.replace(from, to);
    if (out === f25) throw new Error(`${from} not found`);
    return out;
  };
  const noBar = f25.replace(/  bar:\n(    .*\n)+/, '');

  it.each([
    [edit('base_gfn: 0x1000', 'base_gfn: 0x1zz'), "vm.bar.base_gfn: '0x1zz' is not a number"],
    [edit('base_gfn: 0x1000', 'base_gfn: 0x1ff'), "vm.bar.base_gfn: 0x1ff: the BAR's GFNs 0x1ff..0x203 overlap slot 1 (GFNs 0x100..0x1ff)"],
    [edit('base_gfn: 0x1000', 'base_gfn: 0xffffffffff'), 'vm.bar.base_gfn: 0xffffffffff: the BAR\'s GFNs 0xffffffffff..0x10000000003 run past the 52-bit guest physical address space'],
    [edit('{name: vram, pages: 4}', '{name: vram, pages: 0}'), 'vm.bar.resources[1].pages: must be at least 1, got 0'],
    [edit('{name: vram, pages: 4}', '{name: vram, pages: 65}'), 'vm.bar.resources[1].pages: must be at most 64, got 65'],
    [edit('{name: vram, pages: 4}', '{name: status, pages: 4}'), "vm.bar.resources[1].name: 'status' is already vm.bar.resources[0]"],
    [edit('{name: vram, pages: 4}', '{name: vm1, pages: 4}'), "vm.bar.resources[1].name: 'vm1' is not a resource name"],
    [edit('{name: vram, pages: 4}', '{name: "v ram", pages: 4}'), "vm.bar.resources[1].name: 'v ram' is not a resource name"],
    [edit('{name: vram, pages: 4}', '{name: vram, pages: 4, size: 3}'), 'vm.bar.resources[1].size: unknown field (fields here: name, pages, writable)'],
    [edit('{name: vram, pages: 4}', '{name: vram, pages: 4, writable: sometimes}'), "vm.bar.resources[1].writable: expected a boolean, got 'sometimes'"],
    [edit('mmio_pages: 8', 'mmio_pages: 0'), 'vm.bar.mmio_pages: must be at least 1, got 0'],
    [edit('vms: 2', 'vms: 17'), 'vm.bar.vms: must be at most 16, got 17'],
    [edit('vms: 2', 'vms: 2\n    prefetch: always'), "vm.bar.prefetch: 'always' is not one of: off, mapped"],
    [edit('vms: 2', 'vms: 2\n    on_refused_access: panic'), "vm.bar.on_refused_access: 'panic' is not one of: memory-fault, kill-vm"],
    [edit('vms: 2', 'vms: 2\n    colour: red'), 'vm.bar.colour: unknown field (fields here: base_gfn, resources, mmio_pages, vms, prefetch, on_refused_access)'],
    [edit('  memory: 1MiB\n', '  slots: [{id: 1, base_gfn: 0x100, pages: 16, flags: [GUEST_MEMFD]}]\n'), "vm.bar: a mediated device's BAR is not modelled with private memory"],
    [edit('bar-grant vram 2, expect: {pfn: 0}', 'bar-grant vrm 2, expect: {pfn: 0}'), "actors.host[0]: 'bar-grant vrm 2': there is no BAR resource 'vrm' (vm.bar.resources: status, vram)"],
    [edit('bar-grant vram 2, expect: {pfn: 0}', 'bar-grant vram 5, expect: {pfn: 0}'), "actors.host[0]: 'bar-grant vram 5': PAGES 5 is not 1..4 (resource vram has 4 BAR pages)"],
    [edit('bar-grant vram 2, expect: {pfn: 0}', 'bar-grant vram two, expect: {pfn: 0}'), "actors.host[0]: 'bar-grant vram two': PAGES: 'two' is not a number"],
    [edit('bar-grant vram 2 vm1', 'bar-grant vram 2 vm2'), "actors.host[2]: 'bar-grant vram 2 vm2': there is no vm2 sharing the device (vm.bar.vms is 2: vm0..vm1)"],
    [edit('bar-grant vram 2 vm1', 'bar-grant vram 2 vcpu1'), "actors.host[2]: 'bar-grant vram 2 vcpu1': 'vcpu1' is not a VM sharing the device (write vm0, vm1, ...)"],
    [edit('bar-grant vram 2, expect: {pfn: 0}', 'bar-grant vram, expect: {pfn: 0}'), "actors.host[0]: 'bar-grant vram': wrong number of arguments (bar-grant RESOURCE PAGES [vmN])"],
    [edit('bar-revoke vram, expect', 'bar-revoke vram vm0 vm1, expect'), "actors.host[1]: 'bar-revoke vram vm0 vm1': wrong number of arguments (bar-revoke RESOURCE [vmN])"],
    [edit('bar-revoke vram, expect: {unmapped: 2, zapped: 1}', 'bar-decode maybe'), "actors.host[1]: 'bar-decode maybe': 'maybe' is not off or on"],
    [edit('{unmapped: 2, zapped: 1}', '{unmapped: two}'), "actors.host[1].expect.unmapped: 'two' is not a number"],
    [edit('{unmapped: 2, zapped: 1}', '{pfn: 1}'), "actors.host[1].expect.pfn: 'pfn' does not apply to bar-revoke (it takes: unmapped, zapped, error)"],
    [edit('write 0x1001 7', 'write 0x1001 0x100000000'), "actors.vcpu0[0]: 'write 0x1001 0x100000000': VALUE: 0x1001 is a BAR page, whose register is 32 bits (at most 0xffffffff)"],
    [edit('{exit: KVM_EXIT_MEMORY_FAULT}', '{exit: KVM_EXIT_EIO}'), "actors.vcpu0[1].expect.exit: unknown exit reason 'KVM_EXIT_EIO' (one of: none,"],
    [edit('sptes: {1: none, 2: none}', 'sptes: {1: none, 9: none}'), 'expect.bar.sptes[9]: BAR page 9 is outside the 5-page BAR (0..4)'],
    [edit('sptes: {1: none, 2: none}', 'sptes: {x: 1}'), "expect.bar.sptes[x]: 'x' is not a BAR page (0..4)"],
    [edit('    ptes: {1: none, 2: none}', '    ptes: {1: nil}'), "expect.bar.ptes[1]: 'nil': expected the pfn mapped there (0..7), or none"],
    [edit('    ptes: {1: none, 2: none}', '    ptes: {1: 8}'), 'expect.bar.ptes[1]: 8: expected the pfn mapped there (0..7), or none'],
    [edit('mmio: {0: 7}', 'mmio: {8: 7}'), "expect.bar.mmio[8]: pfn 8 is not a pfn of the device's MMIO (0..7)"],
    [edit('mmio: {0: 7}', 'mmio: {0: 0x100000000}'), 'expect.bar.mmio[0]: 4294967296 is more than a 32-bit register holds'],
    [edit('findings: {}', 'findings: {cross-vm: 1}'), 'expect.bar.findings.cross-vm: unknown field (fields here: cross-vm-access, stale-spte, unvalidated-mapping, read-only-write, refused-access-completed)'],
    [edit('findings: {}', 'findings: {stale-spte: -1}'), 'expect.bar.findings.stale-spte: must be at least 0, got -1'],
    [edit('findings: {}', 'findings: {}\n    dead: true'), 'expect.bar.dead: only a VM whose refused accesses kill it dies (vm.bar.on_refused_access: kill-vm)'],
    [edit('findings: {}', 'findings: {}\n    dead: maybe'), "expect.bar.dead: expected a boolean, got 'maybe'"],
    [noBar, "actors.host[0]: 'bar-grant vram 2': bar-grant needs a mediated device's BAR (vm.bar)"],
    [noBar, "expect.bar: the VM has no mediated device's BAR (vm.bar)"],
  ])('bad input %#', (source, message) => {
    const msg = userError(() => parseLitmus(source, 'bad.yaml'));
    const line = msg.split('\n').find((l) => l.includes(message));
    expect(line, msg).toBeDefined();
    expect(line!.startsWith('bad.yaml: ')).toBe(true);
  });

  it('a BAR operation on a file without vm.bar reports every one, one per line', () => {
    const msg = userError(() => parseLitmus(f25.replace(/  bar:\n(    .*\n)+/, ''), 'bad.yaml'));
    expect(msg.split('\n')).toEqual([
      "bad.yaml: actors.host[0]: 'bar-grant vram 2': bar-grant needs a mediated device's BAR (vm.bar)",
      "bad.yaml: actors.host[1]: 'bar-revoke vram': bar-revoke needs a mediated device's BAR (vm.bar)",
      "bad.yaml: actors.host[2]: 'bar-grant vram 2 vm1': bar-grant needs a mediated device's BAR (vm.bar)",
      "bad.yaml: expect.bar: the VM has no mediated device's BAR (vm.bar)",
    ]);
  });
});
