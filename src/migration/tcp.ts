import { crc32 } from 'node:zlib';
import { type AddressInfo, Socket, createServer } from 'node:net';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { Packr } from 'msgpackr';
import { PAGE_SIZE } from '../host/constants.ts';
import { GuestMemory } from '../host/guest-memory.ts';
import { type VmLayout, createVmLayout } from '../host/layout.ts';
import type { Memslot, PageStamp } from '../host/memslot.ts';
import { DestState, DestWord } from './channel.ts';
import { Destination } from './destination.ts';

/**
 * The migration stream between processes: the source writes stream frames (stream.ts) to
 * a TCP connection; the destination answers with its own small frames (u32 BE length,
 * then a msgpack map): `ack` (bytes applied, in KiB: the source's flow-control credit),
 * `complete` (the stream is applied: the migration is over), then `digests` (a digest of
 * every page: CRC-32 and the stamp, so the source can run the stamp oracle without the
 * destination's memory; computed after `complete`, outside the migration's time), or
 * `error`.
 */
const packr = new Packr({ useRecords: false });
const ACK_EVERY = 256 * 1024;
/** Bytes per page in a digest: CRC-32, then the stamp's writer, sequence and iteration. */
export const DIGEST_BYTES = 16;

export type Reply =
  | { t: 'ack'; kib: number }
  | { t: 'complete'; normal: number; zero: number }
  | { t: 'digests'; digests: Uint8Array }
  | { t: 'error'; message: string };

function replyFrame(r: Reply): Uint8Array {
  const body = packr.pack(r);
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

/** A reply as the source may trust it: its type known and its fields of their types. */
function checkReply(x: unknown): Reply {
  const r = x as Record<string, unknown> | null;
  const num = (v: unknown): boolean => typeof v === 'number' && Number.isFinite(v) && v >= 0;
  const ok = r !== null && typeof r === 'object' && (
    (r['t'] === 'ack' && num(r['kib']))
    || (r['t'] === 'complete' && num(r['normal']) && num(r['zero']))
    || (r['t'] === 'digests' && r['digests'] instanceof Uint8Array)
    || (r['t'] === 'error' && typeof r['message'] === 'string'));
  if (!ok) throw new Error(`not a reply: ${JSON.stringify(x)?.slice(0, 80)}`);
  return r as unknown as Reply;
}

/** Splits a byte stream into reply frames. */
class ReplyReader {
  private buf: Uint8Array = new Uint8Array(0);
  push(chunk: Uint8Array): Reply[] {
    const b = new Uint8Array(this.buf.length + chunk.length);
    b.set(this.buf); b.set(chunk, this.buf.length);
    const out: Reply[] = [];
    let at = 0;
    while (b.length - at >= 4) {
      const n = new DataView(b.buffer, at).getUint32(0);
      if (n > 1 << 30) throw new Error(`reply frame of ${n} bytes`);
      if (b.length - at < 4 + n) break;
      out.push(checkReply(packr.unpack(b.subarray(at + 4, at + 4 + n))));
      at += 4 + n;
    }
    this.buf = b.subarray(at);
    return out;
  }
}

/** Per-page digests of guest memory, slots in order. */
export function pageDigests(memory: GuestMemory): Uint8Array {
  const pages = memory.slots.reduce((n, s) => n + s.pages, 0);
  const out = new Uint8Array(pages * DIGEST_BYTES);
  const dv = new DataView(out.buffer);
  let i = 0;
  for (const s of memory.slots) {
    for (let p = 0; p < s.pages; p++, i++) {
      const off = s.byteOffset(p);
      const st = s.stampOf(p);
      dv.setUint32(i * DIGEST_BYTES, crc32(s.bytes(p).subarray(off, off + PAGE_SIZE)));
      dv.setUint32(i * DIGEST_BYTES + 4, st.writer);
      dv.setUint32(i * DIGEST_BYTES + 8, st.seq);
      dv.setUint32(i * DIGEST_BYTES + 12, st.iteration);
    }
  }
  return out;
}

export interface RemoteMismatch { slot: number; gfn: number; source: PageStamp; destination: PageStamp }

/** The stamp oracle against a remote destination's digests. */
export function compareDigests(memory: GuestMemory, remote: Uint8Array, max = 16): { pages: number; count: number; mismatches: RemoteMismatch[] } {
  const local = pageDigests(memory);
  if (local.length !== remote.length) throw new Error(`the destination reported ${remote.length / DIGEST_BYTES} pages, the source has ${local.length / DIGEST_BYTES}`);
  const a = new DataView(local.buffer);
  const b = new DataView(remote.buffer, remote.byteOffset);
  const mismatches: RemoteMismatch[] = [];
  let count = 0;
  let i = 0;
  for (const s of memory.slots as Memslot[]) {
    for (let p = 0; p < s.pages; p++, i++) {
      const o = i * DIGEST_BYTES;
      if (a.getUint32(o) === b.getUint32(o)) continue;
      count++;
      if (mismatches.length < max) {
        mismatches.push({
          slot: s.id, gfn: s.baseGfn + p,
          source: { writer: a.getUint32(o + 4), seq: a.getUint32(o + 8), iteration: a.getUint32(o + 12) },
          destination: { writer: b.getUint32(o + 4), seq: b.getUint32(o + 8), iteration: b.getUint32(o + 12) },
        });
      }
    }
  }
  return { pages: i, count, mismatches };
}

export interface ServedMigration {
  status: 'completed' | 'failed';
  /** The destination's memory (to resume the guest on), once the header built it. */
  layout: VmLayout | null;
  error: string | null;
  pages: number;
  normal: number;
  zero: number;
  frames: number;
}

export interface ServeOptions {
  /** vCPUs of the memory built (to resume the guest on). */
  vcpus?: number;
  /**
   * A connection that sends nothing for this long is dropped: before its stream began
   * (the destination keeps listening for the real source), or during it (the migration
   * fails: the source stalled or is gone).
   */
  idleMs?: number;
}

/**
 * `vmemlab destination`: serves one migration on host:port, builds guest memory from the
 * stream's header (with `vcpus` vCPUs, to resume the guest on), applies the stream,
 * answers with acks and, at the end, digests. It listens until a connection's stream
 * begins (a header the decoder accepted): a connection that sends nothing is dropped
 * after `idleMs` and the next one is served, and while a migration is under way any
 * other connection is refused with an error reply, never the other way round.
 */
/** How long a destination waits for a connection's next bytes by default (`--idle-timeout`). */
export const DESTINATION_IDLE_S = 30;

export async function serveDestination(host: string, port: number, o: ServeOptions = {}): Promise<{ address: AddressInfo; result: Promise<ServedMigration>; close: () => void }> {
  const vcpus = o.vcpus ?? 1;
  const idleMs = o.idleMs ?? DESTINATION_IDLE_S * 1000;
  let settle!: (r: ServedMigration) => void;
  const result = new Promise<ServedMigration>((r) => { settle = r; });
  /** The connection whose stream began; null until one did. */
  let active: Socket | null = null;
  let done = false;
  const server = createServer({ noDelay: true }, (socket: Socket) => {
    if (active !== null || done) {
      socket.on('error', () => socket.destroy()); // a refused peer that resets is no failure of the destination's
      socket.end(replyFrame({ t: 'error', message: 'this destination is already receiving a migration' }));
      return;
    }
    let layout: VmLayout | null = null;
    const dest = new Destination(null, undefined, (slots) => new GuestMemory(layout = createVmLayout({
      slots: slots.map((s) => ({ ...s, flags: 0 })), vcpus,
      tracking: { kind: 'bitmap', manualProtect: false, initiallySet: false },
    })), true);
    let lastAck = 0;
    const finish = (status: ServedMigration['status']): void => {
      if (done) return;
      done = true;
      server.close();
      settle({ status, layout, error: dest.error, pages: dest.stats.normal + dest.stats.zero, normal: dest.stats.normal, zero: dest.stats.zero, frames: dest.stats.frames });
    };
    const mine = (): boolean => active === socket;
    socket.setTimeout(idleMs, () => {
      if (!mine()) { socket.destroy(); return; } // a connection that never began a stream: serve the next
      dest.fail(`the source sent nothing for ${idleMs / 1000} s: it stalled or is gone`);
      socket.destroy();
      finish('failed');
    });
    socket.on('data', (chunk: Buffer) => {
      if (done && !mine()) { socket.destroy(); return; }
      if (active !== null && !mine()) {
        socket.end(replyFrame({ t: 'error', message: 'this destination is already receiving a migration' }));
        return;
      }
      const ok = dest.receive(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length));
      if (active === null && dest.memory !== null) active = socket; // its header was accepted: this is the migration
      if (!ok) {
        socket.end(replyFrame({ t: 'error', message: dest.error ?? 'destination failed' }));
        if (mine()) finish('failed');
        return;
      }
      const applied = Atomics.load(dest.words, DestWord.APPLIED_KIB) * 1024;
      if (dest.state === DestState.COMPLETE) {
        // complete goes out now; the digests (a read of all memory) once it has been written.
        socket.write(replyFrame({ t: 'complete', normal: dest.stats.normal, zero: dest.stats.zero }), () => {
          socket.end(replyFrame({ t: 'digests', digests: pageDigests(dest.memory!) }));
        });
        finish('completed');
      } else if (applied - lastAck >= ACK_EVERY) {
        lastAck = applied;
        socket.write(replyFrame({ t: 'ack', kib: applied / 1024 }));
      }
    });
    socket.on('close', () => {
      if (!mine()) return;
      dest.end();
      finish(dest.state === DestState.COMPLETE ? 'completed' : 'failed');
    });
    socket.on('error', (e) => {
      if (!mine()) return;
      dest.fail(`connection: ${e.message}`);
      finish('failed');
    });
  });
  await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(port, host, resolve); });
  return { address: server.address() as AddressInfo, result, close: () => server.close() };
}

export interface SourceBridge {
  /** Give this to the migration worker: it posts stream frames on it. */
  workerPort: MessagePort;
  /** Settles when the destination completed (with its digests) or the connection failed. */
  finished: Promise<{ digests: Uint8Array | null; error: string | null }>;
  close: () => void;
}

/**
 * The source's end of a TCP migration, on the main thread: frames from the migration
 * worker go to the socket; the destination's acks become credit in `destWords`, its
 * completion or failure becomes DestState there (what the migration thread waits on).
 */
export function connectDestination(host: string, port: number, destWords: Int32Array, stallMs = 10_000): SourceBridge {
  const { port1, port2 } = new MessageChannel();
  let settle!: (r: { digests: Uint8Array | null; error: string | null }) => void;
  const finished = new Promise<{ digests: Uint8Array | null; error: string | null }>((r) => { settle = r; });
  let done = false;
  /** The destination said `complete`: the migration is over, whatever happens to the digests. */
  let completed = false;
  let timer: NodeJS.Timeout | undefined;
  const fail = (message: string): void => {
    if (done) return;
    done = true;
    clearInterval(timer);
    if (!completed) {
      Atomics.store(destWords, DestWord.STATE, DestState.FAILED);
      Atomics.notify(destWords, DestWord.STATE);
    }
    socket.destroy(); // nothing more goes into a connection that failed
    settle({ digests: null, error: message });
  };
  const socket = new Socket();
  socket.setNoDelay(true);
  const where = `${host}:${port}`;
  // Deadlines: the connection within stallMs; then, whenever the destination owes an
  // answer (what was sent runs ahead of its acks by more than their granularity), an
  // answer within stallMs. A destination that is frozen or gone fails the migration with
  // that reason instead of holding the source in a pass for ever. (At completion, with
  // less than an ack's worth outstanding, the driver's watchdog is the deadline.)
  // The connection opens with the first frame (the stream's header, after the guest's
  // warm-up), as a source opens its migration channel only when it migrates: a
  // destination then never sees a silent connection from a real source.
  let connectingAt = 0;
  let connected = false;
  let sent = 0;
  let owedSince = 0;
  // After `complete` nothing is owed (the destination applied all of the stream, and never
  // acks its last chunk): the digests' deadline is the driver's watchdog.
  const owes = (): boolean => !completed && sent - Atomics.load(destWords, DestWord.APPLIED_KIB) * 1024 >= ACK_EVERY;
  timer = setInterval(() => {
    const now = Date.now();
    if (!connected) {
      if (connectingAt > 0 && now - connectingAt >= stallMs) fail(`could not connect to the destination at ${where} within ${stallMs / 1000} s`);
      return;
    }
    if (owedSince > 0 && now - owedSince >= stallMs) {
      const owed = sent - Atomics.load(destWords, DestWord.APPLIED_KIB) * 1024;
      fail(`the destination at ${where} has not answered for ${((now - owedSince) / 1000).toFixed(1)} s with ${(owed / 1048576).toFixed(1)} MiB unacknowledged: it stalled or is gone`);
    }
  }, Math.max(50, Math.min(1000, stallMs / 4)));
  timer.unref();
  const replies = new ReplyReader();
  port1.on('message', (frame: Uint8Array) => {
    if (done) return;
    if (connectingAt === 0) {
      connectingAt = Date.now();
      socket.connect(port, host, () => { connected = true; });
    }
    sent += frame.length;
    if (owedSince === 0 && owes()) owedSince = Date.now();
    socket.write(frame);
  });
  socket.on('data', (chunk: Buffer) => {
    let got: Reply[];
    try { got = replies.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length)); } catch (e) {
      fail(`the destination at ${where} sent a malformed reply: ${(e as Error).message}`);
      return;
    }
    for (const r of got) {
      if (done) return; // a failure (or the digests) ended it: later replies in the same chunk change nothing
      if (r.t === 'ack') {
        Atomics.store(destWords, DestWord.APPLIED_KIB, r.kib);
        Atomics.notify(destWords, DestWord.APPLIED_KIB);
      } else if (r.t === 'complete') {
        completed = true;
        Atomics.store(destWords, DestWord.STATE, DestState.COMPLETE);
        Atomics.notify(destWords, DestWord.STATE);
      } else if (r.t === 'digests') {
        if (!completed) {
          fail(`the destination at ${where} sent its page digests before it completed the migration`);
          return;
        }
        done = true;
        clearInterval(timer);
        settle({ digests: r.digests, error: null });
      } else if (r.t === 'error') {
        fail(`the destination at ${where} failed: ${String(r.message)}`);
      } else {
        fail(`the destination at ${where} sent an unknown reply ${JSON.stringify((r as { t?: unknown }).t)}`);
      }
    }
    owedSince = owes() ? Date.now() : 0;
  });
  socket.on('error', (e: Error) => fail(`the connection to the destination at ${where} failed: ${e.message}`));
  socket.on('close', () => fail(completed
    ? `the connection to ${host}:${port} closed before the destination sent its page digests`
    : `the connection to ${host}:${port} closed before the migration completed`));
  return { workerPort: port2, finished, close: () => { clearInterval(timer); port1.close(); socket.destroy(); } };
}

