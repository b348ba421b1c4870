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
use super::embedding::Embedding;
use super::linear::Linear;
use super::norm::{LayerNorm, RmsNorm};
use super::rope::RotaryEmbedding;

/// Weights are shared by the threads a layer's tokens are split over (`by_tokens`).
pub trait Backend: Sync {
    /// Activations: [B, T, features].
    type Tensor: Clone + std::fmt::Debug;
    type Linear: Clone + std::fmt::Debug + Send + Sync;
    type LayerNorm: Clone + std::fmt::Debug + Send + Sync;
    type RmsNorm: Clone + std::fmt::Debug + Send + Sync;
    /// A table of rows looked up by id (tokens, positions).
    type Embedding: Clone + std::fmt::Debug + Send + Sync;
    /// A rotary embedding's angles.
    type Rope: Clone + std::fmt::Debug + Send + Sync;
    /// Keys and values that every query reads (an image's, for cross-attention).
    type Kv: Clone + std::fmt::Debug + Send + Sync;
    /// One layer's self-attention keys and values of the positions decoded so far.
    type KvCache: std::fmt::Debug + Send + Sync;
    type Error: From<candle_core::Error> + IntoCandle;

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
    fn rms_norm(&self, xs: &Self::Tensor, norm: &Self::RmsNorm) -> Result<Self::Tensor, Self::Error>;
    /// The last dimension cut into N equal parts (a fused projection's outputs).
    fn split_last<const N: usize>(&self, xs: &Self::Tensor) -> Result<[Self::Tensor; N], Self::Error>;
    /// a · b, elementwise (one shape).
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor, Self::Error>;
    /// The rows `ids` of `table` as [rows, ids / rows, width] (`rows` sequences of ids, one
    /// after another).
    fn embed(&self, table: &Self::Embedding, ids: &[u32], rows: usize) -> Result<Self::Tensor, Self::Error>;
    /// [B, T, D] → [B, D] of the last position.
    fn last_position(&self, xs: &Self::Tensor) -> Result<Self::Tensor, Self::Error>;
    /// `xs` [B, T, H·d] rotated as positions `offset..offset + T` (HF Llama's rotate-half).
    fn rope(&self, xs: &Self::Tensor, heads: usize, rope: &Self::Rope, offset: usize) -> Result<Self::Tensor, Self::Error>;
    /// Keys and values [B, N, KV·d] (projections' outputs) as attention reads them.
    fn kv(&self, k: &Self::Tensor, v: &Self::Tensor, kv_heads: usize) -> Result<Self::Kv, Self::Error>;
    /// softmax(q·kᵀ·scale)·v of q [B, T, H·d] over all of `kv`'s positions; `heads` (query,
    /// key/value).
    fn attention(&self, q: &Self::Tensor, kv: &Self::Kv, heads: (usize, usize), scale: f64) -> Result<Self::Tensor, Self::Error>;
    /// A cache for up to `max_positions` positions.
    fn new_kv_cache(&self, max_positions: usize) -> Self::KvCache;
    fn kv_cache_len(&self, cache: &Self::KvCache) -> usize;
    /// Causal self-attention of T new positions: k and v [B, T, KV·d] appended to `cache`
    /// (none: training on whole sequences), each query reading the cached positions and the
    /// new ones up to its own.
    fn causal_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: Option<&mut Self::KvCache>,
        heads: (usize, usize),
        scale: f64,
    ) -> Result<Self::Tensor, Self::Error>;
    /// Bytes of the keys and values a decoding step attends over: the positions cached so far
    /// in `caches` and the cross-attention pairs `cross` (an image's positions).
    fn cached_bytes(&self, caches: &[Self::KvCache], cross: &[Self::Kv]) -> usize;
    /// Batch rows `rows` (in that order, repeats allowed) of `kv`.
    fn select_kv(&self, kv: &Self::Kv, rows: &[usize]) -> Result<Self::Kv, Self::Error>;
    /// Batch rows `rows` of `cache`, sharing no storage with it (caches are written in place).
    fn select_kv_cache(&self, cache: &Self::KvCache, rows: &[usize]) -> Result<Self::KvCache, Self::Error>;
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
    fn rms_norm_from(&self, norm: &RmsNorm) -> Result<Self::RmsNorm, Self::Error>;
    fn embedding_from(&self, table: &Embedding) -> Result<Self::Embedding, Self::Error>;
    /// An LM head that is `table` (tied), sharing its memory.
    fn tied_linear(&self, table: &Self::Embedding) -> Result<Self::Linear, Self::Error>;
    fn rope_from(&self, rope: &RotaryEmbedding) -> Result<Self::Rope, Self::Error>;
}

/// A backend's error as candle's, which the decoding states' seam (`DecodeState`) speaks.
pub trait IntoCandle {
    fn into_candle(self) -> candle_core::Error;
}

impl IntoCandle for candle_core::Error {
    fn into_candle(self) -> candle_core::Error {
        self
    }
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
    type RmsNorm = RmsNorm;
    type Embedding = Embedding;
    type Rope = RotaryEmbedding;
    /// [B, KV, N, d] each.
    type Kv = (Tensor, Tensor);
    type KvCache = candle_nn::kv_cache::KvCache;
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

    fn rms_norm(&self, xs: &Tensor, norm: &RmsNorm) -> candle_core::Result<Tensor> {
        norm.forward(xs)
    }

    fn split_last<const N: usize>(&self, xs: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let width = xs.dim(D::Minus1)? / N;
        let parts = (0..N).map(|i| xs.narrow(D::Minus1, i * width, width)).collect::<candle_core::Result<Vec<_>>>()?;
        parts.try_into().map_err(|_| candle_core::Error::Msg("split_last: parts lost".into()))
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        a * b
    }

    fn embed(&self, table: &Embedding, ids: &[u32], rows: usize) -> candle_core::Result<Tensor> {
        let ids = Tensor::from_vec(ids.to_vec(), (rows, ids.len().checked_div(rows).unwrap_or(0)), table.embeddings().device())?;
        table.forward(&ids)
    }

    fn last_position(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let t = xs.dim(1)?;
        xs.narrow(1, t.saturating_sub(1), 1)?.squeeze(1)
    }

    fn rope(&self, xs: &Tensor, heads: usize, rope: &RotaryEmbedding, offset: usize) -> candle_core::Result<Tensor> {
        attention::merge_heads(&rope.apply(&attention::split_heads(xs, heads)?, offset)?)
    }

    fn kv(&self, k: &Tensor, v: &Tensor, kv_heads: usize) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((attention::split_heads(k, kv_heads)?, attention::split_heads(v, kv_heads)?))
    }

    fn attention(&self, q: &Tensor, (k, v): &(Tensor, Tensor), heads: (usize, usize), scale: f64) -> candle_core::Result<Tensor> {
        attention::merge_heads(&attention::scaled_dot_product(&attention::split_heads(q, heads.0)?, k, v, scale, None)?)
    }

    fn new_kv_cache(&self, max_positions: usize) -> candle_nn::kv_cache::KvCache {
        candle_nn::kv_cache::KvCache::new(2, max_positions.clamp(1, attention::CACHE_CHUNK))
    }

    fn kv_cache_len(&self, cache: &candle_nn::kv_cache::KvCache) -> usize {
        cache.current_seq_len()
    }

    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
        (heads, kv_heads): (usize, usize),
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let q = attention::split_heads(q, heads)?;
        let (k, v) = (attention::split_heads(k, kv_heads)?, attention::split_heads(v, kv_heads)?);
        let past = cache.as_ref().map_or(0, |c| c.current_seq_len());
        let t = q.dim(2)?;
        let (k, v) = attention::append_kv(cache, &k, &v)?;
        let mask = if t > 1 { Some(attention::causal_mask(t, past, q.device())?) } else { None };
        attention::merge_heads(&attention::scaled_dot_product(&q, &k, &v, scale, mask.as_ref())?)
    }

    fn cached_bytes(&self, caches: &[candle_nn::kv_cache::KvCache], cross: &[(Tensor, Tensor)]) -> usize {
        attention::cached_bytes(caches, cross)
    }

    fn select_kv(&self, (k, v): &(Tensor, Tensor), rows: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let index = attention::row_index(rows, k.device())?;
        Ok((k.contiguous()?.index_select(&index, 0)?, v.contiguous()?.index_select(&index, 0)?))
    }

    fn select_kv_cache(&self, cache: &candle_nn::kv_cache::KvCache, rows: &[usize]) -> candle_core::Result<candle_nn::kv_cache::KvCache> {
        attention::select_kv(cache, &attention::row_index(rows, &candle_core::Device::Cpu)?)
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

    fn rms_norm_from(&self, norm: &RmsNorm) -> candle_core::Result<RmsNorm> {
        Ok(norm.clone())
    }

    fn embedding_from(&self, table: &Embedding) -> candle_core::Result<Embedding> {
        Ok(table.clone())
    }

    fn tied_linear(&self, table: &Embedding) -> candle_core::Result<Linear> {
        Ok(Linear::tied(table))
    }

    fn rope_from(&self, rope: &RotaryEmbedding) -> candle_core::Result<RotaryEmbedding> {
        Ok(rope.clone())
    }
}
