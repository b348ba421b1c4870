// y [rows, width] = columns start..start + width of x [rows, x_width]: one part of a fused
// projection's output (GPT-2's [q | k | v]).

struct Params {
  len: u32,
  width: u32,
  x_width: u32,
  start: u32,
  row: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let i = id.y * params.row + id.x;
  if (i < params.len) {
    let r = i / params.width;
    y[i] = x[r * params.x_width + params.start + i % params.width];
  }
}
