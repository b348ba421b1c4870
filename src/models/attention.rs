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
    if super::packed::FASTER_THAN_GEMM && q.dim(2)? >= MIN_PACKED_QUERIES && !super::tracks_grad(&[q, k, v]) {
        if let Some(out) = packed_attention(q, k, v, scale, mask)? {
            return Ok(out);
        }
    }
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(candle_core::DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = if super::tracks_grad(&[&scores]) {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        super::activation::softmax_last_dim(&scores)?
    };
    probs.to_dtype(v.dtype())?.matmul(v)
}

/// Queries from which attention multiplies with our packed GEMM kernel (the encoder, prefill):
/// packing keys and values per head costs about what one query row's products do, so decoding
/// (one query) keeps candle's matmul.
const MIN_PACKED_QUERIES: usize = 16;

/// `scaled_dot_product` head by head on `super::packed`'s kernel (keys and values packed per
/// head, scores softmaxed in place), the heads over the threads. None where it does not apply:
/// not f32 on the CPU, or a mask other than [Tq, Tk].
fn packed_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (b, h, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    if [q, k, v].iter().any(|t| t.dtype() != candle_core::DType::F32 || !t.device().is_cpu()) || k.dims4()? != (b, h, tk, d) || v.dims4()? != (b, h, tk, d) {
        return Ok(None);
    }
    let mask = match mask {
        None => None,
        Some(m) if m.dims() == [tq, tk] => Some(m.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        Some(_) => return Ok(None),
    };
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (qs, ks, vs) = (flat(q)?, flat(k)?, flat(v)?);
    let scale = scale as f32;
    let heads = crate::parallel::map(b * h, |i| -> Result<Vec<f32>> {
        let err = || candle_core::Error::Msg(format!("attention: head {i} of q {:?}, k/v {:?}", q.dims(), k.dims()));
        let keys = super::packed::PackedWeight::pack(&ks[i * tk * d..(i + 1) * tk * d], tk, d).ok_or_else(err)?;
        let mut scores = keys.matmul(&qs[i * tq * d..(i + 1) * tq * d], None).ok_or_else(err)?;
        match &mask {
            Some(m) => scores.iter_mut().zip(m).for_each(|(s, m)| *s = *s * scale + m),
            None => scores.iter_mut().for_each(|s| *s *= scale),
        }
        super::activation::softmax_rows(&mut scores, tk);
        let values = super::packed::PackedWeight::pack_in_out(&vs[i * tk * d..(i + 1) * tk * d], tk, d).ok_or_else(err)?;
        values.matmul(&scores, None).ok_or_else(err)
    });
    let out = heads.into_iter().collect::<Result<Vec<_>>>()?.concat();
    Ok(Some(Tensor::from_vec(out, (b, h, tq, d), q.device())?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packed_attention_matches_candles() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, tq, tk, d, masked) in [(1, 2, 17, 17, 8, true), (2, 3, 20, 5, 13, false), (1, 1, 16, 40, 64, false)] {
            let q = Tensor::randn(0f32, 1., (b, h, tq, d), &dev)?;
            let k = Tensor::randn(0f32, 1., (b, h, tk, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (b, h, tk, d), &dev)?;
            let mask = masked.then(|| causal_mask(tq, tk - tq, &dev)).transpose()?;
            let ours = packed_attention(&q, &k, &v, 0.3, mask.as_ref())?.expect("f32 on the CPU, a [Tq, Tk] mask");
            let scores = (q.matmul(&k.t()?)? * 0.3)?;
            let scores = match &mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let theirs = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let diff = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "b{b} h{h} tq{tq} tk{tk} d{d}: {diff}");
        }
        Ok(())
    }
}
