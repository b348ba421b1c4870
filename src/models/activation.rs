//! GELU (tanh form), SiLU and softmax with an exp that vectorises. candle computes them one
//! element at a time through libm's `tanhf` / `expf`, which in WASM is ~10 % of a SigLIP-B
//! encode (7 M GELUs). Here they are written once over `Lanes` and run four lanes at a time
//! with simd128 in WASM; natively candle's versions stay (ours serve the tests there).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::Activation;

/// Whether these replace candle's: in WASM, where candle's are scalar libm calls.
const FASTER_THAN_CANDLE: bool = cfg!(target_arch = "wasm32");

/// The arithmetic of the functions below, on one f32 or (WASM) four lanes. One source for
/// both: the vector loops and their tails give the same bits, and no step is left to LLVM's
/// vectoriser (which kept `gelu_tanh` at ~1.4× the explicit loop's time).
trait Lanes: Copy {
    fn splat(x: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// min(max(x, lo), hi)
    fn clamp(self, lo: f32, hi: f32) -> Self;
    /// The float whose bits are these bits shifted left by 23: 2^(b − 127) where the low 9 bits
    /// hold b ∈ [0, 255].
    fn exponent_from_low_bits(self) -> Self;
    /// 0 where `x` is -∞, self elsewhere.
    fn zero_where_neg_inf(self, x: Self) -> Self;
}

impl Lanes for f32 {
    fn splat(x: f32) -> Self {
        x
    }
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn sub(self, o: Self) -> Self {
        self - o
    }
    fn mul(self, o: Self) -> Self {
        self * o
    }
    fn div(self, o: Self) -> Self {
        self / o
    }
    fn clamp(self, lo: f32, hi: f32) -> Self {
        // Comparisons, as the vector's pmin/pmax: `f32::clamp` is one too, but not `max`/`min`,
        // which are libm calls in WASM.
        let x = if self < hi { self } else { hi };
        if lo < x {
            x
        } else {
            lo
        }
    }
    fn exponent_from_low_bits(self) -> Self {
        f32::from_bits(self.to_bits() << 23)
    }
    fn zero_where_neg_inf(self, x: Self) -> Self {
        if x == f32::NEG_INFINITY {
            0.0
        } else {
            self
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[derive(Clone, Copy)]
struct F4(core::arch::wasm32::v128);

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
impl Lanes for F4 {
    fn splat(x: f32) -> Self {
        F4(core::arch::wasm32::f32x4_splat(x))
    }
    fn add(self, o: Self) -> Self {
        F4(core::arch::wasm32::f32x4_add(self.0, o.0))
    }
    fn sub(self, o: Self) -> Self {
        F4(core::arch::wasm32::f32x4_sub(self.0, o.0))
    }
    fn mul(self, o: Self) -> Self {
        F4(core::arch::wasm32::f32x4_mul(self.0, o.0))
    }
    fn div(self, o: Self) -> Self {
        F4(core::arch::wasm32::f32x4_div(self.0, o.0))
    }
    fn clamp(self, lo: f32, hi: f32) -> Self {
        use core::arch::wasm32::*;
        // pmin(a, b) = b < a ? b : a, pmax(a, b) = a < b ? b : a: NaN stays NaN, as in f32's.
        F4(f32x4_pmax(f32x4_pmin(self.0, f32x4_splat(hi)), f32x4_splat(lo)))
    }
    fn exponent_from_low_bits(self) -> Self {
        F4(core::arch::wasm32::i32x4_shl(self.0, 23))
    }
    fn zero_where_neg_inf(self, x: Self) -> Self {
        use core::arch::wasm32::*;
        F4(v128_andnot(self.0, f32x4_eq(x.0, f32x4_splat(f32::NEG_INFINITY))))
    }
}

/// e^x for finite x, relative error ≤ 2e-7 (Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, a
/// degree-6 polynomial in r, and 2^n put into the exponent bits). n is rounded by adding
/// 1.5·2²³ + 127, which leaves n + 127 in the low bits of the sum: no float-to-int conversion
/// (a slow one in WASM, with its NaN and overflow checks). x is clamped to [-87, 89]: below,
/// ~1.6e-38 instead of 0; from ~88.4 up, 2^128 is the exponent bits of infinity.
#[inline(always)]
fn exp<T: Lanes>(x: T) -> T {
    const SHIFT: f32 = 12_582_912.0 + 127.0;
    let x = x.clamp(-87.0, 89.0);
    let t = x.mul(T::splat(std::f32::consts::LOG2_E)).add(T::splat(SHIFT));
    let n = t.sub(T::splat(SHIFT));
    let r = x.sub(n.mul(T::splat(0.693_359_4))).add(n.mul(T::splat(2.121_944_4e-4)));
    let mut p = T::splat(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
        p = p.mul(r).add(T::splat(c));
    }
    p.mul(r).mul(r).add(r).add(T::splat(1.0)).mul(t.exponent_from_low_bits())
}

/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), which is x·σ(2u): x / (1 + e^(−2u)), with
/// −2u = x·(−2√(2/π) − 2√(2/π)·0.044715·x²).
#[inline(always)]
fn gelu_tanh<T: Lanes>(x: T) -> T {
    const A: f32 = -2.0 * 0.797_884_6;
    let e = exp(x.mul(T::splat(A).add(T::splat(A * 0.044_715).mul(x.mul(x)))));
    x.div(T::splat(1.0).add(e))
}

/// x·σ(x)
#[inline(always)]
fn silu<T: Lanes>(x: T) -> T {
    x.div(T::splat(1.0).add(exp(T::splat(0.0).sub(x))))
}

/// The activations our path computes (`forward`).
#[derive(Clone, Copy)]
enum Ours {
    GeluTanh,
    Silu,
}

impl Ours {
    /// Ours for `act`, where `xs` can take our path.
    fn of(act: &Activation, xs: &Tensor) -> Option<Self> {
        if !ours(xs) {
            return None;
        }
        match act {
            Activation::GeluPytorchTanh | Activation::NewGelu => Some(Ours::GeluTanh),
            Activation::Silu => Some(Ours::Silu),
            _ => None,
        }
    }

    #[inline(always)]
    fn apply<T: Lanes>(self, x: T) -> T {
        match self {
            Ours::GeluTanh => gelu_tanh(x),
            Ours::Silu => silu(x),
        }
    }

    /// Every element of `v`, in place: four lanes at a time in WASM, one at a time for the rest.
    fn apply_all(self, v: &mut [f32]) {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        let done = {
            use core::arch::wasm32::*;
            let mut done = 0;
            while done + 4 <= v.len() {
                // SAFETY: done + 4 ≤ v.len(); wasm loads and stores need no alignment.
                unsafe {
                    let p = v.as_mut_ptr().add(done) as *mut v128;
                    v128_store(p, self.apply(F4(v128_load(p))).0);
                }
                done += 4;
            }
            done
        };
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        let done = 0;
        for x in &mut v[done..] {
            *x = self.apply(*x);
        }
    }
}

impl candle_core::InplaceOp1 for Ours {
    fn name(&self) -> &'static str {
        "wasmcap-activation"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<()> {
        let (candle_core::CpuStorage::F32(v), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("activation in place: needs a contiguous f32 tensor");
        };
        self.apply_all(&mut v[start..end]);
        Ok(())
    }
}

/// Whether `xs` can take our path: f32 on the CPU, not recording a backward pass.
fn ours(xs: &Tensor) -> bool {
    FASTER_THAN_CANDLE && xs.dtype() == DType::F32 && xs.device().is_cpu() && !super::tracks_grad(&[xs])
}

/// `act` applied to `xs`, as `xs.apply(act)` computes it.
pub fn forward(act: &Activation, xs: &Tensor) -> Result<Tensor> {
    let Some(ours) = Ours::of(act, xs) else { return xs.apply(act) };
    let mut v = super::linear::with_f32(&xs.contiguous()?, <[f32]>::to_vec)?;
    ours.apply_all(&mut v);
    Tensor::from_vec(v, xs.shape(), xs.device())
}

/// `act` as a function over f32 written in place, where our path takes `xs` (see `forward`).
pub fn in_place(act: &Activation, xs: &Tensor) -> Option<impl Fn(&mut [f32]) + Sync> {
    Ours::of(act, xs).map(|ours| move |v: &mut [f32]| ours.apply_all(v))
}

/// `forward`, written over `xs`' own values where our path takes it: for a tensor nothing else
/// holds (a layer's fresh output), whose storage a clone would share. It saves allocating and
/// filling a second buffer per layer (196 × 3072 floats in SigLIP-B's MLP).
pub fn forward_in_place(act: &Activation, xs: Tensor) -> Result<Tensor> {
    match Ours::of(act, &xs) {
        Some(ours) if xs.is_contiguous() => {
            xs.inplace_op1(&ours)?;
            Ok(xs)
        }
        _ => forward(act, &xs),
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !ours(xs) {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    let mut v = xs.flatten_all()?.to_vec1::<f32>()?;
    let len = xs.dim(D::Minus1)?;
    softmax_rows(&mut v, len, len, 1.0, None);
    Tensor::from_vec(v, xs.shape(), xs.device())
}

/// softmax(x·scale + mask) of the first `len` floats of each `stride` floats of `v`, in place
/// (attention scores; the floats past `len` are left as they are). `mask` holds `len` floats
/// per row.
pub(crate) fn softmax_rows(v: &mut [f32], stride: usize, len: usize, scale: f32, mask: Option<&[f32]>) {
    if len == 0 || stride < len {
        return;
    }
    for (i, row) in v.chunks_mut(stride).enumerate() {
        let Some(row) = row.get_mut(..len) else { break };
        let mask = mask.and_then(|m| m.get(i * len..(i + 1) * len));
        let max = scale_and_max(row, scale, mask);
        // Masked positions (-inf) get exactly 0; a row masked in full gives NaN, as candle's
        // and torch's do.
        let inv = 1.0 / exp_and_sum(row, max);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// row = row·scale + mask; returns the largest. Comparisons, not `f32::max`: that is a call to
/// libm's fmaxf per element in WASM (wasm's own max propagates NaN, Rust's ignores it).
#[inline(always)]
fn scale_and_max(row: &mut [f32], scale: f32, mask: Option<&[f32]>) -> f32 {
    match mask {
        Some(m) => row.iter_mut().zip(m).for_each(|(x, m)| *x = *x * scale + m),
        None if scale != 1.0 => row.iter_mut().for_each(|x| *x *= scale),
        None => {}
    }
    lanes_fold(row, f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// row = e^(row − max), 0 where row is -∞; returns the sum.
#[inline(always)]
fn exp_and_sum(row: &mut [f32], max: f32) -> f32 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    let (done, sum) = {
        use core::arch::wasm32::*;
        let mut done = 0;
        let mut acc = f32x4_splat(0.0);
        while done + 4 <= row.len() {
            // SAFETY: done + 4 ≤ row.len(); wasm loads and stores need no alignment.
            unsafe {
                let p = row.as_mut_ptr().add(done) as *mut v128;
                let x = F4(v128_load(p));
                let e = exp(x.sub(F4::splat(max))).zero_where_neg_inf(x).0;
                v128_store(p, e);
                acc = f32x4_add(acc, e);
            }
            done += 4;
        }
        (done, f32x4_extract_lane::<0>(acc) + f32x4_extract_lane::<1>(acc) + f32x4_extract_lane::<2>(acc) + f32x4_extract_lane::<3>(acc))
    };
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let (done, sum) = (0, 0.0);
    let mut tail = [0f32; 8];
    for (k, x) in row[done..].iter_mut().enumerate() {
        *x = exp(*x - max).zero_where_neg_inf(*x);
        tail[k % 8] += *x;
    }
    sum + tail.iter().sum::<f32>()
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
        softmax_rows(&mut v, 20, 20, 1.0, None);
        for (got, want) in v.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-7, "{got} vs {want}");
        }
        assert_eq!(v[5], 0.0);
    }

    /// Attention's use: rows padded past `len` (left alone), a scale, a mask with -∞.
    #[test]
    fn softmax_rows_scale_mask_and_skip_padding() {
        let (rows, len, stride, scale) = (3, 13, 16, 0.3f32);
        let x: Vec<f32> = (0..rows * stride).map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.9).collect();
        let mask: Vec<f32> = (0..rows * len).map(|i| if i % 5 == 2 { f32::NEG_INFINITY } else { (i % 3) as f32 * 0.5 }).collect();
        let mut v = x.clone();
        softmax_rows(&mut v, stride, len, scale, Some(&mask));
        for r in 0..rows {
            let y: Vec<f64> = (0..len).map(|j| x[r * stride + j] as f64 * scale as f64 + mask[r * len + j] as f64).collect();
            let max = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = y.iter().map(|y| (y - max).exp()).sum();
            for j in 0..len {
                let want = (y[j] - max).exp() / sum;
                assert!((v[r * stride + j] as f64 - want).abs() < 1e-7, "row {r} col {j}: {} vs {want}", v[r * stride + j]);
            }
            assert_eq!(v[r * stride + len..(r + 1) * stride], x[r * stride + len..(r + 1) * stride]);
        }
    }
}
