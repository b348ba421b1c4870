// y = act(x·wᵀ (+ b)) for a few rows of x (a decoding step's: one per caption or beam): x [m, k]
// with m ≤ ROWS, w [n, k], y [m, n]. linear.wgsl's 32 × 32 tiles would leave 31 of each 32 rows
// idle and give GPT-2's 768 columns 24 workgroups; here the weight is read once, as a stream:
// each 32 invocations of a workgroup own one column and walk its k in vec4 strides (k a multiple
// of 4), every row's partial sum in registers, then sum their 32 partials in workgroup memory.
// Dims and bindings: linear_few_rows.wgsl.

const ROWS: u32 = 4u;
const LANES: u32 = 32u;
const COLUMNS: u32 = 8u;

var<workgroup> partial: array<array<f32, 256>, ROWS>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let lane = t % LANES;
  let column = (wg.y * dims.groups_x + wg.x) * COLUMNS + t / LANES;
  let k4 = dims.k / 4u;
  var acc = array<f32, ROWS>(0.0, 0.0, 0.0, 0.0);
  if (column < dims.n) {
    let wo = column * k4;
    for (var i = lane; i < k4; i += LANES) {
      let wv = vec4<f32>(w[wo + i]);
      for (var r = 0u; r < ROWS; r++) {
        if (r < dims.m) {
          acc[r] += dot(x[r * k4 + i], wv);
        }
      }
    }
  }
  for (var r = 0u; r < ROWS; r++) {
    partial[r][t] = acc[r];
  }
  workgroupBarrier();
  for (var s = LANES / 2u; s > 0u; s >>= 1u) {
    if (lane < s) {
      for (var r = 0u; r < ROWS; r++) {
        partial[r][t] += partial[r][t + s];
      }
    }
    workgroupBarrier();
  }
  if (lane == 0u && column < dims.n) {
    for (var r = 0u; r < dims.m; r++) {
      var v = partial[r][t];
      if (dims.has_bias != 0u) {
        v += b[column];
      }
      y[r * dims.n + column] = activate(v, dims.act);
    }
  }
}
