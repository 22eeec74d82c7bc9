export async function litmusCommand(_files: string[], _json: boolean): Promise<number> {
  console.error('vmemlab: litmus: not wired yet');
  return 2;
}
