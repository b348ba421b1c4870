//! Linear layers with a matrix–vector fast path. Decoding feeds one position at a time, so each
//! weight is multiplied by a single row: memory-bound work where a general GEMM (candle's
//! `gemm`, in WASM above all) spends most of its time packing. The loops below stream each
//! weight once; their independent accumulators let LLVM emit SIMD (simd128 in WASM, AVX
//! natively) without reassociating floating-point sums.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Storage, Tensor, D};
use candle_nn::{Activation, VarBuilder};

use super::half::{self, Half};
use super::int8::Int8Weight;
use super::packed::{self, PackedWeight};
use super::q8::{self, Q8Matrix};

const LANES: usize = 16;

/// Σ a[i]·b[i], in LANES independent partial sums.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Weights the simd128 dot products read as f32 lanes, 4 at a time: f32 as they are, 16-bit
/// ones widened in registers (`half::Widen`).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(super) trait Lanes<T: Copy> {
    /// The 4 weights at `p` as f32. SAFETY: `p..p + 4` in bounds.
    unsafe fn four(&self, p: *const T) -> core::arch::wasm32::v128;
    fn one(&self, w: T) -> f32;
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
struct F32Lanes;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
impl Lanes<f32> for F32Lanes {
    #[inline(always)]
    unsafe fn four(&self, p: *const f32) -> core::arch::wasm32::v128 {
        // SAFETY: as the caller promises; wasm loads need no alignment.
        unsafe { core::arch::wasm32::v128_load(p as *const core::arch::wasm32::v128) }
    }

    #[inline(always)]
    fn one(&self, w: f32) -> f32 {
        w
    }
}

/// Σ a[i]·b[i] with four f32x4 accumulators: LLVM does not vectorise the portable loop for
/// simd128 as well as it does for AVX.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(&F32Lanes, a, b)
}

/// [`dot`] on weights of any element type: the same sums in the same order, so a 16-bit row
/// gives the bits of its widened row.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn dot_lanes<T: Copy>(lanes: &impl Lanes<T>, a: &[T], b: &[f32]) -> f32 {
    use core::arch::wasm32::*;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(&x, y)| lanes.one(x) * y).sum();
    let mut acc = [f32x4_splat(0.0); 4];
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: each chunk holds LANES = 16 values, so offsets 4k..4k+4 are in bounds;
            // wasm loads need no alignment.
            let (x, y) = unsafe { (lanes.four(ca.as_ptr().add(4 * k)), v128_load(cb.as_ptr().add(4 * k) as *const v128)) };
            *acc = f32x4_add(*acc, f32x4_mul(x, y));
        }
    }
    let sum = f32x4_add(f32x4_add(acc[0], acc[1]), f32x4_add(acc[2], acc[3]));
    f32x4_extract_lane::<0>(sum) + f32x4_extract_lane::<1>(sum) + f32x4_extract_lane::<2>(sum) + f32x4_extract_lane::<3>(sum) + tail
}

/// Four dot products against the same `x`, sharing its loads: the rows stream from memory once
/// and `x` is read a quarter as often as with four separate dots.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn dot4(rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    dot4_lanes(&F32Lanes, rows, x)
}

/// [`dot4`] on weights of any element type (see [`dot_lanes`]).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn dot4_lanes<T: Copy>(lanes: &impl Lanes<T>, rows: [&[T]; 4], x: &[f32]) -> [f32; 4] {
    use core::arch::wasm32::*;
    let len = rows.iter().map(|r| r.len()).fold(x.len(), usize::min);
    let body = len - len % 4;
    let mut acc = [f32x4_splat(0.0); 4];
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= body <= the length of x and of every row; wasm loads need no alignment.
        unsafe {
            let xv = v128_load(x.as_ptr().add(i) as *const v128);
            for (acc, row) in acc.iter_mut().zip(rows) {
                *acc = f32x4_add(*acc, f32x4_mul(lanes.four(row.as_ptr().add(i)), xv));
            }
        }
        i += 4;
    }
    let mut out = [0f32; 4];
    for (k, (o, row)) in out.iter_mut().zip(rows).enumerate() {
        let a = acc[k];
        *o = f32x4_extract_lane::<0>(a) + f32x4_extract_lane::<1>(a) + f32x4_extract_lane::<2>(a) + f32x4_extract_lane::<3>(a);
        *o += row[body..len].iter().zip(&x[body..len]).map(|(&w, v)| lanes.one(w) * v).sum::<f32>();
    }
    out
}

/// Y = X·Wᵀ for W `[out, in]` row-major and `rows` rows of X: Y is `[rows, out]`. Every
/// output is the same dot product, in the same order, as for a single row — a batch of
/// captions decodes to the very numbers one-by-one decoding gives — while each block of W is
/// read from memory once for all rows (it stays in L1 while the rows pass over it).
fn matmul_rows(w: &[f32], x: &[f32], in_dim: usize, rows: usize) -> Vec<f32> {
    matmul_rows_with(w, x, in_dim, rows, dot, dot4)
}

/// [`matmul_rows`] for weights of any element type, with its `dot` and (simd128) `dot4`.
#[cfg_attr(not(all(target_arch = "wasm32", target_feature = "simd128")), allow(unused_variables))]
fn matmul_rows_with<T>(
    w: &[T],
    x: &[f32],
    in_dim: usize,
    rows: usize,
    dot: impl Fn(&[T], &[f32]) -> f32,
    dot4: impl Fn([&[T]; 4], &[f32]) -> [f32; 4],
) -> Vec<f32> {
    if in_dim == 0 {
        return vec![0f32; rows * w.len()];
    }
    let out_dim = w.len() / in_dim;
    let mut y = vec![0f32; rows * out_dim];
    let xs: Vec<&[f32]> = x.chunks_exact(in_dim).take(rows).collect();
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    let first_single = {
        let mut quads = w.chunks_exact(4 * in_dim);
        for (q, quad) in (&mut quads).enumerate() {
            let (r0, rest) = quad.split_at(in_dim);
            let (r1, rest) = rest.split_at(in_dim);
            let (r2, r3) = rest.split_at(in_dim);
            for (m, xm) in xs.iter().enumerate() {
                y[m * out_dim + 4 * q..m * out_dim + 4 * q + 4].copy_from_slice(&dot4([r0, r1, r2, r3], xm));
            }
        }
        out_dim - quads.remainder().len() / in_dim
    };
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let first_single = 0;
    for (j, row) in w.chunks_exact(in_dim).enumerate().skip(first_single) {
        for (m, xm) in xs.iter().enumerate() {
            y[m * out_dim + j] = dot(row, xm);
        }
    }
    y
}

/// `dot4` where there is no simd128 (never called: `matmul_rows_with` takes single rows there).
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn dot4(rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    rows.map(|r| dot(r, x))
}

/// y += s·x
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += s * xi;
    }
}

/// y += s·x, four lanes at a time.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    use core::arch::wasm32::*;
    let len = y.len().min(x.len());
    let (y, x) = (&mut y[..len], &x[..len]);
    let sv = f32x4_splat(s);
    let mut y_chunks = y.chunks_exact_mut(4);
    let mut x_chunks = x.chunks_exact(4);
    for (cy, cx) in (&mut y_chunks).zip(&mut x_chunks) {
        // SAFETY: both chunks hold exactly 4 floats; wasm loads/stores need no alignment.
        unsafe {
            let v = f32x4_add(v128_load(cy.as_ptr() as *const v128), f32x4_mul(sv, v128_load(cx.as_ptr() as *const v128)));
            v128_store(cy.as_mut_ptr() as *mut v128, v);
        }
    }
    for (yi, xi) in y_chunks.into_remainder().iter_mut().zip(x_chunks.remainder()) {
        *yi += s * xi;
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor without copying it.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("our f32 kernels need a contiguous tensor");
    };
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => candle_core::bail!("our f32 kernels run on the CPU only"),
    }
}

/// Up to this many rows take the matrix–vector path: a batch of captions or beams decoding.
const FAST_ROWS: usize = 32;

/// The number of rows of `xs` when it is one position per sequence ([B, 1, d] or [B, d]) for
/// few enough sequences: decoding. Sequences of several positions (the encoder, prefill) go to
/// the GEMM whatever the batch, so a batch computes what each image computes alone.
fn few_rows(xs: &Tensor) -> Result<Option<usize>> {
    let dims = xs.dims();
    let one_position = match dims.len() {
        0 => false,
        1 | 2 => true,
        n => dims[n - 2] == 1,
    };
    let d = xs.dim(D::Minus1)?;
    let rows = if d > 0 { xs.elem_count() / d } else { 0 };
    Ok((one_position && rows >= 1 && rows <= FAST_ROWS && xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32).then_some(rows))
}

/// `xs`' shape with the last dimension (features) replaced by `out_dim`.
fn out_shape(xs: &Tensor, out_dim: usize) -> Vec<usize> {
    let mut shape = xs.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out_dim;
    }
    shape
}

/// `[rows, out_dim]` from `part(range)`, which computes the `[rows, range.len()]` block of the
/// output features `range`: the parts run on the threads (`crate::parallel`), each reading its
/// own slice of the weight. Every output is computed as without the split (ranges are multiples
/// of 4, the f32 kernel's row groups), so the result is the same bits whatever the threads.
fn by_output_features(out_dim: usize, in_dim: usize, rows: usize, part: impl Fn(std::ops::Range<usize>) -> Vec<f32> + Sync + Send) -> Vec<f32> {
    // Waking the pool costs ~0.1-0.2 ms in a browser (Atomics.wait/notify), far more than a
    // decoder projection takes: without an awake crew only matrices of millions of multiply-adds
    // a part (the LM head) split; with one, a part need only outweigh a handoff (~1 µs).
    let min_macs = if crate::parallel::crew_awake() { 1 << 15 } else { 1 << 21 };
    let ranges = crate::parallel::ranges(out_dim, crate::parallel::threads(), min_macs / in_dim.max(1), 4);
    if ranges.len() < 2 {
        return part(0..out_dim);
    }
    let parts = crate::parallel::map(ranges.len(), |i| part(ranges[i].clone()));
    let mut y = vec![0f32; rows * out_dim];
    for (range, block) in ranges.iter().zip(parts) {
        for (m, src) in block.chunks_exact(range.len()).enumerate() {
            y[m * out_dim + range.start..m * out_dim + range.end].copy_from_slice(src);
        }
    }
    y
}

/// Rows of a GEMM per thread below which the split is not worth a thread's wake-up.
const MIN_GEMM_ROWS: usize = 16;

/// `xs`·`w` for many rows (`xs` `[…, in]`, `w` `[in, out]`, possibly a transposed view), the
/// rows split over the threads; the shape of `xs` kept but for its last dimension.
fn gemm_rows(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let out_dim = w.dim(1)?;
    let x2 = xs.reshape(((), xs.dim(D::Minus1)?))?;
    crate::parallel::split_along(&x2, 0, MIN_GEMM_ROWS, |x| x.matmul(w))?.reshape(out_shape(xs, out_dim))
}

/// y = W·x (+ b) for each of a few rows x, with W stored `[out, in]` (`nn.Linear`), f32 or
/// 16-bit.
fn matvec_out_in(xs: &Tensor, w: &Tensor, b: Option<&Tensor>, rows: usize) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let x = xs.flatten_all()?.to_vec1::<f32>()?;
    if x.len() != rows * in_dim {
        candle_core::bail!("linear: input has {} features, weight expects {in_dim}", x.len() / rows.max(1));
    }
    let mut y = match Half::of(w.dtype()) {
        Some(_) => half::with_bits(&w.contiguous()?, |w, kind| {
            by_output_features(out_dim, in_dim, rows, |r| half_matmul_rows(&w[r.start * in_dim..r.end * in_dim], kind, &x, in_dim, rows))
        })?,
        None => with_f32(w, |w| by_output_features(out_dim, in_dim, rows, |r| matmul_rows(&w[r.start * in_dim..r.end * in_dim], &x, in_dim, rows)))?,
    };
    if let Some(b) = b {
        with_f32(b, |b| y.chunks_exact_mut(out_dim).for_each(|y| y.iter_mut().zip(b).for_each(|(yi, bi)| *yi += bi)))?;
    }
    Tensor::from_vec(y, out_shape(xs, out_dim), &Device::Cpu)
}

/// y = x·W (+ b) for each of a few rows x, with W stored `[in, out]` (HF GPT-2 `Conv1D`).
/// Each row accumulates in the same order as alone; each row of W is read once for all.
fn matvec_in_out(xs: &Tensor, w: &Tensor, b: Option<&Tensor>, rows: usize) -> Result<Tensor> {
    let (in_dim, out_dim) = w.dims2()?;
    let x = xs.flatten_all()?.to_vec1::<f32>()?;
    if x.len() != rows * in_dim {
        candle_core::bail!("conv1d: input has {} features, weight expects {in_dim}", x.len() / rows.max(1));
    }
    let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    let y = with_f32(w, |w| {
        by_output_features(out_dim, in_dim, rows, |r| {
            let mut y = match &b {
                Some(b) => b[r.clone()].repeat(rows),
                None => vec![0f32; rows * r.len()],
            };
            for (i, row) in w.chunks_exact(out_dim).enumerate() {
                for (m, ym) in y.chunks_exact_mut(r.len()).enumerate() {
                    axpy(ym, x[m * in_dim + i], &row[r.clone()]);
                }
            }
            y
        })
    })?;
    Tensor::from_vec(y, out_shape(xs, out_dim), &Device::Cpu)
}

/// An unmerged LoRA update of a `Linear` while it trains: y += scale · (x·Aᵀ)·Bᵀ with A
/// `[r, in]`, B `[out, r]` (PEFT's `lora_A` / `lora_B`).
#[derive(Debug, Clone)]
pub struct LoraUpdate {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// ggml's q8_0 of row-major weights whose rows are whole blocks of 32: per block, scale =
/// max |w| / 127 and q = round(w / scale). Load-time quantization and the `quantize` command
/// (`crate::quantize`) both use this, so a quantized file holds what quantizing at load gives.
pub fn q8_0_blocks(w: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let blocks = w.len() / q8::BLOCK;
    let mut qs = vec![0i8; blocks * q8::BLOCK];
    let mut scales = Vec::with_capacity(blocks);
    // Straight loops over a block that vectorize (through i32, which WASM converts four at a
    // time): a GPT-2 vocabulary took ~0.2 s of a q8 load one value at a time.
    for (q, block) in qs.chunks_exact_mut(q8::BLOCK).zip(w.chunks_exact(q8::BLOCK)) {
        let scale = super::max_abs(block) / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        q.iter_mut().zip(block).for_each(|(q, v)| *q = round_half_away(v * inv).clamp(-127.0, 127.0) as i32 as i8);
        scales.push(scale);
    }
    (qs, scales)
}

/// q8_0 blocks (as [`q8_0_blocks`]) of a matrix that will run in 8 bits per output feature
/// (the encoder side): each row rounded once, as [`Int8Weight`] rounds it, and every block of the
/// row given the row's scale. The file stays q8_0 for every reader; ours takes such a row as it
/// is (`Linear::to_int8`) instead of rounding q8_0's values a second time.
pub fn per_output_q8_0_blocks(w: &[f32], in_dim: usize) -> (Vec<i8>, Vec<f32>) {
    let mut qs = vec![0i8; w.len()];
    let mut scales = Vec::with_capacity(w.len() / q8::BLOCK);
    for (q, row) in qs.chunks_exact_mut(in_dim).zip(w.chunks_exact(in_dim)) {
        let scale = super::int8::quantize_row(row, q);
        scales.extend(std::iter::repeat_n(scale, in_dim / q8::BLOCK));
    }
    (qs, scales)
}

/// `f32::round` (halves away from zero, as ggml's `roundf`), exactly, from WASM instructions:
/// `round` itself is a library call per value there (quantizing a vocabulary at load spent most
/// of its time in it). The fraction `x - trunc(x)` is exact for every finite `x`.
#[inline]
pub fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// How a q8_0 matrix is stored in `model.safetensors` (written by `crate::quantize`): next to
/// where `<name>` would be, `<name>.q8_0` (I8, `[out, in]` — also for GPT-2's `Conv1D`, whose f32
/// weight is `[in, out]`) and `<name>.q8_0_scales` (F32, `[out, in / 32]`).
pub const Q8_0_SUFFIX: &str = ".q8_0";
pub const Q8_0_SCALES_SUFFIX: &str = ".q8_0_scales";

/// `qs` `[out, in]` and `scales` `[out, in / 32]` (row-major, as in a file) in our layout.
fn q8_matrix(qs: &[i8], scales: &[f32], out_dim: usize, in_dim: usize) -> Result<Q8Matrix> {
    Q8Matrix::from_rows(qs, scales, out_dim, in_dim).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "q8_0: {} values and {} scales do not make [{out_dim}, {in_dim}] in blocks of {}",
            qs.len(),
            scales.len(),
            q8::BLOCK
        ))
    })
}

/// The q8_0 matrix `name` of `vb` (`[out_dim, in_dim]`), when the checkpoint stores it so.
fn load_q8_0(vb: &VarBuilder, name: &str, out_dim: usize, in_dim: usize) -> Result<Option<Weight>> {
    let q_name = format!("{name}{Q8_0_SUFFIX}");
    if !vb.contains_tensor(&q_name) {
        return Ok(None);
    }
    if in_dim % q8::BLOCK != 0 {
        candle_core::bail!("{q_name}: rows of {in_dim} are not whole q8_0 blocks of {}", q8::BLOCK);
    }
    let qs = vb.get_with_hints_dtype((out_dim, in_dim), &q_name, Default::default(), candle_core::DType::U8)?;
    let scales = vb.get((out_dim, in_dim / q8::BLOCK), &format!("{name}{Q8_0_SCALES_SUFFIX}"))?;
    // The file's I8 bytes arrive as U8 (candle has no i8): the same bits, read as i8 in place.
    let qs = qs.flatten_all()?.to_vec1::<u8>()?;
    // SAFETY: u8 and i8 have the same size and alignment, and every bit pattern is valid for both.
    let qs: &[i8] = unsafe { std::slice::from_raw_parts(qs.as_ptr() as *const i8, qs.len()) };
    let scales = scales.flatten_all()?.to_vec1::<f32>()?;
    Ok(Some(Weight::Q8(q8_matrix(qs, &scales, out_dim, in_dim)?)))
}

/// A layer's weight in the form its kernels read; each variant multiplies few rows (decoding)
/// and many (the encoder, prefill). `Linear` only chooses the variant, at load or when a model
/// is quantized or packed.
#[derive(Debug, Clone)]
enum Weight {
    /// f32 `[out, in]`, as `nn.Linear` stores it.
    F32(Tensor),
    /// f32 `[in, out]`, as GPT-2's `Conv1D` stores it.
    F32InOut(Tensor),
    /// f16 or bf16 `[out, in]` as the checkpoint stores it (a `Conv1D`'s transposed at load),
    /// widened block by block inside the kernels.
    Half(Tensor),
    /// q8_0 blocks: our matrix–vector kernel (`super::q8`) for few rows; many rows (prefill)
    /// dequantize for the GEMM, where f32 beats a quantized matmul.
    Q8(Q8Matrix),
    /// Another ggml block format (q4_0), through candle's quantized matmul (its input rows
    /// quantized to 8 bits on the fly).
    Ggml { matmul: QMatMul, out_dim: usize, in_dim: usize },
    /// f32 laid out for our WASM GEMM kernel (`super::packed`): layers that only ever see many
    /// rows (the encoder side).
    Packed(PackedWeight),
    /// i8 per output feature, multiplied in 8 bits (`super::int8`): the encoder side of a
    /// quantized model.
    Int8(Int8Weight),
}

impl Weight {
    /// (out, in)
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::F32(w) => w.dims2()?,
            Weight::F32InOut(w) => {
                let (inp, out) = w.dims2()?;
                (out, inp)
            }
            Weight::Half(w) => w.dims2()?,
            Weight::Q8(m) => m.dims(),
            Weight::Ggml { out_dim, in_dim, .. } => (*out_dim, *in_dim),
            Weight::Packed(p) => p.dims(),
            Weight::Int8(m) => m.dims(),
        })
    }

    /// The f32 matrix `[out, in]` this weight holds (a copy where it is not f32 `[out, in]`).
    fn out_in_f32(&self) -> Result<Tensor> {
        let (out_dim, in_dim) = self.dims()?;
        match self {
            Weight::F32(w) => Ok(w.clone()),
            Weight::F32InOut(w) => w.t()?.contiguous(),
            Weight::Half(w) => w.to_dtype(candle_core::DType::F32),
            Weight::Q8(m) => Tensor::from_vec(m.dequantize(), (out_dim, in_dim), &Device::Cpu),
            Weight::Ggml { .. } => candle_core::bail!("linear: a {out_dim}x{in_dim} ggml-quantized weight has no f32 copy"),
            Weight::Packed(p) => Tensor::from_vec(p.unpack(), (out_dim, in_dim), &Device::Cpu),
            Weight::Int8(m) => Tensor::from_vec(m.dequantize(), (out_dim, in_dim), &Device::Cpu),
        }
    }

    /// The weight packed for our WASM GEMM, where it can be (f32, 16-bit — kept 16-bit —, q8_0).
    fn packed(&self) -> Result<Option<PackedWeight>> {
        let (out_dim, in_dim) = self.dims()?;
        match self {
            Weight::Half(w) => half::with_bits(&w.contiguous()?, |w, kind| PackedWeight::pack_half(w, kind, out_dim, in_dim)),
            Weight::F32(w) => with_f32(&w.contiguous()?, |w| PackedWeight::pack(w, out_dim, in_dim)),
            Weight::F32InOut(w) => with_f32(&w.contiguous()?, |w| PackedWeight::pack_in_out(w, in_dim, out_dim)),
            Weight::Q8(m) => Ok(PackedWeight::pack(&m.dequantize(), out_dim, in_dim)),
            Weight::Ggml { .. } | Weight::Packed(_) | Weight::Int8(_) => Ok(None),
        }
    }

    /// y = x·Wᵀ (+ b) over the last dimension of `xs`.
    fn forward(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Weight::F32(w) => f32_forward(w, false, xs, bias),
            Weight::F32InOut(w) => f32_forward(w, true, xs, bias),
            Weight::Half(w) => self.half_forward(w, xs, bias),
            Weight::Q8(m) => q8_forward(m, xs, bias),
            Weight::Ggml { matmul, .. } => add_bias(matmul.forward(&xs.contiguous()?)?, bias),
            Weight::Packed(p) => packed_forward(p, xs, bias, None),
            Weight::Int8(m) => int8_forward(m, xs, bias, None),
        }
    }

    /// A 16-bit weight: few rows through the matrix–vector kernel on rows widened a block at a
    /// time; many through our packed GEMM with the weight packed 16-bit for this call (WASM),
    /// else candle's on an f32 copy.
    fn half_forward(&self, w: &Tensor, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if let Some(rows) = few_rows(xs)? {
            return matvec_out_in(xs, w, bias, rows);
        }
        if let Some(ys) = packed_for_this_call(xs, || self.packed(), bias)? {
            return Ok(ys);
        }
        f32_forward(&w.to_dtype(candle_core::DType::F32)?, false, xs, bias)
    }
}

/// [`matmul_rows`] on a 16-bit `[out, in]` weight: the bits of the f32 weight. In WASM, bf16
/// weights are widened 4 at a time in registers (a shift); f16 ones (9 operations per 4: more
/// than the registers of a fused loop hold) a block of rows at a time into L1, as natively, then
/// multiplied by the f32 kernel (F16C's conversion natively, where the CPU has it).
fn half_matmul_rows(w: &[u16], kind: Half, x: &[f32], in_dim: usize, rows: usize) -> Vec<f32> {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if kind == Half::Bf16 {
        let widen = half::Widen::new(kind);
        return matmul_rows_with(w, x, in_dim, rows, |r, x| dot_lanes(&widen, r, x), |r, x| dot4_lanes(&widen, r, x));
    }
    if in_dim == 0 {
        return Vec::new();
    }
    let out_dim = w.len() / in_dim;
    // Whole groups of 4 rows, as `matmul_rows` forms them from the start of the weight.
    let block = (WIDE_BLOCK / in_dim / 4).max(1) * 4;
    let mut wide = vec![0f32; block.min(out_dim) * in_dim];
    let mut y = vec![0f32; rows * out_dim];
    for (b, rows_w) in w.chunks(block * in_dim).enumerate() {
        let wide = &mut wide[..rows_w.len()];
        kind.widen(rows_w, wide);
        let n = rows_w.len() / in_dim;
        let part = matmul_rows(wide, x, in_dim, rows);
        for (m, src) in part.chunks_exact(n).enumerate() {
            y[m * out_dim + b * block..m * out_dim + b * block + n].copy_from_slice(src);
        }
    }
    y
}

/// Floats of widened weight rows a block works on: they stay in L1 while every input row
/// passes over them.
const WIDE_BLOCK: usize = 8192;

fn int8_forward(m: &Int8Weight, xs: &Tensor, b: Option<&Tensor>, then: Then) -> Result<Tensor> {
    // Natively too its rows go over the cores (candle's GEMM would): exact sums, the same bits.
    crate::parallel::on_all_cores(|| by_rows(m.dims(), xs, b, then, true, |x, b, then| m.matmul_then(x, b, then.map(|f| f as &dyn Fn(&mut [f32])))))
}

fn add_bias(ys: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => ys.broadcast_add(b),
        None => Ok(ys),
    }
}

/// An f32 weight, `[out, in]` or (`in_out`) `[in, out]`: the matrix–vector kernels for few
/// rows; for many, our packed GEMM for this call where it pays (WASM), else candle's GEMM.
fn f32_forward(w: &Tensor, in_out: bool, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let training = super::tracks_grad(&[xs, w]) || bias.is_some_and(|b| super::tracks_grad(&[b]));
    if let Some(rows) = few_rows(xs)?.filter(|_| w.is_contiguous() && !training) {
        return if in_out { matvec_in_out(xs, w, bias, rows) } else { matvec_out_in(xs, w, bias, rows) };
    }
    if !training {
        let weight = if in_out { Weight::F32InOut(w.clone()) } else { Weight::F32(w.clone()) };
        if let Some(ys) = packed_for_this_call(xs, || weight.packed(), bias)? {
            return Ok(ys);
        }
    }
    // candle's GEMM takes the weight as `[in, out]`.
    let w_in_out = if in_out { w.clone() } else { w.t()? };
    let ys = if crate::parallel::threads() > 1 && !training {
        gemm_rows(xs, &w_in_out)?
    } else {
        let d_in = xs.dim(D::Minus1)?;
        xs.reshape(((), d_in))?.matmul(&w_in_out)?.reshape(out_shape(xs, w_in_out.dim(1)?))?
    };
    add_bias(ys, bias)
}

fn q8_forward(m: &Q8Matrix, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = m.dims();
    let ys = match few_rows(xs)? {
        Some(rows) => {
            let xq = with_f32(&xs.contiguous()?, |x| m.quantize_rows(x))?.ok_or_else(|| {
                candle_core::Error::Msg(format!("linear: input has {} features, weight expects {in_dim}", xs.dim(D::Minus1).unwrap_or(0)))
            })?;
            let y = by_output_features(out_dim, in_dim, rows, |r| m.matvec(&xq, r));
            Tensor::from_vec(y, out_shape(xs, out_dim), &Device::Cpu)?
        }
        // Many rows (prefill): the f32 path on the values the blocks hold.
        None => return f32_forward(&Tensor::from_vec(m.dequantize(), (out_dim, in_dim), &Device::Cpu)?, false, xs, bias),
    };
    add_bias(ys, bias)
}

/// `weight` `[out, in]` in `dtype`, or `None` when a row is not a whole number of blocks.
fn quantize_out_in(weight: &Tensor, dtype: GgmlDType) -> Result<Option<Weight>> {
    let (out_dim, in_dim) = weight.dims2()?;
    if in_dim % dtype.block_size() != 0 {
        return Ok(None);
    }
    Ok(Some(match dtype {
        GgmlDType::Q8_0 => {
            let (qs, scales) = q8_0_blocks(&weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
            Weight::Q8(q8_matrix(&qs, &scales, out_dim, in_dim)?)
        }
        _ => Weight::Ggml { matmul: QMatMul::from_qtensor(QTensor::quantize(&weight.contiguous()?, dtype)?)?, out_dim, in_dim },
    }))
}

/// A 16-bit `[out, in]` weight in q8_0, a row widened at a time (a tied vocabulary is the
/// largest matrix: its f32 copy would double what the model holds), or `None` when a row is not
/// a whole number of blocks.
fn half_to_q8_0(w: &Tensor) -> Result<Option<Weight>> {
    let (out_dim, in_dim) = w.dims2()?;
    if in_dim == 0 || in_dim % q8::BLOCK != 0 {
        return Ok(None);
    }
    let (qs, scales) = half::with_bits(&w.contiguous()?, |bits, kind| {
        let (mut qs, mut scales) = (Vec::with_capacity(bits.len()), Vec::with_capacity(bits.len() / q8::BLOCK));
        let mut row = vec![0f32; in_dim];
        for r in bits.chunks_exact(in_dim) {
            kind.widen(r, &mut row);
            let (q, s) = q8_0_blocks(&row);
            qs.extend(q);
            scales.extend(s);
        }
        (qs, scales)
    })?;
    Ok(Some(Weight::Q8(q8_matrix(&qs, &scales, out_dim, in_dim)?)))
}

/// `nn.Linear` (weight `[out, in]`, optional bias `[out]`) and GPT-2's `Conv1D` (weight `[in,
/// out]`): y = x·Wᵀ + b, whatever form the weight is held in.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    lora: Option<LoraUpdate>,
}

impl Linear {
    /// From an f32 weight `[out, in]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::F32(weight), bias, lora: None }
    }

    /// An LM head tied to `embedding`'s table (no bias), in the form the table is held: 16-bit
    /// where the checkpoint stores it so, sharing its memory.
    pub fn tied(embedding: &super::embedding::Embedding) -> Self {
        let table = embedding.embeddings().clone();
        let weight = if embedding.is_16bit() { Weight::Half(table) } else { Weight::F32(table) };
        Self { weight, bias: None, lora: None }
    }

    pub fn with_bias(self, bias: Option<Tensor>) -> Self {
        Self { bias, ..self }
    }

    /// Swaps an f32 weight for its `dtype` (F16 / BF16) values, held 16-bit: what a 16-bit
    /// checkpoint loads as (benchmarks). Returns false, changing nothing, for any other weight.
    pub fn to_16bit(&mut self, dtype: candle_core::DType) -> Result<bool> {
        let Weight::F32(w) = &self.weight else { return Ok(false) };
        if Half::of(dtype).is_none() || self.lora.is_some() {
            return Ok(false);
        }
        self.weight = Weight::Half(w.to_dtype(dtype)?);
        Ok(true)
    }

    /// Whether the weight is held in 16 bits (as the checkpoint stored it).
    pub fn is_16bit(&self) -> bool {
        match &self.weight {
            Weight::Half(_) => true,
            Weight::Packed(p) => p.is_half(),
            _ => false,
        }
    }

    /// Lays the weight out for our WASM GEMM kernel (`super::packed`): for layers that only
    /// multiply many rows at once (the encoder side). Returns false, changing nothing, where
    /// that kernel is not the faster one (natively), or the weight cannot be packed (packed
    /// already, q4_0) or has a LoRA update attached.
    pub fn pack(&mut self) -> Result<bool> {
        if !packed::FASTER_THAN_GEMM || self.lora.is_some() {
            return Ok(false);
        }
        let Some(p) = self.weight.packed()? else { return Ok(false) };
        self.weight = Weight::Packed(p);
        Ok(true)
    }

    /// Swaps the weight for a `dtype` copy (the f32 one is dropped, unless something else — a
    /// tied embedding — holds it). Returns false, changing nothing, when it is quantized
    /// already, the rows are not a whole number of blocks or a LoRA update is attached.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<bool> {
        if self.lora.is_some() || matches!(self.weight, Weight::Q8(_) | Weight::Ggml { .. }) {
            return Ok(false);
        }
        if let (Weight::Half(w), GgmlDType::Q8_0) = (&self.weight, dtype) {
            return Ok(match half_to_q8_0(w)? {
                Some(q) => {
                    self.weight = q;
                    true
                }
                None => false,
            });
        }
        let Some(q) = quantize_out_in(&self.weight.out_in_f32()?, dtype)? else { return Ok(false) };
        self.weight = q;
        Ok(true)
    }

    /// Swaps the weight for an 8-bit one multiplied in 8 bits (`super::int8`): for layers that
    /// only multiply many rows (the encoder side of a quantized model). From f32 or q8_0 (its
    /// values requantized per output feature, row by row, unless a row has one scale already).
    /// Returns false, changing nothing, where it is 8-bit already, q4_0, or has a LoRA update
    /// attached.
    pub fn to_int8(&mut self) -> Result<bool> {
        if self.lora.is_some() || matches!(self.weight, Weight::Int8(_) | Weight::Ggml { .. }) {
            return Ok(false);
        }
        let (out_dim, in_dim) = self.weight.dims()?;
        let m = match &self.weight {
            Weight::Q8(q) => {
                // A row that the `quantize` command wrote with one scale is per-output i8 already:
                // taken as it is, so its values are rounded once, from f32.
                let mut values = vec![0f32; in_dim];
                Int8Weight::from_rows(out_dim, in_dim, |o, row| {
                    q.row_with_one_scale(o, row).unwrap_or_else(|| {
                        q.dequantize_row(o, &mut values);
                        super::int8::quantize_row(&values, row)
                    })
                })
            }
            weight => with_f32(&weight.out_in_f32()?.contiguous()?, |w| Int8Weight::quantize(w, out_dim, in_dim))?,
        };
        let Some(m) = m else { return Ok(false) };
        self.weight = Weight::Int8(m);
        Ok(true)
    }

    pub fn is_int8(&self) -> bool {
        matches!(self.weight, Weight::Int8(_))
    }

    /// Back to an f32 weight (the values the q8_0 blocks hold) where the weight is q8_0: for
    /// layers that only ever see many rows (the encoder), whose GEMM is faster in f32. Returns
    /// whether anything changed.
    pub fn dequantize(&mut self) -> Result<bool> {
        if !matches!(self.weight, Weight::Q8(_)) {
            return Ok(false);
        }
        self.weight = Weight::F32(self.weight.out_in_f32()?);
        Ok(true)
    }

    /// Output features `start..start + len` (a fused projection's part), 16-bit where the weight
    /// is, else f32.
    pub fn rows(&self, start: usize, len: usize) -> Result<Linear> {
        let bias = self.bias.as_ref().map(|b| b.narrow(0, start, len)).transpose()?;
        let weight = match &self.weight {
            Weight::Half(w) => Weight::Half(w.narrow(0, start, len)?.contiguous()?),
            other => Weight::F32(other.out_in_f32()?.narrow(0, start, len)?.contiguous()?),
        };
        Ok(Linear { weight, bias, lora: None })
    }

    /// The f32 weight `[out, in]` (a copy where it is held otherwise).
    pub fn weight_f32(&self) -> Result<Tensor> {
        self.weight.out_in_f32()
    }

    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::Packed(_))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Dimensions (in, out).
    pub fn dims(&self) -> Result<(usize, usize)> {
        let (out, inp) = self.weight.dims()?;
        Ok((inp, out))
    }

    pub fn set_lora(&mut self, lora: Option<LoraUpdate>) {
        self.lora = lora;
    }

    pub fn lora(&self) -> Option<&LoraUpdate> {
        self.lora.as_ref()
    }

    /// `act` of `self.forward(xs)`. On a packed weight the activation runs over each part of
    /// the output as the GEMM leaves it in cache (`PackedWeight::matmul_then`).
    pub fn forward_activated(&self, xs: &Tensor, act: &Activation) -> Result<Tensor> {
        match (&self.weight, super::activation::in_place(act, xs)) {
            (Weight::Packed(p), Some(f)) => return packed_forward(p, xs, self.bias.as_ref(), Some(&f)),
            (Weight::Int8(m), Some(f)) => return int8_forward(m, xs, self.bias.as_ref(), Some(&f)),
            _ => {}
        }
        super::activation::forward_in_place(act, self.forward(xs)?)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.weight.forward(xs, self.bias.as_ref())?;
        match &self.lora {
            Some(lora) => {
                let low = Weight::F32(lora.a.clone()).forward(xs, None)?;
                ys + (Weight::F32(lora.b.clone()).forward(&low, None)? * lora.scale)?
            }
            None => Ok(ys),
        }
    }
}

/// Appended to a tensor's name, asks a `VarBuilder` for it as the checkpoint stores it, where
/// that is f16 or bf16 (`crate::loading::build_model`'s backend; no other backend has such
/// names, so training and random weights get f32 as before).
pub const STORED_16BIT: &str = "#16bit";

/// `name` of `vb` (`shape`) in the 16 bits the checkpoint stores it in, if it does.
pub(super) fn stored_16bit(vb: &VarBuilder, name: &str, shape: (usize, usize)) -> Result<Option<Tensor>> {
    let key = format!("{name}{STORED_16BIT}");
    if !vb.contains_tensor(&key) {
        return Ok(None);
    }
    vb.get(shape, &key).map(Some)
}

/// A `Linear` whose weight `weight` is `[out, in]`: q8_0 or 16-bit where the checkpoint stores
/// it so, else f32.
pub fn linear_b(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let bias = if bias { Some(vb.get(d_out, "bias")?) } else { None };
    let weight = match load_q8_0(&vb, "weight", d_out, d_in)? {
        Some(q) => q,
        None => match stored_16bit(&vb, "weight", (d_out, d_in))? {
            Some(w) => Weight::Half(w),
            None => Weight::F32(vb.get((d_out, d_in), "weight")?),
        },
    };
    Ok(Linear { weight, bias, lora: None })
}

pub fn linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(d_in, d_out, true, vb)
}

/// HF GPT-2's `Conv1D`: y = x·W + b with W stored `[in, out]` (q8_0 files store it `[out,
/// in]`, as every quantized weight).
/// Quantizes each of `linears` to `dtype` where its rows allow; returns (quantized, kept).
pub fn quantize_each<'a>(linears: impl IntoIterator<Item = &'a mut Linear>, dtype: candle_core::quantized::GgmlDType) -> Result<(usize, usize)> {
    let mut done = (0, 0);
    for linear in linears {
        if linear.quantize(dtype)? {
            done.0 += 1;
        } else {
            done.1 += 1;
        }
    }
    Ok(done)
}

pub fn conv1d(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    let bias = Some(vb.get(d_out, "bias")?);
    let weight = match load_q8_0(&vb, "weight", d_out, d_in)? {
        Some(q) => q,
        None => match stored_16bit(&vb, "weight", (d_in, d_out))? {
            // `[out, in]`, as the 16-bit kernels read it (one transposed copy at load).
            Some(w) => Weight::Half(w.t()?.contiguous()?),
            None => Weight::F32InOut(vb.get((d_in, d_out), "weight")?),
        },
    };
    Ok(Linear { weight, bias, lora: None })
}

/// Rows from which a GEMM in WASM packs its weight for the call (prefill of a decoder, whose
/// weights stay as decoding reads them): packing reads and writes the weight once, about what
/// 10 rows of products cost, and our kernel is ~1.6× candle's.
const MIN_PACK_ROWS: usize = 48;

/// `xs`·Wᵀ (+ b) on our WASM kernel with W packed by `pack` for this call alone, when there
/// are enough rows for that to pay; None otherwise (and natively).
fn packed_for_this_call(xs: &Tensor, pack: impl FnOnce() -> Result<Option<PackedWeight>>, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let d = xs.dim(D::Minus1)?;
    if !packed::FASTER_THAN_GEMM || d == 0 || xs.elem_count() / d < MIN_PACK_ROWS || xs.dtype() != candle_core::DType::F32 || !xs.device().is_cpu() {
        return Ok(None);
    }
    match pack()? {
        Some(p) => packed_forward(&p, xs, b, None).map(Some),
        None => Ok(None),
    }
}

/// An output activation run in place (`PackedWeight::matmul_then`).
type Then<'a> = Option<&'a (dyn Fn(&mut [f32]) + Sync)>;

/// y = x·Wᵀ (+ b) on a packed weight, the output panels split over the threads
/// (`PackedWeight::matmul_then`).
fn packed_forward(p: &PackedWeight, xs: &Tensor, b: Option<&Tensor>, then: Then) -> Result<Tensor> {
    by_rows(p.dims(), xs, b, then, false, |x, b, then| p.matmul_then(x, b, then))
}

/// y = x·Wᵀ (+ b) by `matmul` (x `[rows, in]` → `[rows, out]`, None on lengths that disagree)
/// on `xs`' rows, split over the threads where `split_rows`.
fn by_rows(
    (out_dim, in_dim): (usize, usize),
    xs: &Tensor,
    b: Option<&Tensor>,
    then: Then,
    split_rows: bool,
    matmul: impl Fn(&[f32], Option<&[f32]>, Then) -> Option<Vec<f32>> + Sync,
) -> Result<Tensor> {
    let d = xs.dim(D::Minus1)?;
    if d != in_dim {
        candle_core::bail!("linear: input has {d} features, weight expects {in_dim}");
    }
    let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    // The input read where it lies (no copy of a 196 × 3072 activation per layer).
    let mut parts = with_f32(&xs.contiguous()?, |x| {
        let part = |rows: std::ops::Range<usize>| {
            matmul(&x[rows.start * in_dim..rows.end * in_dim], b.as_deref(), then)
                .ok_or_else(|| candle_core::Error::Msg(format!("linear: bias of {:?} features for {out_dim}", b.as_ref().map(Vec::len))))
        };
        let rows = x.len() / in_dim.max(1);
        match split_rows {
            true => crate::parallel::map_parts(rows, MIN_GEMM_ROWS, part),
            false => part(0..rows).map(|y| vec![y]),
        }
    })??;
    let y = match parts.len() {
        1 => parts.pop().unwrap_or_default(),
        _ => parts.concat(),
    };
    Tensor::from_vec(y, out_shape(xs, out_dim), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `round_half_away` is `f32::round` bit for bit: at and next to every half in ±130 (the
    /// range q8_0 rounds in), and over the whole range of magnitudes.
    #[test]
    fn round_half_away_is_f32_round() {
        let mut xs = vec![0.0f32, -0.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, 8388608.5, 4194304.5];
        for i in -260..=260 {
            let half = i as f32 / 2.0;
            xs.extend([half, f32::from_bits(half.to_bits() + 1), f32::from_bits(half.to_bits().wrapping_sub(1))]);
        }
        let mut bits = 0x1234_5678u32;
        for _ in 0..200_000 {
            bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            xs.push(f32::from_bits(bits));
        }
        for x in xs.into_iter().filter(|x| !x.is_nan()) {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x:e}");
        }
    }

    #[test]
    fn fast_paths_equal_the_general_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (d_in, d_out) in [(37, 5), (64, 48), (3, 100)] {
            let w = Tensor::randn(0f32, 1., (d_out, d_in), &dev)?;
            let b = Tensor::randn(0f32, 1., d_out, &dev)?;
            let x = Tensor::randn(0f32, 1., (1, 1, d_in), &dev)?;
            let fast = Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
            let slow = x.reshape((1, d_in))?.matmul(&w.t()?)?.broadcast_add(&b)?.reshape((1, 1, d_out))?;
            let diff = (fast - &slow)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "linear {d_in}x{d_out}: {diff}");

            let wt = w.t()?.contiguous()?;
            let conv = Linear { weight: Weight::F32InOut(wt), bias: Some(b.clone()), lora: None };
            let fast = conv.forward(&x)?;
            let diff = (fast - &slow)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "conv1d {d_in}x{d_out}: {diff}");
        }
        Ok(())
    }

    /// `q8_0_blocks` is ggml's q8_0 by its definition (`roundf`, one scale per 32), on values
    /// with exact halves after scaling, zero blocks and a NaN.
    #[test]
    fn q8_0_blocks_is_its_definition() {
        let mut w: Vec<f32> = (0..32 * 40).map(|i| ((i * 7919 % 509) as f32 - 254.0) * 0.5).collect();
        w[32 * 3..32 * 4].fill(0.0);
        w[32 * 5 + 7] = f32::NAN;
        let (qs, scales) = q8_0_blocks(&w);
        for (b, block) in w.chunks_exact(32).enumerate() {
            let amax = block.iter().filter(|v| !v.is_nan()).fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[b].to_bits(), (amax / 127.0).to_bits(), "block {b}");
            let inv = if amax > 0.0 { 1.0 / (amax / 127.0) } else { 0.0 };
            for (i, v) in block.iter().enumerate() {
                assert_eq!(qs[32 * b + i], (v * inv).round().clamp(-127.0, 127.0) as i8, "block {b}, value {i}: {v}");
            }
        }
    }

    /// A q8_0 weight goes 8-bit row by row (`to_int8`), to the bits the whole f32 copy of its
    /// values would give.
    #[test]
    fn q8_0_to_int8_is_the_int8_of_its_values() -> Result<()> {
        for (d_out, d_in) in [(13, 64), (48, 96), (4, 32)] {
            let w = Tensor::randn(0f32, 1., (d_out, d_in), &Device::Cpu)?;
            let mut q8 = Linear::new(w, None);
            assert!(q8.quantize(GgmlDType::Q8_0)?);
            let values = q8.weight.out_in_f32()?.flatten_all()?.to_vec1::<f32>()?;
            let want = Int8Weight::quantize(&values, d_out, d_in).expect("lengths agree").dequantize();
            assert!(q8.to_int8()? && q8.is_int8());
            let got = q8.weight.out_in_f32()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{d_out}x{d_in}");
        }
        Ok(())
    }

    #[test]
    fn threads_give_the_bits_of_one_thread() -> Result<()> {
        let dev = Device::Cpu;
        for (d_in, d_out, rows) in [(64, 48, 1), (64, 50, 3), (96, 13, 40)] {
            let w = Tensor::randn(0f32, 1., (d_out, d_in), &dev)?;
            let b = Tensor::randn(0f32, 1., d_out, &dev)?;
            let xs = Tensor::randn(0f32, 1., (rows, 1, d_in), &dev)?;
            let linear = Linear::new(w.clone(), Some(b.clone()));
            let conv = Linear { weight: Weight::F32InOut(w.t()?.contiguous()?), bias: Some(b.clone()), lora: None };
            let mut q8 = Linear::new(w.clone(), Some(b.clone()));
            assert!(q8.quantize(GgmlDType::Q8_0)?);
            let mut int8 = Linear::new(w.clone(), Some(b));
            assert!(int8.to_int8()?);
            for (name, layer) in [("linear", &linear as &dyn Module), ("conv1d", &conv), ("q8_0", &q8), ("int8", &int8)] {
                let one = layer.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?;
                let two = crate::parallel::with_threads(2, || layer.forward(&xs))?.flatten_all()?.to_vec1::<f32>()?;
                let crew = crate::parallel::with_threads(2, || crate::parallel::with_crew(|| layer.forward(&xs)))?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(two, crew, "{name} {d_in}x{d_out}, {rows} rows, a crew");
                // Few rows (decoding) split the output features: the same bits. Many rows (40:
                // the GEMM) split the rows, which the GEMM may block differently: close.
                if rows <= FAST_ROWS || name == "int8" {
                    assert_eq!(one, two, "{name} {d_in}x{d_out}, {rows} rows");
                } else {
                    let diff = one.iter().zip(&two).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff < 1e-4, "{name} {d_in}x{d_out}, {rows} rows: {diff}");
                }
            }
        }
        Ok(())
    }

    /// A 16-bit weight multiplies as the f32 weight of its values: the same bits for few rows
    /// (decoding: the same f32 kernel on rows widened a block at a time, here over several
    /// blocks), close for many (natively candle's GEMM on the widened copy).
    #[test]
    fn a_16_bit_weight_multiplies_as_its_f32_values() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
            for (d_in, d_out, rows) in [(37, 5, 1), (64, 600, 3), (576, 49, 2), (96, 13, 40)] {
                let w16 = Tensor::randn(0f32, 1., (d_out, d_in), &dev)?.to_dtype(dtype)?;
                let b = Tensor::randn(0f32, 1., d_out, &dev)?;
                let xs = Tensor::randn(0f32, 1., (rows, 1, d_in), &dev)?;
                let half = Linear { weight: Weight::Half(w16.clone()), bias: Some(b.clone()), lora: None };
                let wide = Linear::new(w16.to_dtype(candle_core::DType::F32)?, Some(b));
                assert!(half.is_16bit() && !wide.is_16bit());
                let (got, want) = (half.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?, wide.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?);
                if rows <= FAST_ROWS {
                    assert_eq!(got, want, "{dtype:?} {d_in}x{d_out}, {rows} rows");
                } else {
                    let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff < 1e-4, "{dtype:?} {d_in}x{d_out}, {rows} rows: {diff}");
                }
                let two = crate::parallel::with_threads(2, || half.forward(&xs))?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(got, two, "{dtype:?} {d_in}x{d_out}, {rows} rows, 2 threads");
                // q8_0 from the 16-bit weight (a row at a time) is q8_0 from its f32 values.
                let (mut half_q, mut wide_q) = (half.clone(), wide.clone());
                assert_eq!(half_q.quantize(GgmlDType::Q8_0)?, d_in % 32 == 0);
                if wide_q.quantize(GgmlDType::Q8_0)? {
                    assert_eq!(half_q.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?, wide_q.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_batch_of_rows_gives_each_row_the_bits_it_gets_alone() -> Result<()> {
        let dev = Device::Cpu;
        for (d_in, d_out, rows) in [(37, 5, 3), (64, 48, 8), (576, 9, 32)] {
            let w = Tensor::randn(0f32, 1., (d_out, d_in), &dev)?;
            let b = Tensor::randn(0f32, 1., d_out, &dev)?;
            let xs = Tensor::randn(0f32, 1., (rows, 1, d_in), &dev)?;
            let linear = Linear::new(w.clone(), Some(b.clone()));
            let conv = Linear { weight: Weight::F32InOut(w.t()?.contiguous()?), bias: Some(b), lora: None };
            for layer in [&linear as &dyn Module, &conv] {
                let batch = layer.forward(&xs)?.to_vec3::<f32>()?;
                for (m, got) in batch.iter().enumerate() {
                    let alone = layer.forward(&xs.narrow(0, m, 1)?)?.to_vec3::<f32>()?;
                    assert_eq!(got, &alone[0], "{d_in}x{d_out}, row {m} of {rows}");
                }
            }
        }
        Ok(())
    }
}
