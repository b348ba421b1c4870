//! f32 GEMM on weights packed once at load, for the encoder side in WASM.
//!
//! candle's `gemm` reaches ~30 GFLOP/s on one core of simd128 (Chromium, this machine), and
//! packs the weight again on every call. V8 gives WASM 16 SIMD registers (one kept for
//! scratch), so the widest micro-tile that stays in registers is 3 rows × 12 output features:
//! 9 accumulators, 3 weight vectors and one broadcast input. With the weight laid out as that
//! kernel reads it (panels of 12 output features, `[in][12]` each, read front to back) it runs
//! at ~40 GFLOP/s, and at ~50 with relaxed-SIMD fused multiply-add (measured in Node on
//! SigLIP-B's shapes, 196 × 768 × {768, 3072}).
//!
//! Every output sums its products in input order, whatever rows come with it, so a row gives
//! the same bits alone, in a batch, or on any thread. Natively the same code runs on `[f32; 4]`
//! (for tests); native inference keeps candle's multi-threaded GEMM.

/// Whether packing pays in this build: the simd128 kernel beats candle's GEMM only in WASM.
pub const FASTER_THAN_GEMM: bool = cfg!(all(target_arch = "wasm32", target_feature = "simd128"));

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod lanes {
    use core::arch::wasm32::*;
    pub type V = v128;

    #[inline(always)]
    pub fn zero() -> V {
        f32x4_splat(0.0)
    }

    /// SAFETY (all loads and stores): `p..p + 4` in bounds; wasm needs no alignment.
    #[inline(always)]
    pub unsafe fn load(p: *const f32) -> V {
        v128_load(p as *const v128)
    }

    #[inline(always)]
    pub unsafe fn store(p: *mut f32, v: V) {
        v128_store(p as *mut v128, v)
    }

    /// `*p` in every lane. SAFETY: `p` in bounds.
    #[inline(always)]
    pub unsafe fn splat(p: *const f32) -> V {
        v128_load32_splat(p as *const u32)
    }

    /// a·b + c; one rounding where relaxed SIMD fuses it (the browser decides).
    #[cfg(target_feature = "relaxed-simd")]
    #[inline(always)]
    pub fn madd(a: V, b: V, c: V) -> V {
        f32x4_relaxed_madd(a, b, c)
    }

    #[cfg(not(target_feature = "relaxed-simd"))]
    #[inline(always)]
    pub fn madd(a: V, b: V, c: V) -> V {
        f32x4_add(f32x4_mul(a, b), c)
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
mod lanes {
    pub type V = [f32; 4];

    #[inline(always)]
    pub fn zero() -> V {
        [0.0; 4]
    }

    #[inline(always)]
    pub unsafe fn load(p: *const f32) -> V {
        core::ptr::read_unaligned(p as *const V)
    }

    #[inline(always)]
    pub unsafe fn store(p: *mut f32, v: V) {
        core::ptr::write_unaligned(p as *mut V, v)
    }

    #[inline(always)]
    pub unsafe fn splat(p: *const f32) -> V {
        [*p; 4]
    }

    #[inline(always)]
    pub fn madd(a: V, b: V, c: V) -> V {
        [a[0] * b[0] + c[0], a[1] * b[1] + c[1], a[2] * b[2] + c[2], a[3] * b[3] + c[3]]
    }
}

mod kernel {
    use super::lanes::*;
    include!("packed_kernel.rs");
}

use super::half::Half;
use kernel::NR;

/// A `[out, in]` weight (`nn.Linear`) in panels of 12 output features, each `[in][12]`, the
/// last zero-padded: f32, or the 16-bit values of a checkpoint (widened a panel at a time).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    panels: Panels,
    out_dim: usize,
    in_dim: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Panels {
    F32(Vec<f32>),
    Half(Vec<u16>, Half),
}

/// `w`'s `[out_dim, in_dim]` rows, `ldw` apart, in panels of NR (`rows_fit` checked).
fn panel_layout<T: Copy + Default>(w: &[T], out_dim: usize, in_dim: usize, ldw: usize) -> Vec<T> {
    let mut panels = vec![T::default(); out_dim.div_ceil(NR) * in_dim * NR];
    for o in 0..out_dim {
        let (p, j) = (o / NR, o % NR);
        let panel = &mut panels[p * in_dim * NR..(p + 1) * in_dim * NR];
        for (k, &v) in w[o * ldw..o * ldw + in_dim].iter().enumerate() {
            panel[k * NR + j] = v;
        }
    }
    panels
}

impl PackedWeight {
    /// `w` is `[out_dim, in_dim]` row-major.
    pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Option<Self> {
        (w.len() == out_dim * in_dim).then(|| Self::pack_rows(w, out_dim, in_dim, in_dim))?
    }

    /// `w` holds `[out_dim, in_dim]` as rows `ldw` floats apart (an attention head's keys, where
    /// they lie among the other heads').
    pub fn pack_rows(w: &[f32], out_dim: usize, in_dim: usize, ldw: usize) -> Option<Self> {
        if in_dim == 0 || !rows_fit(w.len(), out_dim, in_dim, ldw) {
            return None;
        }
        Some(Self { panels: Panels::F32(panel_layout(w, out_dim, in_dim, ldw)), out_dim, in_dim })
    }

    /// `w` is `[out_dim, in_dim]` row-major 16-bit floats, kept 16-bit: each panel is widened to
    /// f32 as the GEMM reaches it, so the products are those of the f32 values.
    pub fn pack_half(w: &[u16], kind: Half, out_dim: usize, in_dim: usize) -> Option<Self> {
        if in_dim == 0 || w.len() != out_dim * in_dim {
            return None;
        }
        Some(Self { panels: Panels::Half(panel_layout(w, out_dim, in_dim, in_dim), kind), out_dim, in_dim })
    }

    /// `w` is `[in_dim, out_dim]` row-major (HF GPT-2 `Conv1D`).
    pub fn pack_in_out(w: &[f32], in_dim: usize, out_dim: usize) -> Option<Self> {
        (w.len() == out_dim * in_dim).then(|| Self::pack_in_out_rows(w, in_dim, out_dim, out_dim))?
    }

    /// `w` holds `[in_dim, out_dim]` as rows `ldw` floats apart (an attention head's values).
    pub fn pack_in_out_rows(w: &[f32], in_dim: usize, out_dim: usize, ldw: usize) -> Option<Self> {
        if in_dim == 0 || !rows_fit(w.len(), in_dim, out_dim, ldw) {
            return None;
        }
        let mut panels = vec![0f32; out_dim.div_ceil(NR) * in_dim * NR];
        for k in 0..in_dim {
            for (o, &v) in w[k * ldw..k * ldw + out_dim].iter().enumerate() {
                panels[((o / NR) * in_dim + k) * NR + o % NR] = v;
            }
        }
        Some(Self { panels: Panels::F32(panels), out_dim, in_dim })
    }

    /// Whether the weight is held in 16 bits.
    pub fn is_half(&self) -> bool {
        matches!(self.panels, Panels::Half(..))
    }

    /// The weight back as `[out_dim, in_dim]` row-major.
    pub fn unpack(&self) -> Vec<f32> {
        let (out_dim, in_dim) = (self.out_dim, self.in_dim);
        let wide;
        let panels = match &self.panels {
            Panels::F32(p) => p,
            Panels::Half(h, kind) => {
                let mut w = vec![0f32; h.len()];
                kind.widen(h, &mut w);
                wide = w;
                &wide
            }
        };
        (0..out_dim).flat_map(|o| (0..in_dim).map(move |k| panels[((o / NR) * in_dim + k) * NR + o % NR])).collect()
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// y = x·Wᵀ (+ b) for `x` `[rows, in]`: `[rows, out]`. None when the lengths disagree.
    pub fn matmul(&self, x: &[f32], bias: Option<&[f32]>) -> Option<Vec<f32>> {
        self.matmul_then(x, bias, None)
    }

    /// `matmul`, with `then` applied to the output a few panels at a time, right after the
    /// kernel wrote them and while they are still in cache (an activation: SigLIP-B's fc1
    /// output is 2.4 MB, more than L2 holds, and a pass of its own over it reads it back from
    /// L3).
    ///
    /// On several threads each takes a share of the panels for all rows (so each weight is read
    /// by one thread; split by rows, every thread streamed all of it), then the shares are put
    /// side by side: every output is the same sum, so the bits are those of one thread.
    pub fn matmul_then(&self, x: &[f32], bias: Option<&[f32]>, then: Option<&(dyn Fn(&mut [f32]) + Sync)>) -> Option<Vec<f32>> {
        if x.len() % self.in_dim != 0 {
            return None;
        }
        let rows = x.len() / self.in_dim;
        let n_panels = self.out_dim.div_ceil(NR);
        let parts = crate::parallel::ranges(n_panels, crate::parallel::threads(), MIN_THREAD_PANELS, 1);
        if parts.len() < 2 {
            let y = self.gemm(x, rows, self.in_dim, bias, then, 0..n_panels)?;
            return Some(compact(y, self.padded_out(), self.out_dim));
        }
        let shares = crate::parallel::map(parts.len(), |i| self.gemm(x, rows, self.in_dim, bias, then, parts[i].clone()));
        let mut y = vec![0f32; rows * self.out_dim];
        for (part, share) in parts.iter().zip(shares) {
            let share = share?;
            let width = part.len() * NR;
            let (start, end) = (part.start * NR, (part.end * NR).min(self.out_dim));
            for (r, row) in share.chunks_exact(width).enumerate() {
                y[r * self.out_dim + start..r * self.out_dim + end].copy_from_slice(&row[..end - start]);
            }
        }
        Some(y)
    }

    /// Output features rounded up to whole panels: the row length of `matmul_padded`'s result.
    pub fn padded_out(&self) -> usize {
        self.out_dim.div_ceil(NR) * NR
    }

    /// y = x·Wᵀ (+ b) for `rows` rows of x, `lda` floats apart: `[rows, padded_out()]`, the
    /// features past `out` 0 (zero weights, zero bias). None when x is too short for the rows or
    /// the bias's length disagrees.
    pub fn matmul_padded(&self, x: &[f32], rows: usize, lda: usize, bias: Option<&[f32]>) -> Option<Vec<f32>> {
        self.gemm(x, rows, lda, bias, None, 0..self.out_dim.div_ceil(NR))
    }

    /// The output panels `part` of y = x·Wᵀ (+ b): `[rows, part.len() × 12]`.
    fn gemm(
        &self,
        x: &[f32],
        rows: usize,
        lda: usize,
        bias: Option<&[f32]>,
        then: Option<&(dyn Fn(&mut [f32]) + Sync)>,
        part: std::ops::Range<usize>,
    ) -> Option<Vec<f32>> {
        let (out_dim, in_dim) = (self.out_dim, self.in_dim);
        let n_panels = out_dim.div_ceil(NR);
        if !rows_fit(x.len(), rows, in_dim, lda) || bias.is_some_and(|b| b.len() != out_dim) || part.start > part.end || part.end > n_panels {
            return None;
        }
        let mut bias_padded = vec![0f32; n_panels * NR];
        if let Some(b) = bias {
            bias_padded[..out_dim].copy_from_slice(b);
        }
        // y holds the part's panels only: panel p is at column (p - first) × 12.
        let (first, ldc) = (part.start, part.len() * NR);
        // Not zeroed first: the kernel writes every element (its first pass over the inputs
        // starts from the bias), and zeroing is a pass over the output for nothing.
        let mut y: Vec<f32> = Vec::with_capacity(rows * ldc);
        let step = if then.is_some() { THEN_PANELS } else { part.len() };
        // A 16-bit weight's panels are widened here, one pass of the kernel's width at a time.
        let mut wide = match &self.panels {
            Panels::F32(_) => Vec::new(),
            Panels::Half(..) => vec![0f32; kernel::KC.min(in_dim) * NR],
        };
        let mut p0 = part.start;
        while p0 < part.end {
            let np = step.min(part.end - p0);
            // SAFETY: x holds rows rows of in_dim floats lda apart (`rows_fit`), the panels
            // n_panels × in_dim × 12 (`panel_layout`), the bias n_panels × 12 floats and y has
            // room for rows rows of ldc = part.len() × 12; panels p0..p0 + np ⊆ part of the
            // weight and bias are in bounds, and at column (p0 - first) × 12 of y, and `wide`
            // holds a pass of one panel (kc ≤ KC inputs × 12). The kernel
            // writes all of their outputs (every row tile, remainder rows included, of every
            // panel; in_dim > 0, as packing refuses 0), so `then` reads written floats, and once
            // every step has run, y's length can cover them all.
            unsafe {
                match &self.panels {
                    Panels::F32(panels) => run_kernel((
                        x.as_ptr(),
                        rows,
                        in_dim,
                        lda,
                        panels.as_ptr().add(p0 * in_dim * NR),
                        np,
                        bias_padded.as_ptr().add(p0 * NR),
                        y.as_mut_ptr().add((p0 - first) * NR),
                        ldc,
                    )),
                    // Pass by pass as the f32 kernel goes (each output's sums start from the bias,
                    // are stored after a pass and resumed by the next: stores of f32 are exact),
                    // so the bits are those of the f32 panels.
                    Panels::Half(halves, kind) => {
                        let mut k0 = 0;
                        while k0 < in_dim {
                            let kc = kernel::KC.min(in_dim - k0);
                            for p in p0..p0 + np {
                                let start = (p * in_dim + k0) * NR;
                                kind.widen(&halves[start..start + kc * NR], &mut wide[..kc * NR]);
                                let bias = if k0 == 0 { bias_padded.as_ptr().add(p * NR) } else { core::ptr::null() };
                                run_kernel((x.as_ptr().add(k0), rows, kc, lda, wide.as_ptr(), 1, bias, y.as_mut_ptr().add((p - first) * NR), ldc));
                            }
                            k0 += kc;
                        }
                    }
                }
                if let Some(then) = then {
                    for r in 0..rows {
                        then(std::slice::from_raw_parts_mut(y.as_mut_ptr().add(r * ldc + (p0 - first) * NR), np * NR));
                    }
                }
            }
            p0 += np;
        }
        // SAFETY: see above.
        unsafe { y.set_len(rows * ldc) };
        Some(y)
    }
}

/// The packed kernel on these arguments (`kernel::gemm`'s): the relaxed-SIMD one where the
/// browser has it.
///
/// SAFETY: as `kernel::gemm`; a null bias resumes the sums the output holds.
unsafe fn run_kernel(args: (*const f32, usize, usize, usize, *const f32, usize, *const f32, *mut f32, usize)) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if super::relaxed::ready() {
        super::relaxed::gemm(args);
        return;
    }
    kernel::gemm(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8);
}

/// Panels a thread takes at least (of 64 for SigLIP-B's 768 outputs): fewer are not worth a
/// thread's wake-up.
const MIN_THREAD_PANELS: usize = 4;

/// Panels a `then` pass follows: 16 × 12 features of SigLIP-B's 196 rows are 150 KB, in L2.
const THEN_PANELS: usize = 16;

/// Whether `rows` rows of `len` floats, `stride` apart, lie within `total` floats.
fn rows_fit(total: usize, rows: usize, len: usize, stride: usize) -> bool {
    rows == 0 || (stride >= len && (rows - 1).checked_mul(stride).and_then(|s| s.checked_add(len)).is_some_and(|end| end <= total))
}

/// Rows of `ldc` floats cut to their first `out_dim`.
fn compact(y: Vec<f32>, ldc: usize, out_dim: usize) -> Vec<f32> {
    if ldc == out_dim {
        return y;
    }
    y.chunks_exact(ldc).flat_map(|row| &row[..out_dim]).copied().collect()
}

/// Which kernel packed weights multiply with on this thread: "relaxed-simd" (fused
/// multiply-add), "simd128", or "portable" (natively, where only tests use it).
pub fn kernel_name() -> &'static str {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return if super::relaxed::ready() { "relaxed-simd" } else { "simd128" };
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    "portable"
}

/// Lets packed weights and 8-bit encoder weights use the relaxed-SIMD kernels where the browser has
/// them (the default), or keeps them on the simd128 ones: to compare the two.
pub fn allow_relaxed_simd(allow: bool) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    super::relaxed::ALLOWED.store(allow, std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let _ = allow;
}

/// Which relaxed-SIMD i8 dot product the 8-bit GEMM takes: `Some(true)` the fused one,
/// `Some(false)` the two-dot spelling, `None` the faster on this machine (timed at first use).
pub fn choose_int8_dot(fused: Option<bool>) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    super::relaxed::choose_int8_dot(fused);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let _ = fused;
}

/// The 8-bit GEMM's kernel on this thread: "relaxed-simd, fused i8 dot" (one instruction with
/// AVX-VNNI), "relaxed-simd, two dots", "simd128", natively "sse2" (x86-64) or "portable".
pub fn int8_kernel_name() -> &'static str {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return match super::relaxed::ready() {
        true if super::relaxed::fused_dot() => "relaxed-simd, fused i8 dot",
        true => "relaxed-simd, two dots",
        false => "simd128",
    };
    #[cfg(target_arch = "x86_64")]
    return "sse2";
    #[cfg(not(any(target_arch = "x86_64", all(target_arch = "wasm32", target_feature = "simd128"))))]
    "portable"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y = x·Wᵀ + b, each output summed in input order as the kernel does.
    fn reference(w: &[f32], x: &[f32], b: &[f32], out_dim: usize, in_dim: usize) -> Vec<f32> {
        x.chunks_exact(in_dim).flat_map(|xr| (0..out_dim).map(move |o| (0..in_dim).fold(b[o], |s, k| xr[k] * w[o * in_dim + k] + s))).collect()
    }

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.618 + seed as f32) * 12.9898).sin()).collect()
    }

    #[test]
    fn every_shape_edge_gives_the_reference_sums() {
        // Rows not a multiple of 3, features not of 12, inputs over one 768-wide pass.
        for (rows, out_dim, in_dim) in [(1, 1, 1), (2, 5, 7), (3, 12, 16), (4, 13, 33), (5, 24, 512), (7, 30, 1100), (196, 36, 64)] {
            let w = noise(out_dim * in_dim, 1);
            let x = noise(rows * in_dim, 2);
            let b = noise(out_dim, 3);
            let packed = PackedWeight::pack(&w, out_dim, in_dim).expect("lengths agree");
            let got = packed.matmul(&x, Some(&b)).expect("lengths agree");
            assert_eq!(got, reference(&w, &x, &b, out_dim, in_dim), "{rows}×{in_dim} · {in_dim}→{out_dim}");
            let no_bias = packed.matmul(&x, None).expect("lengths agree");
            assert_eq!(no_bias, reference(&w, &x, &vec![0.0; out_dim], out_dim, in_dim));
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        let (rows, out_dim, in_dim) = (8, 20, 600);
        let packed = PackedWeight::pack(&noise(out_dim * in_dim, 4), out_dim, in_dim).expect("lengths agree");
        let x = noise(rows * in_dim, 5);
        let all = packed.matmul(&x, None).expect("lengths agree");
        for (r, xr) in x.chunks_exact(in_dim).enumerate() {
            assert_eq!(packed.matmul(xr, None).expect("lengths agree"), all[r * out_dim..(r + 1) * out_dim]);
        }
    }

    #[test]
    fn both_layouts_pack_alike() {
        let (out_dim, in_dim) = (14, 9);
        let w = noise(out_dim * in_dim, 6);
        let t: Vec<f32> = (0..in_dim).flat_map(|k| (0..out_dim).map(|o| w[o * in_dim + k]).collect::<Vec<_>>()).collect();
        let (a, b) =
            (PackedWeight::pack(&w, out_dim, in_dim).expect("lengths agree"), PackedWeight::pack_in_out(&t, in_dim, out_dim).expect("lengths agree"));
        assert_eq!(a.unpack(), w);
        assert_eq!((a.panels, a.out_dim, a.in_dim), (b.panels, b.out_dim, b.in_dim));
    }

    /// Attention's use: keys and values packed from rows among other heads' floats, queries
    /// and scores read as rows further apart than their length, the output left padded.
    #[test]
    fn strided_rows_in_and_padded_rows_out() {
        let (rows, out_dim, in_dim, ldw, lda) = (7, 13, 10, 25, 16);
        let w_wide = noise((out_dim - 1) * ldw + in_dim, 7);
        let x_wide = noise((rows - 1) * lda + in_dim, 8);
        let w: Vec<f32> = (0..out_dim).flat_map(|o| w_wide[o * ldw..o * ldw + in_dim].to_vec()).collect();
        let x: Vec<f32> = (0..rows).flat_map(|r| x_wide[r * lda..r * lda + in_dim].to_vec()).collect();
        let want = reference(&w, &x, &vec![0.0; out_dim], out_dim, in_dim);
        let packed = PackedWeight::pack_rows(&w_wide, out_dim, in_dim, ldw).expect("rows fit");
        let ld = packed.padded_out();
        assert_eq!(ld, 24);
        let got = packed.matmul_padded(&x_wide, rows, lda, None).expect("rows fit");
        for r in 0..rows {
            assert_eq!(got[r * ld..r * ld + out_dim], want[r * out_dim..(r + 1) * out_dim]);
            assert!(got[r * ld + out_dim..(r + 1) * ld].iter().all(|&y| y == 0.0));
        }
        let t_wide: Vec<f32> =
            (0..in_dim).flat_map(|k| (0..ldw).map(|o| if o < out_dim { w[o * in_dim + k] } else { 9.0 }).collect::<Vec<_>>()).collect();
        let by_columns = PackedWeight::pack_in_out_rows(&t_wide, in_dim, out_dim, ldw).expect("rows fit");
        assert_eq!(by_columns.panels, packed.panels);
        // The last row one float short; rows closer than their length.
        assert!(packed.matmul_padded(&x_wide[..x_wide.len() - 1], rows, lda, None).is_none());
        assert!(packed.matmul_padded(&x_wide, rows, in_dim - 1, None).is_none());
        assert!(PackedWeight::pack_rows(&w_wide[..w_wide.len() - 1], out_dim, in_dim, ldw).is_none());
    }

    /// An activation's use: `then` sees every output once, 16 panels at a time and then the
    /// rest, and its results are what `matmul` gives, mapped.
    #[test]
    fn then_runs_over_every_output_once() {
        let (rows, out_dim, in_dim) = (7, 200, 30);
        let packed = PackedWeight::pack(&noise(out_dim * in_dim, 9), out_dim, in_dim).expect("lengths agree");
        let (x, b) = (noise(rows * in_dim, 10), noise(out_dim, 11));
        let want: Vec<f32> = packed.matmul(&x, Some(&b)).expect("lengths agree").into_iter().map(|y| y * 2.0 + 1.0).collect();
        let seen = std::sync::atomic::AtomicUsize::new(0);
        let then = |v: &mut [f32]| {
            seen.fetch_add(v.len(), std::sync::atomic::Ordering::Relaxed);
            v.iter_mut().for_each(|y| *y = *y * 2.0 + 1.0);
        };
        let got = packed.matmul_then(&x, Some(&b), Some(&then)).expect("lengths agree");
        assert_eq!(got, want);
        assert_eq!(seen.into_inner(), rows * packed.padded_out());
    }

    /// 16-bit panels give the bits of the f32 panels of their values, over passes longer than
    /// one (1100 inputs) and with `then`.
    #[test]
    fn half_panels_multiply_as_their_f32_values() {
        for kind in [Half::F16, Half::Bf16] {
            for (rows, out_dim, in_dim) in [(1, 1, 1), (4, 13, 33), (7, 30, 1100), (20, 200, 64)] {
                let bits: Vec<u16> = noise(out_dim * in_dim, 12)
                    .iter()
                    .map(|v| match kind {
                        Half::F16 => half::f16::from_f32(*v).to_bits(),
                        Half::Bf16 => half::bf16::from_f32(*v).to_bits(),
                    })
                    .collect();
                let mut w = vec![0f32; bits.len()];
                kind.widen(&bits, &mut w);
                let (x, b) = (noise(rows * in_dim, 13), noise(out_dim, 14));
                let wide = PackedWeight::pack(&w, out_dim, in_dim).expect("lengths agree");
                let narrow = PackedWeight::pack_half(&bits, kind, out_dim, in_dim).expect("lengths agree");
                assert!(narrow.is_half() && !wide.is_half());
                assert_eq!(narrow.unpack(), w);
                assert_eq!(narrow.matmul(&x, Some(&b)), wide.matmul(&x, Some(&b)), "{kind:?} {rows}×{in_dim} · {in_dim}→{out_dim}");
                let then = |v: &mut [f32]| v.iter_mut().for_each(|y| *y = y.max(0.0));
                assert_eq!(narrow.matmul_then(&x, None, Some(&then)), wide.matmul_then(&x, None, Some(&then)));
            }
        }
        assert!(PackedWeight::pack_half(&[0; 6], Half::F16, 2, 4).is_none());
    }

    /// On two threads each takes a share of the panels: the bits of one thread, with `then`
    /// and 16-bit panels too, for outputs that are not whole panels.
    #[test]
    fn threads_split_the_panels_and_give_the_bits_of_one() {
        let (rows, out_dim, in_dim) = (9, 200, 40);
        let w = noise(out_dim * in_dim, 15);
        let bits: Vec<u16> = w.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        let (x, b) = (noise(rows * in_dim, 16), noise(out_dim, 17));
        let then = |v: &mut [f32]| v.iter_mut().for_each(|y| *y = y.max(0.0));
        for packed in [PackedWeight::pack(&w, out_dim, in_dim), PackedWeight::pack_half(&bits, Half::Bf16, out_dim, in_dim)] {
            let packed = packed.expect("lengths agree");
            let one = packed.matmul_then(&x, Some(&b), Some(&then)).expect("lengths agree");
            let two = crate::parallel::with_threads(2, || packed.matmul_then(&x, Some(&b), Some(&then))).expect("lengths agree");
            assert_eq!(one.len(), rows * out_dim);
            assert_eq!(one, two);
        }
    }

    #[test]
    fn lengths_that_disagree_are_refused() {
        assert!(PackedWeight::pack(&[0.0; 6], 2, 4).is_none());
        let packed = PackedWeight::pack(&[0.0; 8], 2, 4).expect("lengths agree");
        assert!(packed.matmul(&[0.0; 6], None).is_none());
        assert!(packed.matmul(&[0.0; 8], Some(&[0.0; 3])).is_none());
    }
}
