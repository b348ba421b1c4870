//! The whole path in one place: files → model; image → pixel values → encoder states →
//! tokens, one at a time so callers (the CLI, WASM, the JS worker) can stream them.

use candle_core::{Device, IndexOp, Tensor};

use crate::beam::{log_softmax, BeamSearch, EarlyStopping, Hypothesis};
use crate::error::{Error, Result};
use crate::loading::{self, GenerationDefaults, ModelFiles};
use crate::models::gpt2::Gpt2Cache;
use crate::models::llama::LlamaCache;
use crate::models::llava::{Llava, LlavaConfig};
use crate::models::vision_encoder_decoder::{VisionEncoderDecoder, VisionEncoderDecoderConfig};
use crate::preprocess::{self, PreprocessorConfig};
use crate::sampling::{self, Rng, SamplingOptions};
use crate::tokenizer::{CaptionTokenizer, TextStream};

/// The architectures `config.json` can name.
#[derive(Debug, Clone)]
pub enum Model {
    /// 🤗 `VisionEncoderDecoderModel`: SigLIP → GPT-2 with cross-attention.
    CrossAttention(VisionEncoderDecoder),
    /// 🤗 `LlavaForConditionalGeneration`: SigLIP → projector → image prefix → Llama.
    Prefix(Llava),
}

pub struct Captioner {
    model: Model,
    tokenizer: CaptionTokenizer,
    preprocessor: PreprocessorConfig,
    generation: GenerationDefaults,
}

#[derive(Debug, Clone, Default)]
pub struct CaptionOptions {
    /// Defaults to `generation_config.json`; without one, transformers' own default for the
    /// cross-attention model (`max_length` 20, start token included: 19) and 20 for the prefix
    /// model (transformers would count the image positions into `max_length`).
    pub max_new_tokens: Option<usize>,
    /// Text after the image (prefix models only): the input is the ids `LlavaProcessor` makes
    /// of `"<image>" + prompt`, the image token repeated once per patch.
    pub prompt: Option<String>,
    /// Sampling and logits processors (repetition penalty, n-gram blocking, …); the default
    /// is plain greedy decoding.
    pub sampling: SamplingOptions,
    /// Overrides the EOS ids of `generation_config.json` (transformers' `eos_token_id`).
    pub eos_token_ids: Option<Vec<u32>>,
}

/// Beam search settings, named as transformers' `generate` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamOptions {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: usize,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self { num_beams: 4, length_penalty: 1.0, early_stopping: EarlyStopping::Heuristic, num_return_sequences: 1 }
    }
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

/// Per-architecture decoding state.
enum DecoderState {
    /// The next decoder input (the start token first) and the cache.
    CrossAttention { cache: Gpt2Cache, next_input: u32 },
    /// The prompt is prefilled lazily by the first step; afterwards the last token is fed.
    Prefix { cache: LlamaCache, prompt: Option<(Vec<u32>, Tensor)>, last: u32 },
}

impl DecoderState {
    /// An independent copy: beams that share a history diverge from here.
    fn fork(&self) -> Result<Self> {
        Ok(match self {
            DecoderState::CrossAttention { cache, next_input } => DecoderState::CrossAttention { cache: cache.deep_copy()?, next_input: *next_input },
            DecoderState::Prefix { cache, prompt, last } => DecoderState::Prefix { cache: cache.deep_copy()?, prompt: prompt.clone(), last: *last },
        })
    }
}

/// A caption in progress: the decoder state for one image and what has been generated.
pub struct CaptionRun {
    state: DecoderState,
    /// What transformers calls `input_ids`: start token or prompt, then the generated ids.
    seen: Vec<u32>,
    sampling: SamplingOptions,
    rng: Rng,
    eos: Vec<u32>,
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

/// The text whose tokens are a prefix model's input (`LlavaProcessor`'s expansion of
/// `"<image>" + prompt`): the image token once per patch, then the prompt. The trainer lays out
/// its sequences with the same function.
pub fn prefix_prompt_text(image_token: &str, num_image_tokens: usize, prompt: Option<&str>) -> String {
    format!("{}{}", image_token.repeat(num_image_tokens), prompt.unwrap_or_default())
}

impl Captioner {
    pub fn from_files(files: ModelFiles<'_>) -> Result<Self> {
        let config = loading::parse_json(loading::CONFIG, files.config)?;
        let generation = files.generation.map(|bytes| loading::parse_json(loading::GENERATION, bytes)).transpose()?;
        let model_type = config.get("model_type").and_then(|t| t.as_str()).unwrap_or_default();
        let (model, decoder_section) = match model_type {
            "vision-encoder-decoder" => {
                let cfg = VisionEncoderDecoderConfig::from_json(&config).map_err(|reason| Error::config(loading::CONFIG, reason))?;
                let tensors = load_weights(&files, loading::vision_encoder_decoder_key)?;
                let model = loading::build_model(loading::WEIGHTS, tensors, |vb| VisionEncoderDecoder::new(&cfg, vb))?;
                (Model::CrossAttention(model), "decoder")
            }
            "llava" => {
                let cfg = LlavaConfig::from_json(&config).map_err(|reason| Error::config(loading::CONFIG, reason))?;
                let tensors = load_weights(&files, loading::llava_key)?;
                let model = loading::build_model(loading::WEIGHTS, tensors, |vb| Llava::new(&cfg, vb))?;
                (Model::Prefix(model), "text_config")
            }
            other => {
                return Err(Error::config(
                    loading::CONFIG,
                    format!("model_type {other:?} is not supported (expected \"vision-encoder-decoder\" or \"llava\")"),
                ))
            }
        };
        let generation = GenerationDefaults::resolve(generation.as_ref(), &config, decoder_section)?;
        if matches!(model, Model::CrossAttention(_)) && generation.decoder_start_token_id.is_none() {
            return Err(Error::config(loading::CONFIG, "no decoder_start_token_id or bos_token_id to start decoding from"));
        }
        let tokenizer = CaptionTokenizer::from_bytes(files.tokenizer)?;
        let preprocessor = PreprocessorConfig::from_json(files.preprocessor)?;
        Ok(Self { model, tokenizer, preprocessor, generation })
    }

    /// A model folder, and optionally a PEFT adapter folder merged into it.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: impl AsRef<std::path::Path>, adapter_dir: Option<&std::path::Path>) -> Result<Self> {
        let mut files = loading::OwnedModelFiles::read_dir(dir.as_ref())?;
        if let Some(adapter) = adapter_dir {
            files = files.with_adapter_dir(adapter)?;
        }
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

    fn check_pixels(&self, pixel_values: &Tensor) -> Result<()> {
        let cfg = match &self.model {
            Model::CrossAttention(m) => m.encoder().config(),
            Model::Prefix(m) => m.vision_tower().config(),
        };
        let expected = [cfg.num_channels, cfg.image_size, cfg.image_size];
        match pixel_values.dims() {
            [_, rest @ ..] if rest == expected => Ok(()),
            found => Err(Error::Image(format!(
                "pixel values have shape {found:?}, the encoder expects [batch, {}, {}, {}] (check preprocessor_config.json size against config.json image_size)",
                expected[0], expected[1], expected[2]
            ))),
        }
    }

    /// What the decoder is conditioned on, for pixel values [B, 3, H, W]: the encoder's last
    /// hidden state (cross-attention) or the projected image embeddings (prefix).
    pub fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixel_values)?;
        Ok(match &self.model {
            Model::CrossAttention(m) => m.encode(pixel_values)?,
            Model::Prefix(m) => m.image_features(pixel_values)?,
        })
    }

    /// The prefix model's input ids for `"<image>" + prompt`, as `LlavaProcessor` makes them.
    pub fn prompt_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        match &self.model {
            Model::Prefix(m) => {
                let image_token = m.config().image_token_index;
                let image = self
                    .tokenizer
                    .id_to_token(image_token)
                    .ok_or_else(|| Error::Tokenizer(format!("the image token id {image_token} from config.json is not in the vocabulary")))?;
                self.tokenizer.encode(&prefix_prompt_text(&image, m.config().num_image_tokens(), prompt), true)
            }
            Model::CrossAttention(_) => match prompt {
                Some(_) => Err(Error::Generation("a text prompt needs a prefix (llava) model".into())),
                None => Ok(vec![]),
            },
        }
    }

    /// Runs the encoder and prepares decoding; then call [`Captioner::next_token`] until it
    /// returns `None`.
    pub fn start(&self, pixel_values: &Tensor, options: &CaptionOptions) -> Result<CaptionRun> {
        let started_ms = now_ms();
        options.sampling.validate()?;
        // Before the encoder runs: a prompt the model cannot take is refused here.
        let prompt_ids = self.prompt_ids(options.prompt.as_deref())?;
        let conditioning = self.encode(pixel_values)?;
        let (state, seen, positions, fallback) = match &self.model {
            Model::CrossAttention(m) => {
                let cache = m.start_decoding(&conditioning)?;
                let start = self.generation.decoder_start_token_id.unwrap_or_default();
                (DecoderState::CrossAttention { cache, next_input: start }, vec![start], m.decoder().config().n_positions, 19)
            }
            Model::Prefix(m) => {
                let cache = m.language_model().new_cache();
                let positions = m.language_model().config().max_position_embeddings;
                (DecoderState::Prefix { cache, prompt: Some((prompt_ids.clone(), conditioning)), last: 0 }, prompt_ids, positions, 20)
            }
        };
        let prompt_len = seen.len();
        let max_new_tokens = options.max_new_tokens.unwrap_or_else(|| self.generation.max_new_tokens_after(prompt_len, fallback));
        if prompt_len + max_new_tokens > positions {
            return Err(Error::Generation(format!(
                "max_new_tokens {max_new_tokens} does not fit the decoder: {prompt_len} prompt positions + new tokens exceed its {positions} positions (n_positions / max_position_embeddings)"
            )));
        }
        Ok(CaptionRun {
            state,
            seen,
            rng: Rng::new(options.sampling.seed.unwrap_or(0)),
            sampling: options.sampling.clone(),
            eos: options.eos_token_ids.clone().unwrap_or_else(|| self.generation.eos_token_ids.clone()),
            token_ids: Vec::with_capacity(max_new_tokens),
            max_new_tokens,
            done: max_new_tokens == 0,
            stream: TextStream::new(),
            started_ms,
            encoder_ms: now_ms() - started_ms,
            first_token_ms: None,
        })
    }

    /// Logits [vocab] of the first generated position — what the fidelity tests compare.
    pub fn first_step_logits(&self, pixel_values: &Tensor, options: &CaptionOptions) -> Result<Tensor> {
        let mut run = self.start(pixel_values, &CaptionOptions { max_new_tokens: Some(1), ..options.clone() })?;
        self.state_logits(&mut run.state)
    }

    fn state_logits(&self, state: &mut DecoderState) -> Result<Tensor> {
        let logits = match (&self.model, state) {
            (Model::CrossAttention(m), DecoderState::CrossAttention { cache, next_input }) => {
                m.decode_step(&Tensor::new(&[[*next_input]], &Device::Cpu)?, cache)?
            }
            (Model::Prefix(m), DecoderState::Prefix { cache, prompt, last }) => match prompt.take() {
                Some((ids, features)) => m.prefill(&ids, &features, cache)?,
                None => m.decode_step(*last, cache)?,
            },
            _ => return Err(Error::Generation("decoding state does not belong to this model".into())),
        };
        Ok(logits.i(0)?)
    }

    /// Beam search as transformers' `generate(num_beams=…)`: the `num_return_sequences` best
    /// hypotheses (new tokens, EOS included when reached) with their scores.
    pub fn beam_search(&self, pixel_values: &Tensor, options: &CaptionOptions, beams: &BeamOptions) -> Result<Vec<Hypothesis>> {
        self.beam_search_streaming(pixel_values, options, beams, |_| {})
    }

    /// [`Captioner::beam_search`], calling `on_provisional` after every step with the best
    /// running hypothesis so far — provisional: the final best may be another beam.
    pub fn beam_search_streaming(
        &self,
        pixel_values: &Tensor,
        options: &CaptionOptions,
        beams: &BeamOptions,
        mut on_provisional: impl FnMut(&[u32]),
    ) -> Result<Vec<Hypothesis>> {
        if beams.num_return_sequences == 0 || beams.num_return_sequences > beams.num_beams {
            return Err(Error::Generation(format!(
                "num_return_sequences ({}) must be between 1 and num_beams ({})",
                beams.num_return_sequences, beams.num_beams
            )));
        }
        let mut run = self.start(pixel_values, options)?;
        let mut search = BeamSearch::new(beams.num_beams, beams.length_penalty, beams.early_stopping, run.max_new_tokens, run.eos.clone())?;
        if search.is_done() {
            return Ok(search.results(beams.num_return_sequences));
        }
        // Every beam starts as the same prompt: one forward, then copies.
        if run.sampling.do_sample {
            return Err(Error::Generation("beam sampling (num_beams > 1 with do_sample) is not supported".into()));
        }
        let eos = run.eos.clone();
        let processed = |logits: Tensor, generated: &[u32]| -> Result<Vec<f32>> {
            let mut lp = log_softmax(&logits.to_vec1::<f32>()?);
            let seen: Vec<u32> = run.seen.iter().chain(generated).copied().collect();
            sampling::process(&mut lp, &seen, generated.len(), &eos, &run.sampling);
            Ok(lp)
        };
        let first = processed(self.state_logits(&mut run.state)?, &[])?;
        let mut states = (0..beams.num_beams).map(|_| run.state.fork()).collect::<Result<Vec<_>>>()?;
        let mut log_probs = vec![first; beams.num_beams];
        loop {
            let parents = search.step(&log_probs)?;
            if let Some(best) = search.running().first() {
                on_provisional(best);
            }
            if search.is_done() {
                break;
            }
            let mut next_states = parents.iter().map(|&p| states[p].fork()).collect::<Result<Vec<_>>>()?;
            for (state, tokens) in next_states.iter_mut().zip(search.running()) {
                let last = tokens.last().copied().unwrap_or_default();
                match state {
                    DecoderState::CrossAttention { next_input, .. } => *next_input = last,
                    DecoderState::Prefix { last: l, .. } => *l = last,
                }
            }
            log_probs = next_states
                .iter_mut()
                .zip(search.running())
                .map(|(state, generated)| processed(self.state_logits(state)?, generated))
                .collect::<Result<Vec<_>>>()?;
            states = next_states;
        }
        Ok(search.results(beams.num_return_sequences))
    }

    /// Greedy step: the next token, or `None` once EOS was produced or the budget is spent.
    pub fn next_token(&self, run: &mut CaptionRun) -> Result<Option<TokenEvent>> {
        if run.done {
            return Ok(None);
        }
        let mut scores = self.state_logits(&mut run.state)?.to_vec1::<f32>()?;
        sampling::process(&mut scores, &run.seen, run.token_ids.len(), &run.eos, &run.sampling);
        let id = if run.sampling.do_sample { run.rng.sample(&scores)? } else { argmax_slice(&scores)? };
        run.seen.push(id);
        match &mut run.state {
            DecoderState::CrossAttention { next_input, .. } => *next_input = id,
            DecoderState::Prefix { last, .. } => *last = id,
        }
        run.token_ids.push(id);
        if run.first_token_ms.is_none() {
            run.first_token_ms = Some(now_ms() - run.started_ms);
        }
        run.done = run.eos.contains(&id) || run.token_ids.len() >= run.max_new_tokens;
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

/// The model's tensors with the adapter (if any) merged in.
fn load_weights(files: &ModelFiles<'_>, rename: fn(&str) -> String) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut tensors = loading::load_safetensors(loading::WEIGHTS, files.weights, rename)?;
    if let Some(adapter) = files.adapter {
        crate::lora::merge(&mut tensors, adapter, rename)?;
    }
    Ok(tensors)
}

/// Index of the largest logit; ties go to the lowest index, as `torch.argmax` does.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    argmax_slice(&logits.to_vec1::<f32>()?)
}

fn argmax_slice(values: &[f32]) -> Result<u32> {
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
