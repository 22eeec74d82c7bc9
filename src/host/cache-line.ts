/** Words are Int32; each independently written group sits on its own 64-byte line (false sharing costs 3-4x). */
export const LINE_WORDS = 16;
