// softmax(q·kᵀ·scale (+ causal mask))·v for every query row: q and y [B, Tq, H·d], k and v
// [B, Tk, KV·d] (a projection's output, heads side by side; a cache's first Tk of `kv_rows`
// rows per batch), query head h reading key/value head h / (H / KV) (grouped-query attention). With `causal` set, query i sees keys
// 0..=past + i.
//
// A workgroup per (batch, query, head): an invocation per query starved the GPU (SigLIP-B's
// 12 × 196 queries are 37 workgroups) and walked all keys alone. Here the 64 invocations score
// a chunk of keys side by side, share the chunk's maximum and sum through workgroup memory,
// and each owns output columns c ≡ its index (mod 64). Chunks of keys keep the scores in
// workgroup memory for any cache length, the softmax running across chunks (a running maximum
// and sum, the partial output rescaled as the maximum grows).

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
  groups_x: u32,
  kv_rows: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

const WG: u32 = 64u;
const CHUNK: u32 = 256u;
// Columns per invocation: d ≤ 256.
const COLS: u32 = 4u;

var<workgroup> qs: array<f32, 256>;
var<workgroup> scores: array<f32, CHUNK>;
var<workgroup> partial: array<f32, WG>;

// The workgroup's maximum (max) or sum of `value`, in every invocation.
fn reduce(t: u32, value: f32, is_max: bool) -> f32 {
  partial[t] = value;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (t < s) {
      let other = partial[t + s];
      partial[t] = select(partial[t] + other, max(partial[t], other), is_max);
    }
    workgroupBarrier();
  }
  let total = partial[0];
  workgroupBarrier();
  return total;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let p = params;
  let row = wg.y * p.groups_x + wg.x;
  if (row >= p.batch * p.tq * p.heads) {
    return;
  }
  let h = row % p.heads;
  let bi = row / p.heads;
  let i = bi % p.tq;
  let b = bi / p.tq;
  let g = h / (p.heads / p.kv_heads);
  let qo = bi * p.heads * p.d + h * p.d;
  let kv_row = p.kv_heads * p.d;
  var keys = p.tk;
  if (p.causal != 0u) {
    keys = min(p.tk, p.past + i + 1u);
  }
  for (var c = t; c < p.d; c += WG) {
    qs[c] = q[qo + c];
  }
  workgroupBarrier();
  var m = -3.0e38;
  var l = 0.0;
  var acc = array<f32, COLS>(0.0, 0.0, 0.0, 0.0);
  for (var start = 0u; start < keys; start += CHUNK) {
    let n = min(CHUNK, keys - start);
    var local_max = -3.0e38;
    for (var j = t; j < n; j += WG) {
      let ko = (b * p.kv_rows + start + j) * kv_row + g * p.d;
      var s = 0.0;
      for (var c = 0u; c < p.d; c++) {
        s += qs[c] * k[ko + c];
      }
      s *= p.scale;
      scores[j] = s;
      local_max = max(local_max, s);
    }
    let m_new = max(m, reduce(t, local_max, true));
    var local_sum = 0.0;
    for (var j = t; j < n; j += WG) {
      let e = exp(scores[j] - m_new);
      scores[j] = e;
      local_sum += e;
    }
    let correction = exp(m - m_new);
    // reduce's barriers also publish the exponentials written above.
    l = l * correction + reduce(t, local_sum, false);
    m = m_new;
    let vo = (b * p.kv_rows + start) * kv_row + g * p.d;
    for (var r = 0u; r < COLS; r++) {
      let c = t + r * WG;
      if (c < p.d) {
        var a = acc[r] * correction;
        for (var j = 0u; j < n; j++) {
          a += scores[j] * v[vo + j * kv_row + c];
        }
        acc[r] = a;
      }
    }
    workgroupBarrier();
  }
  for (var r = 0u; r < COLS; r++) {
    let c = t + r * WG;
    if (c < p.d) {
      y[qo + c] = acc[r] / l;
    }
  }
}
