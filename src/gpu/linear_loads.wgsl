// linear.wgsl's loads for any k: x as f32s and w as Ws (f32 or f16, the prelude's alias), a
// quad gathered a value at a time.

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<W>;

// x[r, gk..gk + 4], zeros past the matrix's edges.
fn quad_x(r: u32, gk: u32) -> vec4<f32> {
  let m = dims.m;
  let k = dims.k;
  if (r >= m) {
    return vec4(0.0);
  }
  let i = r * k + gk;
  if (gk + 3u < k) {
    return vec4(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
  }
  var v = vec4(0.0);
  for (var j = 0u; j < 4u; j++) {
    if (gk + j < k) {
      v[j] = x[i + j];
    }
  }
  return v;
}

// w[r, gk..gk + 4], likewise.
fn quad_w(r: u32, gk: u32) -> vec4<f32> {
  let n = dims.n;
  let k = dims.k;
  if (r >= n) {
    return vec4(0.0);
  }
  let i = r * k + gk;
  if (gk + 3u < k) {
    return vec4(f32(w[i]), f32(w[i + 1u]), f32(w[i + 2u]), f32(w[i + 3u]));
  }
  var v = vec4(0.0);
  for (var j = 0u; j < 4u; j++) {
    if (gk + j < k) {
      v[j] = f32(w[i + j]);
    }
  }
  return v;
}
