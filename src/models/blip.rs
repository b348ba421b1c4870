//! 🤗 `BlipForConditionalGeneration` (transformers `modeling_blip.py`, `modeling_blip_text.py`):
//! the vision model (class token, patch embedding, pre-norm layers with one `qkv` matrix,
//! `post_layernorm`) and the BERT-style text decoder (`BlipTextLMHeadModel`: word + position
//! embeddings with LayerNorm; post-norm layers of causal self-attention, cross-attention to the
//! image states and the feed-forward; the prediction head's transform and decoder). Decoding starts
//! from the BOS (`[DEC]`) token, or from a prompt's ids with BOS in place of `[CLS]` and the last
//! `[SEP]` dropped, as `generate()` does, and stops at `sep_token_id`.

use std::any::Any;

use candle_core::quantized::GgmlDType;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Activation, VarBuilder};

use crate::architecture::{state_of, Architecture, Builder, DecodeState, Family, PromptInputs};
use crate::loading::GenerationDefaults;

use super::attention;
use super::backend::{Backend, Cpu};
use super::embedding::{embedding, Embedding};
use super::encoder_layer::{ClassTokenEmbeddings, EncoderLayer, LayerNames, LayerShape, PatchEmbedding};
use super::linear::{linear_b, Linear};
use super::norm::{layer_norm, LayerNorm};

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
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
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

    /// Keys and values of `xs`, [B, heads, T, d].
    fn keys_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let split = |t: Tensor| attention::split_heads(&t, self.heads);
        Ok((split(self.key.forward(xs)?)?, split(self.value.forward(xs)?)?))
    }

    /// LayerNorm(dense(attention of `xs` to `k`, `v`) + `xs`).
    fn forward(&self, xs: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = attention::split_heads(&self.query.forward(xs)?, self.heads)?;
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let ctx = attention::merge_heads(&attention::scaled_dot_product(&q, k, v, scale, mask)?)?;
        self.norm.forward(&(self.dense.forward(&ctx)? + xs)?)
    }
}

#[derive(Debug, Clone)]
struct TextLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
}

/// The decoder's caches: each layer's self-attention K/V, and the image's cross-attention K/V
/// (computed once per image).
struct BlipCache {
    self_attn: Vec<KvCache>,
    cross: Vec<(Tensor, Tensor)>,
}

impl BlipCache {
    fn select(&self, rows: &[usize]) -> Result<Self> {
        let index = attention::row_index(rows, &candle_core::Device::Cpu)?;
        let self_attn = self.self_attn.iter().map(|c| attention::select_kv(c, &index)).collect::<Result<_>>()?;
        let cross = self.cross.iter().map(|(k, v)| Ok((k.index_select(&index, 0)?, v.index_select(&index, 0)?))).collect::<Result<_>>()?;
        Ok(Self { self_attn, cross })
    }
}

#[derive(Debug, Clone)]
pub struct Blip {
    vision: BlipVisionModel,
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<TextLayer>,
    transform: Linear,
    transform_norm: LayerNorm,
    decoder: Linear,
    config: BlipConfig,
}

impl Blip {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let t = &cfg.text_config;
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
        let decoder = decoder.with_bias(Some(bias));
        Ok(Self {
            vision: BlipVisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            word_embeddings,
            position_embeddings: embedding(t.max_position_embeddings, h, e.pp("position_embeddings"))?,
            embeddings_norm: layer_norm(h, t.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
            transform: linear_b(h, h, true, p.pp("transform.dense"))?,
            transform_norm: layer_norm(h, t.layer_norm_eps, p.pp("transform.LayerNorm"))?,
            decoder,
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

    fn new_cache(&self, image_embeds: &Tensor) -> Result<BlipCache> {
        let cross = self.layers.iter().map(|l| l.crossattention.keys_values(image_embeds)).collect::<Result<_>>()?;
        let chunk = self.config.text_config.max_position_embeddings.min(attention::CACHE_CHUNK);
        Ok(BlipCache { self_attn: (0..self.layers.len()).map(|_| KvCache::new(2, chunk)).collect(), cross })
    }

    /// Logits [B, vocab] of the last of `ids` ([B, T], after the positions in `cache`).
    fn forward(&self, ids: &Tensor, cache: &mut BlipCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let past = cache.self_attn.first().map(|c| c.current_seq_len()).unwrap_or(0);
        if past + t > self.config.text_config.max_position_embeddings {
            candle_core::bail!("{} positions exceed max_position_embeddings {}", past + t, self.config.text_config.max_position_embeddings);
        }
        let positions = Tensor::arange(past as u32, (past + t) as u32, ids.device())?;
        let embeds = self.word_embeddings.forward(ids)?.broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        let mut xs = self.embeddings_norm.forward(&embeds)?;
        let mask = if t > 1 { Some(attention::causal_mask(t, past, ids.device())?) } else { None };
        for ((layer, kv), (ck, cv)) in self.layers.iter().zip(cache.self_attn.iter_mut()).zip(&cache.cross) {
            let (k, v) = layer.attention.keys_values(&xs)?;
            let (k, v) = attention::append_kv(Some(kv), &k, &v)?;
            xs = layer.attention.forward(&xs, &k, &v, mask.as_ref())?;
            xs = layer.crossattention.forward(&xs, ck, cv, None)?;
            let inner = layer.intermediate.forward_activated(&xs, &layer.act)?;
            xs = layer.output_norm.forward(&(layer.output.forward(&inner)? + &xs)?)?;
        }
        let last = xs.narrow(1, t - 1, 1)?.squeeze(1)?;
        let act = self.config.text_config.hidden_act;
        let hidden = self.transform_norm.forward(&self.transform.forward_activated(&last, &act)?)?;
        self.decoder.forward(&hidden)
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

/// Each row's caches and the ids it feeds next (the prompt, then one token).
struct BlipState {
    cache: BlipCache,
    next: Vec<Vec<u32>>,
}

impl DecodeState for BlipState {
    fn select(&self, rows: &[usize]) -> Result<Box<dyn DecodeState>> {
        let next = rows.iter().map(|&r| self.next.get(r).cloned().unwrap_or_default()).collect();
        Ok(Box::new(Self { cache: self.cache.select(rows)?, next }))
    }
    fn feed(&mut self, tokens: Vec<u32>) {
        self.next = tokens.into_iter().map(|t| vec![t]).collect();
    }
    fn cache_bytes(&self) -> usize {
        super::attention::cached_bytes(&self.cache.self_attn, &self.cache.cross)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
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
        Ok(Box::new(BlipState { cache: self.new_cache(&conditioning)?, next: vec![input_ids.to_vec(); rows] }))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> Result<Tensor> {
        let state = state_of::<BlipState>(state)?;
        let flat: Vec<u32> = state.next.iter().flatten().copied().collect();
        let (rows, t) = (state.next.len(), state.next.first().map_or(0, Vec::len));
        if flat.len() != rows * t {
            candle_core::bail!("rows feed different numbers of ids");
        }
        let ids = Tensor::from_vec(flat, (rows, t), &candle_core::Device::Cpu)?;
        self.forward(&ids, &mut state.cache)
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
        let mut linears: Vec<&mut Linear> = Vec::new();
        for layer in &mut self.layers {
            for a in [&mut layer.attention, &mut layer.crossattention] {
                linears.extend([&mut a.query, &mut a.key, &mut a.value, &mut a.dense]);
            }
            linears.extend([&mut layer.intermediate, &mut layer.output]);
        }
        linears.extend([&mut self.transform, &mut self.decoder]);
        let mut done = (0, 0);
        for linear in linears {
            if linear.quantize(dtype)? {
                done.0 += 1;
            } else {
                done.1 += 1;
            }
        }
        Ok(done)
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
