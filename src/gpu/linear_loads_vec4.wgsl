// linear.wgsl's loads where k is a multiple of 4: x and w as vec4s, each quad one aligned load
// (measured on an H200: 1.45-1.7x the GFLOP/s of gathering a value at a time).

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<W>>;

// x[r, gk..gk + 4], zeros past the matrix's edges (gk a multiple of 4, as k is).
fn quad_x(r: u32, gk: u32) -> vec4<f32> {
  if (r >= dims.m || gk >= dims.k) {
    return vec4(0.0);
  }
  return x[(r * dims.k + gk) / 4u];
}

// w[r, gk..gk + 4], likewise.
fn quad_w(r: u32, gk: u32) -> vec4<f32> {
  if (r >= dims.n || gk >= dims.k) {
    return vec4(0.0);
  }
  return vec4<f32>(w[(r * dims.k + gk) / 4u]);
}
