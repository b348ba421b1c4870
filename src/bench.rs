//! Benchmark core shared by the native runner (`examples/bench.rs`) and the browser one
//! (`benchCrossAttention` in `wasm.rs`): the model built from a config with random weights
//! (speed does not depend on the values), one image through the encoder, then greedy decoding.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::captioner::{argmax, now_ms};
use crate::error::{Error, Result};
use crate::models::vision_encoder_decoder::{VisionEncoderDecoder, VisionEncoderDecoderConfig};

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub build_ms: f64,
    /// Medians over the repeats.
    pub encoder_ms: f64,
    pub first_token_ms: f64,
    pub ms_per_token: f64,
    pub tokens_per_s: f64,
    pub new_tokens: usize,
    pub repeats: usize,
}

pub fn random_vision_encoder_decoder(config_json: &str) -> Result<VisionEncoderDecoder> {
    let value: serde_json::Value = serde_json::from_str(config_json).map_err(|e| Error::config("bench config", e))?;
    let cfg = VisionEncoderDecoderConfig::from_json(&value).map_err(|e| Error::config("bench config", e))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Ok(VisionEncoderDecoder::new(&cfg, vb)?)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `repeats` captions of `new_tokens` tokens each (no early stop: the ids are random).
pub fn bench_cross_attention(config_json: &str, new_tokens: usize, repeats: usize) -> Result<BenchReport> {
    let t0 = now_ms();
    let model = random_vision_encoder_decoder(config_json)?;
    let build_ms = now_ms() - t0;
    let cfg = model.encoder().config();
    let pixels = Tensor::randn(0f32, 1f32, (1, cfg.num_channels, cfg.image_size, cfg.image_size), &Device::Cpu)?;
    let (mut enc, mut first, mut per_token) = (vec![], vec![], vec![]);
    for _ in 0..repeats.max(1) {
        let start = now_ms();
        let states = model.encode(&pixels)?;
        // Force the computation before reading the clock (candle on CPU is eager anyway).
        let _ = states.dims();
        let encoded = now_ms();
        let mut cache = model.start_decoding(&states)?;
        let mut next = 0u32;
        let mut first_at = encoded;
        for i in 0..new_tokens {
            let logits = model.decode_step(&Tensor::new(&[[next]], &Device::Cpu)?, &mut cache)?;
            next = argmax(&logits.squeeze(0)?)?;
            if i == 0 {
                first_at = now_ms();
            }
        }
        let end = now_ms();
        enc.push(encoded - start);
        first.push(first_at - start);
        if new_tokens > 1 {
            per_token.push((end - first_at) / (new_tokens - 1) as f64);
        }
    }
    let ms_per_token = median(per_token);
    Ok(BenchReport {
        build_ms,
        encoder_ms: median(enc),
        first_token_ms: median(first),
        ms_per_token,
        tokens_per_s: 1000.0 / ms_per_token,
        new_tokens,
        repeats,
    })
}
