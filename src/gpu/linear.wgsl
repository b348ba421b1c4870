// y = act(x·wᵀ (+ b)): x [m, k], w [n, k] (a PyTorch Linear's weight as stored), y [m, n], all
// row-major f32; act as in activation.wgsl (0: none). One workgroup of 16 × 16 invocations computes a 64 × 64 tile of y, each
// invocation 4 × 4 of it; x's and w's 64 × 16 slices along k pass through workgroup memory, so
// each element read from the buffers serves 64 products. The sum over k runs in ascending order.

struct Dims {
  m: u32,
  n: u32,
  k: u32,
  has_bias: u32,
  act: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> dims: Dims;

const TILE: u32 = 64u;
const KT: u32 = 16u;

// [k within the slice][row or column within the tile]: the inner loop reads 4 consecutive.
var<workgroup> xs: array<array<f32, 64>, 16>;
var<workgroup> ws: array<array<f32, 64>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
  let row0 = group.y * TILE;
  let col0 = group.x * TILE;
  let t = local.y * 16u + local.x;
  var acc: array<array<f32, 4>, 4>;
  for (var k0 = 0u; k0 < dims.k; k0 += KT) {
    // 64 × 16 elements of each, 4 per invocation; consecutive invocations read consecutive k.
    for (var i = 0u; i < 4u; i++) {
      let e = t + i * 256u;
      let r = e / KT;
      let kk = e % KT;
      let gk = k0 + kk;
      var xv = 0.0;
      if (row0 + r < dims.m && gk < dims.k) {
        xv = x[(row0 + r) * dims.k + gk];
      }
      xs[kk][r] = xv;
      var wv = 0.0;
      if (col0 + r < dims.n && gk < dims.k) {
        wv = w[(col0 + r) * dims.k + gk];
      }
      ws[kk][r] = wv;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < KT; kk++) {
      var a: array<f32, 4>;
      var c: array<f32, 4>;
      for (var i = 0u; i < 4u; i++) {
        a[i] = xs[kk][local.y * 4u + i];
        c[i] = ws[kk][local.x * 4u + i];
      }
      for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
          acc[i][j] += a[i] * c[j];
        }
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 4u; i++) {
    let r = row0 + local.y * 4u + i;
    for (var j = 0u; j < 4u; j++) {
      let c = col0 + local.x * 4u + j;
      if (r < dims.m && c < dims.n) {
        var v = acc[i][j];
        if (dims.has_bias != 0u) {
          v += b[c];
        }
        y[r * dims.n + c] = activate(v, dims.act);
      }
    }
  }
}
