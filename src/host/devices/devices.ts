import type { Vm } from '../vm.ts';
import type { DeviceArea, IovaWindow } from './dma-buffers.ts';
import type { DeviceConfig } from './device-config.ts';
import type { Device } from './device.ts';
import { DmaEngine } from './dma-engine.ts';
import { Gvt } from './gvt.ts';
import { Mdev } from './mdev.ts';

/**
 * Device `index` of a VM, of its configured kind; `window` is its IOVA window (IOVA
 * devices); `sharedArea`, a confidential guest's shared bounce buffers it uses.
 */
export function createDevice(vm: Vm, index: number, config: DeviceConfig, seed: number, window: IovaWindow | null, sharedArea: DeviceArea | null = null): Device {
  switch (config.kind) {
    case 'gvt': return new Gvt(vm, index, config, seed);
    case 'mdev': return new Mdev(vm, index, config, seed, window!, sharedArea);
    case 'dma-engine': return new DmaEngine(vm, index, config, seed, window!, sharedArea);
  }
}
