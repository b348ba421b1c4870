// Rotary position embedding as HF Llama applies it (rotate-half): x and y [B, T, H·d], each
// head's pair (i, i + d/2) of position p rotated by the angle whose cos and sin are row
// p − first of the tables [positions, d/2] (computed on the CPU, in f32, as transformers does).
// An invocation per pair.

struct Params {
  pairs: u32,
  t: u32,
  heads: u32,
  half: u32,
  // The tables' row of the first of the T positions.
  first: u32,
  row: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> cos_table: array<f32>;
@group(0) @binding(2) var<storage, read> sin_table: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let n = id.y * params.row + id.x;
  if (n >= params.pairs) {
    return;
  }
  let i = n % params.half;
  let head_row = n / params.half;
  let position = (head_row / params.heads) % params.t;
  let a = head_row * 2u * params.half + i;
  let angle = (params.first + position) * params.half + i;
  let c = cos_table[angle];
  let s = sin_table[angle];
  let x1 = x[a];
  let x2 = x[a + params.half];
  y[a] = x1 * c - x2 * s;
  y[a + params.half] = x2 * c + x1 * s;
}
