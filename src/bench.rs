//! Benchmark core shared by the native runner (`examples/bench.rs`) and the browser one
//! (`benchModel` in `wasm.rs`): the model built from a `config.json` with random weights (speed
//! does not depend on the values), one image through the encoder, then greedy decoding.

use candle_core::Shape;
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::captioner::{argmax, now_ms};
use crate::error::{Error, Result};

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub model_type: String,
    pub build_ms: f64,
    /// Medians over the repeats.
    pub encoder_ms: f64,
    /// Prefix models: the forward pass over image positions + prompt (0 for cross-attention).
    pub prefill_ms: f64,
    pub prefill_positions: usize,
    pub first_token_ms: f64,
    pub ms_per_token: f64,
    /// A decode step with nothing of the model left in the CPU's caches (a read of
    /// [`EVICT_BYTES`] before each step, untimed), the mean over one caption: what a step costs
    /// where the weights do not fit the cache, as on every laptop and phone. `ms_per_token` can
    /// be lower on a host whose cache holds much of a small model (this project's reports 300
    /// MiB of L3, shared with other guests: some minutes it holds most of a 143 MB q8_0 decoder,
    /// others little), so the read floor is held against this.
    pub cold_ms_per_token: f64,
    pub tokens_per_s: f64,
    pub new_tokens: usize,
    pub repeats: usize,
    /// Bytes of weights one decode step reads (every decoder matrix once, the LM head once; not
    /// what is only read for the image, like GPT-2's cross-attention keys/values).
    pub decode_weight_bytes: usize,
    /// Bytes of cached keys and values one decode step reads, averaged over the steps (self-
    /// attention's positions so far, cross-attention's image positions): what the read floor of
    /// the weights alone leaves out.
    pub decode_cache_bytes: usize,
    /// Images through the encoder together, and decode rows per image (beams): a decode step
    /// advances `images × beams` sequences; `ms_per_token` is per step, `tokens_per_s` counts
    /// every row's token.
    pub images: usize,
    pub beams: usize,
    /// The decoder's weight format when not f32 (`q8_0`, `q4_0`; `f16`, `bf16`: every matrix and
    /// the token embeddings held 16-bit, as from a 16-bit checkpoint).
    pub quantized: Option<String>,
    /// Tiles per image; `encoder_ms` is for one tile of each image.
    pub tiles: usize,
    /// The encoder's GEMM kernel (`models::packed::kernel_name`).
    pub encoder_kernel: String,
    /// A quantized model's 8-bit GEMM kernel (`models::packed::int8_kernel_name`): on several
    /// threads, the spelling the calibration chose there.
    pub int8_kernel: Option<String>,
    /// WASM memory's size (it never shrinks) or the process's peak resident set, before the
    /// cold pass allocates its eviction buffer.
    pub peak_memory_bytes: u64,
}

/// How a benchmark decodes: `images` captions in one batch, `beams` rows each (beam search:
/// the caches are reordered every step, as a search does).
#[derive(Debug, Clone, Copy)]
pub struct BenchShape {
    pub images: usize,
    pub beams: usize,
    /// Decoder matrices quantized to this format, the encoder side in 8 bits: what a quantized
    /// checkpoint runs.
    pub quantize: Option<candle_core::quantized::GgmlDType>,
    /// Matrices and token embeddings held in this 16-bit dtype (F16 / BF16), as a 16-bit
    /// checkpoint's are.
    pub sixteen_bit: Option<DType>,
    /// Tiles per image (a split SmolVLM image: rows × cols + 1). One tile per image goes through
    /// the encoder (the timing is per tile: tiles are independent), its features stand for every
    /// tile in the prefill, which covers all their positions.
    pub tiles: usize,
}

impl Default for BenchShape {
    fn default() -> Self {
        Self { images: 1, beams: 1, quantize: None, sixteen_bit: None, tiles: 1 }
    }
}

impl BenchShape {
    /// The weights as `name` says: `f32`, `f16`, `bf16`, `q8_0` or `q4_0`; false for another name.
    pub fn set_weights(&mut self, name: &str) -> bool {
        (self.quantize, self.sixteen_bit) = match name {
            "f32" => (None, None),
            "f16" => (None, Some(DType::F16)),
            "bf16" => (None, Some(DType::BF16)),
            other => match crate::captioner::decoder_format(other) {
                Some(q) => (Some(q), None),
                None => return false,
            },
        };
        true
    }
}

/// Bytes a decode step reads when the decoder's matrices are quantized: q8_0 keeps 34 bytes per
/// 32 weights, q4_0 18 (of f32's 128); what stays f32 (norms, biases) is small, so the estimate
/// scales the whole f32 figure.
fn quantized_bytes(f32_bytes: usize, quantize: Option<candle_core::quantized::GgmlDType>) -> usize {
    use candle_core::quantized::GgmlDType;
    // In f64: on wasm32 `usize` is 32 bits and 551 MB × 34 overflows it.
    let scale = match quantize {
        Some(GgmlDType::Q8_0) => 34.0 / 128.0,
        Some(GgmlDType::Q4_0) => 18.0 / 128.0,
        _ => 1.0,
    };
    (f32_bytes as f64 * scale) as usize
}

impl BenchShape {
    fn rows(&self) -> usize {
        self.images.max(1) * self.beams.max(1)
    }

    /// Cache rows after a step: every beam continues its image's first beam (the heaviest
    /// reorder a search can do), or no reorder without beams.
    fn reorder(&self) -> Option<Vec<usize>> {
        (self.beams > 1).then(|| (0..self.rows()).map(|r| r - r % self.beams).collect())
    }

    /// Rows of the first step's cache (one per image) → one per beam.
    fn expand(&self) -> Option<Vec<usize>> {
        (self.beams > 1).then(|| (0..self.rows()).map(|r| r / self.beams).collect())
    }
}

fn parse(config_json: &str) -> Result<serde_json::Value> {
    serde_json::from_str(config_json).map_err(|e| Error::config("bench config", e))
}

/// Every tensor filled with N(c, 0.02²), `c` the constant a layer would initialise it to (1 for
/// norm gains). Never zeros: a zero-initialised buffer is untouched memory that the OS (and V8's
/// wasm memory) maps to one shared zero page, so reading it costs nothing and decode would be
/// timed without reading the weights from RAM.
/// Also records every tensor it makes, so the bench can say how many bytes one decode step reads.
/// With `sixteen_bit`, it offers every matrix as stored in that dtype (`linear::STORED_16BIT`);
/// with `q8_0`, what `crate::quantize` writes: linear matrices in q8_0 (random blocks), token
/// embeddings in f16 — so that memory is what loading such a file takes, never the f32 model.
#[derive(Clone, Default)]
struct RandomWeights {
    /// (name, elements, bytes per element)
    made: std::sync::Arc<std::sync::Mutex<Vec<(String, usize, usize)>>>,
    sixteen_bit: Option<DType>,
    q8_0: bool,
}

impl RandomWeights {
    /// Bytes of the tensors whose name passes `read_per_step`.
    fn bytes(&self, read_per_step: impl Fn(&str) -> bool) -> usize {
        let made = self.made.lock().map(|m| m.clone()).unwrap_or_default();
        made.iter().filter(|(name, _, _)| read_per_step(name)).map(|(_, n, size)| size * n).sum()
    }
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mean = match h {
            Init::Const(c) => c,
            _ => 0.0,
        };
        use crate::models::linear::{Q8_0_SCALES_SUFFIX, Q8_0_SUFFIX, STORED_16BIT};
        let record = |name: &str, bytes: usize| {
            if let Ok(mut made) = self.made.lock() {
                // A q8_0 model's bytes are estimated from f32's (`quantized_bytes`).
                made.push((name.to_string(), s.elem_count(), if self.q8_0 { 4 } else { bytes }));
            }
        };
        if let Some(base) = name.strip_suffix(Q8_0_SUFFIX) {
            record(base, 1);
            // Pseudo-random bytes, never zeros (see above); values of |q| ≤ 127 as q8_0 keeps.
            let mut x = 0x9e37_79b9u32;
            let qs: Vec<u8> = (0..s.elem_count())
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((x >> 24) as i8).max(-127) as u8
                })
                .collect();
            return Tensor::from_vec(qs, s, dev);
        }
        if name.ends_with(Q8_0_SCALES_SUFFIX) {
            return Tensor::rand(1e-4f32, 2e-4f32, s, dev);
        }
        let (name, dtype) = match name.strip_suffix(STORED_16BIT) {
            Some(base) => (base, self.sixteen_bit.unwrap_or(DType::F16)),
            None => (name, dtype),
        };
        record(name, dtype.size_in_bytes());
        Tensor::randn(mean as f32, 0.02f32, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for {name}")
    }

    /// Every f32 tensor; with `sixteen_bit` every 16-bit one asked for; with `q8_0` every q8_0
    /// matrix and 16-bit token embeddings (a linear weight that is q8_0 is not asked for in 16
    /// bits).
    fn contains_tensor(&self, name: &str) -> bool {
        use crate::models::linear::{Q8_0_SUFFIX, STORED_16BIT};
        if name.ends_with(Q8_0_SUFFIX) {
            return self.q8_0;
        }
        !name.ends_with(STORED_16BIT) || self.sixteen_bit.is_some() || self.q8_0
    }
}

fn random_varbuilder(sixteen_bit: Option<DType>, q8_0: bool) -> (RandomWeights, VarBuilder<'static>) {
    let weights = RandomWeights { sixteen_bit, q8_0, ..Default::default() };
    (weights.clone(), VarBuilder::from_backend(Box::new(weights), DType::F32, Device::Cpu))
}

/// Streams one thread reads at once, and the floats it takes from each in turn: one stream
/// read 9.0–10.4 GB/s in Chromium on this project's Xeon, two 12.3–16.0, four of 1 KB turns
/// 14.2–16.5 (eight gained nothing more). The q8_0 decode kernel reads two; the floor is what
/// the best pattern reads.
const STREAMS: usize = 4;
const TURN: usize = 256;

/// Σ xs read as [`STREAMS`] interleaved streams of [`TURN`] floats (a last few floats that
/// fill no turn are left out), with 16 independent partial sums: the plainest streaming read.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn streams_sum(xs: &[f32]) -> f32 {
    let part = xs.len() / STREAMS / TURN * TURN;
    let mut acc = [0f32; 16];
    for at in (0..part).step_by(TURN) {
        for s in 0..STREAMS {
            for chunk in xs[s * part + at..s * part + at + TURN].chunks_exact(16) {
                for (a, x) in acc.iter_mut().zip(chunk) {
                    *a += x;
                }
            }
        }
    }
    acc.iter().sum()
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn streams_sum(xs: &[f32]) -> f32 {
    use core::arch::wasm32::*;
    let part = xs.len() / STREAMS / TURN * TURN;
    let (mut a0, mut a1, mut a2, mut a3) = (f32x4_splat(0.0), f32x4_splat(0.0), f32x4_splat(0.0), f32x4_splat(0.0));
    let p = xs.as_ptr();
    for at in (0..part).step_by(TURN) {
        for s in 0..STREAMS {
            for c in (0..TURN).step_by(16) {
                // SAFETY: s · part + at + c + 16 ≤ STREAMS · part ≤ xs.len(); wasm loads need no alignment.
                unsafe {
                    let q = p.add(s * part + at + c);
                    a0 = f32x4_add(a0, v128_load(q as *const v128));
                    a1 = f32x4_add(a1, v128_load(q.add(4) as *const v128));
                    a2 = f32x4_add(a2, v128_load(q.add(8) as *const v128));
                    a3 = f32x4_add(a3, v128_load(q.add(12) as *const v128));
                }
            }
        }
    }
    let s = f32x4_add(f32x4_add(a0, a1), f32x4_add(a2, a3));
    f32x4_extract_lane::<0>(s) + f32x4_extract_lane::<1>(s) + f32x4_extract_lane::<2>(s) + f32x4_extract_lane::<3>(s)
}

/// Streaming-read speed: the bytes/s of a sum over a fresh buffer of `bytes` (written first, so
/// it is real memory, not the shared zero page), split over the `parallel::threads()` a decode
/// step splits over, each thread reading [`STREAMS`] streams; the fastest of `repeats`. A decode step
/// cannot take less than the bytes it reads / this.
pub fn memory_read_gbps(bytes: usize, repeats: usize) -> f64 {
    let n = bytes / 4;
    let buffer: Vec<f32> = (0..n).map(|i| (i % 251) as f32 * 1e-3).collect();
    let parts = crate::parallel::threads().max(1);
    let part = n.div_ceil(parts).max(1);
    let times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = now_ms();
            let sums = crate::parallel::map(parts, |i| streams_sum(std::hint::black_box(&buffer[(i * part).min(n)..((i + 1) * part).min(n)])));
            std::hint::black_box(sums);
            now_ms() - start
        })
        .collect();
    // The fastest read, not the median: a floor is the least a step can take.
    (n * 4) as f64 / times.into_iter().fold(f64::INFINITY, f64::min) / 1e6
}

/// `n` deterministic values in [-1, 1]: inputs for timing products, whose speed does not
/// depend on them.
pub fn noise(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.618 + seed) * 12.9898).sin()).collect()
}

/// One product y = x·Wᵀ for x `[rows, in_dim]`, W `[out_dim, in_dim]`, in each form a weight
/// takes: for many rows (the encoder) f32 and f16/bf16 packed for our kernel in WASM (else
/// candle's GEMM) and 8-bit; for a few (decoding) f32, f16/bf16 and q8_0 through the
/// matrix–vector kernels. The median ms of `repeats` and the GFLOP/s (2·rows·in·out per
/// product), as JSON. One thread unless the pool has more.
pub fn gemm_report(rows: usize, in_dim: usize, out_dim: usize, repeats: usize) -> Result<serde_json::Value> {
    use crate::models::linear::Linear;
    use candle_core::Module;
    let w = Tensor::from_vec(noise(out_dim * in_dim, 1.0), (out_dim, in_dim), &Device::Cpu)?;
    let x = Tensor::from_vec(noise(rows * in_dim, 2.0), (1, rows, in_dim), &Device::Cpu)?;
    // Few rows (decoding): the matrix–vector kernels of each form a decoder weight takes; many
    // (the encoder): the packed GEMM in f32 and 16 bits against the 8-bit one.
    let decoding = rows <= 32;
    let mut layers = vec![];
    for name in ["f32", "f16", "bf16", if decoding { "q8_0" } else { "int8" }] {
        let mut layer = Linear::new(w.clone(), None);
        match name {
            "f16" => layer.to_16bit(DType::F16)?,
            "bf16" => layer.to_16bit(DType::BF16)?,
            "q8_0" => layer.quantize(candle_core::quantized::GgmlDType::Q8_0)?,
            "int8" => layer.to_int8()?,
            _ => true,
        };
        if !decoding {
            layer.pack()?;
        }
        layers.push((name, layer));
    }
    let flop = 2.0 * (rows * in_dim * out_dim) as f64;
    let mut report = serde_json::Map::new();
    for (name, layer) in &layers {
        let name = *name;
        let times = (0..repeats.max(1))
            .map(|_| {
                let start = now_ms();
                std::hint::black_box(layer.forward(&x)?);
                Ok(now_ms() - start)
            })
            .collect::<Result<Vec<f64>>>()?;
        let ms = median(times);
        report.insert(name.into(), serde_json::json!({ "ms": ms, "gflops": flop / ms / 1e6 }));
    }
    report.insert("shape".into(), serde_json::json!([rows, in_dim, out_dim]));
    report.insert("kernel".into(), crate::models::packed::kernel_name().into());
    report.insert("int8Kernel".into(), crate::models::packed::int8_kernel_name().into());
    Ok(report.into())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times of one caption: encoder done, prefill done, first token, end (ms from its start).
struct Timing {
    encoded: f64,
    prefilled: f64,
    first: f64,
    end: f64,
}

fn summarize(
    model_type: &str,
    build_ms: f64,
    prefill_positions: usize,
    runs: Vec<Timing>,
    new_tokens: usize,
    decode_weight_bytes: usize,
    decode_cache_bytes: usize,
    shape: BenchShape,
    (cold_ms_per_token, peak_memory_bytes): (f64, u64),
) -> BenchReport {
    let per_token: Vec<f64> = runs.iter().filter(|_| new_tokens > 1).map(|r| (r.end - r.first) / (new_tokens - 1) as f64).collect();
    let ms_per_token = median(per_token);
    BenchReport {
        model_type: model_type.to_string(),
        build_ms,
        encoder_ms: median(runs.iter().map(|r| r.encoded).collect()),
        prefill_ms: median(runs.iter().map(|r| r.prefilled - r.encoded).collect()),
        prefill_positions,
        first_token_ms: median(runs.iter().map(|r| r.first).collect()),
        ms_per_token,
        cold_ms_per_token,
        tokens_per_s: 1000.0 * shape.rows() as f64 / ms_per_token,
        new_tokens,
        repeats: runs.len(),
        decode_weight_bytes: quantized_bytes(decode_weight_bytes, shape.quantize),
        decode_cache_bytes,
        images: shape.images.max(1),
        beams: shape.beams.max(1),
        quantized: shape.quantize.map(|d| format!("{d:?}").to_lowercase()).or(shape.sixteen_bit.map(|d| format!("{d:?}").to_lowercase())),
        tiles: shape.tiles.max(1),
        encoder_kernel: crate::models::packed::kernel_name().to_string(),
        int8_kernel: shape.quantize.map(|_| crate::models::packed::int8_kernel_name().to_string()),
        peak_memory_bytes,
    }
}

/// Benchmarks whichever architecture `config_json` names; `prompt_tokens` text positions follow
/// the image in a prefix model.
pub fn bench_model(config_json: &str, prompt_tokens: usize, new_tokens: usize, repeats: usize) -> Result<BenchReport> {
    bench_model_shaped(config_json, prompt_tokens, new_tokens, repeats, BenchShape::default())
}

/// [`bench_model`] for a batch of images and/or beams.
pub fn bench_model_shaped(config_json: &str, prompt_tokens: usize, new_tokens: usize, repeats: usize, shape: BenchShape) -> Result<BenchReport> {
    let config = parse(config_json)?;
    let t0 = now_ms();
    let family = crate::architecture::family_of(&config).map_err(|e| Error::config("bench config", e))?;
    let build = (family.config)(&config).map_err(|e| Error::config("bench config", e))?;
    let q8_0 = shape.quantize == Some(candle_core::quantized::GgmlDType::Q8_0);
    let (weights, vb) = random_varbuilder(shape.sixteen_bit, q8_0);
    let mut model = build(vb)?;
    if let Some(dtype) = shape.quantize {
        model.quantize_decoder(dtype)?;
        crate::architecture::int8_encoder_side(model.as_mut())?;
    } else {
        crate::architecture::pack_encoder_side(model.as_mut())?;
    }
    let build_ms = now_ms() - t0;
    let generation = crate::loading::GenerationDefaults::resolve(None, &config, family.decoder_section)?;
    let tiles = shape.tiles.max(1);
    let ids = model.synthetic_input_ids(&generation, prompt_tokens, tiles);
    let [channels, height, width] = model.image_shape();
    let pixels = Tensor::randn(0f32, 1f32, (shape.images.max(1), channels, height, width), &Device::Cpu)?;
    let mut runs = vec![];
    // u64: a batch's caches over all steps pass 4 GB, usize's limit in WASM.
    let (mut cache_bytes, mut steps) = (0u64, 0u64);
    // The repeats as they come, then one caption whose steps each start with the caches emptied.
    let (mut evict, mut cold_steps, mut peak): (Option<Vec<f32>>, Vec<f64>, u64) = (None, vec![], 0);
    // The last repeat's image features: the cold pass times decode steps only, so it starts
    // from these rather than running the encoder once more.
    let mut encoded_image: Option<Tensor> = None;
    for run in 0..=repeats.max(1) {
        let cold = run == repeats.max(1);
        if cold {
            peak = peak_memory_bytes();
            evict = Some((0..EVICT_BYTES / 4).map(|i| (i % 251) as f32).collect());
        }
        let start = now_ms();
        let conditioning = match encoded_image.take().filter(|_| cold) {
            Some(features) => features,
            None => model.encode(&pixels)?,
        };
        let encoded = now_ms() - start;
        encoded_image = Some(conditioning.clone());
        let conditioning = if tiles > 1 {
            // Each image's tile stands for all of its tiles, in a row.
            let rows: Vec<usize> = (0..shape.images.max(1)).flat_map(|i| std::iter::repeat_n(i, tiles)).collect();
            conditioning.index_select(&crate::models::attention::row_index(&rows, &Device::Cpu)?, 0)?
        } else {
            conditioning
        };
        let mut state = model.start(conditioning, &ids)?;
        let mut next = argmax_rows(&crate::architecture::step_logits(model.as_ref(), state.as_mut())?)?;
        if let Some(rows) = shape.expand() {
            state = state.select(&rows)?;
            next = rows.iter().map(|&r| next[r]).collect();
        }
        let first = now_ms() - start;
        for _ in 1..new_tokens {
            if let Some(evict) = &evict {
                for _ in 0..EVICT_READS {
                    std::hint::black_box(streams_sum(std::hint::black_box(evict)));
                }
            }
            let step = now_ms();
            state.feed(next);
            if !cold {
                cache_bytes += state.cache_bytes() as u64;
                steps += 1;
            }
            next = argmax_rows(&crate::architecture::step_logits(model.as_ref(), state.as_mut())?)?;
            if let Some(rows) = shape.reorder() {
                state = state.select(&rows)?;
                next = rows.iter().map(|&r| next[r]).collect();
            }
            if cold {
                cold_steps.push(now_ms() - step);
            }
        }
        // A prompt of more than the start token is prefilled by the first step.
        let prefilled = if ids.len() > 1 { first } else { encoded };
        if !cold {
            runs.push(Timing { encoded, prefilled, first, end: now_ms() - start });
        }
    }
    let cold_ms = cold_steps.iter().sum::<f64>() / cold_steps.len().max(1) as f64;
    let read = weights.bytes(|name| model.decode_step_reads(name));
    let prefill_positions = if ids.len() > 1 { ids.len() } else { 0 };
    Ok(summarize(
        family.model_type,
        build_ms,
        prefill_positions,
        runs,
        new_tokens,
        read,
        (cache_bytes / steps.max(1)) as usize,
        shape,
        (cold_ms, peak),
    ))
}

/// What empties the caches before each step of the cold pass: a buffer the size of the largest
/// cache this project's hosts report (300 MiB of L3), read several times. One read of twice that
/// does not do it: the cache keeps lines read again and again (the model's, every step) against
/// ones read once, and a plain read of a 150 MB buffer stays at cache speed (34 GB/s natively)
/// after 2.4 GB of other reads; read six times, the buffer displaces it (17 GB/s, memory's speed).
const EVICT_BYTES: usize = 300 << 20;
const EVICT_READS: usize = 6;

/// WASM memory's size, or natively the peak resident set (0 where neither is known).
fn peak_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return core::arch::wasm32::memory_size(0) as u64 * 65536;
    #[cfg(not(target_arch = "wasm32"))]
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// The argmax of each row of logits [B, vocab].
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    (0..logits.dim(0)?).map(|b| argmax(&logits.get(b)?)).collect()
}
