//! 8-bit GEMM for the encoder side (vision towers, projectors): weights as i8 with one scale per
//! output feature, each input row quantized on the fly to 7 bits over its own range, the
//! products summed as exact integers and scaled back to f32 once per output.
//!
//! Why this shape: relaxed SIMD's i8 dot product (`i16x8.relaxed_dot_i8x16_i7x16_s`, then a
//! widening dot with ones: 3 x64 instructions per 16 products, see `relaxed_module.rs`) against
//! four products per f32 multiply-add; its second operand must stay within 0..=127 for the
//! result to be the same on every CPU, hence inputs of 7 bits, asymmetric (x ≈ min + s·q, q in
//! 0..=127) so a skewed row (after GELU) uses all 128 levels. One scale per output (not per
//! 32-block as q8_0) keeps the whole dot product one integer: no rescaling inside the loop,
//! no extra registers. The input's offset comes back through each output's Σ q.
//!
//! The kernel (`int8_kernel.rs`) runs with relaxed SIMD where the browser has it, else with
//! simd128's i16 dot product, natively with SSE2's on x86-64 (plain integers elsewhere): the
//! sums are exact, so all of them give the same bits, and so does any split over the threads.

/// A `[out, in]` weight as i8, one scale per output feature, in panels of 12 outputs
/// (`[in / 4][12][4]` each; inputs padded to a multiple of 4, outputs to 12, with zeros).
#[derive(Debug, Clone)]
pub struct Int8Weight {
    panels: Vec<i8>,
    /// Per output (padded): the scale, and Σ q over the row (for the inputs' offset).
    scales: Vec<f32>,
    sums: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
    /// `in_dim` rounded up to 4.
    k_padded: usize,
}

/// Largest input level: 7 bits, the i7 operand's range.
const X_LEVELS: f32 = 127.0;

/// An input row in 7 bits: x ≈ min + step · q.
struct QuantizedRows {
    q: Vec<u8>,
    step: Vec<f32>,
    min: Vec<f32>,
}

/// `rows` rows of `in_dim` values, each to 0..=127 over [min(0, row), max(0, row)] (a
/// constant row still has a range), `k_padded` bytes a row (the padding's weights are 0).
fn quantize_rows(x: &[f32], rows: usize, in_dim: usize, k_padded: usize) -> QuantizedRows {
    let mut out = QuantizedRows { q: vec![0u8; rows * k_padded], step: Vec::with_capacity(rows), min: Vec::with_capacity(rows) };
    for (xr, qr) in x.chunks_exact(in_dim).zip(out.q.chunks_exact_mut(k_padded)) {
        let (lo, hi) = super::range(xr);
        let step = (hi - lo) / X_LEVELS;
        let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
        // Through i32 (saturating; NaN is 0), clamped as integers: one straight loop that
        // WASM runs four values at a time.
        for (q, &v) in qr.iter_mut().zip(xr) {
            *q = (((v - lo) * inv).round_ties_even() as i32).clamp(0, X_LEVELS as i32) as u8;
        }
        out.step.push(step);
        out.min.push(lo);
    }
    out
}

/// One output's weights to i8 in `q`: scale = max |w| / 127, q = round(w / scale), ties to even.
/// Returns the scale. (The `quantize` command writes encoder-side matrices with these values, so
/// that they are rounded once.)
pub fn quantize_row(values: &[f32], q: &mut [i8]) -> f32 {
    let scale = super::max_abs(values) / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    // One straight loop (vectorized), through i32, which WASM converts four at a time; the value
    // is whole and within ±127, so the same number.
    q.iter_mut().zip(values).for_each(|(q, &v)| *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32 as i8);
    scale
}

/// Where weight (o, k) lies in the panels: panel o / 12, then per 4 inputs each output's 4.
fn panel_index(o: usize, k: usize, k_padded: usize) -> usize {
    ((o / NR) * k_padded + k / 4 * 4) * NR + (o % NR) * 4 + k % 4
}

impl Int8Weight {
    /// `w` `[out_dim, in_dim]` row-major, per output: scale = max |w| / 127, q = round(w /
    /// scale). None when the lengths disagree or a dimension is 0.
    pub fn quantize(w: &[f32], out_dim: usize, in_dim: usize) -> Option<Self> {
        if w.len() != out_dim.checked_mul(in_dim)? {
            return None;
        }
        Self::from_rows(out_dim, in_dim, |o, q| quantize_row(&w[o * in_dim..(o + 1) * in_dim], q))
    }

    /// The matrix whose row `o` `row(o, q)` writes as i8 (`in_dim` of them), returning its scale.
    pub fn from_rows(out_dim: usize, in_dim: usize, mut row: impl FnMut(usize, &mut [i8]) -> f32) -> Option<Self> {
        if in_dim == 0 || out_dim == 0 {
            return None;
        }
        let k_padded = in_dim.div_ceil(4) * 4;
        let n_panels = out_dim.div_ceil(NR);
        let mut panels = vec![0i8; n_panels.checked_mul(NR * k_padded)?];
        let (mut scales, mut sums) = (vec![0f32; n_panels * NR], vec![0f32; n_panels * NR]);
        let mut q = vec![0i8; k_padded];
        for o in 0..out_dim {
            scales[o] = row(o, &mut q[..in_dim]);
            sums[o] = q.iter().map(|&q| q as i32).sum::<i32>() as f32;
            // Placed 4 bytes at a time: an index per value made this the slowest step of
            // loading a q8 ViT (~0.4 s).
            let first = panel_index(o, 0, k_padded);
            for (k4, q) in q.chunks_exact(4).enumerate() {
                let at = first + k4 * 4 * NR;
                panels[at..at + 4].copy_from_slice(q);
            }
        }
        Some(Self { panels, scales, sums, out_dim, in_dim, k_padded })
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The weight it holds, `[out, in]` row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.out_dim).flat_map(|o| (0..self.in_dim).map(move |k| self.panels[panel_index(o, k, self.k_padded)] as f32 * self.scales[o])).collect()
    }

    /// y = x·Wᵀ (+ b) for `x` `[rows, in]`: `[rows, out]`, with `then` run over each row of the
    /// output as it is made. None when the lengths disagree.
    pub fn matmul_then(&self, x: &[f32], bias: Option<&[f32]>, then: Option<&dyn Fn(&mut [f32])>) -> Option<Vec<f32>> {
        let (out_dim, in_dim, kp) = (self.out_dim, self.in_dim, self.k_padded);
        if x.len() % in_dim != 0 || bias.is_some_and(|b| b.len() != out_dim) {
            return None;
        }
        let rows = x.len() / in_dim;
        let xq = quantize_rows(x, rows, in_dim, kp);
        let n_panels = out_dim.div_ceil(NR);
        let ldc = n_panels * NR;
        // Not zeroed first: the kernel writes every element (its first pass over the inputs
        // stores, later ones add), and zeroing is a pass over the output for nothing.
        let mut sums: Vec<i32> = Vec::with_capacity(rows * ldc);
        // SAFETY: xq.q holds rows × kp bytes (kp a multiple of 4 and > 0, each 0..=127), the
        // panels n_panels × kp × 12 and `sums` room for rows × ldc (`quantize`,
        // `quantize_rows`); `gemm` writes all rows × ldc of them, so the length can cover them.
        unsafe {
            let args = (xq.q.as_ptr(), rows, kp, kp, self.panels.as_ptr(), n_panels, sums.as_mut_ptr(), ldc);
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            let done = super::relaxed::ready() && {
                super::relaxed::int8_gemm(args);
                true
            };
            #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
            let done = false;
            if !done {
                kernel::gemm(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7);
            }
            sums.set_len(rows * ldc);
        }
        let zeros;
        let bias = match bias {
            Some(b) => b,
            None => {
                zeros = vec![0f32; out_dim];
                &zeros
            }
        };
        let (scales, weight_sums) = (&self.scales[..out_dim], &self.sums[..out_dim]);
        let mut y = vec![0f32; rows * out_dim];
        for (r, (yr, sr)) in y.chunks_exact_mut(out_dim).zip(sums.chunks_exact(ldc)).enumerate() {
            let (step, min) = (xq.step[r], xq.min[r]);
            // Σ w·x ≈ scale · (step · Σ q·qx + min · Σ q) + b, in this order everywhere; one
            // straight loop over the outputs, which LLVM vectorizes.
            for ((((y, &s), &scale), &ws), &b) in yr.iter_mut().zip(&sr[..out_dim]).zip(scales).zip(weight_sums).zip(bias) {
                *y = scale * (step * s as f32 + min * ws) + b;
            }
            if let Some(then) = then {
                then(yr);
            }
        }
        Some(y)
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod kernel {
    use core::arch::wasm32::*;
    type V = v128;
    /// The 16 weight bytes as two i16x8 halves.
    type W = (v128, v128);

    #[inline(always)]
    fn zero() -> V {
        i32x4_splat(0)
    }

    /// SAFETY (loads, stores): 16 bytes at `p` in bounds; wasm needs no alignment.
    #[inline(always)]
    unsafe fn load_i32(p: *const i32) -> V {
        v128_load(p as *const v128)
    }

    #[inline(always)]
    unsafe fn store_i32(p: *mut i32, v: V) {
        v128_store(p as *mut v128, v)
    }

    #[inline(always)]
    unsafe fn weights(p: *const i8) -> W {
        let v = v128_load(p as *const v128);
        (i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v))
    }

    /// The 4 input bytes at `p`, twice, as i16x8. SAFETY: 4 bytes at `p` in bounds.
    #[inline(always)]
    unsafe fn inputs(p: *const u8) -> V {
        u16x8_extend_low_u8x16(v128_load32_splat(p as *const u32))
    }

    /// Each output's 4 products summed: simd128's i16 dot gives pairs, added pairwise.
    #[inline(always)]
    fn dot(w: W, x: V, acc: V) -> V {
        let (lo, hi) = (i32x4_dot_i16x8(w.0, x), i32x4_dot_i16x8(w.1, x));
        i32x4_add(acc, i32x4_add(i32x4_shuffle::<0, 2, 4, 6>(lo, hi), i32x4_shuffle::<1, 3, 5, 7>(lo, hi)))
    }

    /// 6 sums + 3 weight vectors + 2 inputs + a product + the ones vector of the widening
    /// stay within x64's 16 registers (3 rows spilled two sums a step).
    const MR: usize = 2;
    include!("int8_kernel.rs");
}

/// x86-64 natively: simd128's loops in SSE2 (part of every x86-64 CPU, so no detection).
/// The scalar spelling below took a SigLIP-B encoder 4.6 s against 0.6 s in f32.
#[cfg(target_arch = "x86_64")]
mod kernel {
    use core::arch::x86_64::*;
    type V = __m128i;
    /// The 16 weight bytes as two i16x8 halves.
    type W = (__m128i, __m128i);

    #[inline(always)]
    fn zero() -> V {
        // SAFETY: SSE2 is part of x86-64.
        unsafe { _mm_setzero_si128() }
    }

    /// SAFETY (loads, stores): 16 bytes at `p` in bounds (unaligned access).
    #[inline(always)]
    unsafe fn load_i32(p: *const i32) -> V {
        _mm_loadu_si128(p as *const __m128i)
    }

    #[inline(always)]
    unsafe fn store_i32(p: *mut i32, v: V) {
        _mm_storeu_si128(p as *mut __m128i, v)
    }

    /// Sign-extended to i16 by pairing each byte with itself and shifting arithmetically.
    #[inline(always)]
    unsafe fn weights(p: *const i8) -> W {
        let v = _mm_loadu_si128(p as *const __m128i);
        (_mm_srai_epi16::<8>(_mm_unpacklo_epi8(v, v)), _mm_srai_epi16::<8>(_mm_unpackhi_epi8(v, v)))
    }

    /// The 4 input bytes at `p`, twice, as i16x8. SAFETY: 4 bytes at `p` in bounds.
    #[inline(always)]
    unsafe fn inputs(p: *const u8) -> V {
        _mm_unpacklo_epi8(_mm_set1_epi32(core::ptr::read_unaligned(p as *const i32)), _mm_setzero_si128())
    }

    /// Each output's 4 products summed: `pmaddwd` gives pairs, added pairwise.
    #[inline(always)]
    fn dot(w: W, x: V, acc: V) -> V {
        // SAFETY: SSE2 is part of x86-64.
        unsafe {
            let (lo, hi) = (_mm_castsi128_ps(_mm_madd_epi16(w.0, x)), _mm_castsi128_ps(_mm_madd_epi16(w.1, x)));
            let even = _mm_castps_si128(_mm_shuffle_ps::<0b10_00_10_00>(lo, hi));
            let odd = _mm_castps_si128(_mm_shuffle_ps::<0b11_01_11_01>(lo, hi));
            _mm_add_epi32(acc, _mm_add_epi32(even, odd))
        }
    }

    /// As simd128's: 16 SIMD registers.
    const MR: usize = 2;
    include!("int8_kernel.rs");
}

#[cfg(not(any(target_arch = "x86_64", all(target_arch = "wasm32", target_feature = "simd128"))))]
mod kernel {
    type V = [i32; 4];
    type W = [i8; 16];

    #[inline(always)]
    fn zero() -> V {
        [0; 4]
    }

    #[inline(always)]
    unsafe fn load_i32(p: *const i32) -> V {
        core::ptr::read_unaligned(p as *const V)
    }

    #[inline(always)]
    unsafe fn store_i32(p: *mut i32, v: V) {
        core::ptr::write_unaligned(p as *mut V, v)
    }

    #[inline(always)]
    unsafe fn weights(p: *const i8) -> W {
        core::ptr::read_unaligned(p as *const W)
    }

    #[inline(always)]
    unsafe fn inputs(p: *const u8) -> [u8; 4] {
        core::ptr::read_unaligned(p as *const [u8; 4])
    }

    #[inline(always)]
    fn dot(w: W, x: [u8; 4], mut acc: V) -> V {
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc += (0..4).map(|t| w[4 * j + t] as i32 * x[t] as i32).sum::<i32>();
        }
        acc
    }

    const MR: usize = 2;
    include!("int8_kernel.rs");
}

use kernel::NR;

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.618 + seed as f32) * 12.9898).sin()).collect()
    }

    /// What the kernel computes, spelled out: the same quantization, plain integer sums, the
    /// same scaling.
    fn reference(w: &Int8Weight, x: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let (out_dim, in_dim) = w.dims();
        let rows = x.len() / in_dim;
        let xq = quantize_rows(x, rows, in_dim, w.k_padded);
        let wq: Vec<f32> = w.dequantize();
        let mut y = Vec::new();
        for r in 0..rows {
            for o in 0..out_dim {
                let s: i32 = (0..in_dim)
                    .map(|k| {
                        let q = if w.scales[o] > 0.0 { (wq[o * in_dim + k] / w.scales[o]).round() as i32 } else { 0 };
                        q * xq.q[r * w.k_padded + k] as i32
                    })
                    .sum();
                let v = w.scales[o] * (xq.step[r] * s as f32 + xq.min[r] * w.sums[o]);
                y.push(b.map_or(v, |b| v + b[o]));
            }
        }
        y
    }

    #[test]
    fn every_shape_edge_gives_the_reference_sums() {
        // Rows not a multiple of 3, outputs not of 12, inputs not of 4 and over one pass.
        for (rows, out_dim, in_dim) in [(1, 1, 1), (2, 5, 7), (3, 12, 16), (4, 13, 33), (5, 24, 512), (7, 30, 1100), (196, 36, 64)] {
            let w = Int8Weight::quantize(&noise(out_dim * in_dim, 1), out_dim, in_dim).expect("lengths agree");
            let (x, b) = (noise(rows * in_dim, 2), noise(out_dim, 3));
            assert_eq!(w.matmul_then(&x, Some(&b), None).expect("lengths agree"), reference(&w, &x, Some(&b)), "{rows}×{in_dim}→{out_dim}");
        }
    }

    #[test]
    fn close_to_f32_and_each_row_alone_as_in_a_batch() {
        let (rows, out_dim, in_dim) = (9, 40, 768);
        let wf = noise(out_dim * in_dim, 4);
        let w = Int8Weight::quantize(&wf, out_dim, in_dim).expect("lengths agree");
        // Skewed rows, as after GELU.
        let x: Vec<f32> = noise(rows * in_dim, 5).into_iter().map(|v| if v > 0.0 { 3.0 * v } else { 0.1 * v }).collect();
        let y = w.matmul_then(&x, None, None).expect("lengths agree");
        for (r, xr) in x.chunks_exact(in_dim).enumerate() {
            assert_eq!(w.matmul_then(xr, None, None).expect("lengths agree"), y[r * out_dim..(r + 1) * out_dim]);
            for o in 0..out_dim {
                let exact: f32 = (0..in_dim).map(|k| wf[o * in_dim + k] * xr[k]).sum();
                let norm: f32 = (0..in_dim).map(|k| (wf[o * in_dim + k] * xr[k]).abs()).sum();
                assert!((y[r * out_dim + o] - exact).abs() < 0.01 * norm, "row {r} out {o}: {} vs {exact}", y[r * out_dim + o]);
            }
        }
    }

    /// Each weight is its row's rounding, at the place `panel_index` gives; padding stays 0.
    #[test]
    fn each_weight_is_its_row_rounded_at_its_place() {
        for (out_dim, in_dim) in [(1, 1), (5, 7), (13, 33), (25, 64)] {
            let w = noise(out_dim * in_dim, 7);
            let q = Int8Weight::quantize(&w, out_dim, in_dim).expect("lengths agree");
            let mut placed = vec![false; q.panels.len()];
            for (o, row) in w.chunks_exact(in_dim).enumerate() {
                let inv = 1.0 / (row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
                for (k, &v) in row.iter().enumerate() {
                    assert_eq!(q.panels[panel_index(o, k, q.k_padded)], (v * inv).round_ties_even() as i8, "{out_dim}×{in_dim}: ({o}, {k})");
                    placed[panel_index(o, k, q.k_padded)] = true;
                }
            }
            assert!(q.panels.iter().zip(&placed).all(|(&q, &placed)| placed || q == 0), "{out_dim}×{in_dim}: padding not zero");
        }
    }

    #[test]
    fn the_weight_round_trips_and_bad_lengths_are_refused() {
        let w = noise(5 * 7, 6);
        let q = Int8Weight::quantize(&w, 5, 7).expect("lengths agree");
        for (a, b) in q.dequantize().iter().zip(&w) {
            assert!((a - b).abs() <= 1.0 / 254.0 + 1e-6);
        }
        assert!(Int8Weight::quantize(&w, 5, 6).is_none());
        assert!(q.matmul_then(&[0.0; 8], None, None).is_none());
        assert!(q.matmul_then(&[0.0; 7], Some(&[0.0; 4]), None).is_none());
        // A zero row and a constant row: no division by zero.
        let zeros = Int8Weight::quantize(&[0.0; 14], 2, 7).expect("lengths agree");
        assert_eq!(zeros.matmul_then(&[1.5; 7], None, None).expect("lengths agree"), vec![0.0, 0.0]);
    }
}
