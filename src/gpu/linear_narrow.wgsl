// y = act(x·wᵀ (+ b)) for a few rows of x when k is short (k < 128, a multiple of 4): x [m, k]
// with m ≤ 4, w [n, k], y [m, n]. linear_rows.wgsl's 32 lanes a column would leave most lanes
// idle, and its workgroup barriers are what software adapters (SwiftShader, lavapipe) pay most
// for: a tiny decoder's 50257-column LM head took seconds a step there. Here one invocation
// owns a column, with no workgroup memory. Dims and bindings: linear_few_rows.wgsl.

const WORKGROUP: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let column = (wg.y * dims.groups_x + wg.x) * WORKGROUP + t;
  if (column >= dims.n) {
    return;
  }
  let k4 = dims.k / 4u;
  let wo = column * k4;
  for (var r = 0u; r < dims.m; r++) {
    var acc = 0.0;
    for (var i = 0u; i < k4; i++) {
      acc += dot(x[r * k4 + i], vec4<f32>(w[wo + i]));
    }
    if (dims.has_bias != 0u) {
      acc += b[column];
    }
    y[r * dims.n + column] = activate(acc, dims.act);
  }
}
