import type { Vm } from '../vm.ts';
import type { ConversionInjection } from './conversion-bugs.ts';
import type { ConversionDesign, ConversionDesignName } from './conversion-design.ts';
import { InPlaceConversion, type InPlaceOptions } from './in-place-conversion.ts';
import { KvmIommuConversion } from './kvm-iommu-conversion.ts';
import { NotifierConversion } from './notifier-conversion.ts';
import { RdmConversion } from './rdm-conversion.ts';

/** Builds a design by name over `vm` (which needs an IOMMU); options a design does not know are ignored. */
export function createConversionDesign(name: ConversionDesignName, vm: Vm, o: InPlaceOptions = {}): ConversionDesign {
  switch (name) {
    case 'rdm': return new RdmConversion(vm, o);
    case 'notifier': return new NotifierConversion(vm, o);
    case 'in-place': return new InPlaceConversion(vm, o);
    case 'kvm-iommu': return new KvmIommuConversion(vm);
  }
}

/**
 * A design for a running guest: the run's injected conversion bugs (the in-place design
 * honours inplace-convert-while-pinned and counts it acting) and where QEMU's printed
 * errors go.
 */
export function injectedConversionDesign(name: ConversionDesignName, vm: Vm, injection: ConversionInjection, report: (detail: string) => void): ConversionDesign {
  return createConversionDesign(name, vm, { report, convertWhilePinned: injection.bugs.inplaceConvertWhilePinned === true, injection });
}
