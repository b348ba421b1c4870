//! Pure model maths: no I/O, no JS, no CLI. One file per model; module prefixes spell the
//! tensor names of `model.safetensors`.

pub mod activation;
pub mod attention;
pub mod blip;
pub mod embedding;
pub mod encoder_layer;
pub mod gpt2;
pub mod half;
pub mod idefics3;
pub mod int8;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod norm;
pub mod packed;
pub mod q8;
mod relaxed;
pub mod siglip;
pub mod vision_encoder_decoder;
pub mod vit;

/// max |x| (0 for none; NaN never wins; `f32::max` is a library call per value in WASM), in eight independent lanes so that it vectorizes: the
/// same value as one running comparison, since max is exact.
pub(crate) fn max_abs(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    lanes.iter().copied().chain(rest.iter().map(|v| v.abs())).fold(0f32, |m, a| if a > m { a } else { m })
}

/// True when autograd records operations on any of `ts` (training). candle's fused CPU kernels
/// (softmax, norms, RoPE) and our matrix–vector path have no backward pass, so models take the
/// composed tensor ops then.
pub(crate) fn tracks_grad(ts: &[&candle_core::Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}
