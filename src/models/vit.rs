//! ViT, as 🤗 transformers `modeling_vit.py` (`ViTModel`): the encoder of
//! `nlpconnect/vit-gpt2-image-captioning` and most `VisionEncoderDecoderModel` captioners.
//!
//! The `VarBuilder` points at the model's root (`encoder.` inside a VisionEncoderDecoder), where
//! `embeddings.*`, `encoder.layer.*` and `layernorm.*` live. The output is `last_hidden_state`:
//! the CLS token then every patch, after `layernorm`. The pooler (`pooler.dense`, tanh of the CLS
//! token) feeds nothing a captioner reads, so it is not loaded, whether the file has it or not.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::encoder_layer::{EncoderLayer, LayerNames, LayerShape, PatchEmbedding};
use super::linear::Linear;
use super::norm::{layer_norm, LayerNorm};
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
#[derive(Debug, Clone)]
struct ViTEmbeddings {
    cls_token: Tensor,
    position_embeddings: Tensor,
    projection: PatchEmbedding,
}

impl ViTEmbeddings {
    fn new(cfg: &ViTConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            cls_token: vb.get((1, 1, d), "cls_token")?,
            position_embeddings: vb.get((1, cfg.num_patches() + 1, d), "position_embeddings")?,
            projection: PatchEmbedding::new(cfg.num_channels, d, cfg.patch_size, vb.pp("patch_embeddings").pp("projection"))?,
        })
    }

    /// [B, C, H, W] → [B, 1 + num_patches, hidden]: CLS first.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patches = self.projection.forward(pixel_values)?;
        let (b, _, d) = patches.dims3()?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)
    }
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
pub struct ViTModel {
    embeddings: ViTEmbeddings,
    layers: Vec<EncoderLayer>,
    layernorm: LayerNorm,
    config: ViTConfig,
}

impl ViTModel {
    pub fn new(cfg: &ViTConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = ViTEmbeddings::new(cfg, vb.pp("embeddings"))?;
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

    pub fn config(&self) -> &ViTConfig {
        &self.config
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(EncoderLayer::linears)
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(EncoderLayer::linears_mut)
    }

    /// `last_hidden_state`: [B, 1 + num_patches, hidden], after `layernorm`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.layernorm.forward(&xs)
    }
}

// The encoder of a VisionEncoderDecoder (`encoder.model_type` "vit").
vision_encoder_decoder::image_encoder!(ViTModel, ViTConfig);
