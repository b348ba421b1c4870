//! The multi-head attention arithmetic shared by every model file: SigLIP, GPT-2 (self and
//! cross) and Llama differ in projections and caching, not in this.

use candle_core::{Result, Storage, Tensor};

use super::packed::PackedWeight;

/// [B, T, H·d] → [B, H, T, d]
pub fn split_heads(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    split_heads_view(xs, num_heads)?.contiguous()
}

/// [B, T, H·d] → [B, H, T, d] as a view of `xs` (heads' rows H·d apart), for attention that
/// reads them where they lie (`scaled_dot_product` in WASM; elsewhere it copies).
pub fn split_heads_view(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, t, hd) = xs.dims3()?;
    xs.reshape((b, t, num_heads, hd / num_heads))?.transpose(1, 2)
}

/// [B, H, T, d] → [B, T, H·d]
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, t, h * d))
}

/// softmax(q·kᵀ·scale + mask)·v with q [B, H, Tq, d], k and v [B, KV, Tk, d] where KV divides
/// H: query head h reads key/value head h / (H / KV) (grouped-query attention; KV = H
/// otherwise). `mask` (f32) is added to the scores (0 or -inf), broadcast over batch and heads.
/// Scores of a lower precision (bf16 training) are taken to f32 for the mask and the softmax,
/// as PyTorch's autocast does.
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let inference = !super::tracks_grad(&[q, k, v]);
    if inference && q.dim(2)? < MIN_PACKED_QUERIES {
        if let Some(out) = few_queries_attention(q, k, v, scale, mask)? {
            return Ok(out);
        }
    }
    let groups = q.dim(1)? / k.dim(1)?.max(1);
    let (k, v) = (&repeat_kv(k, groups)?, &repeat_kv(v, groups)?);
    if super::packed::FASTER_THAN_GEMM && q.dim(2)? >= MIN_PACKED_QUERIES && inference {
        if let Some(out) = packed_attention(q, k, v, scale, mask)? {
            return Ok(out);
        }
    }
    // candle's matmul takes no view of heads H·d apart (split_heads_view).
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
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

/// [B, KV, T, d] → [B, KV·groups, T, d], each key/value head shared by `groups` query heads.
fn repeat_kv(xs: &Tensor, groups: usize) -> Result<Tensor> {
    if groups <= 1 {
        return Ok(xs.clone());
    }
    let (b, kv, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?.expand((b, kv, groups, t, d))?.reshape((b, kv * groups, t, d))
}

/// `scaled_dot_product` for a few queries (decoding), read straight from the keys' and values'
/// storage: the cache's views are strided (a window of preallocated buffers), and going through
/// candle would copy every cached position (three times over, for SmolLM's shared heads) and
/// run two tiny matmuls per head, each step. None where it does not apply: not f32 on the CPU,
/// a head's positions not consecutive rows, or a mask other than [Tq, Tk].
fn few_queries_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (b, h, tq, d) = q.dims4()?;
    let (kb, kv, tk, kd) = k.dims4()?;
    if !f32_on_cpu(&[q, k, v]) || (kb, kd) != (b, d) || v.dims4()? != (b, kv, tk, d) || kv == 0 || h % kv != 0 || tk == 0 {
        return Ok(None);
    }
    let Some(mask) = mask_values(mask, tq, tk)? else { return Ok(None) };
    let qs = q.flatten_all()?.to_vec1::<f32>()?;
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Storage::Cpu(k_cpu), Storage::Cpu(v_cpu)) = (&*k_storage, &*v_storage) else { return Ok(None) };
    let (ks, vs) = (k_cpu.as_slice::<f32>()?, v_cpu.as_slice::<f32>()?);
    // Each (batch, key/value head) must hold its positions as consecutive rows of d (a KV
    // cache's buffer [B, KV, max, d] narrowed to the first tk positions).
    let consecutive = |layout, len| row_layout(layout, len).filter(|at| at[3] == d);
    let (Some(k_at), Some(v_at)) = (consecutive(k_layout, ks.len()), consecutive(v_layout, vs.len())) else { return Ok(None) };
    let (groups, scale) = (h / kv, scale as f32);
    let mut out = vec![0f32; b * h * tq * d];
    // Every head's scores; the keys, then the values, are read a block of positions at a time
    // for all heads in turn, so that each key/value head's cache is one of `kv` streams from
    // memory going at once rather than one after another (profiled, SmolLM-135M q8_0: 10 % less
    // time in attention than a head at a time; it still reads at about half memory's speed).
    let mut scores = vec![0f32; h * tk];
    let at = |at: [usize; 4], bi: usize, head: usize| at[0] + bi * at[1] + head / groups * at[2];
    for bi in 0..b {
        for i in 0..tq {
            let row = |head: usize| (bi * h + head) * tq + i;
            for j0 in (0..tk).step_by(KV_BLOCK) {
                let j1 = (j0 + KV_BLOCK).min(tk);
                for head in 0..h {
                    let keys = &ks[at(k_at, bi, head) + j0 * d..at(k_at, bi, head) + j1 * d];
                    key_scores(&qs[row(head) * d..(row(head) + 1) * d], keys, scale, &mut scores[head * tk + j0..head * tk + j1]);
                }
            }
            for head_scores in scores.chunks_exact_mut(tk) {
                super::activation::softmax_rows(head_scores, tk, tk, 1.0, mask.as_deref().map(|m| &m[i * tk..(i + 1) * tk]));
            }
            for j0 in (0..tk).step_by(KV_BLOCK) {
                let j1 = (j0 + KV_BLOCK).min(tk);
                for head in 0..h {
                    let values = &vs[at(v_at, bi, head) + j0 * d..at(v_at, bi, head) + j1 * d];
                    weighted_sum_add(&scores[head * tk + j0..head * tk + j1], values, &mut out[row(head) * d..(row(head) + 1) * d]);
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, h, tq, d), q.device())?))
}

/// Positions of keys or values `few_queries_attention` reads of one head before the next.
const KV_BLOCK: usize = 32;

/// Where a [B, H, T, d] tensor's rows (positions) lie in its storage of `len` floats, for one
/// whose rows are d consecutive floats: [offset of batch 0 head 0, batch stride, head stride,
/// row stride]. `split_heads_view`'s rows are H·d apart, a KV cache window's d. None for other
/// layouts, for empty tensors and where the last row would run past `len`.
fn row_layout(layout: &candle_core::Layout, len: usize) -> Option<[usize; 4]> {
    let (&[b, h, t, d], s) = (layout.dims(), layout.stride()) else { return None };
    if b == 0 || h == 0 || t == 0 || d == 0 || s[3] != 1 {
        return None;
    }
    let at = [layout.start_offset(), s[0], s[1], s[2]];
    let end = at[0] + (b - 1) * at[1] + (h - 1) * at[2] + (t - 1) * at[3] + d;
    (end <= len).then_some(at)
}

/// Whether our attention loops take these tensors: f32 on the CPU.
fn f32_on_cpu(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == candle_core::DType::F32 && t.device().is_cpu())
}

/// The additive mask as [tq, tk] f32 values: `Some(None)` without one, `None` for a shape our
/// loops do not broadcast (candle's path takes it).
fn mask_values(mask: Option<&Tensor>, tq: usize, tk: usize) -> Result<Option<Option<Vec<f32>>>> {
    match mask {
        None => Ok(Some(None)),
        Some(m) if m.dims() == [tq, tk] => Ok(Some(Some(m.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?))),
        Some(_) => Ok(None),
    }
}

/// scores[j] = q·keys[j]·scale, `keys` rows of q's length.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
use key_scores_plain as key_scores;

/// `key_scores` one key at a time (natively, and WASM's rows of other lengths).
fn key_scores_plain(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(q.len().max(1))) {
        // 8 interleaved partial sums: a loop LLVM vectorises.
        let mut acc = [0f32; 8];
        let (qc, kc) = (q.chunks_exact(8), key.chunks_exact(8));
        let tail: f32 = qc.remainder().iter().zip(kc.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in qc.zip(kc) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        *score = (acc.iter().sum::<f32>() + tail) * scale;
    }
}

/// The same four keys at a time: each key's products in f32x4 lanes, and the four keys' lane
/// sums reduced together by shuffles (one reduction per four keys instead of a serial chain
/// per key). Rows whose length is not a multiple of 4, and the last keys, take plain loops.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn key_scores(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    use core::arch::wasm32::*;
    let d = q.len();
    if d == 0 || d % 4 != 0 {
        return key_scores_plain(q, keys, scale, scores);
    }
    let quads = (keys.len() / d).min(scores.len()) / 4;
    for j in 0..quads {
        let four = &keys[4 * j * d..4 * (j + 1) * d];
        let mut acc = [f32x4_splat(0.0); 4];
        for c in (0..d).step_by(4) {
            // SAFETY: c + 4 ≤ d, and `four` holds 4 rows of d; wasm loads need no alignment.
            unsafe {
                let x = v128_load(q.as_ptr().add(c) as *const v128);
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = f32x4_add(*acc, f32x4_mul(x, v128_load(four.as_ptr().add(k * d + c) as *const v128)));
                }
            }
        }
        let [a, b, c, e] = acc;
        let ab = f32x4_add(i32x4_shuffle::<0, 4, 1, 5>(a, b), i32x4_shuffle::<2, 6, 3, 7>(a, b));
        let ce = f32x4_add(i32x4_shuffle::<0, 4, 1, 5>(c, e), i32x4_shuffle::<2, 6, 3, 7>(c, e));
        let sums = f32x4_mul(f32x4_add(i64x2_shuffle::<0, 2>(ab, ce), i64x2_shuffle::<1, 3>(ab, ce)), f32x4_splat(scale));
        // SAFETY: j < quads ≤ scores.len() / 4.
        unsafe { v128_store(scores.as_mut_ptr().add(4 * j) as *mut v128, sums) };
    }
    key_scores_plain(q, &keys[4 * quads * d..], scale, &mut scores[4 * quads..]);
}

/// out += Σ_j p[j]·values[j], `values` rows of out's length.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
use weighted_sum_add_plain as weighted_sum_add;

/// `weighted_sum_add` one output at a time (natively, and WASM's rows of other lengths).
fn weighted_sum_add_plain(p: &[f32], values: &[f32], out: &mut [f32]) {
    for (p, value) in p.iter().zip(values.chunks_exact(out.len().max(1))) {
        out.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
    }
}

/// The same 16 outputs at a time, kept in four registers over all j (rather than loaded and
/// stored for each j). Rows whose length is not a multiple of 16 take the plain loop.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn weighted_sum_add(p: &[f32], values: &[f32], out: &mut [f32]) {
    use core::arch::wasm32::*;
    let d = out.len();
    let n = p.len().min(values.len() / d.max(1));
    if d == 0 || d % 16 != 0 {
        return weighted_sum_add_plain(p, values, out);
    }
    for c in (0..d).step_by(16) {
        // SAFETY: c + 16 ≤ d = out.len(); wasm loads need no alignment.
        let mut acc: [v128; 4] = core::array::from_fn(|l| unsafe { v128_load(out.as_ptr().add(c + 4 * l) as *const v128) });
        for (j, p) in p[..n].iter().enumerate() {
            let p = f32x4_splat(*p);
            for (l, acc) in acc.iter_mut().enumerate() {
                // SAFETY: j < n rows of d, c + 16 ≤ d; wasm loads need no alignment.
                *acc = f32x4_add(*acc, f32x4_mul(p, unsafe { v128_load(values.as_ptr().add(j * d + c + 4 * l) as *const v128) }));
            }
        }
        for (l, acc) in acc.iter().enumerate() {
            // SAFETY: c + 16 ≤ d = out.len().
            unsafe { v128_store(out.as_mut_ptr().add(c + 4 * l) as *mut v128, *acc) };
        }
    }
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
    if !f32_on_cpu(&[q, k, v]) || k.dims4()? != (b, h, tk, d) || v.dims4()? != (b, h, tk, d) || tq == 0 || tk == 0 {
        return Ok(None);
    }
    let Some(mask) = mask_values(mask, tq, tk)? else { return Ok(None) };
    // Read where they lie: split_heads_view's heads are rows H·d apart, no copies needed.
    let [(qg, ql), (kg, kl), (vg, vl)] = [q, k, v].map(|t| t.storage_and_layout());
    let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qg, &*kg, &*vg) else { return Ok(None) };
    let (qs, ks, vs) = (qc.as_slice::<f32>()?, kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
    let (Some(q_at), Some(k_at), Some(v_at)) = (row_layout(ql, qs.len()), row_layout(kl, ks.len()), row_layout(vl, vs.len())) else {
        return Ok(None);
    };
    let head_start = |at: [usize; 4], i: usize| at[0] + i / h * at[1] + i % h * at[2];
    let scale = scale as f32;
    let heads = crate::parallel::map(b * h, |i| -> Result<Vec<f32>> {
        let err = || candle_core::Error::Msg(format!("attention: head {i} of q {:?}, k/v {:?}", q.dims(), k.dims()));
        let keys = PackedWeight::pack_rows(&ks[head_start(k_at, i)..], tk, d, k_at[3]).ok_or_else(err)?;
        // The scores stay in rows padded to whole panels: the softmax and the values' GEMM
        // skip the padding instead of a copy cutting it off.
        let ld = keys.padded_out();
        let mut scores = keys.matmul_padded(&qs[head_start(q_at, i)..], tq, q_at[3], None).ok_or_else(err)?;
        super::activation::softmax_rows(&mut scores, ld, tk, scale, mask.as_deref());
        let values = PackedWeight::pack_in_out_rows(&vs[head_start(v_at, i)..], tk, d, v_at[3]).ok_or_else(err)?;
        values.matmul_padded(&scores, tq, ld, None).ok_or_else(err)
    });
    // Written as [B, T, H, d]: merge_heads then needs no copy.
    let mut out = vec![0f32; b * tq * h * d];
    for (i, head) in heads.into_iter().enumerate() {
        let head = head?;
        for (j, row) in head.chunks_exact(head.len() / tq).enumerate() {
            let at = ((i / h * tq + j) * h + i % h) * d;
            out[at..at + d].copy_from_slice(&row[..d]);
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, tq, h, d), q.device())?.transpose(1, 2)?))
}

/// Positions a KV cache allocates at a time (candle's `KvCache` grows by its initial size):
/// GPT-2's 1024 up front were 75 MB to allocate and zero per caption; 256 hold a SmolLM prefix
/// (~200 image and prompt positions) and a caption.
pub const CACHE_CHUNK: usize = 256;

/// Appends k/v [B, H, T, d] to `cache` and returns everything cached; without a cache (training
/// on whole sequences) they are used as they are, which keeps them in the autograd graph.
pub fn append_kv(cache: Option<&mut candle_nn::kv_cache::KvCache>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    match cache {
        Some(cache) => cache.append(k, v),
        None => Ok((k.clone(), v.clone())),
    }
}

/// Bytes of the keys and values a decoding step attends over: the positions cached so far in
/// `caches` and the cross-attention pairs `cross` (an image's positions).
pub fn cached_bytes(caches: &[candle_nn::kv_cache::KvCache], cross: &[(Tensor, Tensor)]) -> usize {
    let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let cached = |t: Result<Option<Tensor>>| t.ok().flatten().map_or(0, |t| bytes(&t));
    caches.iter().map(|c| cached(c.k()) + cached(c.v())).sum::<usize>() + cross.iter().map(|(k, v)| bytes(k) + bytes(v)).sum::<usize>()
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
