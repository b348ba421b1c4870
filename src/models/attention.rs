//! The multi-head attention arithmetic shared by every model file: SigLIP, GPT-2 (self and
//! cross) and Llama differ in projections and caching, not in this.

use candle_core::{Result, Tensor};

/// [B, T, H·d] → [B, H, T, d]
pub fn split_heads(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, t, hd) = xs.dims3()?;
    xs.reshape((b, t, num_heads, hd / num_heads))?.transpose(1, 2)?.contiguous()
}

/// [B, H, T, d] → [B, T, H·d]
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, t, h * d))
}

/// softmax(q·kᵀ·scale + mask)·v with q [B, H, Tq, d], k and v [B, H, Tk, d]; `mask` (f32) is
/// added to the scores (0 or -inf), broadcast over batch and heads. Scores of a lower precision
/// (bf16 training) are taken to f32 for the mask and the softmax, as PyTorch's autocast does.
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(candle_core::DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = if super::tracks_grad(&[&scores]) {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs.to_dtype(v.dtype())?.matmul(v)
}

/// Appends k/v [B, H, T, d] to `cache` and returns everything cached; without a cache (training
/// on whole sequences) they are used as they are, which keeps them in the autograd graph.
pub fn append_kv(cache: Option<&mut candle_nn::kv_cache::KvCache>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    match cache {
        Some(cache) => cache.append(k, v),
        None => Ok((k.clone(), v.clone())),
    }
}

/// Additive causal mask for `t` new positions that follow `past` cached ones: [t, past + t].
pub fn causal_mask(t: usize, past: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, past + t), device)
}

/// The batch rows `rows` of a KV cache (in that order, repeats allowed: beams continuing one
/// parent), in fresh storage — candle's `KvCache` writes new positions in place, so caches that
/// diverge must not share buffers.
pub fn select_kv(cache: &candle_nn::kv_cache::KvCache, rows: &Tensor) -> Result<candle_nn::kv_cache::KvCache> {
    let mut copy = candle_nn::kv_cache::KvCache::new(2, cache.k_cache().max_seq_len());
    if let (Some(k), Some(v)) = (cache.k()?, cache.v()?) {
        copy.append(&k.contiguous()?.index_select(rows, 0)?, &v.contiguous()?.index_select(rows, 0)?)?;
    }
    Ok(copy)
}

/// `rows` as the index tensor `select_kv` and friends take.
pub fn row_index(rows: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), device)
}
