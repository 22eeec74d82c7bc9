import { DEVICE_DEFAULTS, DEVICE_KINDS, type DeviceConfig, type DeviceKind } from '../host/devices/device-config.ts';
import { VFIO_DEFAULT_DMA_ENTRY_LIMIT } from '../host/iommu/constants.ts';
import type { IommuBackendKind } from '../host/iommu/iommu-layout.ts';
import { type DeviceSetup, checkDeviceSetup } from '../scenarios/devices.ts';
import { UserError } from '../util/errors.ts';
import { int } from './flags.ts';

/** `--device KIND[:key=value,...]`: the option names, each a DeviceConfig field. */
const KEYS: Record<string, keyof Omit<DeviceConfig, 'kind'>> = {
  every: 'every', buffers: 'buffers', 'write-percent': 'writePercent', 'remap-every': 'remapEvery', pattern: 'pattern',
  tracking: 'tracking', 'stray-every': 'strayEvery', iotlb: 'iotlbEntries', identity: 'identity',
};
export const DEVICE_KEYS = Object.keys(KEYS);

/** Parses one `--device` value; errors name the device, the key and the value. */
export function parseDevice(text: string, index: number): DeviceConfig {
  const [kind, rest] = text.split(/:(.*)/s, 2) as [string, string | undefined];
  const where = `--device: device ${index} '${text}'`;
  if (!(DEVICE_KINDS as readonly string[]).includes(kind)) throw new UserError(`${where}: unknown kind '${kind}' (one of: ${DEVICE_KINDS.join(', ')})`);
  const d: DeviceConfig = { ...DEVICE_DEFAULTS, kind: kind as DeviceKind };
  for (const item of (rest ?? '').split(',').map((x) => x.trim()).filter(Boolean)) {
    const [key, value] = item.split(/=(.*)/s, 2) as [string, string | undefined];
    const field = KEYS[key];
    if (field === undefined) throw new UserError(`${where}: unknown option '${key}' (one of: ${DEVICE_KEYS.join(', ')})`);
    const at = `${where}: ${key}`;
    if (field === 'identity') {
      if (value !== undefined && value !== 'true' && value !== 'false') throw new UserError(`${at}: '${value}' is not true or false`);
      d.identity = value !== 'false';
      continue;
    }
    if (value === undefined) throw new UserError(`${at}: needs a value (${key}=...)`);
    switch (field) {
      case 'pattern':
        if (value !== 'random' && value !== 'sequential') throw new UserError(`${at}: '${value}' is not random or sequential`);
        d.pattern = value;
        break;
      case 'tracking':
        if (value !== 'iommu' && value !== 'device') throw new UserError(`${at}: '${value}' is not iommu (the container's / HWPT's dirty tracking) or device (its own DMA logging)`);
        d.tracking = value;
        break;
      case 'every': d.every = int(at, value, 1); break;
      case 'buffers': d.buffers = int(at, value, 1, 1 << 20); break;
      case 'writePercent': d.writePercent = int(at, value, 0, 100); break;
      case 'remapEvery': d.remapEvery = int(at, value, 0); break;
      case 'strayEvery': d.strayEvery = int(at, value, 0); break;
      case 'iotlbEntries': {
        const n = int(at, value, 1, 1 << 16);
        if ((n & (n - 1)) !== 0) throw new UserError(`${at}: '${value}' is not a power of two`);
        d.iotlbEntries = n;
        break;
      }
    }
  }
  if (d.kind !== 'dma-engine' && d.tracking === 'device') throw new UserError(`${where}: tracking=device: only a dma-engine logs its own DMA (an mdev is tracked by its pins and dma_rw, gvt by KVM's log)`);
  return d;
}

export interface DeviceFlags { device?: string[]; iommu?: string; dmaEntryLimit?: string; onDeviceFault?: string }

export function deviceSetup(f: DeviceFlags): DeviceSetup {
  const backend = f.iommu ?? 'type1';
  if (backend !== 'type1' && backend !== 'iommufd') throw new UserError(`--iommu: unknown backend '${backend}' (type1 or iommufd)`);
  const onFault = f.onDeviceFault ?? 'continue';
  if (onFault !== 'continue' && onFault !== 'stop') throw new UserError(`--on-device-fault: '${onFault}' is not continue or stop`);
  const setup: DeviceSetup = {
    backend: backend as IommuBackendKind,
    dmaEntryLimit: f.dmaEntryLimit === undefined ? VFIO_DEFAULT_DMA_ENTRY_LIMIT : int('--dma-entry-limit', f.dmaEntryLimit, 1, 2 ** 31 - 1),
    stopOnFault: onFault === 'stop',
    devices: (f.device ?? []).map(parseDevice),
  };
  if (setup.devices.length > 64) throw new UserError(`--device: ${setup.devices.length} devices; at most 64`);
  checkDeviceSetup(setup, '--device');
  return setup;
}
