//! ViT, as 🤗 transformers `modeling_vit.py` (`ViTModel`): the encoder of
//! `nlpconnect/vit-gpt2-image-captioning` and most `VisionEncoderDecoderModel` captioners.
//!
//! The `VarBuilder` points at the model's root (`encoder.` inside a VisionEncoderDecoder), where
//! `embeddings.*`, `encoder.layer.*` and `layernorm.*` live. The output is `last_hidden_state`:
//! the CLS token then every patch, after `layernorm`. The pooler (`pooler.dense`, tanh of the CLS
//! token) feeds nothing a captioner reads, so it is not loaded, whether the file has it or not.

use candle_core::{Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::backend::{Backend, Cpu};
use super::encoder_layer::{ClassTokenEmbeddings, EncoderLayer, LayerNames, LayerShape, PatchEmbedding};
use super::linear::Linear;
use super::norm::layer_norm;
use super::vision_encoder_decoder;

/// `ViTConfig`, as the `encoder` section of a VisionEncoderDecoder's `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ViTConfig {
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// transformers' "gelu" is the exact (erf) GELU.
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_qkv_bias")]
    pub qkv_bias: bool,
}

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_num_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    16
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_qkv_bias() -> bool {
    true
}

impl ViTConfig {
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        super::encoder_layer::check_tower_sizes(self.hidden_size, self.num_attention_heads, self.image_size, self.patch_size)
    }
}

// transformers modeling_vit.py: ViTEmbeddings (ViTPatchEmbeddings, no mask token, positions as
// trained: pixel values must be image_size × image_size)
fn embeddings(cfg: &ViTConfig, vb: VarBuilder) -> Result<ClassTokenEmbeddings> {
    let d = cfg.hidden_size;
    Ok(ClassTokenEmbeddings::new(
        vb.get((1, 1, d), "cls_token")?,
        vb.get((1, cfg.num_patches() + 1, d), "position_embeddings")?,
        PatchEmbedding::new(cfg.num_channels, d, cfg.patch_size, vb.pp("patch_embeddings").pp("projection"))?,
    ))
}

// transformers modeling_vit.py: ViTLayer (ViTSelfAttention + ViTSelfOutput, ViTIntermediate +
// ViTOutput; layernorm_before / layernorm_after)
const LAYER_NAMES: LayerNames = LayerNames {
    fused_qkv: None,
    norm1: "layernorm_before",
    query: "attention.attention.query",
    key: "attention.attention.key",
    value: "attention.attention.value",
    out: "attention.output.dense",
    norm2: "layernorm_after",
    fc1: "intermediate.dense",
    fc2: "output.dense",
};

// transformers modeling_vit.py: ViTModel (without the pooler)
#[derive(Debug, Clone)]
pub struct ViTModel<B: Backend = Cpu> {
    embeddings: ClassTokenEmbeddings<B>,
    layers: Vec<EncoderLayer<B>>,
    layernorm: B::LayerNorm,
    config: ViTConfig,
}

impl ViTModel {
    pub fn new(cfg: &ViTConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = embeddings(cfg, vb.pp("embeddings"))?;
        let shape = LayerShape {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            hidden_act: cfg.hidden_act,
            qkv_bias: cfg.qkv_bias,
        };
        let vb_layers = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&shape, &LAYER_NAMES, vb_layers.pp(i))).collect::<Result<Vec<_>>>()?;
        let layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?;
        Ok(Self { embeddings, layers, layernorm, config: cfg.clone() })
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(EncoderLayer::linears)
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(EncoderLayer::linears_mut)
    }

    /// `last_hidden_state`: [B, 1 + num_patches, hidden], after `layernorm`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_on(&Cpu, pixel_values)
    }

    /// The model with its weights where `be` computes (uploaded once).
    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<ViTModel<B>, B::Error> {
        Ok(ViTModel {
            embeddings: self.embeddings.to_backend(be)?,
            layers: self.layers.iter().map(|l| l.to_backend(be)).collect::<std::result::Result<_, _>>()?,
            layernorm: be.layer_norm_from(&self.layernorm)?,
            config: self.config.clone(),
        })
    }
}

impl<B: Backend> ViTModel<B> {
    pub fn config(&self) -> &ViTConfig {
        &self.config
    }

    /// `forward` on `be`: the pixels are on the CPU, the states where `be` computes.
    pub fn forward_on(&self, be: &B, pixel_values: &Tensor) -> std::result::Result<B::Tensor, B::Error> {
        let mut xs = self.embeddings.forward_on(be, pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward_on(be, &xs)?;
        }
        be.layer_norm(&xs, &self.layernorm)
    }
}

// The encoder of a VisionEncoderDecoder (`encoder.model_type` "vit").
vision_encoder_decoder::image_encoder!(ViTModel, ViTConfig);
