// What linear_rows.wgsl and linear_narrow.wgsl, the products of a decoding step's few rows,
// share: y = act(x·wᵀ (+ b)), x [m, k] with k a multiple of 4, w [n, k] stored as W (the
// prelude's alias), y [m, n]; the workgroups laid out as a grid `groups_x` wide.

struct Dims {
  m: u32,
  n: u32,
  k: u32,
  has_bias: u32,
  act: u32,
  groups_x: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<W>>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> dims: Dims;
