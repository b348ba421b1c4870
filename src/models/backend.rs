//! Where a model's operations run. The model files write a layer once against [`Backend`]; each
//! backend holds the weights in its own form and runs the operations its own way: [`Cpu`] is
//! candle's tensors with our kernels under `Linear` (WASM SIMD, the threads splitting the
//! tokens), `crate::gpu::Gpu` the WGSL kernels on WebGPU / Vulkan (feature `webgpu`).
//!
//! A backend's weights come from the loaded CPU model ([`Backend::linear_from`] and friends),
//! so loading, checkpoints' names and quantization stay in one place.

use candle_core::{Module, Tensor, D};
use candle_nn::Activation;

use super::attention;
use super::linear::Linear;
use super::norm::LayerNorm;

/// Weights are shared by the threads a layer's tokens are split over (`by_tokens`).
pub trait Backend: Sync {
    /// Activations: [B, T, features].
    type Tensor: Clone + std::fmt::Debug;
    type Linear: Clone + std::fmt::Debug + Send + Sync;
    type LayerNorm: Clone + std::fmt::Debug + Send + Sync;
    type Error: From<candle_core::Error>;

    /// `act(xs·wᵀ + b)` over the last dimension.
    fn linear(&self, xs: &Self::Tensor, layer: &Self::Linear, act: Option<&Activation>) -> Result<Self::Tensor, Self::Error>;
    fn layer_norm(&self, xs: &Self::Tensor, norm: &Self::LayerNorm) -> Result<Self::Tensor, Self::Error>;
    /// a + b, b repeated over a's leading dimensions (b's shape a trailing part of a's).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor, Self::Error>;
    /// Parts [1 or B, Tᵢ, D] joined along the tokens, a part of one row repeated for every
    /// image (a class token before the patches).
    fn cat_tokens(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor, Self::Error>;
    /// Every token's softmax(q·kᵀ/√d)·v over all tokens, per head: q, k and v [B, T, H·d] as
    /// the projections give them → [B, T, H·d].
    fn self_attention(&self, q: &Self::Tensor, k: &Self::Tensor, v: &Self::Tensor, heads: usize) -> Result<Self::Tensor, Self::Error>;
    /// `f` of the token rows (dimension 1) of `inputs`, all of one length: on the CPU in parts
    /// split over the threads and joined again, elsewhere at once. For the parts of a layer
    /// that are per token.
    fn by_tokens<const N: usize, F>(&self, inputs: &[&Self::Tensor], f: F) -> Result<[Self::Tensor; N], Self::Error>
    where
        F: Fn(&[&Self::Tensor]) -> Result<[Self::Tensor; N], Self::Error> + Sync + Send;

    /// A tensor of the CPU (pixels, a table of the loaded model) where this backend computes.
    fn tensor_from(&self, t: &Tensor) -> Result<Self::Tensor, Self::Error>;
    fn linear_from(&self, layer: &Linear) -> Result<Self::Linear, Self::Error>;
    fn layer_norm_from(&self, norm: &LayerNorm) -> Result<Self::LayerNorm, Self::Error>;
}

/// candle on the CPU: the backend every model is loaded into.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// Tokens below which a part is not split off to another thread.
const MIN_TOKENS_PER_THREAD: usize = 16;

impl Backend for Cpu {
    type Tensor = Tensor;
    type Linear = Linear;
    type LayerNorm = LayerNorm;
    type Error = candle_core::Error;

    fn linear(&self, xs: &Tensor, layer: &Linear, act: Option<&Activation>) -> candle_core::Result<Tensor> {
        match act {
            Some(act) => layer.forward_activated(xs, act),
            None => layer.forward(xs),
        }
    }

    fn layer_norm(&self, xs: &Tensor, norm: &LayerNorm) -> candle_core::Result<Tensor> {
        norm.forward(xs)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        a.broadcast_add(b)
    }

    fn cat_tokens(&self, parts: &[&Tensor]) -> candle_core::Result<Tensor> {
        let batch = parts.iter().map(|p| p.dim(0)).collect::<candle_core::Result<Vec<_>>>()?.into_iter().max().unwrap_or(1);
        let parts = parts.iter().map(|p| p.broadcast_as((batch, p.dim(1)?, p.dim(2)?))).collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    fn self_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let split = |t| attention::split_heads_view(t, heads);
        let q = split(q)?;
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        attention::merge_heads(&attention::scaled_dot_product(&q, &split(k)?, &split(v)?, scale, None)?)
    }

    fn by_tokens<const N: usize, F>(&self, inputs: &[&Tensor], f: F) -> candle_core::Result<[Tensor; N]>
    where
        F: Fn(&[&Tensor]) -> candle_core::Result<[Tensor; N]> + Sync + Send,
    {
        let Some(first) = inputs.first() else { return f(inputs) };
        let parts = crate::parallel::map_parts(first.dim(1)?, MIN_TOKENS_PER_THREAD, |r| {
            let narrowed = inputs.iter().map(|t| t.narrow(1, r.start, r.len())).collect::<candle_core::Result<Vec<_>>>()?;
            f(&narrowed.iter().collect::<Vec<_>>())
        })?;
        let mut joined: [Vec<Tensor>; N] = std::array::from_fn(|_| Vec::with_capacity(parts.len()));
        for part in parts {
            for (all, t) in joined.iter_mut().zip(part) {
                all.push(t);
            }
        }
        let mut out = Vec::with_capacity(N);
        for parts in joined {
            out.push(crate::parallel::cat(parts, 1)?);
        }
        out.try_into().map_err(|_| candle_core::Error::Msg("by_tokens: outputs lost".into()))
    }

    fn tensor_from(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        Ok(t.clone())
    }

    fn linear_from(&self, layer: &Linear) -> candle_core::Result<Linear> {
        Ok(layer.clone())
    }

    fn layer_norm_from(&self, norm: &LayerNorm) -> candle_core::Result<LayerNorm> {
        Ok(norm.clone())
    }
}
