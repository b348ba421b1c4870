//! Linear layers with a matrix–vector fast path. Decoding feeds one position at a time, so each
//! weight is multiplied by a single row: memory-bound work where a general GEMM (candle's
//! `gemm`, in WASM above all) spends most of its time packing. The loops below stream each
//! weight once; their independent accumulators let LLVM emit SIMD (simd128 in WASM, AVX
//! natively) without reassociating floating-point sums.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Storage, Tensor, D};
use candle_nn::VarBuilder;

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

/// Σ a[i]·b[i] with four f32x4 accumulators: LLVM does not vectorise the portable loop for
/// simd128 as well as it does for AVX.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    use core::arch::wasm32::*;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [f32x4_splat(0.0); 4];
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: each chunk holds LANES = 16 floats, so offsets 4k..4k+4 are in bounds;
            // wasm loads need no alignment.
            let (x, y) = unsafe { (v128_load(ca.as_ptr().add(4 * k) as *const v128), v128_load(cb.as_ptr().add(4 * k) as *const v128)) };
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
                *acc = f32x4_add(*acc, f32x4_mul(v128_load(row.as_ptr().add(i) as *const v128), xv));
            }
        }
        i += 4;
    }
    let mut out = [0f32; 4];
    for (k, (o, row)) in out.iter_mut().zip(rows).enumerate() {
        let a = acc[k];
        *o = f32x4_extract_lane::<0>(a) + f32x4_extract_lane::<1>(a) + f32x4_extract_lane::<2>(a) + f32x4_extract_lane::<3>(a);
        *o += row[body..len].iter().zip(&x[body..len]).map(|(w, v)| w * v).sum::<f32>();
    }
    out
}

/// Y = X·Wᵀ for W `[out, in]` row-major and `rows` rows of X: Y is `[rows, out]`. Every
/// output is the same dot product, in the same order, as for a single row — a batch of
/// captions decodes to the very numbers one-by-one decoding gives — while each block of W is
/// read from memory once for all rows (it stays in L1 while the rows pass over it).
fn matmul_rows(w: &[f32], x: &[f32], in_dim: usize, rows: usize) -> Vec<f32> {
    let out_dim = w.len() / in_dim.max(1);
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
        out_dim - quads.remainder().len() / in_dim.max(1)
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
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fast matrix-vector path needs a contiguous tensor");
    };
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => candle_core::bail!("fast matrix-vector path runs on the CPU only"),
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

/// y = W·x (+ b) for each of a few rows x, with W stored `[out, in]` (`nn.Linear`).
fn matvec_out_in(xs: &Tensor, w: &Tensor, b: Option<&Tensor>, rows: usize) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let x = xs.flatten_all()?.to_vec1::<f32>()?;
    if x.len() != rows * in_dim {
        candle_core::bail!("linear: input has {} features, weight expects {in_dim}", x.len() / rows.max(1));
    }
    let mut y = with_f32(w, |w| matmul_rows(w, &x, in_dim, rows))?;
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
    let mut y = match b {
        Some(b) => b.to_vec1::<f32>()?.repeat(rows),
        None => vec![0f32; rows * out_dim],
    };
    with_f32(w, |w| {
        for (i, row) in w.chunks_exact(out_dim).enumerate() {
            for (m, ym) in y.chunks_exact_mut(out_dim).enumerate() {
                axpy(ym, x[m * in_dim + i], row);
            }
        }
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

/// A weight `[out, in]` in a block format. q8_0 is ours: i8 weights with one f32 scale per 32,
/// multiplied by few rows with our kernel (below) and dequantized for the GEMM when many rows
/// come (prefill, where f32 GEMM beats a quantized matmul). q4_0 goes through candle's
/// quantized matmul (its input rows quantized to 8 bits on the fly).
#[derive(Debug, Clone)]
enum QuantizedWeight {
    Q8 { qs: std::sync::Arc<Vec<i8>>, scales: std::sync::Arc<Vec<f32>> },
    Candle(QMatMul),
}

#[derive(Debug, Clone)]
struct Quantized {
    weight: QuantizedWeight,
    out_dim: usize,
    in_dim: usize,
}

const Q8_BLOCK: usize = 32;

/// `weight` `[out, in]` in `dtype`, or `None` when a row is not a whole number of blocks.
fn quantize_out_in(weight: &Tensor, dtype: GgmlDType) -> Result<Option<Quantized>> {
    let (out_dim, in_dim) = weight.dims2()?;
    if in_dim % dtype.block_size() != 0 {
        return Ok(None);
    }
    let weight = match dtype {
        GgmlDType::Q8_0 => {
            // ggml's q8_0: scale = max |w| / 127 per block, q = round(w / scale).
            let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let mut qs = Vec::with_capacity(w.len());
            let mut scales = Vec::with_capacity(w.len() / Q8_BLOCK);
            for block in w.chunks_exact(Q8_BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                qs.extend(block.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8));
                scales.push(scale);
            }
            QuantizedWeight::Q8 { qs: std::sync::Arc::new(qs), scales: std::sync::Arc::new(scales) }
        }
        _ => QuantizedWeight::Candle(QMatMul::from_qtensor(QTensor::quantize(&weight.contiguous()?, dtype)?)?),
    };
    Ok(Some(Quantized { weight, out_dim, in_dim }))
}

/// Σ over blocks of scale_b · Σ q·x16, for one weight row against an input row quantized to i16.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn dot_q8(qs: &[i8], scales: &[f32], x16: &[i16]) -> f32 {
    let mut total = 0f32;
    for ((q, s), x) in qs.chunks_exact(Q8_BLOCK).zip(scales).zip(x16.chunks_exact(Q8_BLOCK)) {
        let sum: i32 = q.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
        total += sum as f32 * s;
    }
    total
}

/// The same with simd128's i16 dot product: 32 weights = 2 loads, 4 widenings, 4 dots.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn dot_q8(qs: &[i8], scales: &[f32], x16: &[i16]) -> f32 {
    use core::arch::wasm32::*;
    let mut acc = f32x4_splat(0.0);
    for ((q, s), x) in qs.chunks_exact(Q8_BLOCK).zip(scales).zip(x16.chunks_exact(Q8_BLOCK)) {
        // SAFETY: every chunk holds 32 values (16 i8 per load; 8 i16 per load); wasm loads need no alignment.
        unsafe {
            let q0 = v128_load(q.as_ptr() as *const v128);
            let q1 = v128_load(q.as_ptr().add(16) as *const v128);
            let x0 = v128_load(x.as_ptr() as *const v128);
            let x1 = v128_load(x.as_ptr().add(8) as *const v128);
            let x2 = v128_load(x.as_ptr().add(16) as *const v128);
            let x3 = v128_load(x.as_ptr().add(24) as *const v128);
            let d0 = i32x4_dot_i16x8(i16x8_extend_low_i8x16(q0), x0);
            let d1 = i32x4_dot_i16x8(i16x8_extend_high_i8x16(q0), x1);
            let d2 = i32x4_dot_i16x8(i16x8_extend_low_i8x16(q1), x2);
            let d3 = i32x4_dot_i16x8(i16x8_extend_high_i8x16(q1), x3);
            let sum = i32x4_add(i32x4_add(d0, d1), i32x4_add(d2, d3));
            acc = f32x4_add(acc, f32x4_mul(f32x4_convert_i32x4(sum), f32x4_splat(*s)));
        }
    }
    f32x4_extract_lane::<0>(acc) + f32x4_extract_lane::<1>(acc) + f32x4_extract_lane::<2>(acc) + f32x4_extract_lane::<3>(acc)
}

/// An input row as i16 with one scale: |error| ≤ max|x| / 65534, far below q8's own.
fn quantize_row_i16(x: &[f32]) -> (Vec<i16>, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 32767.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    (x.iter().map(|v| (v * inv).round().clamp(-32767.0, 32767.0) as i16).collect(), scale)
}

fn quantized_forward(q: &Quantized, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let ys = match &q.weight {
        QuantizedWeight::Candle(matmul) => matmul.forward(&xs.contiguous()?)?,
        QuantizedWeight::Q8 { qs, scales } => match few_rows(xs)? {
            Some(rows) => {
                let x = xs.flatten_all()?.to_vec1::<f32>()?;
                if x.len() != rows * q.in_dim {
                    candle_core::bail!("linear: input has {} features, weight expects {}", x.len() / rows.max(1), q.in_dim);
                }
                let blocks = q.in_dim / Q8_BLOCK;
                let mut y = vec![0f32; rows * q.out_dim];
                let xq: Vec<(Vec<i16>, f32)> = x.chunks_exact(q.in_dim).map(quantize_row_i16).collect();
                for j in 0..q.out_dim {
                    let (wq, ws) = (&qs[j * q.in_dim..(j + 1) * q.in_dim], &scales[j * blocks..(j + 1) * blocks]);
                    for (m, (x16, xs_scale)) in xq.iter().enumerate() {
                        y[m * q.out_dim + j] = dot_q8(wq, ws, x16) * xs_scale;
                    }
                }
                Tensor::from_vec(y, out_shape(xs, q.out_dim), &Device::Cpu)?
            }
            None => {
                // Many rows: dequantize and use the GEMM.
                let w: Vec<f32> = qs.iter().enumerate().map(|(i, &v)| v as f32 * scales[i / Q8_BLOCK]).collect();
                let w = Tensor::from_vec(w, (q.out_dim, q.in_dim), &Device::Cpu)?;
                xs.reshape(((), xs.dim(D::Minus1)?))?.matmul(&w.t()?)?.reshape(out_shape(xs, q.out_dim))?
            }
        },
    };
    match bias {
        Some(b) => ys.broadcast_add(b),
        None => Ok(ys),
    }
}

/// `nn.Linear`: weight `[out, in]`, optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraUpdate>,
    quantized: Option<Quantized>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None, quantized: None }
    }

    /// Swaps the f32 weight for a `dtype` copy (it is dropped, unless something else — a tied
    /// embedding — holds it). Returns false, changing nothing, when the rows are not a whole
    /// number of blocks or a LoRA update is attached.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<bool> {
        if self.lora.is_some() || self.quantized.is_some() {
            return Ok(false);
        }
        let Some(q) = quantize_out_in(&self.weight, dtype)? else { return Ok(false) };
        self.weight = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?;
        self.quantized = Some(q);
        Ok(true)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Dimensions (in, out).
    pub fn dims(&self) -> Result<(usize, usize)> {
        if let Some(q) = &self.quantized {
            return Ok((q.in_dim, q.out_dim));
        }
        let (out, inp) = self.weight.dims2()?;
        Ok((inp, out))
    }

    pub fn set_lora(&mut self, lora: Option<LoraUpdate>) {
        self.lora = lora;
    }

    pub fn lora(&self) -> Option<&LoraUpdate> {
        self.lora.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quantized {
            return quantized_forward(q, xs, self.bias.as_ref());
        }
        if let Some(lora) = &self.lora {
            let base = Linear::new(self.weight.clone(), self.bias.clone()).forward(xs)?;
            let low = Linear::new(lora.a.clone(), None).forward(xs)?;
            return base + (Linear::new(lora.b.clone(), None).forward(&low)? * lora.scale)?;
        }
        if let Some(rows) = few_rows(xs)?.filter(|_| self.weight.is_contiguous() && !super::tracks_grad(&[xs, &self.weight])) {
            return matvec_out_in(xs, &self.weight, self.bias.as_ref(), rows);
        }
        let w = match xs.rank() {
            3 => self.weight.broadcast_left(xs.dim(0)?)?.t()?,
            _ => self.weight.t()?,
        };
        let ys = xs.matmul(&w)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

pub fn linear_b(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((d_out, d_in), "weight")?;
    let bias = if bias { Some(vb.get(d_out, "bias")?) } else { None };
    Ok(Linear::new(weight, bias))
}

pub fn linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(d_in, d_out, true, vb)
}

/// HF GPT-2 `Conv1D`: y = x·W + b with W stored `[in, out]`.
#[derive(Debug, Clone)]
pub struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    quantized: Option<Quantized>,
}

impl Conv1D {
    pub fn new(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get((d_in, d_out), "weight")?, bias: vb.get(d_out, "bias")?, quantized: None })
    }

    /// As [`Linear::quantize`]; the weight is transposed to `[out, in]` first (blocks run along
    /// the input dimension).
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<bool> {
        if self.quantized.is_some() {
            return Ok(false);
        }
        let Some(q) = quantize_out_in(&self.weight.t()?, dtype)? else { return Ok(false) };
        self.weight = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?;
        self.quantized = Some(q);
        Ok(true)
    }
}

impl Module for Conv1D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quantized {
            return quantized_forward(q, xs, Some(&self.bias));
        }
        if let Some(rows) = few_rows(xs)?.filter(|_| self.weight.is_contiguous() && !super::tracks_grad(&[xs, &self.weight, &self.bias])) {
            return matvec_in_out(xs, &self.weight, Some(&self.bias), rows);
        }
        let (b, t, d_in) = xs.dims3()?;
        let ys = xs.reshape((b * t, d_in))?.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        ys.reshape((b, t, ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let conv = Conv1D { weight: wt, bias: b.clone(), quantized: None };
            let fast = conv.forward(&x)?;
            let diff = (fast - &slow)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "conv1d {d_in}x{d_out}: {diff}");
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
            let conv = Conv1D { weight: w.t()?.contiguous()?, bias: b, quantized: None };
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
