//! The pre-norm transformer layer that vision towers share (SigLIP's `SiglipEncoderLayer`, ViT's
//! `ViTLayer`): x + attn(norm1(x)), then x + mlp(norm2(x)). The maths is the same; only the
//! checkpoint names differ, so each tower passes its names ([`LayerNames`]) and the layer is
//! written once. So is the patch embedding they start with ([`PatchEmbedding`]).

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

/// The patch embedding of a tower (SigLIP's `patch_embedding`, ViT's
/// `patch_embeddings.projection`, BLIP's): an `nn.Conv2d` whose stride is its kernel, so each
/// output is one patch's C·p·p pixels times the kernel — a matrix product over the patches,
/// which our GEMM splits over the threads, where candle's convolution ran on one (in WASM, 12 ms
/// of a 2-thread 190 ms q8 SigLIP-B encoder).
#[derive(Debug, Clone)]
pub struct PatchEmbedding {
    /// The kernel `[hidden, C, p, p]` as `[hidden, C·p·p]`.
    proj: Linear,
    channels: usize,
    patch: usize,
}

impl PatchEmbedding {
    /// `weight` `[hidden, channels, patch, patch]` and `bias` `[hidden]` of `vb`, as the
    /// checkpoint's convolution stores them.
    pub fn new(channels: usize, hidden: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((hidden, channels, patch, patch), "weight")?;
        let mut proj = Linear::new(weight.reshape((hidden, channels * patch * patch))?, Some(vb.get(hidden, "bias")?));
        // Laid out for our GEMM now (in WASM; natively nothing changes) and kept in f32 in a
        // quantized model too: the encoder side's 8-bit GEMM takes 7-bit inputs, fewer levels
        // than the 8-bit image the pixels come from.
        proj.pack()?;
        Ok(Self { proj, channels, patch })
    }

    /// [B, C, H, W] → [B, (H / p)·(W / p), hidden], patches in row-major order (the
    /// convolution's output flattened, as the towers read it).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let ((b, c, h, w), p) = (pixel_values.dims4()?, self.patch);
        if c != self.channels || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!(
                "patch embedding: pixel values {:?}, expected [B, {}, H, W] with H and W multiples of {p}",
                pixel_values.dims(),
                self.channels
            );
        }
        let (rows, cols) = (h / p, w / p);
        // Each patch's pixels in the kernel's order (channel, row, column): one copy of the image.
        let patches = pixel_values.reshape((b, c, rows, p, cols, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, rows * cols, c * p * p))?;
        self.proj.forward(&patches)
    }
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
    /// Queries, keys and values of the tokens `xs`: [B, T, H·d] each (heads split once every
    /// token's are joined: rows join with one copy, head views would copy value by value).
    fn projections(&self, xs: &Tensor) -> Result<[Tensor; 3]> {
        Ok([self.q.forward(xs)?, self.k.forward(xs)?, self.v.forward(xs)?])
    }

    /// Every token's mixed values, [B, T, H·d], from all tokens' projections.
    fn mix(&self, [q, k, v]: [&Tensor; 3]) -> Result<Tensor> {
        let heads = |t| attention::split_heads_view(t, self.num_heads);
        let q = heads(q)?;
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        attention::merge_heads(&attention::scaled_dot_product(&q, &heads(k)?, &heads(v)?, scale, None)?)
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
        // (crate::parallel; one part — all tokens — without threads): the norm and the
        // projections, then — every token's at hand — the mixing split by heads (each head's
        // keys packed once, for all of its queries: split by tokens, each part packed them all
        // and the mixing cost a third more on two threads), then the rest of the layer.
        let tokens = xs.dim(1)?;
        let parts = parallel::map_parts(tokens, MIN_TOKENS_PER_THREAD, |r| {
            self.attn.projections(&self.norm1.forward(&xs.narrow(1, r.start, r.len())?)?)
        })?;
        let mut qkv = [vec![], vec![], vec![]];
        for part in parts {
            for (all, p) in qkv.iter_mut().zip(part) {
                all.push(p);
            }
        }
        let [q, k, v] = qkv.map(|parts| parallel::cat(parts, 1));
        let mixed = self.attn.mix([&q?, &k?, &v?])?;
        parallel::concat_parts(tokens, 1, MIN_TOKENS_PER_THREAD, |r| {
            let xs = (xs.narrow(1, r.start, r.len())? + self.attn.out.forward(&mixed.narrow(1, r.start, r.len())?)?)?;
            &xs + self.mlp.forward(&self.norm2.forward(&xs)?)?
        })
    }
}
