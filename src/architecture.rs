//! The seam between the captioner and a model family: what a family implements
//! ([`Architecture`], [`DecodeState`]) and the registry that picks one by `config.json`'s
//! `model_type` ([`FAMILIES`]). The captioner, the WASM API, the CLI and the bench drive these
//! traits and nothing else, so a new family is a file under `src/models/` and one line here.

use std::any::Any;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::loading::GenerationDefaults;
use crate::tokenizer::CaptionTokenizer;

/// The families `config.json` can name, by `model_type`.
pub const FAMILIES: &[&Family] = &[&crate::models::vision_encoder_decoder::FAMILY, &crate::models::llava::FAMILY];

/// One family of the registry.
pub struct Family {
    pub model_type: &'static str,
    /// The `config.json` section whose token ids back up `generation_config.json`'s (transformers'
    /// decoder / text config).
    pub decoder_section: &'static str,
    /// Checkpoint tensor names (every layout transformers has written) → the names the model is
    /// built with; PEFT adapters are renamed the same way.
    pub rename: fn(&str) -> String,
    /// Reads `config.json` (a refusal says why, and is reported as a config error) and gives the
    /// function that builds the model from its weights.
    pub config: fn(&serde_json::Value) -> std::result::Result<Builder, String>,
}

/// Builds a model from its weights (`VarBuilder` errors name the tensor and shapes).
pub type Builder = Box<dyn FnOnce(VarBuilder) -> candle_core::Result<Box<dyn Architecture>>>;

/// The family of a `config.json`, or an error listing the supported `model_type`s.
pub fn family_of(config: &serde_json::Value) -> std::result::Result<&'static Family, String> {
    let model_type = config.get("model_type").and_then(|t| t.as_str());
    FAMILIES
        .iter()
        .copied()
        .find(|f| Some(f.model_type) == model_type)
        .ok_or_else(|| unsupported("model_type", model_type, FAMILIES.iter().map(|f| f.model_type)))
}

/// "`key` "found" is not supported; supported: "a", "b"" — what a registry says of a type it lacks.
pub fn unsupported<'a>(key: &str, found: Option<&str>, known: impl Iterator<Item = &'a str>) -> String {
    let found = found.map_or_else(|| "(none)".to_string(), |t| format!("{t:?}"));
    let known: Vec<_> = known.map(|k| format!("{k:?}")).collect();
    format!("{key} {found} is not supported; supported: {}", known.join(", "))
}

/// The entries `rows` of `values`, in that order (a [`DecodeState::select`] of per-row ids).
pub fn pick_rows(values: &[u32], rows: &[usize]) -> Vec<u32> {
    rows.iter().map(|&r| values.get(r).copied().unwrap_or_default()).collect()
}

/// A captioning model: an image encoder and a decoder that generates from what it encodes.
pub trait Architecture: Send + Sync {
    /// The pixel values the encoder takes: [channels, height, width].
    fn image_shape(&self) -> [usize; 3];

    /// What the decoder is conditioned on, for pixel values [B, C, H, W] (encoder states, image
    /// embeddings, …).
    fn encode(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor>;

    /// What transformers calls the decoder's `input_ids` before generation: the start token of an
    /// encoder–decoder, the expanded image tokens and prompt of a prefix model. A prompt the
    /// family cannot take is an error.
    fn input_ids(&self, tokenizer: &CaptionTokenizer, prompt: Option<&str>, generation: &GenerationDefaults) -> Result<Vec<u32>>;

    /// Decoding state for every image of `conditioning` (from [`Architecture::encode`]), each
    /// starting from `input_ids`.
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> candle_core::Result<Box<dyn DecodeState>>;

    /// Logits [rows, vocab] of every row's next position; advances the state by what it was fed.
    fn next_logits(&self, state: &mut dyn DecodeState) -> candle_core::Result<Tensor>;

    /// Positions the decoder has (`n_positions`, `max_position_embeddings`).
    fn max_positions(&self) -> usize;

    /// New tokens when neither the caller nor the files set a length.
    fn default_max_new_tokens(&self) -> usize;

    /// Quantizes the decoder's matrices (q8_0, q4_0); returns (quantized, kept) counts.
    fn quantize_decoder(&mut self, dtype: GgmlDType) -> candle_core::Result<(usize, usize)>;

    /// Packs the matrices that multiply many rows at once (the encoder side) for the platform's
    /// GEMM (WASM; nothing natively). Returns how many.
    fn pack_encoder(&mut self) -> candle_core::Result<usize>;

    /// Expands q8_0 encoder-side matrices of a quantized checkpoint to f32. Returns how many.
    fn dequantize_encoder(&mut self) -> candle_core::Result<usize>;

    /// The input layout of [`Architecture::input_ids`] with `text_positions` stand-in ids for the
    /// text (no tokenizer): what the bench feeds a model with random weights.
    fn synthetic_input_ids(&self, generation: &GenerationDefaults, text_positions: usize) -> Vec<u32>;

    /// Whether a decode step reads the tensor `name` (as built) whole: the decoder's matrices and
    /// LM head, not what is read once per image or one row at a time. For the bench's read floor.
    fn decode_step_reads(&self, name: &str) -> bool;

    /// The concrete model, for callers that need its own API (tests, tools).
    fn as_any(&self) -> &dyn Any;
}

/// Rows that decode together (the images of a batch, the beams of a search).
pub trait DecodeState: Any + Send {
    /// The state of rows `rows` (in that order, repeats allowed), sharing no cache storage.
    fn select(&self, rows: &[usize]) -> candle_core::Result<Box<dyn DecodeState>>;
    /// The token each row feeds next.
    fn feed(&mut self, tokens: Vec<u32>);
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The state an [`Architecture`] made, as its own type.
pub fn state_of<T: DecodeState>(state: &mut dyn DecodeState) -> candle_core::Result<&mut T> {
    state.as_any_mut().downcast_mut::<T>().ok_or_else(|| candle_core::Error::Msg("decoding state does not belong to this model".into()))
}
