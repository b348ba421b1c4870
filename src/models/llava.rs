//! Prefix conditioning as 🤗 `LlavaForConditionalGeneration` (transformers `modeling_llava.py`):
//! SigLIP patches → `multi_modal_projector` (Linear → GELU → Linear) → image embeddings that take
//! the places of the `<image>` tokens in the prompt → Llama decoder → `lm_head`.
//! Tensor names are transformers 5.x's (`model.vision_tower.*`, `model.multi_modal_projector.*`,
//! `model.language_model.*`, `lm_head.*`); `crate::loading` folds older layouts into these.

use std::any::Any;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use crate::architecture::{
    id_in, pick_rows, set_ids, special_id, state_of, Architecture, Builder, DecodeState, Family, Layout, PromptInputs, SpecialTokens, TrainParts,
    Training,
};
use crate::loading::GenerationDefaults;
use crate::tokenizer::CaptionTokenizer;

use super::backend::{Backend, Cpu, IntoCandle};
use super::embedding::Embedding;
use super::linear::{linear_b, Linear};
use super::llama::{Llama, LlamaCache, LlamaConfig};
use super::siglip::{SiglipVisionConfig, SiglipVisionTransformer};

/// `LlavaConfig` (`config.json` with `model_type: "llava"`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct LlavaConfig {
    pub vision_config: SiglipVisionConfig,
    pub text_config: LlamaConfig,
    /// `image_token_index` in transformers 4.x files, `image_token_id` in 5.x.
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_vision_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "default_select_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: Activation,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

fn default_vision_feature_layer() -> i64 {
    -2
}
fn default_select_strategy() -> String {
    "default".into()
}
fn default_projector_act() -> Activation {
    Activation::Gelu
}
fn default_true() -> bool {
    true
}

impl LlavaConfig {
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = |section: &str| value.get(section).and_then(|s| s.get("model_type")).and_then(|t| t.as_str());
        match model_type("vision_config") {
            Some("siglip_vision_model") => {}
            other => return Err(format!("vision_config.model_type must be \"siglip_vision_model\", found {other:?}")),
        }
        match model_type("text_config") {
            Some("llama") => {}
            other => return Err(format!("text_config.model_type must be \"llama\", found {other:?}")),
        }
        let mut cfg: Self = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        // A top-level tie_word_embeddings (transformers 4.x writes it there) wins over the default.
        if let Some(tie) = cfg.tie_word_embeddings {
            if value.get("text_config").and_then(|t| t.get("tie_word_embeddings")).is_none() {
                cfg.text_config.tie_word_embeddings = tie;
            }
        }
        cfg.vision_config.validate().map_err(|e| format!("vision_config: {e}"))?;
        cfg.text_config.validate().map_err(|e| format!("text_config: {e}"))?;
        if cfg.vision_feature_select_strategy != "full" {
            // "default" drops the first patch, which is meant for a CLS token SigLIP does not have.
            return Err(format!(
                "vision_feature_select_strategy {:?} is not supported with a SigLIP tower (use \"full\")",
                cfg.vision_feature_select_strategy
            ));
        }
        let layers = cfg.vision_config.num_hidden_layers as i64;
        if cfg.vision_feature_layer < -(layers + 1) || cfg.vision_feature_layer > layers {
            return Err(format!("vision_feature_layer {} is out of range for {layers} layers", cfg.vision_feature_layer));
        }
        Ok(cfg)
    }

    /// Image positions in the prompt: one per patch.
    pub fn num_image_tokens(&self) -> usize {
        self.vision_config.num_patches()
    }

    /// Index into the tower's hidden states (embeddings, then each layer), as Python indexes.
    fn feature_layer_index(&self) -> usize {
        let count = self.vision_config.num_hidden_layers as i64 + 1;
        (if self.vision_feature_layer < 0 { count + self.vision_feature_layer } else { self.vision_feature_layer }) as usize
    }
}

// transformers modeling_llava.py: LlavaMultiModalProjector
#[derive(Debug, Clone)]
struct LlavaMultiModalProjector<B: Backend = Cpu> {
    linear_1: B::Linear,
    act: Activation,
    linear_2: B::Linear,
}

impl LlavaMultiModalProjector {
    fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let (v, t, bias) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.multimodal_projector_bias);
        Ok(Self {
            linear_1: linear_b(v, t, bias, vb.pp("linear_1"))?,
            act: cfg.projector_hidden_act,
            linear_2: linear_b(t, t, bias, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_on(&Cpu, xs)
    }

    #[cfg(feature = "webgpu")]
    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<LlavaMultiModalProjector<B>, B::Error> {
        Ok(LlavaMultiModalProjector { linear_1: be.linear_from(&self.linear_1)?, act: self.act, linear_2: be.linear_from(&self.linear_2)? })
    }
}

impl<B: Backend> LlavaMultiModalProjector<B> {
    fn forward_on(&self, be: &B, xs: &B::Tensor) -> std::result::Result<B::Tensor, B::Error> {
        be.linear(&be.linear(xs, &self.linear_1, Some(&self.act))?, &self.linear_2, None)
    }
}

#[derive(Debug, Clone)]
pub struct Llava {
    vision_tower: SiglipVisionTransformer,
    multi_modal_projector: LlavaMultiModalProjector,
    language_model: Llama,
    config: LlavaConfig,
}

impl Llava {
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        Ok(Self {
            vision_tower: SiglipVisionTransformer::new(&cfg.vision_config, vb_m.pp("vision_tower"))?,
            multi_modal_projector: LlavaMultiModalProjector::new(cfg, vb_m.pp("multi_modal_projector"))?,
            language_model: Llama::new(&cfg.text_config, vb_m.pp("language_model"), vb.pp("lm_head"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    pub fn vision_tower(&self) -> &SiglipVisionTransformer {
        &self.vision_tower
    }

    pub fn language_model(&self) -> &Llama {
        &self.language_model
    }

    /// Image embeddings [B, num_patches, text hidden] for pixel values [B, 3, H, W].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.project(&self.vision_features(pixel_values)?)
    }

    /// The tower's hidden state that the projector reads, [B, num_patches, vision hidden]
    /// (`vision_feature_layer`): what the trainer caches while the tower is frozen.
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_tower.hidden_state(pixel_values, self.config.feature_layer_index())
    }

    pub fn project(&self, vision_features: &Tensor) -> Result<Tensor> {
        self.multi_modal_projector.forward(vision_features)
    }
}

// What every prefix family (this one, Idefics3) does with its image features and Llama.

/// The prompt's embeddings for each row of image features ([B, image positions, hidden]):
/// [B, T, hidden], the features in the `image_token` positions.
pub(crate) fn prompt_embeddings(table: &Embedding, image_token: u32, input_ids: &[u32], image_features: &Tensor) -> Result<Tensor> {
    let rows = (0..image_features.dim(0)?)
        .map(|b| merge_image_features(table, image_token, input_ids, &image_features.narrow(0, b, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

/// Text embeddings with the image features ([1, n, hidden]) written, in order, where
/// `image_token` stands (transformers' `masked_scatter`). Runs of text and of image positions
/// are concatenated.
pub(crate) fn merge_image_features(table: &Embedding, image_token: u32, input_ids: &[u32], image_features: &Tensor) -> Result<Tensor> {
    let features = image_features.squeeze(0)?;
    let n_features = features.dim(0)?;
    let n_image = input_ids.iter().filter(|&&id| id == image_token).count();
    if n_image != n_features {
        candle_core::bail!("the prompt has {n_image} <image> tokens but the image gives {n_features} features");
    }
    let ids = Tensor::new(input_ids, image_features.device())?;
    let text = table.forward(&ids)?;
    let mut parts = Vec::new();
    let (mut start, mut used) = (0, 0);
    while start < input_ids.len() {
        let is_image = input_ids[start] == image_token;
        let len = input_ids[start..].iter().take_while(|&&id| (id == image_token) == is_image).count();
        parts.push(if is_image { features.narrow(0, used, len)? } else { text.narrow(0, start, len)? });
        if is_image {
            used += len;
        }
        start += len;
    }
    Tensor::cat(&parts, 0)?.unsqueeze(0)
}

/// `image_positions` image tokens, then `text_positions` ids spread over the vocabulary (never
/// the image token): a prefix family's input for the bench.
pub(crate) fn synthetic_prefix_ids(image_token: u32, image_positions: usize, text: &LlamaConfig, text_positions: usize) -> Vec<u32> {
    let vocab = text.vocab_size.max(2) as u32;
    let mut ids = vec![image_token; image_positions];
    ids.extend((0..text_positions as u32).map(|i| (i * 7919 + 1) % vocab).map(|id| if id == image_token { 1 } else { id }));
    ids
}

/// Whether a prefix family's decode step reads `name`: the Llama under `lm` and the LM head, its
/// token embeddings only as a tied head.
pub(crate) fn decode_step_reads(name: &str, lm: &str, text: &LlamaConfig) -> bool {
    (name.contains(lm) || name.starts_with("lm_head.")) && (text.tie_word_embeddings || !name.ends_with("embed_tokens.weight"))
}

/// The text of the image token `id`, which the prompt's text spells out.
pub(crate) fn image_token_text(tokenizer: &CaptionTokenizer, id: u32) -> crate::Result<String> {
    tokenizer.id_to_token(id).ok_or_else(|| crate::Error::Tokenizer(format!("the image token id {id} from config.json is not in the vocabulary")))
}

// The captioner's seam (crate::architecture): the prompt (the image tokens, then any text) is
// prefilled by the first step with each row's image embeddings; each row's last token after that.

pub const FAMILY: Family =
    Family { model_type: "llava", decoder_section: "text_config", rename: crate::loading::llava_key, config: builder, training: Some(&Recipe) };

fn builder(config: &serde_json::Value) -> std::result::Result<Builder, String> {
    let cfg = LlavaConfig::from_json(config)?;
    Ok(Box::new(move |vb| Ok(Box::new(Llava::new(&cfg, vb)?) as Box<dyn Architecture>)))
}

/// The text whose tokens are a prefix model's input (`LlavaProcessor`'s expansion of
/// `"<image>" + prompt`): the image token once per patch, then the prompt. The trainer lays out
/// its sequences with the same function.
pub fn prefix_prompt_text(image_token: &str, num_image_tokens: usize, prompt: Option<&str>) -> String {
    format!("{}{}", image_token.repeat(num_image_tokens), prompt.unwrap_or_default())
}

/// A prefix family's decoding where `B` computes: the prompt's embeddings (image features in
/// place, made on the CPU) until the first step prefills them, then each row's last token.
pub(crate) struct PrefixState<B: Backend = Cpu> {
    be: Arc<B>,
    cache: LlamaCache<B>,
    prompt: Option<Tensor>,
    last: Vec<u32>,
}

impl PrefixState {
    /// `features` [rows, image positions, hidden] on the CPU, for decoding on `be`.
    pub(crate) fn new<B: Backend>(
        be: &Arc<B>,
        lm: &Llama<B>,
        table: &Embedding,
        image_token: u32,
        input_ids: &[u32],
        features: &Tensor,
    ) -> Result<PrefixState<B>> {
        let rows = features.dim(0)?;
        let prompt = prompt_embeddings(table, image_token, input_ids, features)?;
        Ok(PrefixState { be: be.clone(), cache: lm.new_cache(be), prompt: Some(prompt), last: vec![0; rows] })
    }
}

impl<B: Backend + Send + 'static> PrefixState<B> {
    /// Logits [rows, vocab] of every row's next position.
    pub(crate) fn next_logits(&mut self, lm: &Llama<B>) -> std::result::Result<B::Tensor, B::Error> {
        let be = &*self.be;
        match self.prompt.take() {
            Some(embeds) => lm.last_logits(be, &be.tensor_from(&embeds)?, embeds.dim(1)?, &mut self.cache),
            None => lm.last_logits(be, &lm.embed_on(be, &self.last, self.last.len())?, 1, &mut self.cache),
        }
    }
}

impl<B: Backend + Send + 'static> DecodeState for PrefixState<B> {
    fn select(&self, rows: &[usize]) -> Result<Box<dyn DecodeState>> {
        let prompt = match &self.prompt {
            Some(embeds) => Some(embeds.contiguous()?.index_select(&super::attention::row_index(rows, embeds.device())?, 0)?),
            None => None,
        };
        let cache = self.cache.select(&*self.be, rows).map_err(IntoCandle::into_candle)?;
        Ok(Box::new(Self { be: self.be.clone(), cache, prompt, last: pick_rows(&self.last, rows) }))
    }
    fn feed(&mut self, tokens: Vec<u32>) {
        self.last = tokens;
    }
    fn cache_bytes(&self) -> usize {
        self.cache.bytes(&*self.be)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A prefix family's Llama on a GPU (`Architecture::gpu_decoder`): the prompt's embeddings are
/// made by the CPU's model (its token table shared, not copied) and prefilled there.
#[cfg(feature = "webgpu")]
pub(crate) struct GpuPrefixDecoding {
    pub(crate) gpu: Arc<crate::gpu::Gpu>,
    pub(crate) lm: Llama<crate::gpu::Gpu>,
    /// The CPU model's token table.
    pub(crate) table: Embedding,
    pub(crate) image_token: u32,
    /// The conditioning's rows → features [rows, image positions, hidden] (SmolVLM regroups
    /// each image's tiles).
    pub(crate) features: fn(Tensor, &[u32], u32) -> Result<Tensor>,
}

#[cfg(feature = "webgpu")]
impl crate::architecture::GpuDecoder for GpuPrefixDecoding {
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> crate::Result<Box<dyn DecodeState>> {
        let features = (self.features)(conditioning, input_ids, self.image_token)?;
        Ok(Box::new(PrefixState::new(&self.gpu, &self.lm, &self.table, self.image_token, input_ids, &features)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> crate::Result<crate::gpu::GpuTensor> {
        state_of::<PrefixState<crate::gpu::Gpu>>(state)?.next_logits(&self.lm)
    }
}

impl Architecture for Llava {
    fn image_shape(&self) -> [usize; 3] {
        let v = &self.config.vision_config;
        [v.num_channels, v.image_size, v.image_size]
    }

    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_features(pixel_values)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_encoder(&self, gpu: &crate::gpu::Gpu) -> crate::Result<crate::gpu::GpuEncoder> {
        let (tower, projector) = (self.vision_tower.to_backend(gpu)?, self.multi_modal_projector.to_backend(gpu)?);
        let layer = self.config.feature_layer_index();
        Ok(Box::new(move |gpu, pixel_values| projector.forward_on(gpu, &tower.hidden_state_on(gpu, pixel_values, layer)?)))
    }

    /// The ids `LlavaProcessor` makes of `"<image>" + prompt`.
    fn input_ids(&self, inputs: &PromptInputs<'_>) -> crate::Result<Vec<u32>> {
        inputs.refuse_messages("llava")?;
        let image = image_token_text(inputs.tokenizer, self.config.image_token_index)?;
        inputs.tokenizer.encode(&prefix_prompt_text(&image, self.config.num_image_tokens(), inputs.prompt), true)
    }

    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> Result<Box<dyn DecodeState>> {
        let lm = &self.language_model;
        Ok(Box::new(PrefixState::new(&Arc::new(Cpu), lm, lm.embed_tokens(), self.config.image_token_index, input_ids, &conditioning)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> Result<Tensor> {
        state_of::<PrefixState>(state)?.next_logits(&self.language_model)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_decoder(&self, gpu: &Arc<crate::gpu::Gpu>) -> crate::Result<Option<Box<dyn crate::architecture::GpuDecoder>>> {
        Ok(Some(Box::new(GpuPrefixDecoding {
            gpu: gpu.clone(),
            lm: self.language_model.to_backend(&**gpu)?,
            table: self.language_model.embed_tokens().clone(),
            image_token: self.config.image_token_index,
            features: |conditioning, _, _| Ok(conditioning),
        })))
    }

    fn max_positions(&self) -> usize {
        self.language_model.config().max_position_embeddings
    }

    /// transformers would count the image positions into its default `max_length` of 20.
    fn default_max_new_tokens(&self) -> usize {
        20
    }

    fn quantize_decoder(&mut self, dtype: GgmlDType) -> Result<(usize, usize)> {
        self.language_model.quantize(dtype)
    }

    fn encoder_side_linears(&mut self) -> Vec<&mut Linear> {
        let mut linears: Vec<_> = self.vision_tower.linears_mut().collect();
        let p = &mut self.multi_modal_projector;
        linears.extend([&mut p.linear_1, &mut p.linear_2]);
        linears
    }

    /// The image positions, then `text_positions` ids spread over the vocabulary (never the image
    /// token).
    fn synthetic_input_ids(&self, _: &GenerationDefaults, text_positions: usize, _: usize) -> Vec<u32> {
        synthetic_prefix_ids(self.config.image_token_index, self.config.num_image_tokens(), &self.config.text_config, text_positions)
    }

    fn decode_step_reads(&self, name: &str) -> bool {
        decode_step_reads(name, "language_model.", &self.config.text_config)
    }

    /// The tower's output before the projector: the projector trains.
    fn train_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_features(pixel_values)
    }

    /// Each row's `<image>` positions take its image's projected features.
    fn train_logits(&self, vision_features: &Tensor, input_ids: &[Vec<u32>]) -> Result<Tensor> {
        let features = self.project(vision_features)?;
        let rows = input_ids
            .iter()
            .enumerate()
            .map(|(b, ids)| merge_image_features(self.language_model.embed_tokens(), self.config.image_token_index, ids, &features.narrow(0, b, 1)?))
            .collect::<Result<Vec<_>>>()?;
        self.language_model.forward_train(&Tensor::cat(&rows, 0)?)
    }

    fn lora_projections(&mut self) -> Vec<(String, &mut Linear)> {
        self.language_model.projections_mut()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Training (crate::architecture::Training): a SigLIP tower, a fresh projector and a Llama; the
/// projector always trains, the language model in full or through LoRA, the tower on request.
struct Recipe;

impl Training for Recipe {
    fn arch(&self) -> &'static str {
        "prefix"
    }

    fn compose(&self, vision: serde_json::Value, text: serde_json::Value) -> std::result::Result<serde_json::Value, String> {
        let text_type = text.get("model_type").and_then(|t| t.as_str()).unwrap_or_default();
        if text_type != "llama" {
            return Err(format!("--arch prefix needs a Llama decoder, found model_type {text_type:?}"));
        }
        let size = |key: &str, default: u64| vision.get(key).and_then(serde_json::Value::as_u64).unwrap_or(default);
        let patches = (size("image_size", 224) / size("patch_size", 16).max(1)).pow(2);
        let tie = text.get("tie_word_embeddings").cloned().unwrap_or(true.into());
        Ok(serde_json::json!({
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": vision,
            "text_config": text,
            "image_seq_length": patches,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": true,
            "tie_word_embeddings": tie,
        }))
    }

    fn encoder_prefix(&self) -> &'static str {
        "model.vision_tower."
    }

    fn decoder_tensor(&self, name: &str) -> String {
        match name.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => name.to_string(),
        }
    }

    fn vision_config(&self, config: &serde_json::Value) -> serde_json::Value {
        config.get("vision_config").cloned().unwrap_or_default()
    }

    fn feature_config(&self, config: &serde_json::Value) -> serde_json::Value {
        serde_json::json!([config.get("vision_config"), config.get("vision_feature_layer"), config.get("vision_feature_select_strategy")])
    }

    fn extra_tokens(&self) -> &'static [&'static str] {
        &["<image>"]
    }

    fn special_tokens(&self, config: &mut serde_json::Value, tokenizer: &mut tokenizers::Tokenizer) -> crate::Result<SpecialTokens> {
        if tokenizer.token_to_id("<image>").is_none() {
            tokenizer
                .add_special_tokens([tokenizers::AddedToken::from("<image>", true)])
                .map_err(|e| crate::Error::Tokenizer(format!("could not add <image>: {e}")))?;
        }
        let image = tokenizer.token_to_id("<image>").ok_or_else(|| crate::Error::Tokenizer("could not add <image>".into()))?;
        let eos = special_id(tokenizer, &["<eos>", "<|endoftext|>", "<|im_end|>", "</s>"])
            .or_else(|| config.get("text_config").and_then(|t| id_in(t, "eos_token_id")));
        let eos = eos.ok_or_else(|| crate::Error::Tokenizer("no end-of-sequence token in the tokenizer or config".into()))?;
        let pad = special_id(tokenizer, &["<pad>"]).unwrap_or(eos);
        set_ids(config, &[("image_token_index", image), ("pad_token_id", pad)]);
        if let Some(text) = config.get_mut("text_config") {
            set_ids(text, &[("eos_token_id", eos), ("pad_token_id", pad)]);
        }
        Ok(SpecialTokens { decoder_start: None, eos, pad, image: Some(image) })
    }

    fn trainable(&self, name: &str, parts: TrainParts) -> bool {
        name.starts_with("model.multi_modal_projector.")
            || (parts.encoder && name.starts_with("model.vision_tower."))
            || (parts.decoder && (name.starts_with("model.language_model.") || name.starts_with("lm_head.")))
    }

    fn fresh_in_pair(&self, name: &str) -> bool {
        name.starts_with("model.multi_modal_projector.")
    }

    /// Token embeddings N(0, 1/hidden), rows of norm ≈ 1: the language model stays frozen, and
    /// with a tied head of norm 0.02·√hidden the logits could never leave ±0.02·hidden — too flat
    /// for any adapter to make a confident caption.
    fn init_std(&self, name: &str, dims: &[usize]) -> Option<f64> {
        let hidden = dims.last().copied().unwrap_or(1).max(1) as f64;
        (name == "model.language_model.embed_tokens.weight").then(|| 1.0 / hidden.sqrt())
    }

    fn lora_scope(&self) -> Option<&'static str> {
        Some("model.language_model.")
    }

    fn lora_targets(&self) -> &'static [&'static str] {
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    }

    /// transformers 5's layout (`language_model.model.*`, `language_model.lm_head.*`, the rest
    /// without `model.`).
    fn saved_name(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix("model.language_model.") {
            format!("language_model.model.{rest}")
        } else if let Some(rest) = name.strip_prefix("lm_head.") {
            format!("language_model.lm_head.{rest}")
        } else {
            name.strip_prefix("model.").unwrap_or(name).to_string()
        }
    }

    /// Room for the caption after the image tokens and a short prompt.
    fn generation_config(&self, config: &serde_json::Value, specials: &SpecialTokens, max_caption_tokens: usize) -> crate::Result<serde_json::Value> {
        let cfg = LlavaConfig::from_json(config).map_err(|e| crate::Error::config(crate::loading::CONFIG, e))?;
        let room = cfg.text_config.max_position_embeddings.saturating_sub(cfg.num_image_tokens() + 8);
        Ok(serde_json::json!({ "eos_token_id": specials.eos, "pad_token_id": specials.pad, "max_new_tokens": max_caption_tokens.min(room.max(1)) }))
    }

    fn layout(&self) -> Layout {
        Layout::CausalLm
    }
}
