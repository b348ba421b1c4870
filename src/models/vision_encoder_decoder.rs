//! 🤗 `VisionEncoderDecoderModel`, as transformers `modeling_vision_encoder_decoder.py`:
//! `encoder.*` (any image encoder of [`ENCODERS`], chosen by `encoder.model_type`), an optional
//! `enc_to_dec_proj` (when the hidden sizes differ) and a GPT-2 `decoder.*`.

use std::any::Any;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::architecture::{
    id_in, pick_rows, set_ids, special_id, state_of, unsupported, Architecture, Builder, DecodeState, Family, Layout, PromptInputs, SpecialTokens,
    TrainParts, Training,
};
use crate::loading::GenerationDefaults;

use super::backend::{Backend, Cpu, IntoCandle};
use super::gpt2::{Gpt2Cache, Gpt2Config, Gpt2LMHeadModel};
use super::linear::{linear, Linear};
use super::siglip::SiglipVisionTransformer;
use super::vit::ViTModel;

/// The image encoders a VisionEncoderDecoder can hold, by `encoder.model_type`. A new encoder
/// is a file under `src/models/` implementing [`EncoderModel`] and one line here.
pub const ENCODERS: &[EncoderFamily] = &[family::<SiglipVisionTransformer>("siglip_vision_model"), family::<ViTModel>("vit")];

/// What a VisionEncoderDecoder asks of its encoder once built.
pub trait ImageEncoder: std::fmt::Debug + Send + Sync {
    /// `last_hidden_state` [B, tokens, hidden] for pixel values [B, C, H, W].
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor>;
    /// Every matrix of the encoder (what packing, quantizing and counting visit).
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    fn clone_box(&self) -> Box<dyn ImageEncoder>;
    /// The encoder uploaded to `gpu`: `forward` there.
    #[cfg(feature = "webgpu")]
    fn to_gpu(&self, gpu: &crate::gpu::Gpu) -> crate::Result<crate::gpu::GpuEncoder>;
}

impl Clone for Box<dyn ImageEncoder> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// An encoder as built from its `config.json` section.
pub trait EncoderModel: ImageEncoder + Clone + Sized + 'static {
    type Config: DeserializeOwned;
    fn new(cfg: &Self::Config, vb: VarBuilder) -> Result<Self>;
    /// Checks the config and reports what the wrapper needs before any tensor is read.
    fn spec(cfg: &Self::Config) -> std::result::Result<EncoderSpec, String>;
}

/// The seam for a tower that has `new(&Config, VarBuilder)`, `forward`, `linears` and
/// `linears_mut` of its own, and whose config has `validate` and the usual size fields:
/// `image_encoder!(ViTModel, ViTConfig);` in the tower's file.
macro_rules! image_encoder {
    ($model:ty, $config:ty) => {
        impl $crate::models::vision_encoder_decoder::ImageEncoder for $model {
            fn forward(&self, pixel_values: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
                <$model>::forward(self, pixel_values)
            }
            fn linears(&self) -> Vec<&$crate::models::linear::Linear> {
                <$model>::linears(self).collect()
            }
            fn linears_mut(&mut self) -> Vec<&mut $crate::models::linear::Linear> {
                <$model>::linears_mut(self).collect()
            }
            fn clone_box(&self) -> Box<dyn $crate::models::vision_encoder_decoder::ImageEncoder> {
                Box::new(self.clone())
            }
            #[cfg(feature = "webgpu")]
            fn to_gpu(&self, gpu: &$crate::gpu::Gpu) -> $crate::Result<$crate::gpu::GpuEncoder> {
                let on_gpu = <$model>::to_backend(self, gpu)?;
                Ok(Box::new(move |gpu, pixel_values| on_gpu.forward_on(gpu, pixel_values)))
            }
        }

        impl $crate::models::vision_encoder_decoder::EncoderModel for $model {
            type Config = $config;
            fn new(cfg: &$config, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
                <$model>::new(cfg, vb)
            }
            fn spec(cfg: &$config) -> std::result::Result<$crate::models::vision_encoder_decoder::EncoderSpec, String> {
                cfg.validate()?;
                Ok($crate::models::vision_encoder_decoder::EncoderSpec {
                    hidden_size: cfg.hidden_size,
                    num_channels: cfg.num_channels,
                    image_size: cfg.image_size,
                    num_hidden_layers: cfg.num_hidden_layers,
                })
            }
        }
    };
}
pub(crate) use image_encoder;

/// The sizes the wrapper and the captioner need of an encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSpec {
    pub hidden_size: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub num_hidden_layers: usize,
}

/// One registry entry: how to read an encoder's config and build it.
pub struct EncoderFamily {
    pub model_type: &'static str,
    spec: fn(&serde_json::Value) -> std::result::Result<EncoderSpec, String>,
    build: fn(&serde_json::Value, VarBuilder) -> Result<Box<dyn ImageEncoder>>,
}

const fn family<M: EncoderModel>(model_type: &'static str) -> EncoderFamily {
    EncoderFamily { model_type, spec: spec_of::<M>, build: build_boxed::<M> }
}

fn spec_of<M: EncoderModel>(section: &serde_json::Value) -> std::result::Result<EncoderSpec, String> {
    M::spec(&serde_json::from_value(section.clone()).map_err(|e| e.to_string())?)
}

fn build_boxed<M: EncoderModel>(section: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn ImageEncoder>> {
    let cfg: M::Config = serde_json::from_value(section.clone()).map_err(candle_core::Error::wrap)?;
    Ok(Box::new(M::new(&cfg, vb)?))
}

/// `VisionEncoderDecoderConfig` (`config.json` with `model_type: "vision-encoder-decoder"`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionEncoderDecoderConfig {
    /// The `encoder` section as written, and its family in [`ENCODERS`].
    pub encoder_json: serde_json::Value,
    pub encoder_type: &'static str,
    pub encoder: EncoderSpec,
    pub decoder: Gpt2Config,
}

impl VisionEncoderDecoderConfig {
    /// Parses `config.json`, refusing an encoder or decoder type we do not implement by name
    /// (and listing the ones we do) instead of failing on its first tensor.
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = |section: &str| value.get(section).and_then(|s| s.get("model_type")).and_then(|t| t.as_str());
        let encoder_type = model_type("encoder");
        let family = ENCODERS
            .iter()
            .find(|f| Some(f.model_type) == encoder_type)
            .ok_or_else(|| unsupported("encoder.model_type", encoder_type, ENCODERS.iter().map(|f| f.model_type)))?;
        match model_type("decoder") {
            Some("gpt2") => {}
            other => return Err(unsupported("decoder.model_type", other, ["gpt2"].into_iter())),
        }
        if value.get("decoder").and_then(|d| d.get("cross_attention_hidden_size")).is_some_and(|v| !v.is_null()) {
            return Err("decoder.cross_attention_hidden_size is not supported by GPT-2".into());
        }
        let encoder_json = value.get("encoder").cloned().unwrap_or_default();
        let encoder = (family.spec)(&encoder_json).map_err(|e| format!("encoder: {e}"))?;
        let decoder: Gpt2Config = serde_json::from_value(value.get("decoder").cloned().unwrap_or_default()).map_err(|e| format!("decoder: {e}"))?;
        decoder.validate().map_err(|e| format!("decoder: {e}"))?;
        if !decoder.add_cross_attention {
            return Err("decoder.add_cross_attention must be true for a VisionEncoderDecoder".into());
        }
        Ok(Self { encoder_json, encoder_type: family.model_type, encoder, decoder })
    }

    pub fn has_projection(&self) -> bool {
        self.encoder.hidden_size != self.decoder.n_embd
    }
}

#[derive(Debug, Clone)]
pub struct VisionEncoderDecoder {
    encoder: Box<dyn ImageEncoder>,
    enc_to_dec_proj: Option<Linear>,
    decoder: Gpt2LMHeadModel,
    config: VisionEncoderDecoderConfig,
}

impl VisionEncoderDecoder {
    pub fn new(cfg: &VisionEncoderDecoderConfig, vb: VarBuilder) -> Result<Self> {
        let family = ENCODERS
            .iter()
            .find(|f| f.model_type == cfg.encoder_type)
            .ok_or_else(|| candle_core::Error::Msg(format!("encoder {} is not registered", cfg.encoder_type)))?;
        let encoder = (family.build)(&cfg.encoder_json, vb.pp("encoder"))?;
        let enc_to_dec_proj =
            if cfg.has_projection() { Some(linear(cfg.encoder.hidden_size, cfg.decoder.n_embd, vb.pp("enc_to_dec_proj"))?) } else { None };
        let decoder = Gpt2LMHeadModel::new(&cfg.decoder, vb.pp("decoder"))?;
        Ok(Self { encoder, enc_to_dec_proj, decoder, config: cfg.clone() })
    }

    pub fn config(&self) -> &VisionEncoderDecoderConfig {
        &self.config
    }

    /// How many of the encoder's matrices are packed for the WASM GEMM kernel.
    pub fn packed_encoder_matrices(&self) -> usize {
        self.encoder.linears().into_iter().filter(|l| l.is_packed()).count()
    }

    pub fn decoder_mut(&mut self) -> &mut Gpt2LMHeadModel {
        &mut self.decoder
    }

    pub fn decoder(&self) -> &Gpt2LMHeadModel {
        &self.decoder
    }

    /// The encoder's `last_hidden_state` for pixel values [B, 3, H, W].
    pub fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.encoder.forward(pixel_values)
    }

    fn project(&self, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        match &self.enc_to_dec_proj {
            Some(proj) => proj.forward(encoder_hidden_states),
            None => Ok(encoder_hidden_states.clone()),
        }
    }
}

/// Decoding of every row of `states` [B, N, hidden] (`rows` of them) from `input_ids`' last
/// (the start token), where `be` computes: projected once, cross-attention K/V once.
fn start_on<B: Backend>(
    be: &Arc<B>,
    enc_to_dec_proj: Option<&B::Linear>,
    decoder: &Gpt2LMHeadModel<B>,
    states: &B::Tensor,
    rows: usize,
    input_ids: &[u32],
) -> std::result::Result<CrossAttentionState<B>, B::Error> {
    let states = match enc_to_dec_proj {
        Some(proj) => be.linear(states, proj, None)?,
        None => states.clone(),
    };
    let cache = decoder.new_cache(be, Some(decoder.cross_attention_cache(be, &states)?), rows);
    let start = input_ids.last().copied().unwrap_or_default();
    Ok(CrossAttentionState { be: be.clone(), cache, next_input: vec![start; rows] })
}

/// Logits [rows, vocab] of every row's next position.
fn next_logits_on<B: Backend + Send + 'static>(
    decoder: &Gpt2LMHeadModel<B>,
    state: &mut dyn DecodeState,
) -> std::result::Result<B::Tensor, B::Error> {
    let state = state_of::<CrossAttentionState<B>>(state)?;
    decoder.next_logits(&*state.be, &state.next_input, state.next_input.len(), &mut state.cache)
}

/// The decoder side on a GPU: the projection into the decoder's width and GPT-2.
#[cfg(feature = "webgpu")]
struct GpuDecoding {
    gpu: Arc<crate::gpu::Gpu>,
    enc_to_dec_proj: Option<crate::gpu::GpuLinear>,
    decoder: Gpt2LMHeadModel<crate::gpu::Gpu>,
}

#[cfg(feature = "webgpu")]
impl crate::architecture::GpuDecoder for GpuDecoding {
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> crate::Result<Box<dyn DecodeState>> {
        let rows = conditioning.dim(0)?;
        let states = self.gpu.tensor_from(&conditioning)?;
        Ok(Box::new(start_on(&self.gpu, self.enc_to_dec_proj.as_ref(), &self.decoder, &states, rows, input_ids)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> crate::Result<crate::gpu::GpuTensor> {
        next_logits_on(&self.decoder, state)
    }
}

// The captioner's seam (crate::architecture): decoding starts from `decoder_start_token_id`; the
// image is attended to through cross-attention keys/values computed once per image.

pub const FAMILY: Family = Family {
    model_type: "vision-encoder-decoder",
    decoder_section: "decoder",
    rename: crate::loading::vision_encoder_decoder_key,
    config: builder,
    training: Some(&Recipe),
};

fn builder(config: &serde_json::Value) -> std::result::Result<Builder, String> {
    let cfg = VisionEncoderDecoderConfig::from_json(config)?;
    Ok(Box::new(move |vb| Ok(Box::new(VisionEncoderDecoder::new(&cfg, vb)?) as Box<dyn Architecture>)))
}

/// The cache and each row's next decoder input (the start token first).
struct CrossAttentionState<B: Backend = Cpu> {
    be: Arc<B>,
    cache: Gpt2Cache<B>,
    next_input: Vec<u32>,
}

impl<B: Backend + Send + 'static> DecodeState for CrossAttentionState<B> {
    fn select(&self, rows: &[usize]) -> Result<Box<dyn DecodeState>> {
        let cache = self.cache.select(&*self.be, rows).map_err(IntoCandle::into_candle)?;
        Ok(Box::new(Self { be: self.be.clone(), cache, next_input: pick_rows(&self.next_input, rows) }))
    }
    fn feed(&mut self, tokens: Vec<u32>) {
        self.next_input = tokens;
    }
    fn cache_bytes(&self) -> usize {
        self.cache.bytes(&*self.be)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Architecture for VisionEncoderDecoder {
    fn image_shape(&self) -> [usize; 3] {
        let e = &self.config.encoder;
        [e.num_channels, e.image_size, e.image_size]
    }

    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        VisionEncoderDecoder::encode(self, pixel_values)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_encoder(&self, gpu: &crate::gpu::Gpu) -> crate::Result<crate::gpu::GpuEncoder> {
        self.encoder.to_gpu(gpu)
    }

    fn input_ids(&self, inputs: &PromptInputs<'_>) -> crate::Result<Vec<u32>> {
        inputs.refuse_messages("a vision-encoder-decoder")?;
        if inputs.prompt.is_some() {
            return Err(crate::Error::Generation(
                "a text prompt needs a prefix model (llava); a vision-encoder-decoder starts from its start token".into(),
            ));
        }
        match inputs.generation.decoder_start_token_id {
            Some(start) => Ok(vec![start]),
            None => Err(crate::Error::config(crate::loading::CONFIG, "no decoder_start_token_id or bos_token_id to start decoding from")),
        }
    }

    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> Result<Box<dyn DecodeState>> {
        let rows = conditioning.dim(0)?;
        Ok(Box::new(start_on(&Arc::new(Cpu), self.enc_to_dec_proj.as_ref(), &self.decoder, &conditioning, rows, input_ids)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> Result<Tensor> {
        next_logits_on(&self.decoder, state)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_decoder(&self, gpu: &Arc<crate::gpu::Gpu>) -> crate::Result<Option<Box<dyn crate::architecture::GpuDecoder>>> {
        let enc_to_dec_proj = self.enc_to_dec_proj.as_ref().map(|p| gpu.linear_from(p)).transpose()?;
        Ok(Some(Box::new(GpuDecoding { gpu: gpu.clone(), enc_to_dec_proj, decoder: self.decoder.to_backend(&**gpu)? })))
    }

    fn max_positions(&self) -> usize {
        self.decoder.config().n_positions
    }

    /// transformers' default `max_length` of 20 counts the start token.
    fn default_max_new_tokens(&self) -> usize {
        19
    }

    fn quantize_decoder(&mut self, dtype: GgmlDType) -> Result<(usize, usize)> {
        self.decoder.quantize(dtype)
    }

    /// The encoder, `enc_to_dec_proj` and the decoder's cross-attention keys/values.
    fn encoder_side_linears(&mut self) -> Vec<&mut Linear> {
        let mut linears = self.encoder.linears_mut();
        linears.extend(self.enc_to_dec_proj.as_mut());
        linears.extend(self.decoder.cross_attention_kv_linears());
        linears
    }

    fn synthetic_input_ids(&self, generation: &GenerationDefaults, _: usize, _: usize) -> Vec<u32> {
        vec![generation.decoder_start_token_id.unwrap_or_default()]
    }

    /// Token embeddings only as a tied LM head; position embeddings one row at a time;
    /// cross-attention keys/values once per image.
    fn decode_step_reads(&self, name: &str) -> bool {
        let tied = self.decoder.config().tie_word_embeddings;
        name.starts_with("decoder.")
            && !name.contains("crossattention.c_attn")
            && !name.ends_with("wpe.weight")
            && (tied || !name.ends_with("wte.weight"))
    }

    /// Logits for `decoder_input_ids` attending to the encoder's output (before `enc_to_dec_proj`).
    fn train_logits(&self, encoder_hidden_states: &Tensor, input_ids: &[Vec<u32>]) -> Result<Tensor> {
        let t = input_ids.first().map_or(0, Vec::len);
        let ids = Tensor::from_vec(input_ids.concat(), (input_ids.len(), t), encoder_hidden_states.device())?;
        self.decoder.forward_train(&ids, &self.project(encoder_hidden_states)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Training (crate::architecture::Training): a SigLIP encoder and a GPT-2 decoder that gains
/// cross-attention; the decoder (and projection) always train, the encoder on request.
struct Recipe;

impl Training for Recipe {
    fn arch(&self) -> &'static str {
        "cross-attention"
    }

    fn compose(&self, vision: serde_json::Value, mut text: serde_json::Value) -> std::result::Result<serde_json::Value, String> {
        let text_type = text.get("model_type").and_then(|t| t.as_str()).unwrap_or_default();
        if text_type != "gpt2" {
            return Err(format!("--arch cross-attention needs a GPT-2 decoder, found model_type {text_type:?}"));
        }
        text["add_cross_attention"] = true.into();
        text["is_decoder"] = true.into();
        Ok(serde_json::json!({
            "model_type": "vision-encoder-decoder",
            "architectures": ["VisionEncoderDecoderModel"],
            "encoder": vision,
            "decoder": text,
            "tie_word_embeddings": false,
        }))
    }

    fn encoder_prefix(&self) -> &'static str {
        "encoder."
    }

    fn decoder_tensor(&self, name: &str) -> String {
        let name = name.strip_prefix("transformer.").unwrap_or(name);
        if name.starts_with("lm_head.") {
            format!("decoder.{name}")
        } else {
            format!("decoder.transformer.{name}")
        }
    }

    fn vision_config(&self, config: &serde_json::Value) -> serde_json::Value {
        config.get("encoder").cloned().unwrap_or_default()
    }

    fn special_tokens(&self, config: &mut serde_json::Value, tokenizer: &mut tokenizers::Tokenizer) -> crate::Result<SpecialTokens> {
        let eos = special_id(tokenizer, &["<eos>", "<|endoftext|>", "</s>"]).or_else(|| config.get("decoder").and_then(|d| id_in(d, "eos_token_id")));
        let eos =
            eos.ok_or_else(|| crate::Error::Tokenizer("no end-of-sequence token (<eos>, <|endoftext|> or </s>) in the tokenizer or config".into()))?;
        let start = special_id(tokenizer, &["<bos>"])
            .or_else(|| id_in(config, "decoder_start_token_id"))
            .or_else(|| config.get("decoder").and_then(|d| id_in(d, "bos_token_id")))
            .unwrap_or(eos);
        let pad = special_id(tokenizer, &["<pad>"]).unwrap_or(eos);
        set_ids(config, &[("decoder_start_token_id", start), ("eos_token_id", eos), ("pad_token_id", pad)]);
        if let Some(decoder) = config.get_mut("decoder") {
            set_ids(decoder, &[("bos_token_id", start), ("eos_token_id", eos), ("pad_token_id", pad)]);
        }
        Ok(SpecialTokens { decoder_start: Some(start), eos, pad, image: None })
    }

    fn trainable(&self, name: &str, parts: TrainParts) -> bool {
        name.starts_with("decoder.") || name.starts_with("enc_to_dec_proj.") || (parts.encoder && name.starts_with("encoder."))
    }

    /// A pretrained GPT-2 has no cross-attention yet; a folder pair has no projection.
    fn fresh_in_pair(&self, name: &str) -> bool {
        name.contains(".crossattention.") || name.contains(".ln_cross_attn.") || name.starts_with("enc_to_dec_proj.")
    }

    fn generation_config(&self, config: &serde_json::Value, specials: &SpecialTokens, max_caption_tokens: usize) -> crate::Result<serde_json::Value> {
        let positions =
            VisionEncoderDecoderConfig::from_json(config).map_err(|e| crate::Error::config(crate::loading::CONFIG, e))?.decoder.n_positions;
        let start = specials.decoder_start.unwrap_or(specials.eos);
        Ok(serde_json::json!({
            "decoder_start_token_id": start,
            "bos_token_id": start,
            "eos_token_id": specials.eos,
            "pad_token_id": specials.pad,
            // transformers counts the start token into max_length.
            "max_length": (max_caption_tokens + 1).min(positions),
        }))
    }

    fn layout(&self) -> Layout {
        Layout::ShiftedRight
    }
}
