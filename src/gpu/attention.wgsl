// softmax(q·kᵀ·scale (+ causal mask))·v for every query row: q and y [B, Tq, H·d], k and v
// [B, Tk, KV·d] (a projection's output, heads side by side), query head h reading key/value
// head h / (H / KV) (grouped-query attention). With `causal` set, query i sees keys
// 0..=past + i. One invocation per (batch, head, query), the softmax online (a running maximum
// and sum, the partial output rescaled as the maximum grows): one pass over keys and values.

struct Params {
  batch: u32,
  tq: u32,
  tk: u32,
  heads: u32,
  kv_heads: u32,
  d: u32,
  scale: f32,
  causal: u32,
  past: u32,
  row: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

const MAX_D: u32 = 256u;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let p = params;
  let index = id.y * p.row + id.x;
  if (index >= p.batch * p.heads * p.tq) {
    return;
  }
  let i = index % p.tq;
  let h = (index / p.tq) % p.heads;
  let bi = index / (p.tq * p.heads);
  let g = h / (p.heads / p.kv_heads);
  let qo = (bi * p.tq + i) * p.heads * p.d + h * p.d;
  var keys = p.tk;
  if (p.causal != 0u) {
    keys = min(p.tk, p.past + i + 1u);
  }
  var acc: array<f32, 256>;
  for (var c = 0u; c < p.d; c++) {
    acc[c] = 0.0;
  }
  var m = -3.0e38;
  var l = 0.0;
  for (var j = 0u; j < keys; j++) {
    let ko = (bi * p.tk + j) * p.kv_heads * p.d + g * p.d;
    var s = 0.0;
    for (var c = 0u; c < p.d; c++) {
      s += q[qo + c] * k[ko + c];
    }
    s *= p.scale;
    let m_new = max(m, s);
    let correction = exp(m - m_new);
    let e = exp(s - m_new);
    l = l * correction + e;
    for (var c = 0u; c < p.d; c++) {
      acc[c] = acc[c] * correction + e * v[ko + c];
    }
    m = m_new;
  }
  for (var c = 0u; c < p.d; c++) {
    y[qo + c] = acc[c] / l;
  }
}
