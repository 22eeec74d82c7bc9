import { CACHE_LINE_SIZE, type Dram, LINES_PER_PAGE } from './cpu-cache.ts';
import type { GuestMemory } from './guest-memory.ts';

/** Guest memory as the CPU cache model's DRAM: lines by VM-wide frame (Memslot.firstPage + page) * 64 + line. */
export function guestDram(memory: GuestMemory): Dram {
  return {
    line(key: number): Uint8Array {
      const frame = Math.floor(key / LINES_PER_PAGE);
      const slot = memory.slotOfFrame(frame);
      if (slot === undefined) throw new Error(`cpu cache: no memslot holds frame ${frame}`);
      const page = frame - slot.firstPage;
      const at = slot.byteOffset(page) + (key % LINES_PER_PAGE) * CACHE_LINE_SIZE;
      return slot.bytes(page).subarray(at, at + CACHE_LINE_SIZE);
    },
  };
}
