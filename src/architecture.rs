//! The seam between the captioner and a model family: what a family implements
//! ([`Architecture`], [`DecodeState`]) and the registry that picks one by `config.json`'s
//! `model_type` ([`FAMILIES`]); what the trainer needs of a family besides the model itself
//! ([`Training`]). The captioner, the WASM API, the CLI, the bench and the trainer drive these
//! traits and nothing else, so a new family is a file under `src/models/` and one line here.

use std::any::Any;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::error::Result;
use crate::loading::GenerationDefaults;
use crate::models::linear::Linear;
use crate::tokenizer::CaptionTokenizer;

/// The families `config.json` can name, by `model_type`.
pub const FAMILIES: &[&Family] = &[
    &crate::models::vision_encoder_decoder::FAMILY,
    &crate::models::llava::FAMILY,
    &crate::models::idefics3::FAMILY,
    &crate::models::idefics3::SMOLVLM,
    &crate::models::blip::FAMILY,
];

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
    /// How the trainer composes, lays out and saves this family (`None`: not trained here yet).
    pub training: Option<&'static dyn Training>,
}

impl Family {
    /// The trainer's recipe, or an error saying this family has none.
    pub fn recipe(&self) -> Result<&'static dyn Training> {
        self.training.ok_or_else(|| {
            let known: Vec<_> = FAMILIES.iter().filter(|f| f.training.is_some()).map(|f| format!("{:?}", f.model_type)).collect();
            crate::Error::config(
                crate::loading::CONFIG,
                format!("the trainer does not train model_type {:?} yet (it trains {})", self.model_type, known.join(", ")),
            )
        })
    }
}

/// What a family's processor turns into the decoder's first input: the user's prompt (if any)
/// for an image cut into `grid`, with the folder's tokenizer, chat template and generation config.
pub struct PromptInputs<'a> {
    pub tokenizer: &'a CaptionTokenizer,
    pub chat_template: Option<&'a crate::chat::ChatTemplate>,
    pub generation: &'a GenerationDefaults,
    pub prompt: Option<&'a str>,
    /// A conversation in transformers' chat format in place of `prompt` (chat-template families).
    pub messages: Option<&'a Value>,
    pub grid: crate::preprocess::Grid,
}

impl PromptInputs<'_> {
    /// The error of a family that takes no conversation.
    pub fn refuse_messages(&self, family: &str) -> Result<()> {
        match self.messages {
            Some(_) => Err(crate::Error::Generation(format!(
                "messages need a model whose processor has a chat template (idefics3, smolvlm); {family} takes a prompt"
            ))),
            None => Ok(()),
        }
    }
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

/// The family the trainer composes for `--arch NAME` from an encoder and a decoder folder, or an
/// error listing the names it knows.
pub fn family_for_arch(name: &str) -> std::result::Result<&'static Family, String> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.training.is_some_and(|t| t.arch() == name))
        .ok_or_else(|| unsupported("--arch", Some(name), FAMILIES.iter().filter_map(|f| f.training.map(|t| t.arch()))))
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
    fn input_ids(&self, inputs: &PromptInputs<'_>) -> Result<Vec<u32>>;

    /// Decoding state for every image of `conditioning` (from [`Architecture::encode`]; a tiling
    /// family's tiles, each image's in a row), each starting from `input_ids`.
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> candle_core::Result<Box<dyn DecodeState>>;

    /// Logits [rows, vocab] of every row's next position; advances the state by what it was fed.
    fn next_logits(&self, state: &mut dyn DecodeState) -> candle_core::Result<Tensor>;

    /// The encoder side (what [`Architecture::encode`] runs) uploaded to `gpu`.
    #[cfg(feature = "webgpu")]
    fn gpu_encoder(&self, gpu: &crate::gpu::Gpu) -> Result<crate::gpu::GpuEncoder>;

    /// The decoder uploaded to `gpu`, its steps run there; `None`: this family decodes on the
    /// CPU.
    #[cfg(feature = "webgpu")]
    fn gpu_decoder(&self, _gpu: &std::sync::Arc<crate::gpu::Gpu>) -> Result<Option<Box<dyn GpuDecoder>>> {
        Ok(None)
    }

    /// The ids that end a caption when the family's `generate()` overrides the files' EOS
    /// (BLIP stops at `sep_token_id`); `None`: `generation_config.json`'s.
    fn eos_token_ids(&self) -> Option<Vec<u32>> {
        None
    }

    /// Which of `input_ids` belong to the caption's text (BLIP's prompt, which its decoded
    /// output starts with); none by default.
    fn text_prefix(&self, _input_ids: &[u32]) -> Vec<u32> {
        Vec::new()
    }

    /// Positions the decoder has (`n_positions`, `max_position_embeddings`).
    fn max_positions(&self) -> usize;

    /// New tokens when neither the caller nor the files set a length.
    fn default_max_new_tokens(&self) -> usize;

    /// Quantizes the decoder's matrices (q8_0, q4_0); returns (quantized, kept) counts.
    fn quantize_decoder(&mut self, dtype: GgmlDType) -> candle_core::Result<(usize, usize)>;

    /// The matrices that only ever multiply an image's many rows — the vision tower, the
    /// projector, a decoder's cross-attention keys and values: the captioner lays them out for
    /// the encoder's GEMM (f32, packed in WASM; or 8-bit in a quantized model).
    fn encoder_side_linears(&mut self) -> Vec<&mut Linear>;

    /// The input layout of [`Architecture::input_ids`] for an image of `tiles` tiles with
    /// `text_positions` stand-in ids for the text (no tokenizer): what the bench feeds a model
    /// with random weights.
    fn synthetic_input_ids(&self, generation: &GenerationDefaults, text_positions: usize, tiles: usize) -> Vec<u32>;

    /// Whether a decode step reads the tensor `name` (as built) whole: the decoder's matrices and
    /// LM head, not what is read once per image or one row at a time. For the bench's read floor.
    fn decode_step_reads(&self, name: &str) -> bool;

    /// Training: what the image part hands the trained part for pixel values [B, C, H, W] (the
    /// encoder states; a prefix model's tower output before its projector). A frozen encoder's
    /// are computed once per image and cached by the trainer.
    fn train_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        self.encode(pixel_values)
    }

    /// Training forward: logits [B, T, vocab] for right-padded, equal-length rows `input_ids`,
    /// row b conditioned on `features` row b (from [`Architecture::train_features`]).
    fn train_logits(&self, features: &Tensor, input_ids: &[Vec<u32>]) -> candle_core::Result<Tensor>;

    /// The matrices LoRA may adapt, by module path under [`Training::lora_scope`] (none: the
    /// family trains without LoRA).
    fn lora_projections(&mut self) -> Vec<(String, &mut Linear)> {
        Vec::new()
    }

    /// The concrete model, for callers that need its own API (tests, tools).
    fn as_any(&self) -> &dyn Any;
}

/// After loading, unquantized: in WASM the encoder side's matrices packed for our GEMM kernel
/// (a q8_0 file's straight from its blocks); natively, where candle's GEMM is the faster, q8_0
/// ones back to f32. Returns how many were packed.
pub fn pack_encoder_side(model: &mut dyn Architecture) -> candle_core::Result<usize> {
    let mut packed = 0;
    for linear in model.encoder_side_linears() {
        if linear.pack()? {
            packed += 1;
        } else {
            linear.dequantize()?;
        }
    }
    Ok(packed)
}

/// A quantized model's encoder side in 8 bits (`Linear::to_int8`). Returns how many.
pub fn int8_encoder_side(model: &mut dyn Architecture) -> candle_core::Result<usize> {
    let mut n = 0;
    for linear in model.encoder_side_linears() {
        n += usize::from(linear.to_int8()?);
    }
    Ok(n)
}

/// [`Architecture::next_logits`] with the threads kept awake for the step
/// (`parallel::with_crew`): a step is hundreds of small matrix–vector products. Every surface
/// (the captioner, the bench) decodes through this.
pub fn step_logits(model: &dyn Architecture, state: &mut dyn DecodeState) -> candle_core::Result<Tensor> {
    crate::parallel::with_crew(|| model.next_logits(state))
}

/// Rows that decode together (the images of a batch, the beams of a search).
pub trait DecodeState: Any + Send {
    /// The state of rows `rows` (in that order, repeats allowed), sharing no cache storage.
    fn select(&self, rows: &[usize]) -> candle_core::Result<Box<dyn DecodeState>>;
    /// The token each row feeds next.
    fn feed(&mut self, tokens: Vec<u32>);
    /// Bytes of cached keys and values the next step reads (self-attention's positions so far,
    /// cross-attention's image positions): the part of a step's reads the weights leave out,
    /// for the bench's read floor.
    fn cache_bytes(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The state an [`Architecture`] made, as its own type.
pub fn state_of<T: DecodeState>(state: &mut dyn DecodeState) -> candle_core::Result<&mut T> {
    state.as_any_mut().downcast_mut::<T>().ok_or_else(|| candle_core::Error::Msg("decoding state does not belong to this model".into()))
}

/// A family's decoder on a GPU ([`Architecture::gpu_decoder`]): [`Architecture::start`] and
/// [`Architecture::next_logits`] with the weights and caches in GPU memory; the logits are
/// queued there, for the caller to read (waiting natively, awaiting in a browser).
#[cfg(feature = "webgpu")]
pub trait GpuDecoder: Send + Sync {
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> Result<Box<dyn DecodeState>>;
    /// Logits [rows, vocab] of every row's next position.
    fn next_logits(&self, state: &mut dyn DecodeState) -> Result<crate::gpu::GpuTensor>;
}

/// The ids a trainer lays sequences out with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecialTokens {
    /// An encoder–decoder's first decoder input (`decoder_start_token_id`); `None` for a prefix model.
    pub decoder_start: Option<u32>,
    pub eos: u32,
    pub pad: u32,
    /// The placeholder the image embeddings replace (`<image>`), for families that have one.
    pub image: Option<u32>,
}

/// Which parts a run trains besides what the family always trains.
#[derive(Debug, Clone, Copy)]
pub struct TrainParts {
    pub encoder: bool,
    pub decoder: bool,
}

/// How transformers lays out a training row and its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Encoder–decoder (`shift_tokens_right`): inputs are the start and the caption, each
    /// position labelled with the next token (the caption, then eos).
    ShiftedRight,
    /// Causal LM: inputs are the prompt, the caption and eos; position t is labelled with input
    /// t + 1, the prompt's own tokens are not targets, nor is the last position.
    CausalLm,
}

impl Layout {
    /// (inputs, labels) for a row that starts with `start` (what [`Architecture::input_ids`]
    /// gives) and continues with `caption` (its tokens, eos last); `None` = not in the loss.
    pub fn row(self, start: &[u32], caption: &[u32]) -> (Vec<u32>, Vec<Option<u32>>) {
        let mut input = start.to_vec();
        match self {
            Layout::ShiftedRight => {
                input.extend_from_slice(&caption[..caption.len().saturating_sub(1)]);
                (input, caption.iter().copied().map(Some).collect())
            }
            Layout::CausalLm => {
                input.extend_from_slice(caption);
                let mut labels: Vec<Option<u32>> = input[1..].iter().copied().map(Some).collect();
                labels.push(None);
                for l in labels.iter_mut().take(start.len().saturating_sub(1)) {
                    *l = None;
                }
                (input, labels)
            }
        }
    }
}

/// What the trainer needs of a family besides the model: how to compose one from a SigLIP
/// folder and a decoder folder, its special tokens, which tensors train or start fresh, and what
/// transformers writes for it. Every method reads (or fills in) the family's own `config.json`.
pub trait Training: Sync {
    /// The `--arch` word that composes this family from an encoder and a decoder folder.
    fn arch(&self) -> &'static str;

    /// The model's `config.json` for a SigLIP `vision_config` and a decoder's `config.json`, or
    /// why that decoder does not fit.
    fn compose(&self, vision: Value, text: Value) -> std::result::Result<Value, String>;

    /// Where the encoder's (vision tower's) tensors live in the model, e.g. `encoder.`.
    fn encoder_prefix(&self) -> &'static str;

    /// A decoder folder's tensor name → its name in the model.
    fn decoder_tensor(&self, name: &str) -> String;

    /// The encoder's config section (the image size a default preprocessor resizes to).
    fn vision_config(&self, config: &Value) -> Value;

    /// Everything in `config` that the training features depend on (with the encoder's tensors,
    /// the feature cache's key).
    fn feature_config(&self, config: &Value) -> Value {
        self.vision_config(config)
    }

    /// Special tokens a word-level tokenizer needs beyond `<pad> <bos> <eos> <unk>`.
    fn extra_tokens(&self) -> &'static [&'static str] {
        &[]
    }

    /// Finds the special tokens (adding any the family needs to `tokenizer`) and writes their
    /// ids into `config` as transformers reads them.
    fn special_tokens(&self, config: &mut Value, tokenizer: &mut tokenizers::Tokenizer) -> Result<SpecialTokens>;

    /// Whether the tensor `name` trains.
    fn trainable(&self, name: &str, parts: TrainParts) -> bool;

    /// Tensors an encoder + decoder pair lacks and gets fresh weights for (cross-attention, a
    /// projector).
    fn fresh_in_pair(&self, name: &str) -> bool;

    /// The standard deviation a fresh tensor `name` is drawn with when it is not transformers'
    /// 0.02 (`None`: 0.02).
    fn init_std(&self, _name: &str, _dims: &[usize]) -> Option<f64> {
        None
    }

    /// The module LoRA adapts, e.g. `model.language_model.` (`None`: no LoRA).
    fn lora_scope(&self) -> Option<&'static str> {
        None
    }

    /// The leaf names [`Architecture::lora_projections`] gives.
    fn lora_targets(&self) -> &'static [&'static str] {
        &[]
    }

    /// Model name → the name transformers writes in `model.safetensors`.
    fn saved_name(&self, name: &str) -> String {
        name.to_string()
    }

    /// `generation_config.json` for captions of up to `max_caption_tokens` tokens.
    fn generation_config(&self, config: &Value, specials: &SpecialTokens, max_caption_tokens: usize) -> Result<Value>;

    fn layout(&self) -> Layout;
}

/// The first of `names` the tokenizer has.
pub fn special_id(tokenizer: &tokenizers::Tokenizer, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|n| tokenizer.token_to_id(n))
}

/// `value[key]` as a token id.
pub fn id_in(value: &Value, key: &str) -> Option<u32> {
    value.get(key).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok())
}

/// Writes token ids into a config section (a section that is not an object is left alone: the
/// config's own parsing reports it).
pub fn set_ids(section: &mut Value, ids: &[(&str, u32)]) {
    if let Some(map) = section.as_object_mut() {
        for (key, id) in ids {
            map.insert(key.to_string(), (*id).into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn layouts_follow_transformers() {
        // VisionEncoderDecoder: decoder_input_ids = shift_tokens_right(labels).
        let (input, labels) = Layout::ShiftedRight.row(&[9], &[5, 6, 2]);
        assert_eq!(input, vec![9, 5, 6]);
        assert_eq!(labels, vec![Some(5), Some(6), Some(2)]);
        // Llava: labels = input_ids with the prompt masked, shifted by one inside the loss.
        let (input, labels) = Layout::CausalLm.row(&[7, 7, 3], &[5, 2]);
        assert_eq!(input, vec![7, 7, 3, 5, 2]);
        assert_eq!(labels, vec![None, None, Some(5), Some(2), None]);
    }
}
