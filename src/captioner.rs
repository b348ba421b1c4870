//! The whole path in one place: files → model; image → pixel values → encoder states →
//! tokens, one at a time so callers (the CLI, WASM, the JS worker) can stream them.

use std::collections::HashMap;

use candle_core::{IndexOp, Tensor};

use crate::architecture::{self, Architecture, DecodeState, PromptInputs};
use crate::beam::{log_softmax, BeamSearch, EarlyStopping, Hypothesis};
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::loading::{self, GenerationDefaults, ModelFiles};
use crate::preprocess::{self, Grid, ImageBatch, Pixels, PreprocessorConfig};
use crate::sampling::{self, Rng, SamplingOptions};
use crate::tokenizer::{CaptionTokenizer, TextStream};

pub struct Captioner {
    /// A family of `crate::architecture::FAMILIES`, chosen by `config.json`'s `model_type`.
    model: Box<dyn Architecture>,
    tokenizer: CaptionTokenizer,
    /// The folder's chat template, for families whose processor renders one.
    chat_template: Option<ChatTemplate>,
    preprocessor: PreprocessorConfig,
    generation: GenerationDefaults,
    /// The encoder side on a GPU, once [`Captioner::use_gpu`] put it there.
    #[cfg(feature = "webgpu")]
    gpu: Option<(std::sync::Arc<crate::gpu::Gpu>, crate::gpu::GpuEncoder)>,
    /// The decoder on that GPU, where the family has one and its steps can be waited for.
    #[cfg(feature = "webgpu")]
    gpu_decoder: Option<Box<dyn crate::architecture::GpuDecoder>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptionOptions {
    /// Defaults to `generation_config.json`; without one, transformers' own default for the
    /// cross-attention model (`max_length` 20, start token included: 19) and 20 for the prefix
    /// model (transformers would count the image positions into `max_length`).
    pub max_new_tokens: Option<usize>,
    /// Text after the image (prefix models only): the input is the ids `LlavaProcessor` makes
    /// of `"<image>" + prompt`, the image token repeated once per patch.
    pub prompt: Option<String>,
    /// The conversation, in transformers' chat format, in place of one turn of image + `prompt`
    /// (models whose processor renders a chat template; it holds one image).
    pub messages: Option<serde_json::Value>,
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

impl BeamOptions {
    /// Whether these settings ask for a beam search rather than one greedy or sampled caption:
    /// more than one beam, as `generate()` decides (crate::generation).
    pub fn searches(&self) -> bool {
        self.num_beams > 1
    }

    /// At least one beam, and between 1 and `num_beams` sequences returned, as `generate()` asks.
    pub fn validate(&self) -> Result<()> {
        if self.num_beams == 0 {
            return Err(Error::Generation("num_beams must be at least 1".into()));
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            let hint = if self.num_beams == 1 { ": greedy decoding and sampling give one sequence; ask for as many beams" } else { "" };
            return Err(Error::Generation(format!(
                "num_return_sequences ({}) must be between 1 and num_beams ({}){hint}",
                self.num_return_sequences, self.num_beams
            )));
        }
        Ok(())
    }
}

/// The decoder weight formats [`Captioner::quantize_decoder`] takes, by the names the CLI,
/// the WASM API, the JS package and the bench use.
pub fn decoder_format(name: &str) -> Option<candle_core::quantized::GgmlDType> {
    match name {
        "q8_0" => Some(candle_core::quantized::GgmlDType::Q8_0),
        "q4_0" => Some(candle_core::quantized::GgmlDType::Q4_0),
        _ => None,
    }
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

/// One caption's progress within a run.
struct RowRun {
    /// What transformers calls `input_ids`: start token or prompt, then the generated ids.
    seen: Vec<u32>,
    rng: Rng,
    token_ids: Vec<u32>,
    done: bool,
    stream: TextStream,
    first_token_ms: Option<f64>,
}

/// Captions in progress: one per image of the batch given to [`Captioner::start`] (or
/// [`Captioner::start_many`]), decoded together; finished ones leave the batch.
pub struct CaptionRun {
    state: Box<dyn DecodeState>,
    /// `state` lives on the GPU (the captioner's GPU decoder made it).
    on_gpu: bool,
    /// The caption of each row of `state`: the running ones, in state order.
    active: Vec<usize>,
    rows: Vec<RowRun>,
    sampling: SamplingOptions,
    eos: Vec<u32>,
    max_new_tokens: usize,
    started_ms: f64,
    encoder_ms: f64,
}

impl CaptionRun {
    pub fn is_done(&self) -> bool {
        self.rows.iter().all(|r| r.done)
    }

    /// The (first) caption's tokens so far.
    pub fn token_ids(&self) -> &[u32] {
        self.rows.first().map(|r| r.token_ids.as_slice()).unwrap_or_default()
    }

    pub fn text(&self) -> &str {
        self.rows.first().map(|r| r.stream.text()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Images part-way through the encoder: see [`Captioner::start_encoding`].
pub struct EncodeRun {
    pixels: Pixels,
    prompt_ids: Vec<u32>,
    options: CaptionOptions,
    max_new_tokens: usize,
    /// The encoder's output for the tiles before `next`, in steps.
    encoded: Vec<Tensor>,
    next: usize,
    started_ms: f64,
}

impl EncodeRun {
    /// The tiles of every image (one per image unless the processor splits them).
    pub fn tiles(&self) -> usize {
        self.pixels.dims().first().copied().unwrap_or(0)
    }

    /// Tiles encoded so far.
    pub fn encoded(&self) -> usize {
        self.next
    }

    pub fn is_encoded(&self) -> bool {
        self.next >= self.tiles()
    }

    /// The pixels of up to `tiles` more tiles (at least one while any are left).
    fn next_tiles(&self, tiles: usize) -> Result<Option<Tensor>> {
        let n = tiles.max(1).min(self.tiles() - self.next);
        Ok(if n == 0 { None } else { Some(self.pixels.values().narrow(0, self.next, n)?) })
    }

    /// The encoder's output for the tiles `next_tiles` gave.
    fn push_encoded(&mut self, pixels: &Tensor, states: Tensor) {
        self.next += pixels.dims().first().copied().unwrap_or(0);
        self.encoded.push(states);
    }
}

pub use crate::models::llava::prefix_prompt_text;

impl Captioner {
    pub fn from_files(files: ModelFiles<'_>) -> Result<Self> {
        Self::from_files_with(files, |rename| files.tensors(rename))
    }

    /// [`Captioner::from_files`] with the checkpoint's tensors from `tensors` (given the family's
    /// renaming): in WASM, the tensors made as the weights streamed in (`files.weights` unread).
    pub fn from_files_with(files: ModelFiles<'_>, tensors: impl FnOnce(fn(&str) -> String) -> Result<HashMap<String, Tensor>>) -> Result<Self> {
        let config = loading::parse_json(loading::CONFIG, files.config)?;
        let generation = files.generation.map(|bytes| loading::parse_json(loading::GENERATION, bytes)).transpose()?;
        let family = architecture::family_of(&config).map_err(|reason| Error::config(loading::CONFIG, reason))?;
        let build = (family.config)(&config).map_err(|reason| Error::config(loading::CONFIG, reason))?;
        let tensors = with_adapter(&files, tensors(family.rename)?, family.rename)?;
        let q8_0 = is_q8_0_checkpoint(&tensors);
        let model = loading::build_model(files.weights_name, tensors, build)?;
        let generation = GenerationDefaults::resolve(generation.as_ref(), &config, family.decoder_section)?;
        // The small files before the tokenizer, the slowest to parse: a bad one fails fast.
        let preprocessor = PreprocessorConfig::from_json(files.preprocessor)?;
        let chat_template = files.chat_template.map(|(file, bytes)| ChatTemplate::from_file(file, bytes)).transpose()?;
        let tokenizer = CaptionTokenizer::from_bytes(files.tokenizer)?;
        let mut captioner = Self {
            model,
            tokenizer,
            chat_template,
            preprocessor,
            generation,
            #[cfg(feature = "webgpu")]
            gpu: None,
            #[cfg(feature = "webgpu")]
            gpu_decoder: None,
        };
        // A model that cannot start decoding (no start token, an image token missing from the
        // vocabulary) is refused now rather than at its first caption.
        captioner.prompt_ids(None)?;
        if q8_0 {
            captioner.quantize_decoder(candle_core::quantized::GgmlDType::Q8_0)?;
            captioner.quantize_encoder()?;
        } else {
            architecture::pack_encoder_side(captioner.model.as_mut())?;
        }
        Ok(captioner)
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

    /// The model; `model().as_any()` downcasts to its own type.
    pub fn model(&self) -> &dyn Architecture {
        self.model.as_ref()
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

    /// Quantizes the decoder's projections and LM head to `dtype` (q8_0, q4_0) in place, where
    /// a row is a whole number of 32-weight blocks; the rest stays f32. Decoding then reads about
    /// a quarter (q8_0) or an eighth (q4_0) of the bytes per token (prefill dequantizes q8_0
    /// blocks for the f32 GEMM). The encoder side is `quantize_encoder`'s. Returns (quantized,
    /// kept) matrix counts.
    pub fn quantize_decoder(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<(usize, usize)> {
        Ok(self.model.quantize_decoder(dtype)?)
    }

    /// The encoder side's matrices (`Architecture::encoder_side_linears`) to 8 bits, multiplied
    /// in 8 bits (`models::int8`): a quarter of f32's bytes, and in WASM with relaxed SIMD ~2×
    /// faster. What `quantize` options do along with the decoder. Returns how many.
    pub fn quantize_encoder(&mut self) -> Result<usize> {
        Ok(architecture::int8_encoder_side(self.model.as_mut())?)
    }

    /// Options as `generation_config.json` sets them (sampling and logits processors; the
    /// length stays "from the files" too) — what transformers' `generate()` uses when it is
    /// given nothing. `CaptionOptions::default()` is plain greedy decoding instead.
    pub fn default_options(&self) -> CaptionOptions {
        CaptionOptions { sampling: self.generation.sampling.clone(), ..Default::default() }
    }

    /// Beam settings from `generation_config.json` (`num_beams` 1 when it has none).
    pub fn default_beam_options(&self) -> BeamOptions {
        self.generation.beams.clone()
    }

    /// What `options` ask for once the model's generation_config.json fills the rest in:
    /// validated caption options, and beam settings when it is a beam search (crate::generation).
    pub fn plan(&self, options: &crate::generation::GenerationOptions) -> Result<crate::generation::Plan> {
        options.plan(&self.generation)
    }

    /// Whether `generation_config.json` asks for beam search by default.
    pub fn beam_search_by_default(&self) -> bool {
        self.generation.beams.searches()
    }

    /// Encoded image bytes (PNG/JPEG) → pixel values [tiles, 3, H, W] (one tile unless the
    /// processor splits images) and the image's tile grid.
    pub fn pixel_values_from_bytes(&self, bytes: &[u8]) -> Result<Pixels> {
        self.preprocessor.preprocess(&preprocess::decode_image(bytes)?)
    }

    /// Raw RGBA pixels (what a canvas gives) → pixel values, as [`Captioner::pixel_values_from_bytes`].
    pub fn pixel_values_from_rgba(&self, rgba: &[u8], width: u32, height: u32) -> Result<Pixels> {
        self.preprocessor.preprocess(&preprocess::rgba_to_rgb(rgba, width, height)?)
    }

    fn check_pixels(&self, pixel_values: &Tensor) -> Result<()> {
        let expected = self.model.image_shape();
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
        self.encode_now(pixel_values)
    }

    /// The encoder's output, on the GPU when one is in use and can be waited for (natively; in
    /// the browser the synchronous calls keep the CPU's encoder and
    /// [`Captioner::encode_step_async`] takes the GPU's).
    fn encode_now(&self, pixel_values: &Tensor) -> Result<Tensor> {
        #[cfg(all(feature = "webgpu", not(target_arch = "wasm32")))]
        if let Some((gpu, encoder)) = &self.gpu {
            return gpu.read_tensor_now(&encoder(gpu, pixel_values)?);
        }
        Ok(self.model.encode(pixel_values)?)
    }

    /// From now on the encoder side runs on `gpu` (its weights uploaded now, once), and the
    /// decoder too where the family has a GPU decoder (its caches in GPU memory, each step's
    /// logits read back). Natively every call runs there; in a browser, whose GPU reads are
    /// awaited, [`Captioner::encode_step_async`] encodes there and the runs of
    /// [`Captioner::finish_encoding_awaited`] decode there.
    #[cfg(feature = "webgpu")]
    pub fn use_gpu(&mut self, gpu: std::sync::Arc<crate::gpu::Gpu>) -> Result<()> {
        let encoder = self.model.gpu_encoder(&gpu)?;
        self.gpu_decoder = self.model.gpu_decoder(&gpu)?;
        self.gpu = Some((gpu, encoder));
        Ok(())
    }

    /// Whether the decoder runs on the GPU ([`Captioner::use_gpu`]).
    #[cfg(feature = "webgpu")]
    pub fn decodes_on_gpu(&self) -> bool {
        self.gpu_decoder.is_some()
    }

    /// The GPU the encoder runs on, if any.
    #[cfg(feature = "webgpu")]
    pub fn gpu(&self) -> Option<&crate::gpu::Gpu> {
        self.gpu.as_ref().map(|(gpu, _)| gpu.as_ref())
    }

    /// The decoder's input before generation for an image of one tile: the start token, or
    /// (prefix models) the ids their processor makes of the image and `prompt`.
    pub fn prompt_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        self.prompt_ids_for(prompt, Grid::WHOLE)
    }

    /// [`Captioner::prompt_ids`] for an image cut into `grid`.
    pub fn prompt_ids_for(&self, prompt: Option<&str>, grid: Grid) -> Result<Vec<u32>> {
        self.input_ids_for(&CaptionOptions { prompt: prompt.map(str::to_string), ..Default::default() }, grid)
    }

    /// The text of a caption's new `token_ids` as transformers' processor decodes `generate()`'s
    /// output: BLIP's prompt first (`Architecture::text_prefix`), special tokens skipped. What
    /// beam search's hypotheses read as.
    pub fn caption_text(&self, options: &CaptionOptions, token_ids: &[u32]) -> Result<String> {
        let mut ids = self.model.text_prefix(&self.input_ids_for(options, Grid::WHOLE)?);
        ids.extend_from_slice(token_ids);
        self.tokenizer.decode(&ids, true)
    }

    /// The decoder's input for `options`' prompt or messages and an image cut into `grid`.
    pub fn input_ids_for(&self, options: &CaptionOptions, grid: Grid) -> Result<Vec<u32>> {
        self.model.input_ids(&PromptInputs {
            tokenizer: &self.tokenizer,
            chat_template: self.chat_template.as_ref(),
            generation: &self.generation,
            prompt: options.prompt.as_deref(),
            messages: options.messages.as_ref(),
            grid,
        })
    }

    /// The one grid of a batch's images; images cut differently have prompts of other lengths
    /// and decode in separate runs (`caption_many` and `beam_search_many` group them).
    fn one_grid(pixels: &Pixels) -> Result<Grid> {
        let grid = pixels.grids().first().copied().unwrap_or_default();
        if pixels.grids().iter().any(|&g| g != grid) {
            return Err(Error::Image(format!(
                "images cut into different tile grids ({:?}) cannot share one run: caption them one by one, or with caption_many",
                pixels.grids()
            )));
        }
        Ok(grid)
    }

    /// The images of `pixels` grouped by tile grid (indices into `pixels`, and their pixels):
    /// one group when every image is cut alike.
    fn by_grid(pixels: &Pixels) -> Result<Vec<(Vec<usize>, Pixels)>> {
        let mut groups: Vec<(Grid, Vec<usize>)> = Vec::new();
        for (i, &g) in pixels.grids().iter().enumerate() {
            match groups.iter_mut().find(|(grid, _)| *grid == g) {
                Some((_, members)) => members.push(i),
                None => groups.push((g, vec![i])),
            }
        }
        if groups.len() <= 1 {
            return Ok(vec![((0..pixels.len()).collect(), pixels.clone())]);
        }
        groups.into_iter().map(|(_, members)| Ok((members.clone(), pixels.select(&members)?))).collect()
    }

    /// Runs the encoder on one image and prepares decoding; then call [`Captioner::next_token`]
    /// until it returns `None`.
    pub fn start(&self, pixel_values: &(impl ImageBatch + ?Sized), options: &CaptionOptions) -> Result<CaptionRun> {
        let pixels = pixel_values.to_pixels();
        if pixels.len() != 1 {
            return Err(Error::Image(format!(
                "start takes one image (pixel values [1, 3, H, W]), got {} images {:?}; caption several with caption_many",
                pixels.len(),
                pixels.dims()
            )));
        }
        self.start_many(&pixels, options)
    }

    /// Runs the encoder on a batch of images cut alike (pixel values [N, 3, H, W], or the tiles
    /// of N images of one grid) at once and prepares decoding them together; then call
    /// [`Captioner::step`] until it returns no events.
    pub fn start_many(&self, pixel_values: &(impl ImageBatch + ?Sized), options: &CaptionOptions) -> Result<CaptionRun> {
        self.finish_encoding(self.start_encoding(pixel_values, options)?)
    }

    /// [`Captioner::start_many`], or (`awaited`) its run for the async steps, encoded with the
    /// GPU's reads awaited.
    async fn start_many_where(&self, pixel_values: &(impl ImageBatch + ?Sized), options: &CaptionOptions, awaited: bool) -> Result<CaptionRun> {
        if !awaited {
            return self.start_many(pixel_values, options);
        }
        let mut run = self.start_encoding(pixel_values, options)?;
        while !run.is_encoded() {
            self.encode_step_async(&mut run, usize::MAX).await?;
        }
        self.finish_encoding_awaited(run)
    }

    /// [`Captioner::start_many`] in steps: checks the options, the prompt and the pixels, and
    /// returns the run whose tiles [`Captioner::encode_step`] encodes a few at a time — so a
    /// caller (the JS worker) can report progress and stop between tiles of a long encode —
    /// and [`Captioner::finish_encoding`] turns into a caption run.
    pub fn start_encoding(&self, pixel_values: &(impl ImageBatch + ?Sized), options: &CaptionOptions) -> Result<EncodeRun> {
        let started_ms = now_ms();
        options.sampling.validate()?;
        let pixels = pixel_values.to_pixels();
        self.check_pixels(pixels.values())?;
        // Before the encoder runs: a prompt the model cannot take is refused here.
        let prompt_ids = self.input_ids_for(options, Self::one_grid(&pixels)?)?;
        let (prompt_len, positions) = (prompt_ids.len(), self.model.max_positions());
        let fallback = self.model.default_max_new_tokens();
        let max_new_tokens = options.max_new_tokens.unwrap_or_else(|| self.generation.max_new_tokens_after(prompt_len, fallback));
        if prompt_len + max_new_tokens > positions {
            return Err(Error::Generation(format!(
                "max_new_tokens {max_new_tokens} does not fit the decoder: {prompt_len} prompt positions + new tokens exceed its {positions} positions (n_positions / max_position_embeddings)"
            )));
        }
        Ok(EncodeRun { pixels, prompt_ids, options: options.clone(), max_new_tokens, encoded: Vec::new(), next: 0, started_ms })
    }

    /// Encodes up to `tiles` more tiles of `run` (at least one, while any are left), as one
    /// batch; returns how many are encoded so far.
    pub fn encode_step(&self, run: &mut EncodeRun, tiles: usize) -> Result<usize> {
        if let Some(pixels) = run.next_tiles(tiles)? {
            let states = self.encode_now(&pixels)?;
            run.push_encoded(&pixels, states);
        }
        Ok(run.next)
    }

    /// [`Captioner::encode_step`] that waits for the GPU without blocking (the browser's
    /// WebGPU reads complete from its event loop); without a GPU, the same as `encode_step`.
    pub async fn encode_step_async(&self, run: &mut EncodeRun, tiles: usize) -> Result<usize> {
        if let Some(pixels) = run.next_tiles(tiles)? {
            #[cfg(feature = "webgpu")]
            if let Some((gpu, encoder)) = &self.gpu {
                let states = gpu.read_tensor(&encoder(gpu, &pixels)?).await?;
                run.push_encoded(&pixels, states);
                return Ok(run.next);
            }
            let states = self.model.encode(&pixels)?;
            run.push_encoded(&pixels, states);
        }
        Ok(run.next)
    }

    /// The caption run of an encoding (the tiles left, if any, encoded now as one batch).
    /// Natively it decodes on the GPU where the decoder is there ([`Captioner::use_gpu`]); in a
    /// browser, whose GPU reads complete from its event loop, on the CPU, so that the
    /// synchronous steps can run it: [`Captioner::finish_encoding_awaited`] gives a run for the
    /// async steps there.
    pub fn finish_encoding(&self, run: EncodeRun) -> Result<CaptionRun> {
        self.finish_encoding_where(run, cfg!(not(target_arch = "wasm32")))
    }

    /// [`Captioner::finish_encoding`] for a caller that awaits the steps
    /// ([`Captioner::step_async`], [`Captioner::beam_search_run_async`]): on the GPU where the
    /// decoder is there, in a browser too.
    pub fn finish_encoding_awaited(&self, run: EncodeRun) -> Result<CaptionRun> {
        self.finish_encoding_where(run, true)
    }

    fn finish_encoding_where(&self, mut run: EncodeRun, gpu_allowed: bool) -> Result<CaptionRun> {
        if !run.is_encoded() {
            self.encode_step(&mut run, usize::MAX)?;
        }
        let conditioning = match run.encoded.len() {
            1 => run.encoded.remove(0),
            _ => Tensor::cat(&run.encoded, 0)?,
        };
        let EncodeRun { pixels, prompt_ids, options, max_new_tokens, started_ms, .. } = run;
        // The image encoder alone (with a prefix model's projector), as documented; GPT-2's
        // cross-attention keys/values are decoder work and count toward the first token.
        let encoder_ms = now_ms() - started_ms;
        let n = pixels.len();
        let (state, on_gpu) = self.start_state(conditioning, &prompt_ids, gpu_allowed)?;
        let stream = TextStream::with_prefix(&self.tokenizer, &self.model.text_prefix(&prompt_ids))?;
        let seen = prompt_ids;
        let rows = (0..n)
            .map(|_| RowRun {
                seen: seen.clone(),
                // Each image its own generator from the seed: a batch samples what one-by-one does.
                rng: Rng::new(options.sampling.seed.unwrap_or(0)),
                token_ids: Vec::with_capacity(max_new_tokens),
                done: max_new_tokens == 0,
                stream: stream.clone(),
                first_token_ms: None,
            })
            .collect();
        Ok(CaptionRun {
            state,
            on_gpu,
            active: if max_new_tokens == 0 { vec![] } else { (0..n).collect() },
            rows,
            sampling: options.sampling.clone(),
            eos: options.eos_token_ids.clone().or_else(|| self.model.eos_token_ids()).unwrap_or_else(|| self.generation.eos_token_ids.clone()),
            max_new_tokens,
            started_ms,
            encoder_ms,
        })
    }

    /// Logits [vocab] of the first generated position — what the fidelity tests compare.
    pub fn first_step_logits(&self, pixel_values: &(impl ImageBatch + ?Sized), options: &CaptionOptions) -> Result<Tensor> {
        let run = self.start(pixel_values, &CaptionOptions { max_new_tokens: Some(1), ..options.clone() })?;
        Ok(self.first_step_logits_of(run)?.i(0)?)
    }

    /// Logits [B, vocab] of a started run's first generated position (e.g. one encoded with
    /// [`Captioner::encode_step_async`]); the run is spent.
    pub fn first_step_logits_of(&self, run: CaptionRun) -> Result<Tensor> {
        ready(self.first_step_logits_of_async(run))
    }

    /// [`Captioner::first_step_logits_of`], awaiting the GPU's read.
    pub async fn first_step_logits_of_async(&self, mut run: CaptionRun) -> Result<Tensor> {
        self.state_logits(&mut run.state, run.on_gpu).await
    }

    /// Decoding state for every row of `conditioning`, where the decoder runs (the GPU if
    /// `gpu_allowed` and the decoder is there): the state and whether it is on the GPU.
    #[allow(unused_variables)]
    fn start_state(&self, conditioning: Tensor, prompt_ids: &[u32], gpu_allowed: bool) -> Result<(Box<dyn DecodeState>, bool)> {
        #[cfg(feature = "webgpu")]
        if let (Some(decoder), true) = (&self.gpu_decoder, gpu_allowed) {
            return Ok((decoder.start(conditioning, prompt_ids)?, true));
        }
        Ok((self.model.start(conditioning, prompt_ids)?, false))
    }

    /// Logits [B, vocab] of every row's next position (`on_gpu`: the state is the GPU
    /// decoder's, and the logits are read back from there).
    #[allow(unused_variables)]
    async fn state_logits(&self, state: &mut Box<dyn DecodeState>, on_gpu: bool) -> Result<Tensor> {
        #[cfg(feature = "webgpu")]
        if let (true, Some(decoder), Some((gpu, _))) = (on_gpu, &self.gpu_decoder, &self.gpu) {
            return gpu.read_tensor(&decoder.next_logits(state.as_mut())?).await;
        }
        Ok(crate::architecture::step_logits(self.model.as_ref(), state.as_mut())?)
    }

    /// Beam search as transformers' `generate(num_beams=…)`: the `num_return_sequences` best
    /// hypotheses (new tokens, EOS included when reached) with their scores.
    pub fn beam_search(&self, pixel_values: &(impl ImageBatch + ?Sized), options: &CaptionOptions, beams: &BeamOptions) -> Result<Vec<Hypothesis>> {
        self.beam_search_streaming(pixel_values, options, beams, |_| {})
    }

    /// [`Captioner::beam_search`], calling `on_provisional` after every step with the best
    /// running hypothesis so far — provisional: the final best may be another beam.
    pub fn beam_search_streaming(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        beams: &BeamOptions,
        mut on_provisional: impl FnMut(&[u32]),
    ) -> Result<Vec<Hypothesis>> {
        let pixels = pixel_values.to_pixels();
        if pixels.len() != 1 {
            return Err(Error::Image(format!("beam_search takes one image, got pixel values {:?}; use beam_search_many", pixels.dims())));
        }
        let mut all = self.beam_search_many(&pixels, options, beams, |_, best| on_provisional(best))?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Beam search over a batch of images (pixel values [N, 3, H, W]): one encoder pass, and
    /// every image's beams decoded as rows of one batch (images cut into different tile grids:
    /// one batch per grid). Per image, the same hypotheses as [`Captioner::beam_search`];
    /// `on_provisional(image, best)` after every step.
    pub fn beam_search_many(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        beams: &BeamOptions,
        on_provisional: impl FnMut(usize, &[u32]),
    ) -> Result<Vec<Vec<Hypothesis>>> {
        ready(self.beam_search_many_where(pixel_values, options, beams, on_provisional, false))
    }

    /// [`Captioner::beam_search_many`] awaiting the GPU: in a browser too, the images are
    /// encoded and their beams decoded there where the model is.
    pub async fn beam_search_many_async(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        beams: &BeamOptions,
        on_provisional: impl FnMut(usize, &[u32]),
    ) -> Result<Vec<Vec<Hypothesis>>> {
        self.beam_search_many_where(pixel_values, options, beams, on_provisional, true).await
    }

    pub(crate) async fn beam_search_many_where(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        beams: &BeamOptions,
        mut on_provisional: impl FnMut(usize, &[u32]),
        awaited: bool,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        beams.validate()?;
        let pixels = pixel_values.to_pixels();
        let mut out: Vec<Vec<Hypothesis>> = vec![Vec::new(); pixels.len()];
        for (members, group) in Self::by_grid(&pixels)? {
            let run = self.start_many_where(&group, options, awaited).await?;
            let found = self.beam_search_run_async(run, beams, |i, best| on_provisional(members[i], best)).await?;
            for (i, hypotheses) in members.into_iter().zip(found) {
                out[i] = hypotheses;
            }
        }
        Ok(out)
    }

    /// Beam search from a started run (its images encoded, e.g. step by step with
    /// [`Captioner::encode_step`]): per image, the hypotheses of [`Captioner::beam_search_many`].
    pub fn beam_search_run(&self, run: CaptionRun, beams: &BeamOptions, on_provisional: impl FnMut(usize, &[u32])) -> Result<Vec<Vec<Hypothesis>>> {
        ready(self.beam_search_run_async(run, beams, on_provisional))
    }

    /// [`Captioner::beam_search_run`], awaiting the GPU's reads (a run of
    /// [`Captioner::finish_encoding_awaited`] in a browser).
    pub async fn beam_search_run_async(
        &self,
        mut run: CaptionRun,
        beams: &BeamOptions,
        mut on_provisional: impl FnMut(usize, &[u32]),
    ) -> Result<Vec<Vec<Hypothesis>>> {
        beams.validate()?;
        let k = beams.num_beams;
        let mut searches = (0..run.rows.len())
            .map(|_| BeamSearch::new(k, beams.length_penalty, beams.early_stopping, run.max_new_tokens, run.eos.clone()))
            .collect::<Result<Vec<_>>>()?;
        let results = |searches: &[BeamSearch]| searches.iter().map(|s| s.results(beams.num_return_sequences)).collect();
        if searches.iter().all(BeamSearch::is_done) {
            return Ok(results(&searches));
        }
        let prompt = run.rows.first().map(|r| r.seen.clone()).unwrap_or_default();
        let (eos, sampling) = (run.eos.clone(), run.sampling.clone());
        // Beam sampling (do_sample): each image draws from its own generator, seeded alike.
        let mut rngs: Vec<Rng> = (0..searches.len()).map(|_| Rng::new(sampling.seed.unwrap_or(0))).collect();
        let processed = |logits: Tensor, generated: &[u32]| -> Result<Vec<f32>> {
            let mut lp = log_softmax(&logits.to_vec1::<f32>()?);
            let seen: Vec<u32> = prompt.iter().chain(generated).copied().collect();
            sampling::process(&mut lp, &seen, generated.len(), &eos, &sampling);
            Ok(lp)
        };
        // One forward per image; each image's beams start as copies of it.
        let on_gpu = run.on_gpu;
        let first = self.state_logits(&mut run.state, on_gpu).await?;
        let mut log_probs = (0..searches.len()).map(|i| Ok(vec![processed(first.i(i)?, &[])?; k])).collect::<Result<Vec<_>>>()?;
        let rows: Vec<usize> = (0..searches.len()).flat_map(|i| std::iter::repeat_n(i, k)).collect();
        let mut state = run.state.select(&rows)?;
        // Images whose beams are rows of `state`, k rows each, in order.
        let mut images: Vec<usize> = (0..searches.len()).collect();
        loop {
            let (mut keep, mut feed, mut still) = (Vec::new(), Vec::new(), Vec::new());
            for (slot, &image) in images.iter().enumerate() {
                let search = &mut searches[image];
                let parents =
                    if sampling.do_sample { search.step_sampled(&log_probs[slot], &mut rngs[image])? } else { search.step(&log_probs[slot])? };
                if let Some(best) = search.running().first() {
                    on_provisional(image, best);
                }
                if search.is_done() {
                    continue;
                }
                keep.extend(parents.iter().map(|&p| slot * k + p));
                feed.extend(search.running().iter().map(|t| t.last().copied().unwrap_or_default()));
                still.push(image);
            }
            if still.is_empty() {
                break;
            }
            state = state.select(&keep)?;
            state.feed(feed);
            let logits = self.state_logits(&mut state, on_gpu).await?;
            log_probs = still
                .iter()
                .enumerate()
                .map(|(slot, &image)| {
                    let running = searches[image].running();
                    (0..k).map(|j| processed(logits.i(slot * k + j)?, &running[j])).collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            images = still;
        }
        Ok(results(&searches))
    }

    /// One step of every running caption of `run`: (caption index, its new token) for each;
    /// empty once all are done. Captions that finish leave the batch.
    pub fn step(&self, run: &mut CaptionRun) -> Result<Vec<(usize, TokenEvent)>> {
        ready(self.step_async(run))
    }

    /// [`Captioner::step`], awaiting the GPU's read (a run of
    /// [`Captioner::finish_encoding_awaited`] in a browser).
    pub async fn step_async(&self, run: &mut CaptionRun) -> Result<Vec<(usize, TokenEvent)>> {
        if run.active.is_empty() {
            return Ok(vec![]);
        }
        let logits = self.state_logits(&mut run.state, run.on_gpu).await?;
        let mut events = Vec::with_capacity(run.active.len());
        let (mut keep, mut feed) = (Vec::new(), Vec::new());
        for (slot, &caption) in run.active.iter().enumerate() {
            let row = &mut run.rows[caption];
            let mut scores = logits.i(slot)?.to_vec1::<f32>()?;
            sampling::process(&mut scores, &row.seen, row.token_ids.len(), &run.eos, &run.sampling);
            let id = if run.sampling.do_sample { row.rng.sample(&scores)? } else { argmax_slice(&scores)? };
            row.seen.push(id);
            row.token_ids.push(id);
            if row.first_token_ms.is_none() {
                row.first_token_ms = Some(now_ms() - run.started_ms);
            }
            row.done = run.eos.contains(&id) || row.token_ids.len() >= run.max_new_tokens;
            let mut delta = row.stream.push(&self.tokenizer, id)?;
            if row.done {
                delta.push_str(&row.stream.finish(&self.tokenizer)?);
            } else {
                keep.push(slot);
                feed.push(id);
            }
            events.push((caption, TokenEvent { id, text: row.stream.text().to_string(), delta }));
        }
        if keep.len() < run.active.len() {
            run.active = keep.iter().map(|&slot| run.active[slot]).collect();
            if !keep.is_empty() {
                run.state = run.state.select(&keep)?;
            }
        }
        run.state.feed(feed);
        Ok(events)
    }

    /// Greedy (or sampled) step of a one-image run: the next token, or `None` once EOS was
    /// produced or the budget is spent.
    pub fn next_token(&self, run: &mut CaptionRun) -> Result<Option<TokenEvent>> {
        ready(self.next_token_async(run))
    }

    /// [`Captioner::next_token`], awaiting the GPU's read.
    pub async fn next_token_async(&self, run: &mut CaptionRun) -> Result<Option<TokenEvent>> {
        Ok(self.step_async(run).await?.into_iter().next().map(|(_, event)| event))
    }

    /// The finished caption of a one-image run (call once `next_token` returned `None`).
    pub fn finish(&self, run: &CaptionRun) -> Caption {
        self.finish_caption(run, 0)
    }

    /// Caption `i` of a run.
    fn finish_caption(&self, run: &CaptionRun, i: usize) -> Caption {
        let total_ms = now_ms() - run.started_ms;
        let Some(row) = run.rows.get(i) else {
            return Caption { text: String::new(), token_ids: vec![], encoder_ms: run.encoder_ms, first_token_ms: 0.0, total_ms, tokens_per_s: 0.0 };
        };
        let first_token_ms = row.first_token_ms.unwrap_or(run.encoder_ms);
        let further = row.token_ids.len().saturating_sub(1) as f64;
        let decode_ms = total_ms - first_token_ms;
        Caption {
            text: row.stream.text().to_string(),
            token_ids: row.token_ids.clone(),
            encoder_ms: run.encoder_ms,
            first_token_ms,
            total_ms,
            tokens_per_s: if further > 0.0 && decode_ms > 0.0 { further * 1000.0 / decode_ms } else { 0.0 },
        }
    }

    /// Captions one image, calling `on_token` as each token is produced.
    pub fn caption(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        mut on_token: impl FnMut(&TokenEvent),
    ) -> Result<Caption> {
        let mut run = self.start(pixel_values, options)?;
        while let Some(event) = self.next_token(&mut run)? {
            on_token(&event);
        }
        Ok(self.finish(&run))
    }

    /// Captions a batch of images (pixel values [N, 3, H, W]): one encoder pass, decoded
    /// together (images cut into different tile grids: one batch per grid); `on_token(image,
    /// event)` as tokens come. The same captions as one by one.
    pub fn caption_many(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        on_token: impl FnMut(usize, &TokenEvent),
    ) -> Result<Vec<Caption>> {
        ready(self.caption_many_where(pixel_values, options, on_token, false))
    }

    /// [`Captioner::caption_many`] awaiting the GPU: in a browser too, the images are encoded
    /// and decoded there where the model is ([`Captioner::use_gpu`]).
    pub async fn caption_many_async(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        on_token: impl FnMut(usize, &TokenEvent),
    ) -> Result<Vec<Caption>> {
        self.caption_many_where(pixel_values, options, on_token, true).await
    }

    pub(crate) async fn caption_many_where(
        &self,
        pixel_values: &(impl ImageBatch + ?Sized),
        options: &CaptionOptions,
        mut on_token: impl FnMut(usize, &TokenEvent),
        awaited: bool,
    ) -> Result<Vec<Caption>> {
        let pixels = pixel_values.to_pixels();
        let mut out: Vec<Option<Caption>> = vec![None; pixels.len()];
        for (members, group) in Self::by_grid(&pixels)? {
            let mut run = self.start_many_where(&group, options, awaited).await?;
            loop {
                let events = self.step_async(&mut run).await?;
                if events.is_empty() {
                    break;
                }
                for (i, event) in &events {
                    on_token(members[*i], event);
                }
            }
            // The batch's clock: total time is when the last caption finished.
            for (slot, &i) in members.iter().enumerate() {
                out[i] = Some(self.finish_caption(&run, slot));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// The model's tensors with the adapter (if any) merged in.
fn with_adapter(files: &ModelFiles<'_>, mut tensors: HashMap<String, Tensor>, rename: fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
    if let Some(adapter) = files.adapter {
        if let Some(name) = tensors.keys().find(|k| k.ends_with(crate::models::linear::Q8_0_SUFFIX)) {
            return Err(Error::Safetensors {
                file: files.weights_name.to_string(),
                reason: format!("`{name}` is q8_0: an adapter merges into f32 weights only: merge it into the f32 model, then quantize that"),
            });
        }
        crate::lora::merge(&mut tensors, adapter, rename)?;
    }
    Ok(tensors)
}

/// Whether a checkpoint holds q8_0 matrices (written by `crate::quantize`): then its decoder runs
/// in q8_0 throughout (the LM head — tied to the embedding, which the file keeps in f16 — is
/// quantized once loaded), and its encoder side in 8 bits (`Captioner::quantize_encoder`).
fn is_q8_0_checkpoint(tensors: &HashMap<String, Tensor>) -> bool {
    tensors.keys().any(|k| k.ends_with(crate::models::linear::Q8_0_SUFFIX))
}

/// Index of the largest logit; ties go to the lowest index, as `torch.argmax` does.
/// The value of a future that needs no waiting: every CPU step, and natively the GPU's (a read
/// completes within its poll of the device). A browser completes GPU reads from its event loop,
/// which a synchronous call cannot wait for: that is an error, saying which calls await.
pub(crate) fn ready<T, E: From<Error>>(future: impl std::future::Future<Output = std::result::Result<T, E>>) -> std::result::Result<T, E> {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => Err(E::from(Error::Gpu(
            "this caption decodes on the GPU, whose reads the browser completes from its event loop: step it with the async calls (nextTokenAsync, beamSearchEncodedAsync)".into(),
        ))),
    }
}

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
