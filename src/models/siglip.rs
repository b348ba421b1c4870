//! SigLIP vision tower, as 🤗 transformers `modeling_siglip.py` (`SiglipVisionTransformer`).
//!
//! The `VarBuilder` handed to [`SiglipVisionTransformer::new`] points at the tower's root, where
//! `embeddings.*`, `encoder.layers.*` and `post_layernorm.*` live. transformers 4.x nests that
//! root one level deeper (`vision_model.`); `crate::loading` folds both layouts into this one.
//! The attention-pooling `head.*` is not used by a captioner (it reads every patch) and is not
//! loaded.

use candle_core::{Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::backend::{Backend, Cpu};
use super::encoder_layer::{EncoderLayer, LayerNames, LayerShape, PatchEmbedding};
use super::linear::Linear;
use super::norm::layer_norm;
use super::vision_encoder_decoder;

/// `SiglipVisionConfig` as in the `encoder` / `vision_config` section of `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct SiglipVisionConfig {
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
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
fn default_hidden_act() -> Activation {
    Activation::GeluPytorchTanh
}
fn default_layer_norm_eps() -> f64 {
    1e-6
}

impl SiglipVisionConfig {
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    /// What the loader checks before building anything, so a bad config is reported as such
    /// rather than as a tensor of surprising shape.
    pub fn validate(&self) -> std::result::Result<(), String> {
        super::encoder_layer::check_tower_sizes(self.hidden_size, self.num_attention_heads, self.image_size, self.patch_size)
    }
}

// transformers modeling_siglip.py: SiglipVisionEmbeddings
#[derive(Debug, Clone)]
struct SiglipVisionEmbeddings<B: Backend> {
    patch_embedding: PatchEmbedding<B>,
    /// `[positions, hidden]`, f32: added whole to every image.
    position_embedding: B::Tensor,
}

impl SiglipVisionEmbeddings<Cpu> {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let patch_embedding = PatchEmbedding::new(cfg.num_channels, cfg.hidden_size, cfg.patch_size, vb.pp("patch_embedding"))?;
        let position_embedding = vb.pp("position_embedding").get((cfg.num_patches(), cfg.hidden_size), "weight")?;
        Ok(Self { patch_embedding, position_embedding })
    }
}

impl<B: Backend> SiglipVisionEmbeddings<B> {
    /// [B, C, H, W] → [B, num_patches, hidden]
    fn forward(&self, be: &B, pixel_values: &Tensor) -> std::result::Result<B::Tensor, B::Error> {
        be.add(&self.patch_embedding.forward_on(be, pixel_values)?, &self.position_embedding)
    }
}

// transformers modeling_siglip.py: SiglipEncoderLayer (pre-norm; SiglipAttention, SiglipMLP)
const LAYER_NAMES: LayerNames = LayerNames {
    fused_qkv: None,
    norm1: "layer_norm1",
    query: "self_attn.q_proj",
    key: "self_attn.k_proj",
    value: "self_attn.v_proj",
    out: "self_attn.out_proj",
    norm2: "layer_norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

impl SiglipVisionConfig {
    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act,
            qkv_bias: true,
        }
    }
}

// transformers modeling_siglip.py: SiglipVisionTransformer (without the pooling head)
#[derive(Debug, Clone)]
pub struct SiglipVisionTransformer<B: Backend = Cpu> {
    embeddings: SiglipVisionEmbeddings<B>,
    layers: Vec<EncoderLayer<B>>,
    post_layernorm: B::LayerNorm,
    config: SiglipVisionConfig,
}

impl SiglipVisionTransformer {
    pub fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = SiglipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let vb_layers = vb.pp("encoder").pp("layers");
        let shape = cfg.layer_shape();
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&shape, &LAYER_NAMES, vb_layers.pp(i))).collect::<Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self { embeddings, layers, post_layernorm, config: cfg.clone() })
    }

    /// How many matrices are packed for the WASM GEMM kernel (`Linear::pack`).
    pub fn packed_matrices(&self) -> usize {
        self.linears().filter(|l| l.is_packed()).count()
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(EncoderLayer::linears)
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(EncoderLayer::linears_mut)
    }

    /// `hidden_states[index]` as transformers returns them with `output_hidden_states`: 0 is
    /// the embeddings, i the output of layer i — without `post_layernorm`.
    pub fn hidden_state(&self, pixel_values: &Tensor, index: usize) -> Result<Tensor> {
        self.hidden_state_on(&Cpu, pixel_values, index)
    }

    /// `last_hidden_state`: [B, num_patches, hidden], after `post_layernorm`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_on(&Cpu, pixel_values)
    }

    /// The tower with its weights where `be` computes (uploaded once).
    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<SiglipVisionTransformer<B>, B::Error> {
        Ok(SiglipVisionTransformer {
            embeddings: SiglipVisionEmbeddings {
                patch_embedding: self.embeddings.patch_embedding.to_backend(be)?,
                position_embedding: be.tensor_from(&self.embeddings.position_embedding)?,
            },
            layers: self.layers.iter().map(|l| l.to_backend(be)).collect::<std::result::Result<_, _>>()?,
            post_layernorm: be.layer_norm_from(&self.post_layernorm)?,
            config: self.config.clone(),
        })
    }
}

impl<B: Backend> SiglipVisionTransformer<B> {
    pub fn config(&self) -> &SiglipVisionConfig {
        &self.config
    }

    /// `hidden_state` on `be`.
    pub fn hidden_state_on(&self, be: &B, pixel_values: &Tensor, index: usize) -> std::result::Result<B::Tensor, B::Error> {
        if index > self.layers.len() {
            return Err(candle_core::Error::Msg(format!("hidden state {index} requested from a tower of {} layers", self.layers.len())).into());
        }
        let mut xs = self.embeddings.forward(be, pixel_values)?;
        for layer in &self.layers[..index] {
            xs = layer.forward_on(be, &xs)?;
        }
        Ok(xs)
    }

    /// `forward` on `be`: the pixels are on the CPU, the states where `be` computes.
    pub fn forward_on(&self, be: &B, pixel_values: &Tensor) -> std::result::Result<B::Tensor, B::Error> {
        be.layer_norm(&self.hidden_state_on(be, pixel_values, self.layers.len())?, &self.post_layernorm)
    }
}

// The encoder of a VisionEncoderDecoder (`encoder.model_type` "siglip_vision_model").
vision_encoder_decoder::image_encoder!(SiglipVisionTransformer, SiglipVisionConfig);
