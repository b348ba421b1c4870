//! Our matrix kernels against candle's plain arithmetic, on shapes where the WASM build takes
//! its own paths (`models::packed`: weights packed at load or per call, attention of 16+
//! queries, the vectorised activations). Natively these calls run candle's code, so the test
//! means most in headless Chromium (`wasm-pack test`), on both GEMM kernels.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};
use std::collections::HashMap;
use wasmcap::models::linear::{conv1d, Linear};
use wasmcap::models::{activation, attention, packed};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).expect("same shapes")
}

/// Deterministic values in [-1, 1] (candle's randn differs between native and WASM builds).
fn values(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.618 + seed as f32) * 12.9898).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("length matches")
}

fn check(name: &str, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let d = max_diff(ours, theirs);
    assert!(d <= tol, "{name} [{}]: max |Δ| {d}", packed::kernel_name());
}

#[test]
fn linear_layers_of_many_rows_match_plain_matmul() -> Result<()> {
    for relaxed in [true, false] {
        packed::allow_relaxed_simd(relaxed);
        // 64 rows: packed for the call (prefill); 5: candle's GEMM; odd feature counts; 200
        // features: 17 panels, an activation after 16 and after 1 (`forward_activated`).
        for (rows, d_in, d_out) in [(64, 96, 50), (5, 96, 50), (70, 64, 24), (7, 40, 200)] {
            let (w, b, x) = (values(&[d_out, d_in], 1), values(&[d_out], 2), values(&[1, rows, d_in], 3));
            let want = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;

            let mut linear = Linear::new(w.clone(), Some(b.clone()));
            check("linear", &linear.forward(&x)?, &want, 1e-4);
            linear.pack()?; // at load, in WASM
            check("linear packed at load", &linear.forward(&x)?, &want, 1e-4);
            for act in [Activation::GeluPytorchTanh, Activation::Silu] {
                check(&format!("linear packed at load, then {act:?}"), &linear.forward_activated(&x, &act)?, &want.apply(&act)?, 1e-4);
            }

            let vb = VarBuilder::from_tensors(
                HashMap::from([("weight".to_string(), w.t()?.contiguous()?), ("bias".to_string(), b.clone())]),
                candle_core::DType::F32,
                &Device::Cpu,
            );
            let mut conv = conv1d(d_in, d_out, vb)?;
            check("conv1d", &conv.forward(&x)?, &want, 1e-4);
            conv.pack()?;
            check("conv1d packed at load", &conv.forward(&x)?, &want, 1e-4);

            // q8_0 (rows of whole 32-blocks): many rows dequantize (and pack, in WASM).
            if d_in % 32 == 0 {
                let mut q8 = Linear::new(w.clone(), Some(b.clone()));
                assert!(q8.quantize(GgmlDType::Q8_0)?);
                let mut deq = q8.clone();
                assert!(deq.dequantize()?);
                let want_q8 = x.broadcast_matmul(&deq.weight_f32()?.t()?)?.broadcast_add(&b)?;
                check("q8_0", &q8.forward(&x)?, &want_q8, 1e-4);
                // A quantized checkpoint's encoder: packed straight from the blocks, in WASM.
                let mut q8_packed = q8.clone();
                q8_packed.pack()?;
                check("q8_0 packed at load", &q8_packed.forward(&x)?, &want_q8, 1e-4);
                // A packed Conv1D quantizes from its packed weight.
                let mut conv_q8 = conv.clone();
                assert!(conv_q8.quantize(GgmlDType::Q8_0)?);
                check("conv1d packed then q8_0", &conv_q8.forward(&x)?, &want_q8, 1e-4);
            }
        }
    }
    packed::allow_relaxed_simd(true);
    Ok(())
}

/// The 8-bit encoder GEMM (`Linear::to_int8`): the relaxed-SIMD (both dot products) and simd128 kernels give the
/// same bits (exact integer sums), on rows split over tiles and passes, with and without a
/// fused activation; and both stay within 8-bit error of the f32 product.
#[test]
fn int8_layers_give_the_same_bits_on_every_kernel_and_stay_near_f32() -> Result<()> {
    for (rows, d_in, d_out) in [(64, 96, 50), (5, 36, 13), (7, 1100, 24), (196, 64, 30)] {
        let (w, b, x) = (values(&[d_out, d_in], 21), values(&[d_out], 22), values(&[1, rows, d_in], 23));
        let want = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let mut layer = Linear::new(w.clone(), Some(b.clone()));
        assert!(layer.to_int8()? && layer.is_int8());
        let mut outputs = vec![];
        // Relaxed SIMD with either spelling of its i8 dot product, then simd128.
        for (relaxed, fused) in [(true, Some(true)), (true, Some(false)), (false, None)] {
            packed::allow_relaxed_simd(relaxed);
            packed::choose_int8_dot(fused);
            let ys = layer.forward(&x)?;
            // Each output within 1 % of Σ|w·x| (7-bit inputs, 8-bit weights).
            let scale = x.abs()?.broadcast_matmul(&w.abs()?.t()?)?;
            let excess = ((ys.clone() - &want)?.abs()? - (scale * 0.01)?)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(excess <= 0.0, "{rows}×{d_in}→{d_out} [{}]: {excess} beyond 1 %", packed::kernel_name());
            let gelu = layer.forward_activated(&x, &Activation::GeluPytorchTanh)?;
            check("int8, then GELU", &gelu, &ys.apply(&Activation::GeluPytorchTanh)?, 1e-5);
            outputs.push((ys.flatten_all()?.to_vec1::<f32>()?, gelu.flatten_all()?.to_vec1::<f32>()?));
        }
        assert_eq!(outputs[0], outputs[1], "{rows}×{d_in}→{d_out}: relaxed SIMD's two dot products differ");
        assert_eq!(outputs[0], outputs[2], "{rows}×{d_in}→{d_out}: relaxed SIMD and simd128 differ");
    }
    packed::allow_relaxed_simd(true);
    packed::choose_int8_dot(None);
    Ok(())
}

/// softmax(q·kᵀ·scale + mask)·v with candle's plain ops.
fn formula(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

#[test]
fn attention_of_many_queries_matches_the_formula() -> Result<()> {
    for (tq, tk, masked) in [(20, 20, true), (16, 30, false), (3, 9, false)] {
        let (q, k, v) = (values(&[1, 2, tq, 8], 4), values(&[1, 2, tk, 8], 5), values(&[1, 2, tk, 8], 6));
        let mask = masked.then(|| attention::causal_mask(tq, tk - tq, &Device::Cpu)).transpose()?;
        let ours = attention::scaled_dot_product(&q, &k, &v, 0.35, mask.as_ref())?;
        let theirs = formula(&q, &k, &v, 0.35, mask.as_ref())?;
        check(&format!("attention tq {tq} tk {tk}"), &ours, &theirs, 1e-5);
    }
    // Heads as views of [B, T, H·d] (rows H·d apart), as SigLIP passes them; d = 20 pads the
    // values' GEMM to 24 features and 30 keys pad the scores to 36.
    let (b, h, t, d) = (2, 3, 30, 20);
    let [q, k, v] = [11, 12, 13].map(|seed| attention::split_heads_view(&values(&[b, t, h * d], seed), h));
    let (q, k, v) = (q?, k?, v?);
    assert!(!q.is_contiguous());
    let ours = attention::scaled_dot_product(&q, &k, &v, 0.35, None)?;
    let theirs = formula(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, 0.35, None)?;
    check("attention of head views", &ours, &theirs, 1e-5);
    check("merged heads", &attention::merge_heads(&ours)?, &attention::merge_heads(&theirs)?, 1e-5);
    Ok(())
}

/// Decoding's attention (few queries, read in place): keys and values shared by groups of
/// query heads (SmolLM's 9 over 3) and strided like a KV cache's window of a larger buffer,
/// against the formula on copied, repeated heads.
#[test]
fn attention_of_few_queries_on_a_cache_window_matches_the_formula() -> Result<()> {
    for (b, h, kv, tq, tk, d, masked) in
        [(1, 6, 2, 1, 37, 8, false), (2, 4, 4, 1, 5, 8, false), (2, 3, 1, 4, 12, 8, true), (1, 9, 3, 1, 39, 64, false), (2, 2, 1, 2, 7, 6, true)]
            .into_iter()
            // Runs of shared heads: 4 per key/value head, and 5 (a run of 4, then 1) with
            // rows of 16 and 32 (WASM: two or four f32x4 per output row).
            .chain([(1, 8, 2, 1, 33, 32, false), (2, 10, 2, 3, 21, 16, true), (2, 2, 1, 1, 40, 48, false)])
    {
        let q = values(&[b, h, tq, d], 7);
        // A cache of 50 positions of which the first tk are filled: a strided view.
        let (k_all, v_all) = (values(&[b, kv, 50, d], 8), values(&[b, kv, 50, d], 9));
        let (k, v) = (k_all.narrow(2, 0, tk)?, v_all.narrow(2, 0, tk)?);
        assert!(!k.is_contiguous());
        let mask = masked.then(|| attention::causal_mask(tq, tk - tq, &Device::Cpu)).transpose()?;
        let ours = attention::scaled_dot_product(&q, &k, &v, 0.35, mask.as_ref())?;
        let repeat = |t: &Tensor| -> Result<Tensor> { t.unsqueeze(2)?.expand((b, kv, h / kv, tk, d))?.reshape((b, h, tk, d)) };
        let (k, v) = (repeat(&k)?, repeat(&v)?);
        let theirs = formula(&q, &k, &v, 0.35, mask.as_ref())?;
        check(&format!("attention b {b} h {h} kv {kv} tq {tq} tk {tk} d {d}"), &ours, &theirs, 1e-5);
    }
    Ok(())
}

#[test]
fn activations_match_candles() -> Result<()> {
    let x = (values(&[4, 250], 7) * 12.0)?;
    for act in [Activation::GeluPytorchTanh, Activation::NewGelu, Activation::Silu, Activation::Gelu] {
        check(&format!("{act:?}"), &activation::forward(&act, &x)?, &x.apply(&act)?, 2e-6 * 12.0);
        check(&format!("{act:?} in place"), &activation::forward_in_place(&act, x.copy()?)?, &x.apply(&act)?, 2e-6 * 12.0);
    }
    check("softmax", &activation::softmax_last_dim(&x)?, &candle_nn::ops::softmax_last_dim(&x)?, 1e-6);
    Ok(())
}

/// The decoder's q8_0 matrix–vector kernels (`models::q8`: grouped layout; relaxed SIMD and simd128 in WASM)
/// against its definition: per block the integer sum of q·x14
/// times the block's scale, summed block after block, times the row's scale. The same bits
/// natively and in WASM, for a matrix whose last group of four rows is short, output ranges cut
/// at group boundaries, weights of -128 (none of ours, but a file may hold them) and inputs that
/// round half to even or are NaN.
#[test]
fn q8_matvec_matches_its_definition() {
    use wasmcap::models::q8::{Q8Matrix, BLOCK};
    // 20 groups of four rows, the last one short: the relaxed kernel's eight side by side, then alone.
    let (out_dim, in_dim) = (78, 64);
    let qs: Vec<i8> = (0..out_dim * in_dim).map(|i| ((i * 7919 + 13) % 256) as i32 - 128).map(|q| q as i8).collect();
    let scales: Vec<f32> = values(&[out_dim * in_dim / BLOCK], 4).to_vec1::<f32>().expect("f32").iter().map(|v| v.abs() * 1e-2).collect();
    let m = Q8Matrix::from_rows(&qs, &scales, out_dim, in_dim).expect("whole blocks");
    for (i, w) in m.dequantize().iter().enumerate() {
        assert_eq!(*w, qs[i] as f32 * scales[i / BLOCK], "dequantized weight {i}");
    }
    let mut xs = values(&[2 * in_dim], 5).to_vec1::<f32>().expect("f32");
    // A third row on a scale of 1: halves (ties go to even, both signs) and a NaN (→ 0).
    xs.extend((0..in_dim).map(|i| match i {
        0 => 8191.0,
        5 => f32::NAN,
        _ => i as f32 * 0.5 - 16.0,
    }));
    // In WASM: the relaxed-SIMD kernel (7-bit halves, either spelling of the i8 dot), then simd128's shifts.
    for ((relaxed, fused), outputs) in [(true, Some(true)), (true, Some(false)), (false, None)]
        .into_iter()
        .flat_map(|k| [0..out_dim, 4..out_dim, 0..4, 8..12, 36..70].map(|o| (k, o)))
    {
        packed::allow_relaxed_simd(relaxed);
        packed::choose_int8_dot(fused);
        let rows = m.quantize_rows(&xs).expect("whole rows");
        let y = m.matvec(&rows, outputs.clone());
        let width = outputs.end.min(out_dim) - outputs.start;
        assert_eq!(y.len(), 3 * width);
        for (r, x) in xs.chunks_exact(in_dim).enumerate() {
            let scale = x.iter().fold(0f32, |a, v| a.max(v.abs())) / 8191.0;
            let inv = 1.0 / scale;
            let x16: Vec<i32> = x.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
            for j in outputs.start..outputs.start + width {
                let mut acc = 0f32;
                for b in 0..in_dim / BLOCK {
                    let sum: i32 = (b * BLOCK..(b + 1) * BLOCK).map(|i| qs[j * in_dim + i] as i32 * x16[i]).sum();
                    acc += sum as f32 * scales[j * in_dim / BLOCK + b];
                }
                assert_eq!(
                    y[r * width + j - outputs.start],
                    acc * scale,
                    "row {r}, output {j}, outputs {outputs:?} [{}]",
                    packed::int8_kernel_name()
                );
            }
        }
    }
    packed::allow_relaxed_simd(true);
    packed::choose_int8_dot(None);
    assert!(Q8Matrix::from_rows(&qs, &scales, out_dim, 48).is_none());
    assert!(m.quantize_rows(&xs[..in_dim + 1]).is_none());
}
