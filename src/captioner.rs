//! The whole path in one place: files → model; image → pixel values → encoder states →
//! tokens, one at a time so callers (the CLI, WASM, the JS worker) can stream them.

use candle_core::{Device, IndexOp, Tensor};

use crate::error::{Error, Result};
use crate::loading::{self, GenerationDefaults, ModelFiles};
use crate::models::gpt2::Gpt2Cache;
use crate::models::vision_encoder_decoder::{VisionEncoderDecoder, VisionEncoderDecoderConfig};
use crate::preprocess::{self, PreprocessorConfig};
use crate::tokenizer::{CaptionTokenizer, TextStream};

/// The architectures `config.json` can name.
#[derive(Debug, Clone)]
pub enum Model {
    /// 🤗 `VisionEncoderDecoderModel`: SigLIP → GPT-2 with cross-attention.
    CrossAttention(VisionEncoderDecoder),
}

pub struct Captioner {
    model: Model,
    tokenizer: CaptionTokenizer,
    preprocessor: PreprocessorConfig,
    generation: GenerationDefaults,
}

#[derive(Debug, Clone, Default)]
pub struct CaptionOptions {
    /// Defaults to `generation_config.json` (transformers' own default when absent).
    pub max_new_tokens: Option<usize>,
}

/// One generated token: its id, the caption so far, and what this token added to it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
    pub delta: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Caption {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub encoder_ms: f64,
    pub first_token_ms: f64,
    pub total_ms: f64,
    pub tokens_per_s: f64,
}

/// A caption in progress: the decoder cache for one image and what has been generated.
pub struct CaptionRun {
    cache: Gpt2Cache,
    next_input: u32,
    token_ids: Vec<u32>,
    max_new_tokens: usize,
    done: bool,
    stream: TextStream,
    started_ms: f64,
    encoder_ms: f64,
    first_token_ms: Option<f64>,
}

impl CaptionRun {
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    pub fn text(&self) -> &str {
        self.stream.text()
    }
}

impl Captioner {
    pub fn from_files(files: ModelFiles<'_>) -> Result<Self> {
        let config = loading::parse_json(loading::CONFIG, files.config)?;
        let generation = files.generation.map(|bytes| loading::parse_json(loading::GENERATION, bytes)).transpose()?;
        let model_type = config.get("model_type").and_then(|t| t.as_str()).unwrap_or_default();
        let (model, decoder_section) = match model_type {
            "vision-encoder-decoder" => {
                let cfg = VisionEncoderDecoderConfig::from_json(&config).map_err(|reason| Error::config(loading::CONFIG, reason))?;
                let tensors = loading::load_safetensors(loading::WEIGHTS, files.weights, loading::vision_encoder_decoder_key)?;
                let model = loading::build_model(loading::WEIGHTS, tensors, |vb| VisionEncoderDecoder::new(&cfg, vb))?;
                (Model::CrossAttention(model), "decoder")
            }
            other => {
                return Err(Error::config(
                    loading::CONFIG,
                    format!("model_type {other:?} is not supported (expected \"vision-encoder-decoder\")"),
                ))
            }
        };
        let generation = GenerationDefaults::resolve(generation.as_ref(), &config, decoder_section)?;
        let tokenizer = CaptionTokenizer::from_bytes(files.tokenizer)?;
        let preprocessor = PreprocessorConfig::from_json(files.preprocessor)?;
        Ok(Self { model, tokenizer, preprocessor, generation })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        let files = loading::OwnedModelFiles::read_dir(dir.as_ref())?;
        Self::from_files(files.borrow())
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &CaptionTokenizer {
        &self.tokenizer
    }

    pub fn preprocessor(&self) -> &PreprocessorConfig {
        &self.preprocessor
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// Encoded image bytes (PNG/JPEG) → pixel values [1, 3, H, W].
    pub fn pixel_values_from_bytes(&self, bytes: &[u8]) -> Result<Tensor> {
        self.preprocessor.preprocess(&preprocess::decode_image(bytes)?)
    }

    /// Raw RGBA pixels (what a canvas gives) → pixel values [1, 3, H, W].
    pub fn pixel_values_from_rgba(&self, rgba: &[u8], width: u32, height: u32) -> Result<Tensor> {
        self.preprocessor.preprocess(&preprocess::rgba_to_rgb(rgba, width, height)?)
    }

    /// The encoder's last hidden state for pixel values [B, 3, H, W].
    pub fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let Model::CrossAttention(model) = &self.model;
        let cfg = model.encoder().config();
        let expected = [cfg.num_channels, cfg.image_size, cfg.image_size];
        match pixel_values.dims() {
            [_, rest @ ..] if rest == expected => {}
            found => {
                return Err(Error::Image(format!(
                    "pixel values have shape {found:?}, the encoder expects [batch, {}, {}, {}] (check preprocessor_config.json size against config.json image_size)",
                    expected[0], expected[1], expected[2]
                )))
            }
        }
        Ok(model.encode(pixel_values)?)
    }

    /// Runs the encoder and prepares decoding; then call [`Captioner::next_token`] until it
    /// returns `None`.
    pub fn start(&self, pixel_values: &Tensor, options: &CaptionOptions) -> Result<CaptionRun> {
        let started_ms = now_ms();
        let max_new_tokens = options.max_new_tokens.unwrap_or(self.generation.max_new_tokens);
        let Model::CrossAttention(model) = &self.model;
        let n_positions = model.decoder().config().n_positions;
        if max_new_tokens + 1 > n_positions {
            return Err(Error::Generation(format!(
                "max_new_tokens {max_new_tokens} does not fit the decoder: n_positions is {n_positions}, so at most {} new tokens",
                n_positions.saturating_sub(1)
            )));
        }
        let encoder_states = self.encode(pixel_values)?;
        let cache = model.start_decoding(&encoder_states)?;
        Ok(CaptionRun {
            cache,
            next_input: self.generation.decoder_start_token_id,
            token_ids: Vec::with_capacity(max_new_tokens),
            max_new_tokens,
            done: max_new_tokens == 0,
            stream: TextStream::new(),
            started_ms,
            encoder_ms: now_ms() - started_ms,
            first_token_ms: None,
        })
    }

    /// First-step logits [vocab] after the start token — what the fidelity tests compare.
    pub fn first_step_logits(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let Model::CrossAttention(model) = &self.model;
        let mut cache = model.start_decoding(&self.encode(pixel_values)?)?;
        let input = Tensor::new(&[[self.generation.decoder_start_token_id]], &Device::Cpu)?;
        Ok(model.decode_step(&input, &mut cache)?.i(0)?)
    }

    /// Greedy step: the next token, or `None` once EOS was produced or the budget is spent.
    pub fn next_token(&self, run: &mut CaptionRun) -> Result<Option<TokenEvent>> {
        if run.done {
            return Ok(None);
        }
        let Model::CrossAttention(model) = &self.model;
        let input = Tensor::new(&[[run.next_input]], &Device::Cpu)?;
        let logits = model.decode_step(&input, &mut run.cache)?.i(0)?;
        let id = argmax(&logits)?;
        run.token_ids.push(id);
        run.next_input = id;
        if run.first_token_ms.is_none() {
            run.first_token_ms = Some(now_ms() - run.started_ms);
        }
        run.done = self.generation.eos_token_ids.contains(&id) || run.token_ids.len() >= run.max_new_tokens;
        let mut delta = run.stream.push(&self.tokenizer, id)?;
        if run.done {
            delta.push_str(&run.stream.finish(&self.tokenizer)?);
        }
        Ok(Some(TokenEvent { id, text: run.stream.text().to_string(), delta }))
    }

    /// The finished caption of a run (call once `next_token` returned `None`).
    pub fn finish(&self, run: &CaptionRun) -> Caption {
        let total_ms = now_ms() - run.started_ms;
        let first_token_ms = run.first_token_ms.unwrap_or(run.encoder_ms);
        let further = run.token_ids.len().saturating_sub(1) as f64;
        let decode_ms = total_ms - first_token_ms;
        Caption {
            text: run.stream.text().to_string(),
            token_ids: run.token_ids.clone(),
            encoder_ms: run.encoder_ms,
            first_token_ms,
            total_ms,
            tokens_per_s: if further > 0.0 && decode_ms > 0.0 { further * 1000.0 / decode_ms } else { 0.0 },
        }
    }

    /// Captions one image, calling `on_token` as each token is produced.
    pub fn caption(&self, pixel_values: &Tensor, options: &CaptionOptions, mut on_token: impl FnMut(&TokenEvent)) -> Result<Caption> {
        let mut run = self.start(pixel_values, options)?;
        while let Some(event) = self.next_token(&mut run)? {
            on_token(&event);
        }
        Ok(self.finish(&run))
    }
}

/// Index of the largest logit; ties go to the lowest index, as `torch.argmax` does.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    let values = logits.to_vec1::<f32>()?;
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() {
            return Err(Error::Compute(format!("logit {i} is NaN")));
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32).ok_or_else(|| Error::Compute("empty logits".into()))
}

/// Milliseconds from an arbitrary origin: `std::time::Instant` panics on wasm32.
pub fn now_ms() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        use wasm_bindgen::JsCast;
        // `performance` exists in windows and workers alike; `window()` does not.
        js_sys::Reflect::get(&js_sys::global(), &"performance".into())
            .ok()
            .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
            .map(|p| p.now())
            .unwrap_or_else(js_sys::Date::now)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
        ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_secs_f64() * 1000.0
    }
}
