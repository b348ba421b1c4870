//! Benchmark core shared by the native runner (`examples/bench.rs`) and the browser one
//! (`benchModel` in `wasm.rs`): the model built from a `config.json` with random weights (speed
//! does not depend on the values), one image through the encoder, then greedy decoding.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::captioner::{argmax, now_ms};
use crate::error::{Error, Result};
use crate::models::llava::{Llava, LlavaConfig};
use crate::models::vision_encoder_decoder::{VisionEncoderDecoder, VisionEncoderDecoderConfig};

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
    pub tokens_per_s: f64,
    pub new_tokens: usize,
    pub repeats: usize,
}

fn parse(config_json: &str) -> Result<serde_json::Value> {
    serde_json::from_str(config_json).map_err(|e| Error::config("bench config", e))
}

fn random_varbuilder() -> (VarMap, VarBuilder<'static>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (varmap, vb)
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

fn summarize(model_type: &str, build_ms: f64, prefill_positions: usize, runs: Vec<Timing>, new_tokens: usize) -> BenchReport {
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
        tokens_per_s: 1000.0 / ms_per_token,
        new_tokens,
        repeats: runs.len(),
    }
}

/// Benchmarks whichever architecture `config_json` names; `prompt_tokens` text positions follow
/// the image in a prefix model.
pub fn bench_model(config_json: &str, prompt_tokens: usize, new_tokens: usize, repeats: usize) -> Result<BenchReport> {
    let value = parse(config_json)?;
    match value.get("model_type").and_then(|t| t.as_str()) {
        Some("vision-encoder-decoder") => bench_cross_attention(&value, new_tokens, repeats),
        Some("llava") => bench_prefix(&value, prompt_tokens, new_tokens, repeats),
        other => Err(Error::config("bench config", format!("model_type {other:?} is not supported"))),
    }
}

fn bench_cross_attention(value: &serde_json::Value, new_tokens: usize, repeats: usize) -> Result<BenchReport> {
    let t0 = now_ms();
    let cfg = VisionEncoderDecoderConfig::from_json(value).map_err(|e| Error::config("bench config", e))?;
    let (_varmap, vb) = random_varbuilder();
    let model = VisionEncoderDecoder::new(&cfg, vb)?;
    let build_ms = now_ms() - t0;
    let enc = &cfg.encoder;
    let pixels = Tensor::randn(0f32, 1f32, (1, enc.num_channels, enc.image_size, enc.image_size), &Device::Cpu)?;
    let mut runs = vec![];
    for _ in 0..repeats.max(1) {
        let start = now_ms();
        let states = model.encode(&pixels)?;
        let encoded = now_ms() - start;
        let mut cache = model.start_decoding(&states)?;
        let (mut next, mut first) = (0u32, encoded);
        for i in 0..new_tokens {
            let logits = model.decode_step(&Tensor::new(&[[next]], &Device::Cpu)?, &mut cache)?;
            next = argmax(&logits.squeeze(0)?)?;
            if i == 0 {
                first = now_ms() - start;
            }
        }
        runs.push(Timing { encoded, prefilled: encoded, first, end: now_ms() - start });
    }
    Ok(summarize("vision-encoder-decoder", build_ms, 0, runs, new_tokens))
}

fn bench_prefix(value: &serde_json::Value, prompt_tokens: usize, new_tokens: usize, repeats: usize) -> Result<BenchReport> {
    let t0 = now_ms();
    let cfg = LlavaConfig::from_json(value).map_err(|e| Error::config("bench config", e))?;
    let (_varmap, vb) = random_varbuilder();
    let model = Llava::new(&cfg, vb)?;
    let build_ms = now_ms() - t0;
    let vision = &cfg.vision_config;
    let pixels = Tensor::randn(0f32, 1f32, (1, vision.num_channels, vision.image_size, vision.image_size), &Device::Cpu)?;
    let vocab = cfg.text_config.vocab_size.max(2) as u32;
    let mut ids = vec![cfg.image_token_index; cfg.num_image_tokens()];
    ids.extend((0..prompt_tokens as u32).map(|i| (i * 7919 + 1) % vocab).map(|id| if id == cfg.image_token_index { 1 } else { id }));
    let mut runs = vec![];
    for _ in 0..repeats.max(1) {
        let start = now_ms();
        let features = model.image_features(&pixels)?;
        let encoded = now_ms() - start;
        let mut cache = model.language_model().new_cache();
        let mut next = argmax(&model.prefill(&ids, &features, &mut cache)?.squeeze(0)?)?;
        let prefilled = now_ms() - start;
        for _ in 1..new_tokens {
            next = argmax(&model.decode_step(next, &mut cache)?.squeeze(0)?)?;
        }
        runs.push(Timing { encoded, prefilled, first: prefilled, end: now_ms() - start });
    }
    Ok(summarize("llava", build_ms, ids.len(), runs, new_tokens))
}
