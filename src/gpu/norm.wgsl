// LayerNorm (PyTorch's: mean and biased variance of each row, then (x − mean) / √(var + ε) · w
// + b) or RMSNorm (x / √(mean(x²) + ε) · w, Llama's) over the last dimension: x and y [rows, n].
// One workgroup of 256 per row (rows past the grid's first dimension in its second); the sums
// are reduced as a tree in workgroup memory, the variance from the mean (two passes, as
// candle's CPU kernel).

struct Params {
  rows: u32,
  n: u32,
  eps: f32,
  rms: u32,
  groups_x: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

const SIZE: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// The sum of every invocation's `v` over the workgroup (all invocations call it).
fn workgroup_sum(v: f32, t: u32) -> f32 {
  partial[t] = v;
  workgroupBarrier();
  for (var half = SIZE / 2u; half > 0u; half /= 2u) {
    if (t < half) {
      partial[t] += partial[t + half];
    }
    workgroupBarrier();
  }
  let total = partial[0];
  workgroupBarrier();
  return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  // Uniform control flow for the barriers: a row past the end still takes part, reading nothing.
  let row = group.y * params.groups_x + group.x;
  let live = row < params.rows;
  let n = params.n;
  let base = row * n;
  var mean = 0.0;
  if (params.rms == 0u) {
    var s = 0.0;
    if (live) {
      for (var i = t; i < n; i += SIZE) {
        s += x[base + i];
      }
    }
    mean = workgroup_sum(s, t) / f32(n);
  }
  var s2 = 0.0;
  if (live) {
    for (var i = t; i < n; i += SIZE) {
      let d = x[base + i] - mean;
      s2 += d * d;
    }
  }
  let inv = inverseSqrt(workgroup_sum(s2, t) / f32(n) + params.eps);
  if (live) {
    for (var i = t; i < n; i += SIZE) {
      var v = (x[base + i] - mean) * inv * w[i];
      if (params.rms == 0u) {
        v += b[i];
      }
      y[base + i] = v;
    }
  }
}
