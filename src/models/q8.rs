//! q8_0 weights (ggml's block format: i8 values, one f32 scale per 32 inputs) laid out for the
//! decoder's matrix–vector products, which read every weight once per token and are bound by
//! memory. What makes the WASM loops cheaper per byte, so that more of the stream overlaps:
//! - four output rows are interleaved block by block, so one load of the input serves four rows
//!   and the four sums of a block leave as one vector (one scale load, one convert, one multiply);
//! - with simd128, the i8 → i16 widening is two shifts (even bytes, odd bytes) instead of
//!   `extend_high`, which V8 lowers to a shuffle plus a widening; the input row is stored with
//!   its even and odd lanes of every 16 apart to match.
//!
//! Where relaxed SIMD's i8 dot product is one instruction (`vpdpbusd`: AVX-VNNI, which the
//! encoder's 8-bit GEMM detects by timing both spellings), the side module's kernel takes the
//! input as two 7-bit halves instead (`relaxed_module.rs`' `q8_groups`: 6–8 % less time a
//! SmolLM-135M or GPT-2 token, Chromium 156 on a Xeon with AVX-VNNI, alternated builds).
//! Without AVX-VNNI, V8 lowers the dot to two multiplies, and the halves took 14.5–15.5 ms a
//! SmolLM-135M token against 11.4–12.3 for the shifts (AMD EPYC with AVX-512).
//!
//! A block's sum is an exact integer, so the order of its products does not matter: the scalar
//! loop (native builds) and the simd128 loop give the same bits.

use std::sync::Arc;

/// Inputs per q8_0 block.
pub const BLOCK: usize = 32;
/// Output rows interleaved together.
const GROUP: usize = 4;

/// A q8_0 matrix `[out_dim, in_dim]`: for each group of four output rows and each block of 32
/// inputs, the four rows' 32 values one after another (`qs`) and their four scales (`scales`).
/// A last group short of four rows is padded with zero rows.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    qs: Arc<Vec<i8>>,
    scales: Arc<Vec<f32>>,
    out_dim: usize,
    in_dim: usize,
}

/// An input row quantized for `Q8Matrix::matvec`: 14-bit integers with one scale (|error| ≤
/// max|x| / 16382, far below q8's own).
pub struct QuantizedRow {
    /// Each 16 values reordered evens then odds, as the shifts kernel widens the weights.
    lanes: Vec<i16>,
    /// For the relaxed-SIMD kernel (empty where it is not used): per block of 32, the high then
    /// the low 7 bits of each value + 8192, in order.
    #[cfg_attr(not(all(target_arch = "wasm32", target_feature = "simd128")), allow(dead_code))]
    halves: Vec<u8>,
    scale: f32,
}

/// The largest magnitude of a quantized input (14 bits: what the results have always been
/// computed with, kept so that they stay the same bits).
const X_MAX: f32 = 8191.0;

impl Q8Matrix {
    /// From row-major blocks (`qs` `[out, in]`, `scales` `[out, in / 32]`: the layout of ggml,
    /// of `q8_0_blocks` and of a quantized `model.safetensors`). None when the lengths disagree
    /// or rows are not whole blocks.
    pub fn from_rows(qs: &[i8], scales: &[f32], out_dim: usize, in_dim: usize) -> Option<Self> {
        let blocks = in_dim / BLOCK;
        if in_dim % BLOCK != 0 || qs.len() != out_dim * in_dim || scales.len() != out_dim * blocks {
            return None;
        }
        let groups = out_dim.div_ceil(GROUP);
        let mut grouped = vec![0i8; groups * GROUP * in_dim];
        let mut grouped_scales = vec![0f32; groups * GROUP * blocks];
        for row in 0..out_dim {
            let (g, k) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let at = ((g * blocks + b) * GROUP + k) * BLOCK;
                grouped[at..at + BLOCK].copy_from_slice(&qs[row * in_dim + b * BLOCK..row * in_dim + (b + 1) * BLOCK]);
                grouped_scales[(g * blocks + b) * GROUP + k] = scales[row * blocks + b];
            }
        }
        Some(Self { qs: Arc::new(grouped), scales: Arc::new(grouped_scales), out_dim, in_dim })
    }

    /// `(out_dim, in_dim)`
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The f32 matrix `[out, in]` the blocks hold (row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        for (row, w) in w.chunks_exact_mut(self.in_dim.max(1)).enumerate() {
            self.dequantize_row(row, w);
        }
        w
    }

    /// Row `row` (< out_dim) of [`Q8Matrix::dequantize`] into `out` (`in_dim` long).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let blocks = self.in_dim / BLOCK;
        let (g, k) = (row / GROUP, row % GROUP);
        for (b, w) in out.chunks_exact_mut(BLOCK).enumerate().take(blocks) {
            let at = (g * blocks + b) * GROUP + k;
            let s = self.scales[at];
            w.iter_mut().zip(&self.qs[at * BLOCK..(at + 1) * BLOCK]).for_each(|(w, &q)| *w = q as f32 * s);
        }
    }

    /// Row `row`'s values into `out` (`in_dim` long) and their scale, when every block of the
    /// row has the same one (a matrix the `quantize` command wrote per output feature); None,
    /// writing nothing, otherwise.
    pub fn row_with_one_scale(&self, row: usize, out: &mut [i8]) -> Option<f32> {
        let blocks = self.in_dim / BLOCK;
        let (g, k) = (row / GROUP, row % GROUP);
        let at = |b: usize| (g * blocks + b) * GROUP + k;
        let scale = self.scales[at(0)];
        if (1..blocks).any(|b| self.scales[at(b)].to_bits() != scale.to_bits()) {
            return None;
        }
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate().take(blocks) {
            out.copy_from_slice(&self.qs[at(b) * BLOCK..(at(b) + 1) * BLOCK]);
        }
        Some(scale)
    }

    /// `xs` (rows of `in_dim` values) quantized for `matvec`; None when `xs` is not whole rows.
    pub fn quantize_rows(&self, xs: &[f32]) -> Option<Vec<QuantizedRow>> {
        if self.in_dim == 0 || xs.len() % self.in_dim != 0 {
            return None;
        }
        let halves = relaxed_kernel();
        Some(xs.chunks_exact(self.in_dim).map(|x| quantize_row(x, halves)).collect())
    }

    /// W·x for each row of `xs` and the output features `outputs` (starting at a multiple of
    /// four): `[xs.len(), outputs.len()]`, row-major. Outputs past `out_dim` are not returned.
    pub fn matvec(&self, xs: &[QuantizedRow], outputs: std::ops::Range<usize>) -> Vec<f32> {
        let outputs = outputs.start..outputs.end.min(self.out_dim);
        let width = outputs.len();
        let mut y = vec![0f32; xs.len() * width];
        let (first, groups) = (outputs.start / GROUP, outputs.end.div_ceil(GROUP).saturating_sub(outputs.start / GROUP));
        let mut results = vec![0f32; groups * GROUP];
        for (m, x) in xs.iter().enumerate() {
            self.groups(first, groups, x, &mut results);
            for (y, r) in y[m * width..(m + 1) * width].iter_mut().zip(&results[outputs.start - first * GROUP..]) {
                *y = r * x.scale;
            }
        }
        y
    }

    /// The four results of each of `groups` groups from `first`, for one input row (without
    /// its scale), into `out`.
    fn groups(&self, first: usize, groups: usize, x: &QuantizedRow, out: &mut [f32]) {
        let blocks = self.in_dim / BLOCK;
        let (g0, g1) = (first, first + groups);
        if g1 * GROUP * self.in_dim > self.qs.len() || out.len() < groups * GROUP || x.lanes.len() != self.in_dim {
            return;
        }
        let (qs, scales) = (&self.qs[g0 * GROUP * self.in_dim..], &self.scales[g0 * GROUP * blocks..]);
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        if x.halves.len() == blocks * 2 * BLOCK && super::relaxed::ready() {
            // SAFETY: g1 ≤ the matrix's groups (checked above), so qs and scales from g0 hold
            // `groups` groups of `blocks` blocks; x.halves holds 64 bytes a block; out ≥ 4 · groups.
            unsafe { super::relaxed::q8_groups(qs.as_ptr(), scales.as_ptr(), x.halves.as_ptr(), blocks, groups, out.as_mut_ptr()) };
            return;
        }
        for g in (0..groups).map(|i| stream_order(i, groups)) {
            let at = g * GROUP * self.in_dim;
            out[g * GROUP..(g + 1) * GROUP].copy_from_slice(&group_dot(
                &qs[at..at + GROUP * self.in_dim],
                &scales[g * GROUP * blocks..(g + 1) * GROUP * blocks],
                &x.lanes,
            ));
        }
    }
}

/// Round-half-even to 14 bits with one scale, in the kernel's layout (`round_ties_even`:
/// `round` is a library call in WASM).
fn quantize_row(x: &[f32], with_halves: bool) -> QuantizedRow {
    let amax = super::max_abs(x);
    let scale = amax / X_MAX;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut lanes = vec![0i16; x.len()];
    let mut halves = vec![0u8; if with_halves { 2 * x.len() } else { 0 }];
    for (c, (lanes, x)) in lanes.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        // Chunk c is half c % 2 of block c / 2: its high bytes at 64 · (c / 2) + 16 · (c % 2),
        // its low bytes 32 further.
        let at = 64 * (c / 2) + 16 * (c % 2);
        let halves = halves.get_mut(at..at + 48).map(|h| h.split_at_mut(32)).map(|(hi, lo)| (&mut hi[..16], &mut lo[..16]));
        quantize_16(x, inv, lanes, halves);
    }
    QuantizedRow { lanes, halves, scale }
}

/// 16 values times `inv`, rounded half to even, into `lanes` evens then odds. (`as` saturates
/// and sends NaN to 0, as the SIMD conversion does.) Natively no kernel takes the 7-bit halves
/// (`relaxed_kernel()` is false), so none are asked for.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn quantize_16(x: &[f32], inv: f32, lanes: &mut [i16], _halves: Option<(&mut [u8], &mut [u8])>) {
    let q: [i16; 16] = std::array::from_fn(|i| (x[i] * inv).round_ties_even() as i16);
    for p in 0..8 {
        lanes[p] = q[2 * p];
        lanes[8 + p] = q[2 * p + 1];
    }
}

/// The same four lanes at a time (a decoding step quantizes ~150 k inputs: 0.33 ms of a
/// SmolLM-135M token one by one). `nearest` rounds half to even; the products stay within
/// ±8191, so the saturating narrowings change nothing but NaN (→ 0).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn quantize_16(x: &[f32], inv: f32, lanes: &mut [i16], halves: Option<(&mut [u8], &mut [u8])>) {
    use core::arch::wasm32::*;
    if x.len() < 16 || lanes.len() < 16 {
        return;
    }
    let inv = f32x4_splat(inv);
    // SAFETY: both slices hold 16 elements (checked above); wasm loads need no alignment.
    let (a, b) = unsafe {
        let q = [0, 4, 8, 12].map(|o| i32x4_trunc_sat_f32x4(f32x4_nearest(f32x4_mul(v128_load(x.as_ptr().add(o) as *const v128), inv))));
        let (a, b) = (i16x8_narrow_i32x4(q[0], q[1]), i16x8_narrow_i32x4(q[2], q[3]));
        v128_store(lanes.as_mut_ptr() as *mut v128, i16x8_shuffle::<0, 2, 4, 6, 8, 10, 12, 14>(a, b));
        v128_store(lanes.as_mut_ptr().add(8) as *mut v128, i16x8_shuffle::<1, 3, 5, 7, 9, 11, 13, 15>(a, b));
        (a, b)
    };
    if let Some((hi, lo)) = halves {
        if hi.len() < 16 || lo.len() < 16 {
            return;
        }
        // |q| ≤ 8191 here, so q + 8192 is 1..=16383 and both halves 0..=127.
        let (ua, ub) = (i16x8_add(a, i16x8_splat(8192)), i16x8_add(b, i16x8_splat(8192)));
        let low = i16x8_splat(127);
        // SAFETY: both hold 16 bytes (checked above).
        unsafe {
            v128_store(hi.as_mut_ptr() as *mut v128, u8x16_narrow_i16x8(u16x8_shr(ua, 7), u16x8_shr(ub, 7)));
            v128_store(lo.as_mut_ptr() as *mut v128, u8x16_narrow_i16x8(v128_and(ua, low), v128_and(ub, low)));
        }
    }
}

/// Whether `Q8Matrix::matvec` runs the relaxed-SIMD kernel here: where the side module runs and
/// its fused i8 dot product is the faster spelling (AVX-VNNI: one instruction; elsewhere V8's
/// two multiplies lose to the shifts, 14.5–15.5 against 11.4–12.3 ms a SmolLM-135M token on
/// an AMD EPYC without it).
fn relaxed_kernel() -> bool {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return super::relaxed::ready() && super::relaxed::fused_dot();
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    false
}

/// The four rows of one group against `x`: per block, the exact integer sum of its products
/// times the block's scale, added up block after block in f32.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn group_dot(qs: &[i8], scales: &[f32], x: &[i16]) -> [f32; GROUP] {
    let mut acc = [0f32; GROUP];
    for ((q, s), x) in qs.chunks_exact(GROUP * BLOCK).zip(scales.chunks_exact(GROUP)).zip(x.chunks_exact(BLOCK)) {
        for k in 0..GROUP {
            let q = &q[k * BLOCK..(k + 1) * BLOCK];
            let mut sum = 0i32;
            for (q, x) in q.chunks_exact(16).zip(x.chunks_exact(16)) {
                for p in 0..8 {
                    sum += q[2 * p] as i32 * x[p] as i32 + q[2 * p + 1] as i32 * x[8 + p] as i32;
                }
            }
            acc[k] += sum as f32 * s[k];
        }
    }
    acc
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod kernel {
    use core::arch::wasm32::*;

    /// [Σ a, Σ b, Σ c, Σ d] of four i32x4 vectors.
    #[inline(always)]
    fn horizontal_sums([a, b, c, d]: [v128; 4]) -> v128 {
        let ab = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(a, b), i32x4_shuffle::<2, 6, 3, 7>(a, b));
        let cd = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(c, d), i32x4_shuffle::<2, 6, 3, 7>(c, d));
        i32x4_add(i64x2_shuffle::<0, 2>(ab, cd), i64x2_shuffle::<1, 3>(ab, cd))
    }

    /// The four rows of a group: Σ over blocks b, in order, of f32(`sums(b)`) · scales[4b..4b + 4],
    /// `sums(b)` being each row's exact Σ q·x over block b. SAFETY: scales[..4 · blocks] in bounds.
    #[inline(always)]
    unsafe fn group_results(blocks: usize, scales: *const f32, sums: impl Fn(usize) -> v128) -> v128 {
        let mut acc = f32x4_splat(0.0);
        for b in 0..blocks {
            acc = f32x4_add(acc, f32x4_mul(f32x4_convert_i32x4(sums(b)), v128_load(scales.add(4 * b) as *const v128)));
        }
        acc
    }

    /// The `i`-th group to compute of `groups`: the first and the second half alternate (0, h, 1,
    /// h + 1, …). Two streams from memory overlap with the arithmetic better than one: a SmolLM
    /// token's matrices took 17.1 ms instead of 20.0 in a microbenchmark (Chromium, this machine;
    /// four streams gained nothing more).
    #[inline(always)]
    pub fn stream_order(i: usize, groups: usize) -> usize {
        let half = groups.div_ceil(2);
        if i % 2 == 0 {
            i / 2
        } else {
            half + i / 2
        }
    }

    /// `group_dot` with simd128's i16 dot product.
    pub fn group_dot(qs: &[i8], scales: &[f32], x: &[i16]) -> [f32; 4] {
        let blocks = x.len() / super::BLOCK;
        if qs.len() < blocks * 128 || scales.len() < blocks * 4 {
            return [0.0; 4];
        }
        // SAFETY: the check above keeps every load in bounds (block b reads x[32b..32b+32],
        // qs[128b..128b+128] and scales[4b..4b+4]); wasm loads need no alignment.
        let results = unsafe {
            group_results(blocks, scales.as_ptr(), |b| {
                let xb = x.as_ptr().add(32 * b);
                let xs = [0, 8, 16, 24].map(|o| v128_load(xb.add(o) as *const v128));
                let qb = qs.as_ptr().add(128 * b);
                horizontal_sums([0, 32, 64, 96].map(|o| {
                    let (q0, q1) = (v128_load(qb.add(o) as *const v128), v128_load(qb.add(o + 16) as *const v128));
                    // As i16 lanes, each holds an even byte (low half) and an odd byte (high half).
                    let d0 = i32x4_dot_i16x8(i16x8_shr(i16x8_shl(q0, 8), 8), xs[0]);
                    let d1 = i32x4_dot_i16x8(i16x8_shr(q0, 8), xs[1]);
                    let d2 = i32x4_dot_i16x8(i16x8_shr(i16x8_shl(q1, 8), 8), xs[2]);
                    let d3 = i32x4_dot_i16x8(i16x8_shr(q1, 8), xs[3]);
                    i32x4_add(i32x4_add(d0, d1), i32x4_add(d2, d3))
                }))
            })
        };
        [f32x4_extract_lane::<0>(results), f32x4_extract_lane::<1>(results), f32x4_extract_lane::<2>(results), f32x4_extract_lane::<3>(results)]
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
use kernel::{group_dot, stream_order};

/// Natively, groups in order (the WASM order only helps V8's loads overlap).
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn stream_order(i: usize, _groups: usize) -> usize {
    i
}
