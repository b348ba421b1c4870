//! The model files' [`Backend`] on the GPU: weights uploaded once from the loaded CPU model,
//! every operation one of this module's kernels, activations staying in GPU memory.

use candle_core::{DType, Tensor};
use candle_nn::Activation;

use super::{gpu_error, Gpu, GpuDtype, GpuTensor};
use crate::error::{Error, Result};
use crate::models::backend::{Backend, IntoCandle};
use crate::models::embedding::Embedding;
use crate::models::linear::Linear;
use crate::models::norm::{LayerNorm, RmsNorm};
use crate::models::rope::RotaryEmbedding;

/// A `Linear`'s weight [out, in] and bias in GPU memory: the weight stored as the `Gpu`'s
/// `weights_dtype` (quantized weights widened at upload), the bias as f32.
#[derive(Debug, Clone)]
pub struct GpuLinear {
    weight: GpuTensor,
    bias: Option<GpuTensor>,
}

#[derive(Debug, Clone)]
pub struct GpuLayerNorm {
    weight: GpuTensor,
    bias: GpuTensor,
    eps: f32,
}

#[derive(Debug, Clone)]
pub struct GpuRmsNorm {
    weight: GpuTensor,
    eps: f32,
}

/// The rotary tables of the positions the CPU's keeps, [positions, d / 2]; positions past them
/// are computed by the CPU's when asked for, and uploaded.
#[derive(Debug, Clone)]
pub struct GpuRope {
    cos: GpuTensor,
    sin: GpuTensor,
    cpu: RotaryEmbedding,
}

/// One layer's keys and values so far, [B, capacity, KV·d] each, the first `len` rows of each
/// batch written; grown by doubling (a copy), up to the decoder's positions.
#[derive(Debug)]
pub struct GpuKvCache {
    kv: Option<(GpuTensor, GpuTensor)>,
    len: usize,
    max_positions: usize,
}

/// Positions a cache holds when first written (more only if a prompt needs them).
const FIRST_CAPACITY: usize = 256;

impl IntoCandle for Error {
    fn into_candle(self) -> candle_core::Error {
        candle_core::Error::wrap(self)
    }
}

impl Backend for Gpu {
    type Tensor = GpuTensor;
    type Linear = GpuLinear;
    type LayerNorm = GpuLayerNorm;
    type RmsNorm = GpuRmsNorm;
    type Embedding = GpuTensor;
    type Rope = GpuRope;
    /// [B, N, KV·d] each.
    type Kv = (GpuTensor, GpuTensor);
    type KvCache = GpuKvCache;
    type Error = Error;

    fn linear(&self, xs: &GpuTensor, layer: &GpuLinear, act: Option<&Activation>) -> Result<GpuTensor> {
        self.linear_activated(xs, &layer.weight, layer.bias.as_ref(), act)
    }

    fn layer_norm(&self, xs: &GpuTensor, norm: &GpuLayerNorm) -> Result<GpuTensor> {
        Gpu::layer_norm(self, xs, &norm.weight, &norm.bias, norm.eps)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        Gpu::add(self, a, b)
    }

    fn cat_tokens(&self, parts: &[&GpuTensor]) -> Result<GpuTensor> {
        Gpu::cat_tokens(self, parts)
    }

    fn self_attention(&self, q: &GpuTensor, k: &GpuTensor, v: &GpuTensor, heads: usize) -> Result<GpuTensor> {
        let d = q.shape().last().copied().unwrap_or(0) / heads.max(1);
        self.attention(q, k, v, (heads, heads), 1.0 / (d.max(1) as f32).sqrt(), None)
    }

    fn rms_norm(&self, xs: &GpuTensor, norm: &GpuRmsNorm) -> Result<GpuTensor> {
        Gpu::rms_norm(self, xs, &norm.weight, norm.eps)
    }

    fn split_last<const N: usize>(&self, xs: &GpuTensor) -> Result<[GpuTensor; N]> {
        let width = xs.shape().last().copied().unwrap_or(0) / N;
        let parts = (0..N).map(|i| self.columns(xs, i * width, width)).collect::<Result<Vec<_>>>()?;
        parts.try_into().map_err(|_| gpu_error("split_last: parts lost"))
    }

    fn mul(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        Gpu::mul(self, a, b)
    }

    fn embed(&self, table: &GpuTensor, ids: &[u32], rows: usize) -> Result<GpuTensor> {
        let width = table.shape().last().copied().unwrap_or(0);
        self.gather_rows(table, ids)?.reshape(&[rows, ids.len().checked_div(rows).unwrap_or(0), width])
    }

    fn last_position(&self, xs: &GpuTensor) -> Result<GpuTensor> {
        let &[b, t, d] = xs.shape() else { return Err(gpu_error(format!("last_position: {:?} (expected [B, T, D])", xs.shape()))) };
        if t == 1 {
            return xs.reshape(&[b, d]);
        }
        let rows: Vec<u32> = (0..b).map(|i| (i * t + t - 1) as u32).collect();
        self.gather_rows(&xs.reshape(&[b * t, d])?, &rows)
    }

    fn rope(&self, xs: &GpuTensor, heads: usize, rope: &GpuRope, offset: usize) -> Result<GpuTensor> {
        let t = xs.shape().get(1).copied().unwrap_or(0);
        if offset + t <= rope.cos.shape()[0] {
            return Gpu::rope(self, xs, heads, &rope.cos, &rope.sin, offset);
        }
        let (cos, sin) = rope.cpu.angles(offset, t)?;
        Gpu::rope(self, xs, heads, &self.tensor_from(&cos)?, &self.tensor_from(&sin)?, 0)
    }

    fn kv(&self, k: &GpuTensor, v: &GpuTensor, _kv_heads: usize) -> Result<(GpuTensor, GpuTensor)> {
        Ok((k.clone(), v.clone()))
    }

    fn attention(&self, q: &GpuTensor, (k, v): &(GpuTensor, GpuTensor), heads: (usize, usize), scale: f64) -> Result<GpuTensor> {
        Gpu::attention(self, q, k, v, heads, scale as f32, None)
    }

    fn new_kv_cache(&self, max_positions: usize) -> GpuKvCache {
        GpuKvCache { kv: None, len: 0, max_positions }
    }

    fn kv_cache_len(&self, cache: &GpuKvCache) -> usize {
        cache.len
    }

    fn causal_attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        cache: Option<&mut GpuKvCache>,
        heads: (usize, usize),
        scale: f64,
    ) -> Result<GpuTensor> {
        let Some(cache) = cache else { return Gpu::attention(self, q, k, v, heads, scale as f32, Some(0)) };
        let &[b, t, w] = k.shape() else { return Err(gpu_error(format!("causal_attention: keys {:?} (expected [B, T, W])", k.shape()))) };
        let (past, needed) = (cache.len, cache.len + t);
        if needed > cache.max_positions {
            return Err(gpu_error(format!("causal_attention: {needed} positions, past the decoder's {}", cache.max_positions)));
        }
        let capacity = cache.kv.as_ref().map_or(0, |(k, _)| k.shape()[1]);
        if needed > capacity {
            let grown = needed.max(FIRST_CAPACITY).max(2 * capacity).next_power_of_two().min(cache.max_positions);
            let (gk, gv) = (self.uninit(&[b, grown, w])?, self.uninit(&[b, grown, w])?);
            if let Some((ok, ov)) = &cache.kv {
                self.write_rows(ok, past, &gk, 0)?;
                self.write_rows(ov, past, &gv, 0)?;
            }
            cache.kv = Some((gk, gv));
        }
        let Some((ck, cv)) = &cache.kv else { return Err(gpu_error("causal_attention: no cache")) };
        if ck.shape()[0] != b {
            return Err(gpu_error(format!("causal_attention: {b} rows for a cache of {}", ck.shape()[0])));
        }
        self.write_rows(k, t, ck, past)?;
        self.write_rows(v, t, cv, past)?;
        cache.len = needed;
        self.attention_first(q, ck, cv, needed, heads, scale as f32, Some(past))
    }

    fn cached_bytes(&self, caches: &[GpuKvCache], cross: &[(GpuTensor, GpuTensor)]) -> usize {
        let cached = caches.iter().filter_map(|c| c.kv.as_ref().map(|(k, _)| 2 * 4 * k.shape()[0] * c.len * k.shape()[2]));
        cached.sum::<usize>() + cross.iter().map(|(k, _)| 2 * 4 * k.shape().iter().product::<usize>()).sum::<usize>()
    }

    fn select_kv(&self, (k, v): &(GpuTensor, GpuTensor), rows: &[usize]) -> Result<(GpuTensor, GpuTensor)> {
        Ok((self.batch_rows(k, rows)?, self.batch_rows(v, rows)?))
    }

    fn select_kv_cache(&self, cache: &GpuKvCache, rows: &[usize]) -> Result<GpuKvCache> {
        let kv = match &cache.kv {
            Some((k, v)) => Some((self.batch_rows(k, rows)?, self.batch_rows(v, rows)?)),
            None => None,
        };
        Ok(GpuKvCache { kv, len: cache.len, max_positions: cache.max_positions })
    }

    /// One part, all tokens: the GPU's parallelism is within each kernel.
    fn by_tokens<const N: usize, F>(&self, inputs: &[&GpuTensor], f: F) -> Result<[GpuTensor; N]>
    where
        F: Fn(&[&GpuTensor]) -> Result<[GpuTensor; N]> + Sync + Send,
    {
        f(inputs)
    }

    fn tensor_from(&self, t: &Tensor) -> Result<GpuTensor> {
        self.upload_tensor(t, GpuDtype::F32)
    }

    fn linear_from(&self, layer: &Linear) -> Result<GpuLinear> {
        Ok(GpuLinear {
            weight: self.upload_tensor(&layer.weight_f32()?, self.weights_dtype())?,
            bias: layer.bias().map(|b| self.tensor_from(b)).transpose()?,
        })
    }

    fn layer_norm_from(&self, norm: &LayerNorm) -> Result<GpuLayerNorm> {
        let (weight, bias, eps) = norm.parts();
        Ok(GpuLayerNorm { weight: self.tensor_from(weight)?, bias: self.tensor_from(bias)?, eps })
    }

    fn rms_norm_from(&self, norm: &RmsNorm) -> Result<GpuRmsNorm> {
        let (weight, eps) = norm.parts();
        Ok(GpuRmsNorm { weight: self.tensor_from(weight)?, eps })
    }

    fn embedding_from(&self, table: &Embedding) -> Result<GpuTensor> {
        self.upload_tensor(table.embeddings(), self.weights_dtype())
    }

    fn tied_linear(&self, table: &GpuTensor) -> Result<GpuLinear> {
        Ok(GpuLinear { weight: table.clone(), bias: None })
    }

    fn rope_from(&self, rope: &RotaryEmbedding) -> Result<GpuRope> {
        let (cos, sin) = rope.table();
        Ok(GpuRope { cos: self.tensor_from(cos)?, sin: self.tensor_from(sin)?, cpu: rope.clone() })
    }
}

impl Gpu {
    fn upload_tensor(&self, t: &Tensor, dtype: GpuDtype) -> Result<GpuTensor> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.upload_as(&values, t.dims(), dtype)
    }

    /// Batch entries `rows` (in that order, repeats allowed) of x [B, ..] → [rows.len(), ..].
    fn batch_rows(&self, x: &GpuTensor, rows: &[usize]) -> Result<GpuTensor> {
        let Some((&b, rest)) = x.shape().split_first() else { return Err(gpu_error("batch_rows: a scalar")) };
        let width: usize = rest.iter().product();
        let ids = rows.iter().map(|&r| if r < b { Ok(r as u32) } else { Err(gpu_error(format!("batch_rows: row {r} of {b}"))) });
        let gathered = self.gather_rows(&x.reshape(&[b, width])?, &ids.collect::<Result<Vec<_>>>()?)?;
        gathered.reshape(&[&[rows.len()], rest].concat())
    }
}
