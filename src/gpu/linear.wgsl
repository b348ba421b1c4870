// y = act(x·wᵀ (+ b)): x [m, k], w [n, k] (a PyTorch Linear's weight as stored), y [m, n], all
// row-major f32; act as in activation.wgsl (0: none).
//
// An encoder's products have few rows (196 patches) and 768-3072 columns: 64 × 64 tiles made
// 48-192 workgroups for an H100's 132 SMs, each a long serial walk along k. So a workgroup takes
// a 32 × 32 tile (4 × 4 outputs an invocation) and its 256 invocations split each 32-wide slice of
// k four ways, summing the four partial tiles through workgroup memory at the end: 4× the
// workgroups and a quarter of the serial walk, with no second pass. The next slice is read into
// registers while the current one is multiplied; x's and w's slices are stored transposed
// ([k][row]) so each invocation reads its 4 rows and 4 columns as one vec4 each. Workgroup memory
// is 12 KiB and workgroups 256 invocations: within WebGPU's defaults (16 KiB, 256).

struct Dims {
  m: u32,
  n: u32,
  k: u32,
  has_bias: u32,
  act: u32,
}

// x and w (bindings 0 and 1) and their loaders `quad_x` / `quad_w` come from
// linear_loads.wgsl (any k) or linear_loads_vec4.wgsl (k a multiple of 4: one vec4 a load).
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> dims: Dims;

// Rows and columns of y a workgroup computes (linear_activated's grid assumes 32 × 32), the
// slices of k its invocations share out, and the k each slice takes a step.
const BM: u32 = 32u;
const BN: u32 = 32u;
const KS: u32 = 4u;
const BK: u32 = 8u;
const KT: u32 = KS * BK;
const TX: u32 = BN / 4u;
const TY: u32 = BM / 4u;
const WG: u32 = TX * TY * KS;
// Quads (4 consecutive k of one row) each invocation loads a step.
const LX: u32 = (BM * KT / 4u + WG - 1u) / WG;
const LW: u32 = (BN * KT / 4u + WG - 1u) / WG;

var<workgroup> xs: array<vec4<f32>, KT * BM / 4u>;
var<workgroup> ws: array<vec4<f32>, KT * BN / 4u>;
// One k-slice's partial tile at a time, added into slice 0's.
const PART: u32 = BM * BN / 4u;
var<workgroup> part: array<vec4<f32>, PART>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let row0 = group.y * BM;
  let col0 = group.x * BN;
  let tx = t % TX;
  let ty = (t / TX) % TY;
  let s = t / (TX * TY);
  let k = dims.k;
  var xr: array<vec4<f32>, LX>;
  var wr: array<vec4<f32>, LW>;
  for (var i = 0u; i < LX; i++) {
    let q = t + i * WG;
    xr[i] = quad_x(row0 + q % BM, 4u * (q / BM));
  }
  for (var i = 0u; i < LW; i++) {
    let q = t + i * WG;
    wr[i] = quad_w(col0 + q % BN, 4u * (q / BN));
  }
  var acc0 = vec4(0.0);
  var acc1 = vec4(0.0);
  var acc2 = vec4(0.0);
  var acc3 = vec4(0.0);
  for (var k0 = 0u; k0 < k; k0 += KT) {
    // Row fastest across invocations: the transposed stores hit consecutive banks.
    workgroupBarrier();
    for (var i = 0u; i < LX; i++) {
      let q = t + i * WG;
      if (q < BM * KT / 4u) {
        let r = q % BM;
        let e = 4u * (q / BM);
        let v = xr[i];
        xs[e * (BM / 4u) + r / 4u][r % 4u] = v.x;
        xs[(e + 1u) * (BM / 4u) + r / 4u][r % 4u] = v.y;
        xs[(e + 2u) * (BM / 4u) + r / 4u][r % 4u] = v.z;
        xs[(e + 3u) * (BM / 4u) + r / 4u][r % 4u] = v.w;
      }
    }
    for (var i = 0u; i < LW; i++) {
      let q = t + i * WG;
      if (q < BN * KT / 4u) {
        let r = q % BN;
        let e = 4u * (q / BN);
        let v = wr[i];
        ws[e * (BN / 4u) + r / 4u][r % 4u] = v.x;
        ws[(e + 1u) * (BN / 4u) + r / 4u][r % 4u] = v.y;
        ws[(e + 2u) * (BN / 4u) + r / 4u][r % 4u] = v.z;
        ws[(e + 3u) * (BN / 4u) + r / 4u][r % 4u] = v.w;
      }
    }
    workgroupBarrier();
    let next = k0 + KT;
    if (next < k) {
      for (var i = 0u; i < LX; i++) {
        let q = t + i * WG;
        xr[i] = quad_x(row0 + q % BM, next + 4u * (q / BM));
      }
      for (var i = 0u; i < LW; i++) {
        let q = t + i * WG;
        wr[i] = quad_w(col0 + q % BN, next + 4u * (q / BN));
      }
    }
    for (var kk = 0u; kk < BK; kk++) {
      let e = s * BK + kk;
      let a = xs[e * TY + ty];
      let c = ws[e * TX + tx];
      acc0 = fma(vec4(a.x), c, acc0);
      acc1 = fma(vec4(a.y), c, acc1);
      acc2 = fma(vec4(a.z), c, acc2);
      acc3 = fma(vec4(a.w), c, acc3);
    }
  }
  for (var r = 1u; r < KS; r++) {
    workgroupBarrier();
    let p = ty * 4u * TX + tx;
    if (s == r) {
      part[p] = acc0;
      part[p + TX] = acc1;
      part[p + 2u * TX] = acc2;
      part[p + 3u * TX] = acc3;
    }
    workgroupBarrier();
    if (s == 0u) {
      acc0 += part[p];
      acc1 += part[p + TX];
      acc2 += part[p + 2u * TX];
      acc3 += part[p + 3u * TX];
    }
  }
  if (s != 0u) {
    return;
  }
  let c = col0 + tx * 4u;
  var bias = vec4(0.0);
  if (dims.has_bias != 0u) {
    for (var j = 0u; j < 4u; j++) {
      if (c + j < dims.n) {
        bias[j] = b[c + j];
      }
    }
  }
  let accs = array(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {
    let r = row0 + ty * 4u + i;
    if (r < dims.m) {
      let v = accs[i] + bias;
      for (var j = 0u; j < 4u; j++) {
        if (c + j < dims.n) {
          y[r * dims.n + c + j] = activate(v[j], dims.act);
        }
      }
    }
  }
}
