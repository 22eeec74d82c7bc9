import { Acted, type InjectionCounters } from '../injections.ts';

/**
 * The VMM's conversion mistakes (src/bugs/catalog.ts), each honoured at one site of the
 * QEMU-side code: kvm_convert_memory, RamBlockAttributes and VFIO's RAM discard listener.
 * (attributes-before-zap is KVM's, in KernelBugs.)
 */
export interface ConversionBugs {
  /** RamBlockAttributes: to private, the bits are cleared but no listener hears of it (VFIO keeps its mappings). */
  convertWithoutUnmap?: boolean;
  /** kvm_convert_memory: to private, the shared memory is discarded before the listeners unmap it. */
  discardBeforeUnmap?: boolean;
  /** kvm_convert_memory: to shared, the listeners map before KVM_SET_MEMORY_ATTRIBUTES makes the range shared. */
  mapBeforeShared?: boolean;
  /** RamBlockAttributes: a wholly shared range turned private keeps its bits (the bitmap drifts from KVM's attributes). */
  rdmBitmapDrift?: boolean;
  /** VFIO's listener maps in 2 MiB chunks, not per 4 KiB granule: a later 4 KiB unmap would split one (EINVAL). */
  splitHugeMapping?: boolean;
  /** The in-place design (in-place-conversion.ts): shared -> private while VFIO's pin still holds the page. */
  inplaceConvertWhilePinned?: boolean;
}

/** The flags and the counters their sites report to (null: nobody counts, as in unit tests). */
export class ConversionInjection {
  static readonly NONE = new ConversionInjection({}, null);

  constructor(readonly bugs: ConversionBugs, private readonly acts: InjectionCounters | null) {}

  acted(bug: Acted, times = 1): void {
    this.acts?.acted(bug, times);
  }
}

export { Acted };
