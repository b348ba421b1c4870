//! 🤗 `BlipForConditionalGeneration` (transformers `modeling_blip.py`, `modeling_blip_text.py`):
//! the vision model (class token, patch embedding, pre-norm layers with one `qkv` matrix,
//! `post_layernorm`) and the BERT-style text decoder (`BlipTextLMHeadModel`: word + position
//! embeddings with LayerNorm; post-norm layers of causal self-attention, cross-attention to the
//! image states and the feed-forward; the prediction head's transform and decoder). Decoding starts
//! from the BOS (`[DEC]`) token, or from a prompt's ids with BOS in place of `[CLS]` and the last
//! `[SEP]` dropped, as `generate()` does, and stops at `sep_token_id`.

use std::any::Any;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use crate::architecture::{state_of, Architecture, Builder, DecodeState, Family, PromptInputs};
use crate::loading::GenerationDefaults;

use super::backend::{Backend, Cpu, IntoCandle};
use super::embedding::embedding;
use super::encoder_layer::{ClassTokenEmbeddings, EncoderLayer, LayerNames, LayerShape, PatchEmbedding};
use super::linear::{linear_b, quantize_each, Linear};
use super::norm::layer_norm;

/// `BlipVisionConfig`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BlipVisionConfig {
    #[serde(default = "vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "vision_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "twelve")]
    pub num_attention_heads: usize,
    #[serde(default = "image_size")]
    pub image_size: usize,
    #[serde(default = "patch_size")]
    pub patch_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    #[serde(default = "vision_eps")]
    pub layer_norm_eps: f64,
}

/// `BlipTextConfig`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BlipTextConfig {
    #[serde(default = "text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "vision_hidden")]
    pub encoder_hidden_size: usize,
    #[serde(default = "vision_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "eight")]
    pub num_attention_heads: usize,
    #[serde(default = "text_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    #[serde(default = "text_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "bos")]
    pub bos_token_id: u32,
    #[serde(default = "sep")]
    pub sep_token_id: u32,
}

fn vision_hidden() -> usize {
    768
}
fn vision_intermediate() -> usize {
    3072
}
fn twelve() -> usize {
    12
}
fn eight() -> usize {
    8
}
fn image_size() -> usize {
    384
}
fn patch_size() -> usize {
    16
}
fn gelu() -> Activation {
    Activation::GeluPytorchTanh
}
fn vision_eps() -> f64 {
    1e-5
}
fn text_eps() -> f64 {
    1e-12
}
fn text_vocab() -> usize {
    30524
}
fn text_positions() -> usize {
    512
}
fn bos() -> u32 {
    30522
}
fn sep() -> u32 {
    102
}

/// `BlipConfig` (`config.json` with `model_type: "blip"`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlipConfig {
    pub vision_config: BlipVisionConfig,
    pub text_config: BlipTextConfig,
}

impl BlipConfig {
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let section = |name: &str| value.get(name).cloned().unwrap_or_else(|| serde_json::json!({}));
        let vision: BlipVisionConfig = serde_json::from_value(section("vision_config")).map_err(|e| format!("vision_config: {e}"))?;
        let text: BlipTextConfig = serde_json::from_value(section("text_config")).map_err(|e| format!("text_config: {e}"))?;
        super::encoder_layer::check_tower_sizes(vision.hidden_size, vision.num_attention_heads, vision.image_size, vision.patch_size)
            .map_err(|e| format!("vision_config: {e}"))?;
        if text.num_attention_heads == 0 || text.hidden_size % text.num_attention_heads != 0 {
            return Err(format!(
                "text_config: hidden_size {} is not divisible by num_attention_heads {}",
                text.hidden_size, text.num_attention_heads
            ));
        }
        if text.encoder_hidden_size != vision.hidden_size {
            return Err(format!("text_config.encoder_hidden_size {} is not the vision hidden_size {}", text.encoder_hidden_size, vision.hidden_size));
        }
        Ok(Self { vision_config: vision, text_config: text })
    }
}

const VISION_LAYER: LayerNames = LayerNames {
    fused_qkv: Some("self_attn.qkv"),
    norm1: "layer_norm1",
    query: "",
    key: "",
    value: "",
    out: "self_attn.projection",
    norm2: "layer_norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

/// transformers modeling_blip.py: BlipVisionModel → `last_hidden_state` (class token first;
/// BlipVisionEmbeddings' positions as trained).
#[derive(Debug, Clone)]
pub struct BlipVisionModel<B: Backend = Cpu> {
    embeddings: ClassTokenEmbeddings<B>,
    layers: Vec<EncoderLayer<B>>,
    post_layernorm: B::LayerNorm,
}

impl BlipVisionModel {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        let embeddings = ClassTokenEmbeddings::new(
            e.get((1, 1, d), "class_embedding")?,
            e.get((1, patches + 1, d), "position_embedding")?,
            PatchEmbedding::new(3, d, cfg.patch_size, e.pp("patch_embedding"))?,
        );
        let shape = LayerShape {
            hidden_size: d,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            hidden_act: cfg.hidden_act,
            qkv_bias: true,
        };
        let layers =
            (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&shape, &VISION_LAYER, vb.pp("encoder.layers").pp(i))).collect::<Result<_>>()?;
        Ok(Self { embeddings, layers, post_layernorm: layer_norm(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))? })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_on(&Cpu, pixel_values)
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(EncoderLayer::linears_mut)
    }

    /// The vision model with its weights where `be` computes (uploaded once).
    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<BlipVisionModel<B>, B::Error> {
        Ok(BlipVisionModel {
            embeddings: self.embeddings.to_backend(be)?,
            layers: self.layers.iter().map(|l| l.to_backend(be)).collect::<std::result::Result<_, _>>()?,
            post_layernorm: be.layer_norm_from(&self.post_layernorm)?,
        })
    }
}

impl<B: Backend> BlipVisionModel<B> {
    /// `forward` on `be`: the pixels are on the CPU, the states where `be` computes.
    pub fn forward_on(&self, be: &B, pixel_values: &Tensor) -> std::result::Result<B::Tensor, B::Error> {
        let mut xs = self.embeddings.forward_on(be, pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward_on(be, &xs)?;
        }
        be.layer_norm(&xs, &self.post_layernorm)
    }
}

/// Query, key, value and the output (`dense` + LayerNorm over the residual) of one attention.
#[derive(Debug, Clone)]
struct BertAttention<B: Backend = Cpu> {
    query: B::Linear,
    key: B::Linear,
    value: B::Linear,
    dense: B::Linear,
    norm: B::LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(cfg: &BlipTextConfig, kv_in: usize, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query: linear_b(h, h, true, vb.pp("self.query"))?,
            key: linear_b(kv_in, h, true, vb.pp("self.key"))?,
            value: linear_b(kv_in, h, true, vb.pp("self.value"))?,
            dense: linear_b(h, h, true, vb.pp("output.dense"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
        })
    }

    #[cfg(feature = "webgpu")]
    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<BertAttention<B>, B::Error> {
        Ok(BertAttention {
            query: be.linear_from(&self.query)?,
            key: be.linear_from(&self.key)?,
            value: be.linear_from(&self.value)?,
            dense: be.linear_from(&self.dense)?,
            norm: be.layer_norm_from(&self.norm)?,
            heads: self.heads,
        })
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.query, &mut self.key, &mut self.value, &mut self.dense]
    }
}

impl<B: Backend> BertAttention<B> {
    /// Keys and values of `xs` (the image's, for cross-attention).
    fn keys_values(&self, be: &B, xs: &B::Tensor) -> std::result::Result<B::Kv, B::Error> {
        be.kv(&be.linear(xs, &self.key, None)?, &be.linear(xs, &self.value, None)?, self.heads)
    }

    /// LayerNorm(dense(`mixed`) + `xs`).
    fn output(&self, be: &B, xs: &B::Tensor, mixed: &B::Tensor) -> std::result::Result<B::Tensor, B::Error> {
        be.layer_norm(&be.add(&be.linear(mixed, &self.dense, None)?, xs)?, &self.norm)
    }

    /// Causal self-attention of `xs`, its keys and values appended to `cache`.
    fn forward_self(&self, be: &B, xs: &B::Tensor, cache: &mut B::KvCache, head_dim: usize) -> std::result::Result<B::Tensor, B::Error> {
        let (q, k, v) = (be.linear(xs, &self.query, None)?, be.linear(xs, &self.key, None)?, be.linear(xs, &self.value, None)?);
        let mixed = be.causal_attention(&q, &k, &v, Some(cache), (self.heads, self.heads), 1.0 / (head_dim as f64).sqrt())?;
        self.output(be, xs, &mixed)
    }

    /// Attention of `xs` to the image's keys and values.
    fn forward_cross(&self, be: &B, xs: &B::Tensor, kv: &B::Kv, head_dim: usize) -> std::result::Result<B::Tensor, B::Error> {
        let q = be.linear(xs, &self.query, None)?;
        let mixed = be.attention(&q, kv, (self.heads, self.heads), 1.0 / (head_dim as f64).sqrt())?;
        self.output(be, xs, &mixed)
    }
}

#[derive(Debug, Clone)]
struct TextLayer<B: Backend = Cpu> {
    attention: BertAttention<B>,
    crossattention: BertAttention<B>,
    intermediate: B::Linear,
    output: B::Linear,
    output_norm: B::LayerNorm,
    act: Activation,
}

/// The decoder's caches: each layer's self-attention K/V, and the image's cross-attention K/V
/// (computed once per image).
struct BlipCache<B: Backend = Cpu> {
    self_attn: Vec<B::KvCache>,
    cross: Vec<B::Kv>,
}

impl<B: Backend> BlipCache<B> {
    fn select(&self, be: &B, rows: &[usize]) -> std::result::Result<Self, B::Error> {
        let self_attn = self.self_attn.iter().map(|c| be.select_kv_cache(c, rows)).collect::<std::result::Result<_, _>>()?;
        let cross = self.cross.iter().map(|kv| be.select_kv(kv, rows)).collect::<std::result::Result<_, _>>()?;
        Ok(Self { self_attn, cross })
    }
}

/// transformers modeling_blip_text.py: BlipTextLMHeadModel (embeddings, layers, prediction head).
#[derive(Debug, Clone)]
struct BlipTextDecoder<B: Backend = Cpu> {
    word_embeddings: B::Embedding,
    position_embeddings: B::Embedding,
    embeddings_norm: B::LayerNorm,
    layers: Vec<TextLayer<B>>,
    transform: B::Linear,
    transform_norm: B::LayerNorm,
    decoder: B::Linear,
    act: Activation,
    head_dim: usize,
    max_positions: usize,
}

impl BlipTextDecoder {
    fn new(t: &BlipTextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, v) = (t.hidden_size, t.vocab_size);
        let bert = vb.pp("text_decoder.bert");
        let e = bert.pp("embeddings");
        let word_embeddings = embedding(v, h, e.pp("word_embeddings"))?;
        let layers = (0..t.num_hidden_layers)
            .map(|i| {
                let l = bert.pp("encoder.layer").pp(i);
                Ok(TextLayer {
                    attention: BertAttention::new(t, h, l.pp("attention"))?,
                    crossattention: BertAttention::new(t, t.encoder_hidden_size, l.pp("crossattention"))?,
                    intermediate: linear_b(h, t.intermediate_size, true, l.pp("intermediate.dense"))?,
                    output: linear_b(t.intermediate_size, h, true, l.pp("output.dense"))?,
                    output_norm: layer_norm(h, t.layer_norm_eps, l.pp("output.LayerNorm"))?,
                    act: t.hidden_act,
                })
            })
            .collect::<Result<_>>()?;
        let p = vb.pp("text_decoder.cls.predictions");
        // transformers 5 reads the decoder's own bias; 4.x files keep it as `predictions.bias`
        // (tied to it), and a tied head has no `decoder.weight`.
        let bias = p.get(v, "decoder.bias").or_else(|_| p.get(v, "bias"))?;
        let decoder = if p.contains_tensor("decoder.weight") { linear_b(h, v, false, p.pp("decoder"))? } else { Linear::tied(&word_embeddings) };
        Ok(Self {
            word_embeddings,
            position_embeddings: embedding(t.max_position_embeddings, h, e.pp("position_embeddings"))?,
            embeddings_norm: layer_norm(h, t.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
            transform: linear_b(h, h, true, p.pp("transform.dense"))?,
            transform_norm: layer_norm(h, t.layer_norm_eps, p.pp("transform.LayerNorm"))?,
            decoder: decoder.with_bias(Some(bias)),
            act: t.hidden_act,
            head_dim: h / t.num_attention_heads.max(1),
            max_positions: t.max_position_embeddings,
        })
    }

    #[cfg(feature = "webgpu")]
    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<BlipTextDecoder<B>, B::Error> {
        let layers = self.layers.iter().map(|l| {
            Ok(TextLayer {
                attention: l.attention.to_backend(be)?,
                crossattention: l.crossattention.to_backend(be)?,
                intermediate: be.linear_from(&l.intermediate)?,
                output: be.linear_from(&l.output)?,
                output_norm: be.layer_norm_from(&l.output_norm)?,
                act: l.act,
            })
        });
        Ok(BlipTextDecoder {
            word_embeddings: be.embedding_from(&self.word_embeddings)?,
            position_embeddings: be.embedding_from(&self.position_embeddings)?,
            embeddings_norm: be.layer_norm_from(&self.embeddings_norm)?,
            layers: layers.collect::<std::result::Result<_, B::Error>>()?,
            transform: be.linear_from(&self.transform)?,
            transform_norm: be.layer_norm_from(&self.transform_norm)?,
            // The head has a bias of its own: a copy of a tied table.
            decoder: be.linear_from(&self.decoder)?,
            act: self.act,
            head_dim: self.head_dim,
            max_positions: self.max_positions,
        })
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears: Vec<&mut Linear> = Vec::new();
        for layer in &mut self.layers {
            linears.extend(layer.attention.linears_mut());
            linears.extend(layer.crossattention.linears_mut());
            linears.extend([&mut layer.intermediate, &mut layer.output]);
        }
        linears.extend([&mut self.transform, &mut self.decoder]);
        linears
    }
}

impl<B: Backend> BlipTextDecoder<B> {
    fn new_cache(&self, be: &B, image_embeds: &B::Tensor) -> std::result::Result<BlipCache<B>, B::Error> {
        let cross = self.layers.iter().map(|l| l.crossattention.keys_values(be, image_embeds)).collect::<std::result::Result<_, _>>()?;
        Ok(BlipCache { self_attn: (0..self.layers.len()).map(|_| be.new_kv_cache(self.max_positions)).collect(), cross })
    }

    /// Logits [rows, vocab] of the last of `ids` (`rows` sequences of T, after the positions in
    /// `cache`).
    fn forward(&self, be: &B, ids: &[u32], rows: usize, cache: &mut BlipCache<B>) -> std::result::Result<B::Tensor, B::Error> {
        let t = ids.len().checked_div(rows).unwrap_or(0);
        let past = cache.self_attn.first().map_or(0, |c| be.kv_cache_len(c));
        let fail = |m: String| Err(candle_core::Error::Msg(m).into());
        if t == 0 || t * rows != ids.len() {
            return fail(format!("{} ids for {rows} rows", ids.len()));
        }
        if past + t > self.max_positions {
            return fail(format!("{} positions exceed max_position_embeddings {}", past + t, self.max_positions));
        }
        let positions: Vec<u32> = (past..past + t).map(|p| p as u32).collect();
        let embeds = be.add(&be.embed(&self.word_embeddings, ids, rows)?, &be.embed(&self.position_embeddings, &positions, 1)?)?;
        let mut xs = be.layer_norm(&embeds, &self.embeddings_norm)?;
        for ((layer, kv), cross) in self.layers.iter().zip(cache.self_attn.iter_mut()).zip(&cache.cross) {
            xs = layer.attention.forward_self(be, &xs, kv, self.head_dim)?;
            xs = layer.crossattention.forward_cross(be, &xs, cross, self.head_dim)?;
            let inner = be.linear(&xs, &layer.intermediate, Some(&layer.act))?;
            xs = be.layer_norm(&be.add(&be.linear(&inner, &layer.output, None)?, &xs)?, &layer.output_norm)?;
        }
        let hidden = be.layer_norm(&be.linear(&be.last_position(&xs)?, &self.transform, Some(&self.act))?, &self.transform_norm)?;
        be.linear(&hidden, &self.decoder, None)
    }
}

#[derive(Debug, Clone)]
pub struct Blip {
    vision: BlipVisionModel,
    text: BlipTextDecoder,
    config: BlipConfig,
}

impl Blip {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            vision: BlipVisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text: BlipTextDecoder::new(&cfg.text_config, vb.clone())?,
            config: cfg.clone(),
        })
    }

    /// The vision model (what `to_backend` moves to the GPU).
    pub fn vision(&self) -> &BlipVisionModel {
        &self.vision
    }

    /// The image states [B, 1 + patches, vision hidden] (`vision_model(...)[0]`).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixel_values)
    }
}

pub const FAMILY: Family = Family { model_type: "blip", decoder_section: "text_config", rename: same_name, config: builder, training: None };

fn same_name(name: &str) -> String {
    name.to_string()
}

fn builder(config: &serde_json::Value) -> std::result::Result<Builder, String> {
    let cfg = BlipConfig::from_json(config)?;
    Ok(Box::new(move |vb| Ok(Box::new(Blip::new(&cfg, vb)?) as Box<dyn Architecture>)))
}

/// Each row's caches and the ids it feeds next (the prompt, then one token), where `B` computes.
struct BlipState<B: Backend = Cpu> {
    be: Arc<B>,
    cache: BlipCache<B>,
    next: Vec<Vec<u32>>,
}

impl<B: Backend + Send + 'static> BlipState<B> {
    fn start(
        be: &Arc<B>,
        text: &BlipTextDecoder<B>,
        image_embeds: &B::Tensor,
        rows: usize,
        input_ids: &[u32],
    ) -> std::result::Result<Self, B::Error> {
        Ok(BlipState { be: be.clone(), cache: text.new_cache(be, image_embeds)?, next: vec![input_ids.to_vec(); rows] })
    }

    fn next_logits(&mut self, text: &BlipTextDecoder<B>) -> std::result::Result<B::Tensor, B::Error> {
        let flat: Vec<u32> = self.next.iter().flatten().copied().collect();
        text.forward(&*self.be, &flat, self.next.len(), &mut self.cache)
    }
}

impl<B: Backend + Send + 'static> DecodeState for BlipState<B> {
    fn select(&self, rows: &[usize]) -> Result<Box<dyn DecodeState>> {
        let next = rows.iter().map(|&r| self.next.get(r).cloned().unwrap_or_default()).collect();
        let cache = self.cache.select(&*self.be, rows).map_err(IntoCandle::into_candle)?;
        Ok(Box::new(Self { be: self.be.clone(), cache, next }))
    }
    fn feed(&mut self, tokens: Vec<u32>) {
        self.next = tokens.into_iter().map(|t| vec![t]).collect();
    }
    fn cache_bytes(&self) -> usize {
        self.be.cached_bytes(&self.cache.self_attn, &self.cache.cross)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// BLIP's text decoder on a GPU.
#[cfg(feature = "webgpu")]
struct GpuBlipDecoding {
    gpu: Arc<crate::gpu::Gpu>,
    text: BlipTextDecoder<crate::gpu::Gpu>,
}

#[cfg(feature = "webgpu")]
impl crate::architecture::GpuDecoder for GpuBlipDecoding {
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> crate::Result<Box<dyn DecodeState>> {
        let rows = conditioning.dim(0)?;
        Ok(Box::new(BlipState::start(&self.gpu, &self.text, &self.gpu.tensor_from(&conditioning)?, rows, input_ids)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> crate::Result<crate::gpu::GpuTensor> {
        state_of::<BlipState<crate::gpu::Gpu>>(state)?.next_logits(&self.text)
    }
}

impl Architecture for Blip {
    fn image_shape(&self) -> [usize; 3] {
        let v = &self.config.vision_config;
        [3, v.image_size, v.image_size]
    }

    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_embeds(pixel_values)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_encoder(&self, gpu: &crate::gpu::Gpu) -> crate::Result<crate::gpu::GpuEncoder> {
        let vision = self.vision.to_backend(gpu)?;
        Ok(Box::new(move |gpu, pixel_values| vision.forward_on(gpu, pixel_values)))
    }

    /// No prompt: the BOS token. A prompt: its ids as the tokenizer makes them, BOS in place of
    /// the first (`[CLS]`) and the last (`[SEP]`) dropped — what `generate()` feeds the decoder.
    fn input_ids(&self, inputs: &PromptInputs<'_>) -> crate::Result<Vec<u32>> {
        inputs.refuse_messages("blip")?;
        let bos = self.config.text_config.bos_token_id;
        let Some(prompt) = inputs.prompt else { return Ok(vec![bos]) };
        let mut ids = inputs.tokenizer.encode(prompt, true)?;
        if ids.len() < 2 {
            return Err(crate::Error::Generation(format!(
                "the prompt {prompt:?} makes {} ids; BLIP's tokenizer wraps it in [CLS] … [SEP]",
                ids.len()
            )));
        }
        ids[0] = bos;
        ids.pop();
        Ok(ids)
    }

    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> Result<Box<dyn DecodeState>> {
        let rows = conditioning.dim(0)?;
        Ok(Box::new(BlipState::start(&Arc::new(Cpu), &self.text, &conditioning, rows, input_ids)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> Result<Tensor> {
        state_of::<BlipState>(state)?.next_logits(&self.text)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_decoder(&self, gpu: &Arc<crate::gpu::Gpu>) -> crate::Result<Option<Box<dyn crate::architecture::GpuDecoder>>> {
        Ok(Some(Box::new(GpuBlipDecoding { gpu: gpu.clone(), text: self.text.to_backend(&**gpu)? })))
    }

    fn max_positions(&self) -> usize {
        self.config.text_config.max_position_embeddings
    }

    fn default_max_new_tokens(&self) -> usize {
        20
    }

    /// `generate()` stops BLIP at `sep_token_id`, whatever the files' `eos_token_id`.
    fn eos_token_ids(&self) -> Option<Vec<u32>> {
        Some(vec![self.config.text_config.sep_token_id])
    }

    /// The prompt after BOS is part of the caption's text, as `processor.decode(generate(...))` gives it.
    fn text_prefix(&self, input_ids: &[u32]) -> Vec<u32> {
        input_ids.get(1..).unwrap_or_default().to_vec()
    }

    fn quantize_decoder(&mut self, dtype: GgmlDType) -> Result<(usize, usize)> {
        quantize_each(self.text.linears_mut(), dtype)
    }

    fn encoder_side_linears(&mut self) -> Vec<&mut Linear> {
        self.vision.linears_mut().collect()
    }

    fn synthetic_input_ids(&self, _: &GenerationDefaults, _: usize, _: usize) -> Vec<u32> {
        vec![self.config.text_config.bos_token_id]
    }

    /// The decoder's matrices and head; not the embeddings (one row each) nor the cross-attention
    /// keys and values (once per image).
    fn decode_step_reads(&self, name: &str) -> bool {
        name.starts_with("text_decoder.")
            && !name.contains(".embeddings.")
            && !name.contains("crossattention.self.key")
            && !name.contains("crossattention.self.value")
    }

    fn train_logits(&self, _: &Tensor, _: &[Vec<u32>]) -> Result<Tensor> {
        candle_core::bail!("the trainer does not train BLIP yet")
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
