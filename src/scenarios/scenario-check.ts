import { UserError } from '../util/errors.ts';
import type { DeviceConfig } from '../host/devices/device-config.ts';
import type { MigrationScenario } from './migration.ts';
import { type Raw, type SettingKey, deviceEntry } from './options.ts';
import { buildMigration, parseLayer, resolve } from './settings.ts';

/**
 * A migration scenario that came from a file vmemlab wrote (a replay file, a hunt shard),
 * checked as if it had been typed: every field goes through the option table's parser
 * and the same cross-setting checks, then the scenario those settings build must be the
 * one the file holds, field for field. So a file edited by hand (1000 vCPUs, a ring of
 * 3 entries, an unknown bug, a string where a number goes, a key no scenario has) is
 * refused with one line naming the file and the field, before anything runs, and can
 * never produce a finding.
 */
export function checkScenario(raw: unknown, where: string): MigrationScenario {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new UserError(`${where}: not a scenario (${raw === null ? 'null' : Array.isArray(raw) ? 'a list' : typeof raw})`);
  const s = raw as Record<string, unknown>;
  const at = (path: string): unknown => path.split('.').reduce<unknown>((o, k) => (o !== null && typeof o === 'object' ? (o as Record<string, unknown>)[k] : undefined), s);
  const values: Partial<Record<SettingKey, Raw>> = {};
  const paths: Partial<Record<SettingKey, string>> = {};
  const take = (key: SettingKey, path: string, convert: (v: unknown) => Raw = (v) => v, skip?: (v: unknown) => boolean): void => {
    const v = at(path);
    if (v === undefined || skip?.(v)) return;
    values[key] = convert(v);
    paths[key] = path;
  };
  take('tracking', 'tracking');
  take('vcpus', 'vcpus');
  take('memoryBytes', 'memoryBytes');
  take('slots', 'slots');
  take('ringEntries', 'ringEntries');
  take('workload', 'workload.name');
  take('hotFraction', 'workload.hotFraction');
  take('hotShare', 'workload.hotShare');
  take('writePercent', 'workload.writePercent');
  take('opRate', 'workload.opRate', undefined, (v) => v === 0);
  take('dirtyLimit', 'dirtyLimit', undefined, (v) => v === 0);
  take('seed', 'seed');
  take('inject', 'bugs');
  take('hostWriteEvery', 'hostWriteEvery');
  take('pageHistory', 'pageHistory');
  take('devices', 'devices.devices', (v) => (Array.isArray(v) ? v.map((d) => (d !== null && typeof d === 'object' ? deviceEntry(d as DeviceConfig) : d)) : v));
  take('iommu', 'devices.backend');
  take('dmaEntryLimit', 'devices.dmaEntryLimit');
  take('onDeviceFault', 'devices.stopOnFault', (v) => (v === true ? 'stop' : v === false ? 'continue' : v));
  take('bandwidth', 'params.bandwidth', (v) => (v === 0 ? 'unlimited' : v));
  take('downtimeLimitMs', 'params.downtimeLimitMs');
  take('maxIterations', 'params.maxIterations');
  take('timeoutMs', 'params.timeoutMs', (v) => (typeof v === 'number' ? v / 1000 : v));
  take('policy', 'params.policy');
  // The quota is only a setting under the dirty-limit policy; otherwise it holds the default.
  take('vcpuDirtyLimit', 'params.vcpuDirtyLimit', undefined, () => at('params.policy') !== 'dirty-limit');
  take('batchPages', 'params.batchPages');
  take('warmup', 'params.warmupOps');
  const layer = parseLayer(values, (key) => `${where}.${paths[key]}`);
  const built = buildMigration(resolve('migrate', [layer])).scenario;
  sameShape(s, built as unknown as Record<string, unknown>, where);
  return built;
}

/** The file's scenario must be, field for field, the one its settings build. */
function sameShape(got: unknown, want: unknown, where: string): void {
  if (want !== null && typeof want === 'object') {
    if (got === null || typeof got !== 'object' || Array.isArray(got) !== Array.isArray(want)) {
      throw new UserError(`${where}: ${show(got)} is not ${Array.isArray(want) ? 'a list' : 'a section'}`);
    }
    const g = got as Record<string, unknown>;
    const w = want as Record<string, unknown>;
    for (const k of Object.keys(g)) {
      if (!Object.hasOwn(w, k) && g[k] !== undefined) throw new UserError(`${where}.${k}: not a field of a scenario`);
    }
    for (const k of Object.keys(w)) if (g[k] !== undefined || w[k] !== undefined) {
      if (g[k] === undefined && optional(k)) continue;
      sameShape(g[k], w[k], `${where}.${k}`);
    }
    return;
  }
  const same = typeof got === 'number' && typeof want === 'number' ? Math.abs(got - want) <= 1e-9 * Math.max(1, Math.abs(want)) : got === want;
  if (!same) throw new UserError(`${where}: ${show(got)} is not a value a scenario holds there (${typeof want === 'number' ? 'a number' : typeof want === 'string' ? `'${want}'` : String(want)})`);
}

/** Fields a scenario may leave out (older files, defaults). */
const optional = (k: string): boolean => k === 'pageHistory' || k === 'devices' || k === 'dirtyLimit' || k === 'opRate' || k === 'vcpuDirtyLimit';

function show(v: unknown): string {
  if (typeof v === 'string') return `'${v.length > 40 ? `${v.slice(0, 40)}...` : v}'`;
  if (v === undefined) return 'nothing';
  const t = JSON.stringify(v);
  return t === undefined ? String(v) : t.length > 40 ? `${t.slice(0, 40)}...` : t;
}
