import type { Vm } from '../vm.ts';
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
