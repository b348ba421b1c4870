//! SigLIP vision tower, as 🤗 transformers `modeling_siglip.py` (`SiglipVisionTransformer`).
//!
//! The `VarBuilder` handed to [`SiglipVisionTransformer::new`] points at the tower's root, where
//! `embeddings.*`, `encoder.layers.*` and `post_layernorm.*` live. transformers 4.x nests that
//! root one level deeper (`vision_model.`); `crate::loading` folds both layouts into this one.
//! The attention-pooling `head.*` is not used by a captioner (it reads every patch) and is not
//! loaded.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{conv2d, embedding, Activation, Conv2d, Conv2dConfig, Embedding, VarBuilder};

use super::attention;
use super::linear::{linear, Linear};
use super::norm::{layer_norm, LayerNorm};

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
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return Err(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        Ok(())
    }
}

// transformers modeling_siglip.py: SiglipVisionEmbeddings
#[derive(Debug, Clone)]
struct SiglipVisionEmbeddings {
    patch_embedding: Conv2d,
    position_embedding: Embedding,
}

impl SiglipVisionEmbeddings {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let conv_cfg = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let patch_embedding = conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, conv_cfg, vb.pp("patch_embedding"))?;
        let position_embedding = embedding(cfg.num_patches(), cfg.hidden_size, vb.pp("position_embedding"))?;
        Ok(Self { patch_embedding, position_embedding })
    }

    /// [B, C, H, W] → [B, num_patches, hidden]
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patches = self.patch_embedding.forward(pixel_values)?.flatten_from(2)?.transpose(1, 2)?;
        patches.broadcast_add(self.position_embedding.embeddings())
    }
}

// transformers modeling_siglip.py: SiglipAttention
#[derive(Debug, Clone)]
struct SiglipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl SiglipAttention {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// Keys and values of every token: [B, H, T, d] each.
    fn keys_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = attention::split_heads_view(&self.k_proj.forward(xs)?, self.num_heads)?;
        let v = attention::split_heads_view(&self.v_proj.forward(xs)?, self.num_heads)?;
        Ok((k, v))
    }

    /// The output for the tokens `xs` (all of them, or a slice of them), attending to `k`, `v`.
    fn forward(&self, xs: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = attention::split_heads_view(&self.q_proj.forward(xs)?, self.num_heads)?;
        let head_dim = q.dim(D::Minus1)?;
        let out = attention::scaled_dot_product(&q, k, v, 1.0 / (head_dim as f64).sqrt(), None)?;
        self.out_proj.forward(&attention::merge_heads(&out)?)
    }
}

// transformers modeling_siglip.py: SiglipMLP
#[derive(Debug, Clone)]
struct SiglipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl SiglipMlp {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_activated(xs, &self.act)?)
    }
}

const MIN_TOKENS_PER_THREAD: usize = 16;

// transformers modeling_siglip.py: SiglipEncoderLayer (pre-norm)
#[derive(Debug, Clone)]
struct SiglipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SiglipAttention,
    layer_norm2: LayerNorm,
    mlp: SiglipMlp,
}

impl SiglipEncoderLayer {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layer_norm1: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SiglipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: SiglipMlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        use crate::parallel;
        // All but attention's mixing is per token, so the tokens are split over the threads
        // (crate::parallel; one part — all tokens — without threads): the norm and the keys and
        // values first, then, with every token's keys and values at hand, the rest of the layer.
        let tokens = xs.dim(1)?;
        let parts = parallel::map_parts(tokens, MIN_TOKENS_PER_THREAD, |r| {
            let normed = self.layer_norm1.forward(&xs.narrow(1, r.start, r.len())?)?;
            let (k, v) = self.self_attn.keys_values(&normed)?;
            Ok((normed, k, v))
        })?;
        let (mut normed, mut k, mut v) = (vec![], vec![], vec![]);
        for (n, kp, vp) in parts {
            normed.push(n);
            k.push(kp);
            v.push(vp);
        }
        // keys and values are [B, H, T, d]: tokens on dimension 2.
        let (normed, k, v) = (parallel::cat(normed, 1)?, parallel::cat(k, 2)?, parallel::cat(v, 2)?);
        parallel::concat_parts(tokens, 1, MIN_TOKENS_PER_THREAD, |r| {
            let (xs, normed) = (xs.narrow(1, r.start, r.len())?, normed.narrow(1, r.start, r.len())?);
            let xs = (xs + self.self_attn.forward(&normed, &k, &v)?)?;
            &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
        })
    }
}

// transformers modeling_siglip.py: SiglipVisionTransformer (without the pooling head)
#[derive(Debug, Clone)]
pub struct SiglipVisionTransformer {
    embeddings: SiglipVisionEmbeddings,
    layers: Vec<SiglipEncoderLayer>,
    post_layernorm: LayerNorm,
    config: SiglipVisionConfig,
}

impl SiglipVisionTransformer {
    pub fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = SiglipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let vb_layers = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers).map(|i| SiglipEncoderLayer::new(cfg, vb_layers.pp(i))).collect::<Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self { embeddings, layers, post_layernorm, config: cfg.clone() })
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        &self.config
    }

    /// Expands q8_0 matrices (from a quantized checkpoint) to f32: see `Linear::dequantize`.
    /// Returns how many.
    pub fn dequantize(&mut self) -> Result<usize> {
        self.linears_mut().map(|l| l.dequantize().map(usize::from)).sum()
    }

    /// Packs the f32 matrices for the WASM GEMM kernel: see `Linear::pack`. Returns how many.
    pub fn pack(&mut self) -> Result<usize> {
        self.linears_mut().map(|l| l.pack().map(usize::from)).sum()
    }

    /// How many matrices are packed (`pack`).
    pub fn packed_matrices(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|layer| {
                let a = &layer.self_attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &layer.mlp.fc1, &layer.mlp.fc2]
            })
            .filter(|l| l.is_packed())
            .count()
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|layer| {
            let a = &mut layer.self_attn;
            [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj, &mut layer.mlp.fc1, &mut layer.mlp.fc2]
        })
    }

    /// `hidden_states[index]` as transformers returns them with `output_hidden_states`: 0 is
    /// the embeddings, i the output of layer i — without `post_layernorm`.
    pub fn hidden_state(&self, pixel_values: &Tensor, index: usize) -> Result<Tensor> {
        if index > self.layers.len() {
            candle_core::bail!("hidden state {index} requested from a tower of {} layers", self.layers.len());
        }
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers[..index] {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }

    /// `last_hidden_state`: [B, num_patches, hidden], after `post_layernorm`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(&self.hidden_state(pixel_values, self.layers.len())?)
    }
}
