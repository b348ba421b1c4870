//! The pre-norm transformer layer that vision towers share (SigLIP's `SiglipEncoderLayer`, ViT's
//! `ViTLayer`): x + attn(norm1(x)), then x + mlp(norm2(x)). The maths is the same; only the
//! checkpoint names differ, so each tower passes its names ([`LayerNames`]) and the layer is
//! written once.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Activation, VarBuilder};

use super::attention;
use super::linear::{linear_b, Linear};
use super::norm::{layer_norm, LayerNorm};

/// The size checks every patch-embedding tower's config needs before anything is built: whole
/// heads, and an image cut into whole patches.
pub fn check_tower_sizes(hidden_size: usize, num_attention_heads: usize, image_size: usize, patch_size: usize) -> std::result::Result<(), String> {
    if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
        return Err(format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"));
    }
    if patch_size == 0 || !image_size.is_multiple_of(patch_size) {
        return Err(format!("image_size {image_size} is not a multiple of patch_size {patch_size}"));
    }
    Ok(())
}

/// Where a tower keeps each part of a layer, relative to the layer's prefix.
pub struct LayerNames {
    pub norm1: &'static str,
    /// One matrix for query, key and value, in that order (BLIP's `self_attn.qkv`); then
    /// `query`, `key` and `value` are not read.
    pub fused_qkv: Option<&'static str>,
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub out: &'static str,
    pub norm2: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
}

/// Sizes of a layer, as the towers' configs give them.
pub struct LayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// Whether query, key and value carry a bias (ViT's `qkv_bias`; SigLIP always).
    pub qkv_bias: bool,
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    num_heads: usize,
}

impl SelfAttention {
    /// Keys and values of every token: [B, H, T, d] each.
    fn keys_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = attention::split_heads_view(&self.k.forward(xs)?, self.num_heads)?;
        let v = attention::split_heads_view(&self.v.forward(xs)?, self.num_heads)?;
        Ok((k, v))
    }

    /// The output for the tokens `xs` (all of them, or a slice of them), attending to `k`, `v`.
    fn forward(&self, xs: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = attention::split_heads_view(&self.q.forward(xs)?, self.num_heads)?;
        let head_dim = q.dim(D::Minus1)?;
        let out = attention::scaled_dot_product(&q, k, v, 1.0 / (head_dim as f64).sqrt(), None)?;
        self.out.forward(&attention::merge_heads(&out)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_activated(xs, &self.act)?)
    }
}

const MIN_TOKENS_PER_THREAD: usize = 16;

#[derive(Debug, Clone)]
pub struct EncoderLayer {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    pub fn new(shape: &LayerShape, names: &LayerNames, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (shape.hidden_size, shape.layer_norm_eps);
        let (q, k, v) = match names.fused_qkv {
            Some(name) => {
                let fused = linear_b(d, 3 * d, shape.qkv_bias, vb.pp(name))?;
                (fused.rows(0, d)?, fused.rows(d, d)?, fused.rows(2 * d, d)?)
            }
            None => {
                let qkv = |name: &str| linear_b(d, d, shape.qkv_bias, vb.pp(name));
                (qkv(names.query)?, qkv(names.key)?, qkv(names.value)?)
            }
        };
        Ok(Self {
            norm1: layer_norm(d, eps, vb.pp(names.norm1))?,
            attn: SelfAttention { q, k, v, out: linear_b(d, d, true, vb.pp(names.out))?, num_heads: shape.num_attention_heads },
            norm2: layer_norm(d, eps, vb.pp(names.norm2))?,
            mlp: Mlp {
                fc1: linear_b(d, shape.intermediate_size, true, vb.pp(names.fc1))?,
                fc2: linear_b(shape.intermediate_size, d, true, vb.pp(names.fc2))?,
                act: shape.hidden_act,
            },
        })
    }

    /// The layer's matrices (what packing and quantization visit).
    pub fn linears(&self) -> [&Linear; 6] {
        let a = &self.attn;
        [&a.q, &a.k, &a.v, &a.out, &self.mlp.fc1, &self.mlp.fc2]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 6] {
        let a = &mut self.attn;
        [&mut a.q, &mut a.k, &mut a.v, &mut a.out, &mut self.mlp.fc1, &mut self.mlp.fc2]
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        use crate::parallel;
        // All but attention's mixing is per token, so the tokens are split over the threads
        // (crate::parallel; one part — all tokens — without threads): the norm and the keys and
        // values first, then, with every token's keys and values at hand, the rest of the layer.
        let tokens = xs.dim(1)?;
        let parts = parallel::map_parts(tokens, MIN_TOKENS_PER_THREAD, |r| {
            let normed = self.norm1.forward(&xs.narrow(1, r.start, r.len())?)?;
            let (k, v) = self.attn.keys_values(&normed)?;
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
            let xs = (xs + self.attn.forward(&normed, &k, &v)?)?;
            &xs + self.mlp.forward(&self.norm2.forward(&xs)?)?
        })
    }
}
