// y = a + b or a · b, b repeated over a's leading dimensions (b's length divides a's):
// residuals, position embeddings added to every image, SwiGLU's gate times its up projection.

struct Params {
  len: u32,
  b_len: u32,
  // Invocations a row of the grid holds (workgroups past the first dimension go in the second).
  row: u32,
  // 0: a + b, 1: a · b.
  op: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let i = id.y * params.row + id.x;
  if (i < params.len) {
    let other = b[i % params.b_len];
    y[i] = select(a[i] + other, a[i] * other, params.op == 1u);
  }
}
