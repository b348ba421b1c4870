// y[r] = x[index[r]], rows of `width` values: a tensor's rows in another order (SmolVLM's pixel
// shuffle), or a table's rows by id (token embeddings; W, the prelude's alias, is f16 where the
// table is stored so). A workgroup per output row.

struct Params {
  rows: u32,
  width: u32,
  groups_x: u32,
}

@group(0) @binding(0) var<storage, read> x: array<W>;
@group(0) @binding(1) var<storage, read> index: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let r = wg.y * params.groups_x + wg.x;
  if (r >= params.rows) {
    return;
  }
  let at = index[r] * params.width;
  for (var c = t; c < params.width; c += 256u) {
    y[r * params.width + c] = f32(x[at + c]);
  }
}
