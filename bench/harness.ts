/**
 * Shared pieces of the benchmark suite (bench/run.ts runs every case in its own child
 * process, so one case's JIT feedback never slows down another's).
 *
 * Rules (BENCHMARKS.md): speed is measured only here; every figure is a ratio against a
 * raw baseline measured in the same process, or an absolute rate printed next to its
 * target; medians over repeats, after warm-up repeats that are thrown away; both sides
 * consume a checksum so V8 cannot drop their work.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { type Steps } from '../src/roles/role.ts';
import { createVmLayout, type DirtyTracking, type MemslotConfig, VcpuWord, type VmConfig } from '../src/host/layout.ts';
import { Vm } from '../src/host/vm.ts';
import type { Vcpu } from '../src/host/vcpu.ts';
import { VmmControl } from '../src/host/vmm/vmm-control.ts';

export interface Target {
  /** 'min': the figure must be at least `value`; 'max': at most. */
  kind: 'min' | 'max';
  value: number;
  /** The target as written in the table, e.g. ">= 0.5x plain stores". */
  text: string;
}

/** One line of the results table. */
export interface Figure {
  /** Short stable id, e.g. "write-path/bitmap/256MiB". */
  id: string;
  /** What is measured, in words. */
  what: string;
  /** The figure, formatted, e.g. "0.62x" or "7.3 M faults/s". */
  figure: string;
  value: number;
  target?: Target;
  /** How it was obtained: both sides' rates, repeats, sizes. */
  detail: string;
}

export function pass(f: Figure): boolean | undefined {
  if (!f.target) return undefined;
  return f.target.kind === 'min' ? f.value >= f.target.value : f.value <= f.target.value;
}

/** Where a child process hands its figures to bench/run.ts. */
export const RESULT_TAG = '@@vmemlab-bench ';

export function emit(figures: Figure[]): void {
  process.stdout.write(RESULT_TAG + JSON.stringify(figures) + '\n');
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function now(): number {
  return performance.now();
}

/** Checksums land here; printing it at the end keeps every side's results live. */
let sink = 0;
export function consume(x: number): void {
  sink = (sink + (x | 0)) | 0;
}
export function sinkValue(): number {
  return sink;
}

/** One timed repeat: operations done and seconds taken. */
export interface Sample { ops: number; seconds: number }

export function rate(s: Sample): number {
  return s.ops / s.seconds;
}

/**
 * Runs `warmup` untimed-for-the-result repeats of each side, then `reps` timed repeats,
 * alternating sides (A, B, A, B, ...) so that drift (turbo, other load) hits both.
 * Returns per-repeat rates (ops/s) of each side.
 */
export function alternate(
  reps: number, warmup: number, a: () => Sample, b: () => Sample,
): { a: number[]; b: number[]; ratios: number[] } {
  for (let i = 0; i < warmup; i++) { a(); b(); }
  const ra: number[] = [];
  const rb: number[] = [];
  const ratios: number[] = [];
  for (let i = 0; i < reps; i++) {
    // Swap who goes first every other repeat.
    const [sa, sb] = i % 2 === 0 ? [a(), b()] : ((): [Sample, Sample] => { const y = b(); return [a(), y]; })();
    ra.push(rate(sa));
    rb.push(rate(sb));
    ratios.push(rate(sa) / rate(sb));
  }
  return { a: ra, b: rb, ratios };
}

/** Runs a host procedure (an ioctl) to completion on this thread; it must not wait. */
export function drive<T>(steps: Steps<T>): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
    if (r.value !== undefined) throw new Error(`bench: host procedure waits (code ${r.value.code}); stop the vCPUs first`);
  }
}

/** One memslot of `pages` pages at gfn 0x100, `vcpus` vCPUs, the given tracking. */
export function singleSlotVm(pages: number, vcpus: number, tracking: DirtyTracking, extra: Partial<VmConfig> = {}): Vm {
  const slots: MemslotConfig[] = [{ id: 1, asId: 0, baseGfn: 0x100, pages, flags: 0 }];
  const vm = new Vm(createVmLayout({ slots, vcpus, tracking, ...extra }));
  vm.populate();
  return vm;
}

export const RING_65536: DirtyTracking = { kind: 'ring', entries: 65536, withBitmap: false };
export const BITMAP_MANUAL: DirtyTracking = { kind: 'bitmap', manualProtect: true, initiallySet: false };
export const BITMAP_LEGACY: DirtyTracking = { kind: 'bitmap', manualProtect: false, initiallySet: false };

export function mps(x: number): string {
  return `${(x / 1e6).toFixed(x >= 1e8 ? 0 : x >= 1e7 ? 1 : 2)} M`;
}

export function fmtMs(ms: number): string {
  return ms >= 10 ? `${ms.toFixed(1)} ms` : ms >= 1 ? `${ms.toFixed(2)} ms` : `${(ms * 1000).toFixed(0)} us`;
}

/** Case name and arguments from the command line: `tsx bench/x.ts <case> [args...]`. */
export function caseArgs(): string[] {
  return process.argv.slice(2);
}

/**
 * The vCPU's fault counter. A vCPU publishes it when it leaves guest mode, so this stops
 * the vCPU at its next boundary (as the VMM does), reads it, and lets it run again.
 */
export function faultCount(vm: Vm, vcpu: Vcpu): number {
  const vmm = new VmmControl(vm);
  vmm.requestStop(vcpu.index);
  vcpu.runBurst(1); // no operation pending between bursts: this burst only stops
  const faults = vmm.word(vcpu.index, VcpuWord.FAULTS);
  vmm.release(vcpu.index);
  return faults;
}

let gc: (() => void) | null = null;
/**
 * Frees the last run's guest memory before the next timed run (unmapping it meanwhile
 * stalls page faults). Workers' isolates drop their references to guest memory some
 * time after they end: collect until the resident size stops falling (at most 5 s).
 */
export async function settle(): Promise<void> {
  if (gc === null) {
    setFlagsFromString('--expose-gc');
    gc = runInNewContext('gc') as () => void;
  }
  let last = Infinity;
  for (let i = 0; i < 50; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 100));
    const rss = process.memoryUsage.rss();
    if (rss > last - (16 << 20)) break;
    last = rss;
  }
  if (process.env['BENCH_VERBOSE']) console.error(`settled at ${(process.memoryUsage.rss() / (1 << 20)).toFixed(0)} MiB resident`);
}

/**
 * Runs `fn` with a CPU-burning process beside it (a busy loop in another Node process),
 * as a neighbour that keeps one core busy would.
 */
export async function withBurner<T>(fn: () => Promise<T>): Promise<T> {
  const { spawn } = await import('node:child_process');
  const burner = spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' });
  try {
    return await fn();
  } finally {
    burner.kill('SIGKILL');
  }
}
