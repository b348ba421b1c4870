// y = a + b, b repeated over a's leading dimensions (b's length divides a's): residuals, and
// position embeddings added to every image.

struct Params {
  len: u32,
  b_len: u32,
  // Invocations a row of the grid holds (workgroups past the first dimension go in the second).
  row: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let i = id.y * params.row + id.x;
  if (i < params.len) {
    y[i] = a[i] + b[i % params.b_len];
  }
}
