//! GELU (tanh form), SiLU and softmax with an exp that vectorises. candle computes them one
//! element at a time through libm's `tanhf` / `expf`, which in WASM is ~10 % of a SigLIP-B
//! encode (7 M GELUs). Written as plain loops over f32 with no calls, LLVM turns these into
//! simd128 (floor, truncation and bit casts included); natively candle's versions stay.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::Activation;

/// Whether these replace candle's: in WASM, where candle's are scalar libm calls.
const FASTER_THAN_CANDLE: bool = cfg!(target_arch = "wasm32");

/// e^x for finite x, relative error ≤ 2e-7 (Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, a
/// degree-6 polynomial in r, and 2^n put into the exponent bits). x is clamped to [-87, 89]:
/// below, ~1.6e-38 instead of 0; from ~88.4 up, 2^128 is the exponent bits of infinity.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 89.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), which is x·σ(2u): x / (1 + e^(−2u)).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// x·σ(x)
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `f` of every element, read where the tensor lies (one pass, not a copy and then a pass).
fn map(xs: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    let v: Vec<f32> = super::linear::with_f32(&xs.contiguous()?, |x| x.iter().map(|&x| f(x)).collect())?;
    Tensor::from_vec(v, xs.shape(), xs.device())
}

/// Whether `xs` can take our path: f32 on the CPU, not recording a backward pass.
fn ours(xs: &Tensor) -> bool {
    FASTER_THAN_CANDLE && xs.dtype() == DType::F32 && xs.device().is_cpu() && !super::tracks_grad(&[xs])
}

/// `act` applied to `xs`, as `xs.apply(act)` computes it.
pub fn forward(act: &Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::GeluPytorchTanh | Activation::NewGelu if ours(xs) => map(xs, gelu_tanh),
        Activation::Silu if ours(xs) => map(xs, silu),
        _ => xs.apply(act),
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !ours(xs) {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    let mut v = xs.flatten_all()?.to_vec1::<f32>()?;
    softmax_rows(&mut v, xs.dim(D::Minus1)?);
    Tensor::from_vec(v, xs.shape(), xs.device())
}

/// Softmax of each `len` floats of `v`, in place.
pub(crate) fn softmax_rows(v: &mut [f32], len: usize) {
    for row in v.chunks_exact_mut(len.max(1)) {
        // A comparison, not `f32::max`: that is a call to libm's fmaxf per element in WASM
        // (wasm's own max propagates NaN, Rust's ignores it).
        let max = lanes_fold(row, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
        // Masked positions (-inf) get exactly 0; a row masked in full gives NaN, as candle's
        // and torch's do.
        for x in row.iter_mut() {
            *x = if *x == f32::NEG_INFINITY { 0.0 } else { exp(*x - max) };
        }
        let inv = 1.0 / lanes_fold(row, 0.0, |a, b| a + b);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `f` folded over `row` in 8 interleaved partial results, then over those: a loop LLVM
/// vectorises, where one running result is a chain it must keep in order.
#[inline(always)]
fn lanes_fold(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for c in chunks {
        for k in 0..8 {
            acc[k] = f(acc[k], c[k]);
        }
    }
    acc.into_iter().fold(tail, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<f32> {
        let mut v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.01).collect();
        v.extend([-1e30, -200.0, -90.0, -87.5, -1e-30, 0.0, 1e-30, 1e-7, 88.5, 90.0, 200.0, 1e30]);
        v
    }

    #[test]
    fn exp_is_within_2e_7_relative() {
        for x in samples().into_iter().filter(|x| (-87.0..=88.0).contains(x)) {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            assert!(rel < 2e-7, "exp({x}): {} vs {want} ({rel:e})", exp(x));
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        for x in samples() {
            let xd = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3));
            let gelu = 0.5 * xd * (1.0 + u.tanh());
            let silu_want = xd / (1.0 + (-xd).exp());
            for (name, got, want) in [("gelu_tanh", gelu_tanh(x) as f64, gelu), ("silu", silu(x) as f64, silu_want)] {
                let err = (got - want).abs();
                assert!(err <= 1e-6 * want.abs().max(1e-3) || err < 1e-38, "{name}({x}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() {
        let mut v: Vec<f32> = (0..60).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7).collect();
        v[5] = f32::NEG_INFINITY;
        let want: Vec<f64> = v
            .chunks(20)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |x| x / s)
            })
            .collect();
        softmax_rows(&mut v, 20);
        for (got, want) in v.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-7, "{got} vs {want}");
        }
        assert_eq!(v[5], 0.0);
    }
}
