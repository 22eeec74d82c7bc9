import { crc32 } from 'node:zlib';
import { Packr } from 'msgpackr';
import { PAGE_SIZE } from '../host/constants.ts';
import { LIMITS } from '../util/limits.ts';

/**
 * The migration stream, version 4 (docs/migration-stream.md). A sequence of frames:
 *
 *   u32 BE  frame length N (bytes after this word, at most MAX_FRAME)
 *   u32 BE  record length R
 *   R bytes a msgpack map: the record
 *   0-7     zero bytes, up to the next multiple of 8 from the frame's start
 *   rest    payload bytes (page batches only: the normal pages' contents, in order)
 *
 * The padding keeps page payloads 8-byte aligned wherever frames start 8-byte aligned:
 * copies between SharedArrayBuffers are word copies only when both ends are aligned,
 * byte by byte otherwise (V8's relaxed memcpy), several times slower.
 *
 * Records: header (first, once), pages (batches), sync (end of a pass), attributes (a
 * confidential guest's shared/private state per guest_memfd slot, once, before the
 * completion; new in version 3), device (a device's own saved state, its payload the bytes
 * it saved: a mediated device's BAR contents, once, after the VM stopped; new in version 4),
 * complete (last). A source writes version 4 only when it sends a device record, else 3;
 * version 2 streams (no attributes record) are read as well.
 * Page bytes go into the frame by one copy straight out of guest memory; msgpack carries
 * only the small record, so the payload is never copied again by the encoder.
 */
export const STREAM_MAGIC = 'vmemlab-migration';
export const STREAM_VERSION = 3;
/** The version of a stream that carries device state (the device record). */
export const STREAM_VERSION_DEVICE = 4;
/** Versions this vmemlab reads: 2 lacks the attributes record, 3 the device record. */
export const READABLE_VERSIONS: readonly number[] = [2, 3, 4];
/** A device record: its name's longest, its parts' most and each part's most pages. */
const DEVICE_NAME_MAX = 64;
const DEVICE_PARTS_MAX = 64;
const DEVICE_PART_PAGES_MAX = 4096;
export const MAX_FRAME = 64 << 20;
export const PAGE_NORMAL = 0;
export const PAGE_ZERO = 1;

export interface StreamSlot { id: number; asId: number; baseGfn: number; pages: number }

export type StreamRecord =
  | { t: 'header'; magic: string; version: number; pageSize: number; slots: StreamSlot[] }
  /** `slot` is as_id << 16 | id; `offsets` are pages within the slot; `kinds` PAGE_NORMAL or PAGE_ZERO. */
  | { t: 'pages'; slot: number; offsets: Uint32Array; kinds: Uint8Array }
  | { t: 'sync'; pass: number }
  /**
   * The RamDiscardManager's bitmap of one guest_memfd slot: bit p (little-endian 32-bit
   * words) set = page p is shared; clear = private (its shared memory discarded).
   */
  | { t: 'attributes'; slot: number; shared: Uint32Array }
  /** A device's saved state: named parts of whole pages (a mediated device: its resources), their bytes in `payload`, in order. */
  | { t: 'device'; name: string; parts: DevicePart[]; payload: Uint8Array }
  | { t: 'complete'; normal: number; zero: number; checksum: number };

export interface DevicePart { name: string; pages: number }

/** A decoded page batch: the record plus its payload (normal pages, PAGE_SIZE each). */
export interface PageBatch { slot: number; offsets: Uint32Array; kinds: Uint8Array; payload: Uint8Array }

export class StreamError extends Error {
  override readonly name = 'StreamError';
}

const packr = new Packr({ useRecords: false, moreTypes: false });

/** Where the payload starts in a frame whose record is `r` bytes: after the padding to 8. */
export function payloadOffset(r: number): number {
  return (8 + r + 7) & ~7;
}

/** Where a frame of `n` bytes is built; by default, new memory. */
export type FrameAlloc = (n: number) => Uint8Array;
const newFrame: FrameAlloc = (n) => new Uint8Array(n);

function frame(record: object, payloadBytes: number, alloc: FrameAlloc = newFrame): { buf: Uint8Array; payloadAt: number } {
  const head = packr.pack(record);
  const payloadAt = payloadOffset(head.length);
  const n = payloadAt - 4 + payloadBytes;
  if (n > MAX_FRAME) throw new StreamError(`frame of ${n} bytes exceeds ${MAX_FRAME}`);
  const buf = alloc(4 + n);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  dv.setUint32(0, n);
  dv.setUint32(4, head.length);
  buf.set(head, 8);
  buf.fill(0, 8 + head.length, payloadAt);
  return { buf, payloadAt };
}

export function encodeHeader(slots: StreamSlot[], version = STREAM_VERSION): Uint8Array {
  return frame({ t: 'header', magic: STREAM_MAGIC, version, pageSize: PAGE_SIZE, slots }, 0).buf;
}

/** A device record: `bytes` holds the parts' pages in order (a version-4 stream). */
export function encodeDevice(name: string, parts: DevicePart[], bytes: Uint8Array): Uint8Array {
  const { buf, payloadAt } = frame({ t: 'device', name, parts }, bytes.length);
  buf.set(bytes, payloadAt);
  return buf;
}

export function encodeSync(pass: number): Uint8Array {
  return frame({ t: 'sync', pass }, 0).buf;
}

export function encodeAttributes(slot: number, shared: Uint32Array): Uint8Array {
  const bytes = new Uint8Array(shared.length * 4);
  const dv = new DataView(bytes.buffer);
  for (let i = 0; i < shared.length; i++) dv.setUint32(i * 4, shared[i]!, true);
  return frame({ t: 'attributes', slot, shared: bytes }, 0).buf;
}

export function encodeComplete(normal: number, zero: number, checksum: number): Uint8Array {
  return frame({ t: 'complete', normal, zero, checksum }, 0).buf;
}

/** Where encodePages reads pages, numbered within one slot. */
export interface PageSource {
  /** True when the page is all zeroes (sent as a flag, no payload). */
  isZero(page: number): boolean;
  /** Copies `count` consecutive pages, from `page` on, into `into` at `at`. */
  copy(page: number, count: number, into: Uint8Array, at: number): void;
}

/**
 * Encodes one batch of pages of one slot: zero pages as a flag, the others' bytes as the
 * payload, each run of consecutive pages by one copy. As QEMU's save_zero_page, the zero
 * check reads guest memory before the copy; a write in between was logged and the page
 * is sent again.
 */
export function encodePages(slot: number, offsets: ArrayLike<number>, source: PageSource, alloc?: FrameAlloc): { frame: Uint8Array; normal: number; zero: number } {
  const count = offsets.length;
  const offs = new Uint32Array(count);
  const kinds = new Uint8Array(count);
  let normal = 0;
  for (let i = 0; i < count; i++) {
    offs[i] = offsets[i]!;
    if (source.isZero(offs[i]!)) kinds[i] = PAGE_ZERO;
    else normal++;
  }
  const { buf, payloadAt } = frame({ t: 'pages', slot, offsets: new Uint8Array(offs.buffer), kinds }, normal * PAGE_SIZE, alloc);
  let at = payloadAt;
  for (let i = 0; i < count;) {
    if (kinds[i] !== PAGE_NORMAL) { i++; continue; }
    let j = i + 1;
    while (j < count && kinds[j] === PAGE_NORMAL && offs[j] === offs[i]! + (j - i)) j++;
    source.copy(offs[i]!, j - i, buf, at);
    at += (j - i) * PAGE_SIZE;
    i = j;
  }
  return { frame: buf, normal, zero: count - normal };
}

/** CRC-32 chained over frames: what the completion record's checksum covers. */
export function checksumUpdate(crc: number, bytes: Uint8Array): number {
  return crc32(bytes, crc);
}

/**
 * Decodes a byte stream into records, across arbitrary chunk boundaries (TCP). Rejects
 * anything malformed with a StreamError saying what and where; never trusts a length.
 */
export class StreamDecoder {
  private buf: Uint8Array = new Uint8Array(0);
  private offset = 0;
  /** Chunks after `buf` while its first frame is incomplete, and their bytes. */
  private parts: Uint8Array[] = [];
  private partBytes = 0;
  private frames = 0;
  private header: Extract<StreamRecord, { t: 'header' }> | null = null;
  private completed = false;
  checksum = 0;

  get slots(): StreamSlot[] | null { return this.header?.slots ?? null; }
  get done(): boolean { return this.completed; }

  /** Feeds bytes; returns the records (and page batches) now complete. */
  push(chunk: Uint8Array): (StreamRecord | PageBatch)[] {
    if (this.buf.length === this.offset && this.parts.length === 0) {
      this.buf = chunk;
      this.offset = 0;
    } else {
      // The rest of a frame that began in an earlier chunk: gather the pieces and join
      // them once the frame is whole (a frame over many socket reads is copied once).
      this.parts.push(chunk);
      this.partBytes += chunk.length;
      const have = this.buf.length - this.offset;
      if (have >= 4) {
        const n = new DataView(this.buf.buffer, this.buf.byteOffset + this.offset).getUint32(0);
        if (n <= MAX_FRAME && have + this.partBytes < 4 + n) return [];
      }
      this.join();
    }
    const out: (StreamRecord | PageBatch)[] = [];
    for (;;) {
      const avail = this.buf.length - this.offset;
      if (avail < 4) break;
      const dv = new DataView(this.buf.buffer, this.buf.byteOffset + this.offset);
      const n = dv.getUint32(0);
      if (n > MAX_FRAME) throw new StreamError(`frame ${this.frames}: length ${n} exceeds the limit of ${MAX_FRAME} bytes`);
      if (n < 4) throw new StreamError(`frame ${this.frames}: length ${n} is too short`);
      if (avail < 4 + n) break;
      const body = this.buf.subarray(this.offset + 4, this.offset + 4 + n);
      out.push(this.decodeFrame(body));
      this.checksum = crc32(this.buf.subarray(this.offset, this.offset + 4 + n), this.checksum);
      this.offset += 4 + n;
      this.frames++;
    }
    return out;
  }

  /** The stream ended: anything left over is a truncated frame. */
  end(): void {
    if (this.parts.length > 0) this.join();
    if (this.buf.length > this.offset) throw new StreamError(`stream truncated: ${this.buf.length - this.offset} bytes of an incomplete frame ${this.frames}`);
    if (!this.completed) throw new StreamError(`stream ended after ${this.frames} frames without a completion record`);
  }

  /** The unread bytes and the gathered chunks, as one buffer. */
  private join(): void {
    this.buf = concat(this.buf.subarray(this.offset), ...this.parts);
    this.offset = 0;
    this.parts = [];
    this.partBytes = 0;
  }

  private decodeFrame(body: Uint8Array): StreamRecord | PageBatch {
    const where = `frame ${this.frames}`;
    const r = new DataView(body.buffer, body.byteOffset).getUint32(0);
    if (4 + r > body.length) throw new StreamError(`${where}: record length ${r} runs past the frame`);
    let rec: Record<string, unknown>;
    try {
      rec = packr.unpack(body.subarray(4, 4 + r)) as Record<string, unknown>;
    } catch (e) {
      throw new StreamError(`${where}: the record is not valid msgpack (${(e as Error).message})`);
    }
    if (rec === null || typeof rec !== 'object') throw new StreamError(`${where}: the record is not a map`);
    // The body starts after the length word: the payload at payloadOffset(r) - 4.
    const at = payloadOffset(r) - 4;
    if (at > body.length) throw new StreamError(`${where}: the padding after the record runs past the frame`);
    const payload = body.subarray(at);
    if (this.completed) throw new StreamError(`${where}: data after the completion record`);
    if (this.header === null) {
      if (rec['t'] !== 'header') throw new StreamError(`${where}: the stream must start with a header, got '${String(rec['t'])}'`);
      if (rec['magic'] !== STREAM_MAGIC) throw new StreamError(`${where}: not a vmemlab migration stream (magic ${JSON.stringify(rec['magic'])})`);
      if (!READABLE_VERSIONS.includes(rec['version'] as number)) throw new StreamError(`${where}: stream version ${String(rec['version'])} is not supported (this vmemlab reads versions ${READABLE_VERSIONS.join(', ')})`);
      if (rec['pageSize'] !== PAGE_SIZE) throw new StreamError(`${where}: page size ${String(rec['pageSize'])} is not ${PAGE_SIZE}`);
      if (!Array.isArray(rec['slots'])) throw new StreamError(`${where}: header has no slot list`);
      checkHeaderSlots(rec['slots'], `${where}: header`);
      this.header = rec as unknown as Extract<StreamRecord, { t: 'header' }>;
      return this.header;
    }
    switch (rec['t']) {
      case 'pages': return this.decodePages(rec, payload, where);
      case 'sync': return { t: 'sync', pass: Number(rec['pass']) };
      case 'attributes': return this.decodeAttributes(rec, where);
      case 'device': return this.decodeDevice(rec, payload, where);
      case 'complete':
        if (Number(rec['checksum']) >>> 0 !== this.checksum >>> 0) {
          throw new StreamError(`${where}: checksum mismatch: the source sent ${Number(rec['checksum']) >>> 0}, the frames received give ${this.checksum >>> 0}`);
        }
        this.completed = true;
        return { t: 'complete', normal: Number(rec['normal']), zero: Number(rec['zero']), checksum: Number(rec['checksum']) };
      case 'header': throw new StreamError(`${where}: a second header`);
      default: throw new StreamError(`${where}: unknown record type '${String(rec['t'])}'`);
    }
  }

  private decodeDevice(rec: Record<string, unknown>, payload: Uint8Array, where: string): StreamRecord {
    if (this.header!.version < STREAM_VERSION_DEVICE) throw new StreamError(`${where}: a device record in a version ${this.header!.version} stream (they came with version ${STREAM_VERSION_DEVICE})`);
    const name = rec['name'];
    if (typeof name !== 'string' || name.length === 0 || name.length > DEVICE_NAME_MAX) throw new StreamError(`${where}: a device record's name must be 1 to ${DEVICE_NAME_MAX} characters`);
    const raw = rec['parts'];
    if (!Array.isArray(raw) || raw.length > DEVICE_PARTS_MAX) throw new StreamError(`${where}: device ${name}: parts must be a list of at most ${DEVICE_PARTS_MAX}`);
    const parts: DevicePart[] = [];
    let pages = 0;
    for (const [i, p] of raw.entries()) {
      const part = p as Record<string, unknown> | null;
      const n = part?.['pages'];
      if (part === null || typeof part !== 'object' || typeof part['name'] !== 'string' || !Number.isInteger(n) || (n as number) < 0 || (n as number) > DEVICE_PART_PAGES_MAX) {
        throw new StreamError(`${where}: device ${name}: part ${i} must be {name, pages} with 0 to ${DEVICE_PART_PAGES_MAX} pages`);
      }
      parts.push({ name: part['name'], pages: n as number });
      pages += n as number;
    }
    if (payload.length !== pages * PAGE_SIZE) throw new StreamError(`${where}: device ${name}: ${payload.length} payload bytes for ${pages} pages`);
    return { t: 'device', name, parts, payload };
  }

  private decodeAttributes(rec: Record<string, unknown>, where: string): StreamRecord {
    if (this.header!.version < 3) throw new StreamError(`${where}: an attributes record in a version ${this.header!.version} stream (they came with version 3)`);
    const slotField = Number(rec['slot']);
    const slot = this.header!.slots.find((s) => ((s.asId << 16) | s.id) === slotField);
    if (slot === undefined) throw new StreamError(`${where}: attributes for slot ${slotField >>> 16}:${slotField & 0xffff}, which the header does not have`);
    const raw = rec['shared'];
    const bytes = Math.ceil(slot.pages / 32) * 4;
    if (!(raw instanceof Uint8Array) || raw.length !== bytes) {
      throw new StreamError(`${where}: attributes for slot ${slot.id} must be ${bytes} bytes (one bit per page of ${slot.pages}), got ${raw instanceof Uint8Array ? raw.length : typeof raw}`);
    }
    const shared = new Uint32Array(bytes / 4);
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    for (let i = 0; i < shared.length; i++) shared[i] = dv.getUint32(i * 4, true);
    return { t: 'attributes', slot: slotField, shared };
  }

  private decodePages(rec: Record<string, unknown>, payload: Uint8Array, where: string): PageBatch {
    const slotField = Number(rec['slot']);
    const slot = this.header!.slots.find((s) => ((s.asId << 16) | s.id) === slotField);
    if (slot === undefined) throw new StreamError(`${where}: pages for slot ${slotField >>> 16}:${slotField & 0xffff}, which the header does not have`);
    const rawOffsets = rec['offsets'];
    const kinds = rec['kinds'];
    if (!(rawOffsets instanceof Uint8Array) || rawOffsets.length % 4 !== 0 || !(kinds instanceof Uint8Array) || kinds.length * 4 !== rawOffsets.length) {
      throw new StreamError(`${where}: malformed page batch (offsets and kinds do not match)`);
    }
    const offsets = new Uint32Array(kinds.length);
    new Uint8Array(offsets.buffer).set(rawOffsets);
    let normal = 0;
    for (let i = 0; i < kinds.length; i++) {
      if (offsets[i]! >= slot.pages) throw new StreamError(`${where}: page ${offsets[i]} is outside slot ${slot.id} (${slot.pages} pages)`);
      if (kinds[i] === PAGE_NORMAL) normal++;
      else if (kinds[i] !== PAGE_ZERO) throw new StreamError(`${where}: unknown page kind ${kinds[i]}`);
    }
    if (payload.length !== normal * PAGE_SIZE) throw new StreamError(`${where}: ${payload.length} payload bytes for ${normal} normal pages`);
    return { slot: slotField, offsets, kinds, payload };
  }
}

/**
 * The header's memslots, before a destination commits memory for them: whole numbers in
 * range (ids and address spaces 16 bits, gfns below 2^52), at least one slot and at most
 * KVM's slot count, no duplicate and no overlapping slot, and the guest memory they add up
 * to within the memory limit. A header that claims more is refused, not believed.
 */
export function checkHeaderSlots(slots: unknown[], where: string): void {
  const l = LIMITS.memoryBytes;
  if (slots.length < 1 || slots.length > LIMITS.slots.max) throw new StreamError(`${where}: ${slots.length} slots; a guest has 1 to ${LIMITS.slots.max}`);
  const whole = (v: unknown, max: number): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 && v <= max;
  let pages = 0;
  const seen: StreamSlot[] = [];
  const byId = new Map<number, StreamSlot>();
  const clash = (i: number, slot: StreamSlot, other: StreamSlot): StreamError =>
    new StreamError(`${where}: slot ${i} (${slot.asId}:${slot.id}) duplicates or overlaps slot ${other.asId}:${other.id}`);
  slots.forEach((x, i) => {
    const s = x as Record<string, unknown> | null;
    if (s === null || typeof s !== 'object' || !whole(s['id'], 0xffff) || !whole(s['asId'], 0xffff) || !whole(s['baseGfn'], 2 ** 52) || !whole(s['pages'], l.max / PAGE_SIZE) || s['pages'] === 0) {
      throw new StreamError(`${where}: slot ${i}: ${JSON.stringify(x)?.slice(0, 80)} is not a memslot (id, asId: 16 bits; baseGfn; pages: 1 to ${l.max / PAGE_SIZE})`);
    }
    const slot = s as unknown as StreamSlot;
    const same = byId.get(slot.asId * 0x10000 + slot.id);
    if (same) throw clash(i, slot, same);
    byId.set(slot.asId * 0x10000 + slot.id, slot);
    seen.push(slot);
    pages += slot.pages;
  });
  // Overlaps: in gfn order, any overlap shows between neighbours (n log n: a header of 32764 slots is cheap to refuse).
  const order = seen.map((_, i) => i).sort((a, b) => seen[a]!.baseGfn - seen[b]!.baseGfn || a - b);
  for (let k = 1; k < order.length; k++) {
    const [a, b] = [order[k - 1]!, order[k]!];
    if (seen[b]!.baseGfn < seen[a]!.baseGfn + seen[a]!.pages) throw a < b ? clash(b, seen[b]!, seen[a]!) : clash(a, seen[a]!, seen[b]!);
  }
  if (pages * PAGE_SIZE > l.max) throw new StreamError(`${where}: ${pages} pages of guest memory; at most ${l.max / PAGE_SIZE} (${l.text.split(' .. ')[1]})`);
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const c = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { c.set(p, at); at += p.length; }
  return c;
}
