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

/// True when autograd records operations on any of `ts` (training). candle's fused CPU kernels
/// (softmax, norms, RoPE) and our matrix–vector path have no backward pass, so models take the
/// composed tensor ops then.
pub(crate) fn tracks_grad(ts: &[&candle_core::Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}
