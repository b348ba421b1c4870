//! The pre-norm transformer layer that vision towers share (SigLIP's `SiglipEncoderLayer`, ViT's
//! `ViTLayer`): x + attn(norm1(x)), then x + mlp(norm2(x)). The maths is the same; only the
//! checkpoint names differ, so each tower passes its names ([`LayerNames`]) and the layer is
//! written once. So is the patch embedding they start with ([`PatchEmbedding`]).

use candle_core::{Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::backend::{Backend, Cpu};
use super::linear::{linear_b, Linear};
use super::norm::layer_norm;

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
pub struct PatchEmbedding<B: Backend = Cpu> {
    /// The kernel `[hidden, C, p, p]` as `[hidden, C·p·p]`.
    proj: B::Linear,
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
        self.forward_on(&Cpu, pixel_values)
    }

    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<PatchEmbedding<B>, B::Error> {
        Ok(PatchEmbedding { proj: be.linear_from(&self.proj)?, channels: self.channels, patch: self.patch })
    }
}

impl<B: Backend> PatchEmbedding<B> {
    /// `forward` on `be`: the pixels (on the CPU, where the image was decoded) are cut into
    /// patches there, then multiplied where the backend computes.
    pub fn forward_on(&self, be: &B, pixel_values: &Tensor) -> std::result::Result<B::Tensor, B::Error> {
        let ((b, c, h, w), p) = (pixel_values.dims4()?, self.patch);
        if c != self.channels || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(candle_core::Error::Msg(format!(
                "patch embedding: pixel values {:?}, expected [B, {}, H, W] with H and W multiples of {p}",
                pixel_values.dims(),
                self.channels
            ))
            .into());
        }
        let (rows, cols) = (h / p, w / p);
        // Each patch's pixels in the kernel's order (channel, row, column): one copy of the image.
        let patches = pixel_values.reshape((b, c, rows, p, cols, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, rows * cols, c * p * p))?;
        be.linear(&be.tensor_from(&patches)?, &self.proj, None)
    }
}

/// The embeddings of a tower that reads a class token before the patches (ViT's, BLIP's):
/// [class; patch embeddings] + position embeddings, positions as trained (pixel values of the
/// image size the checkpoint was trained on).
#[derive(Debug, Clone)]
pub struct ClassTokenEmbeddings<B: Backend = Cpu> {
    /// [1, 1, hidden]
    class: B::Tensor,
    /// [1, 1 + patches, hidden]
    positions: B::Tensor,
    patches: PatchEmbedding<B>,
}

impl ClassTokenEmbeddings {
    pub fn new(class: Tensor, positions: Tensor, patches: PatchEmbedding) -> Self {
        Self { class, positions, patches }
    }

    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<ClassTokenEmbeddings<B>, B::Error> {
        Ok(ClassTokenEmbeddings {
            class: be.tensor_from(&self.class)?,
            positions: be.tensor_from(&self.positions)?,
            patches: self.patches.to_backend(be)?,
        })
    }
}

impl<B: Backend> ClassTokenEmbeddings<B> {
    /// [B, C, H, W] → [B, 1 + patches, hidden], the class token first.
    pub fn forward_on(&self, be: &B, pixel_values: &Tensor) -> std::result::Result<B::Tensor, B::Error> {
        let patches = self.patches.forward_on(be, pixel_values)?;
        be.add(&be.cat_tokens(&[&self.class, &patches])?, &self.positions)
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
struct SelfAttention<B: Backend> {
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    out: B::Linear,
    num_heads: usize,
}

#[derive(Debug, Clone)]
struct Mlp<B: Backend> {
    fc1: B::Linear,
    fc2: B::Linear,
    act: Activation,
}

#[derive(Debug, Clone)]
pub struct EncoderLayer<B: Backend = Cpu> {
    norm1: B::LayerNorm,
    attn: SelfAttention<B>,
    norm2: B::LayerNorm,
    mlp: Mlp<B>,
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
        self.forward_on(&Cpu, xs)
    }

    /// The layer with its weights where `be` computes.
    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<EncoderLayer<B>, B::Error> {
        let (a, m) = (&self.attn, &self.mlp);
        Ok(EncoderLayer {
            norm1: be.layer_norm_from(&self.norm1)?,
            attn: SelfAttention {
                q: be.linear_from(&a.q)?,
                k: be.linear_from(&a.k)?,
                v: be.linear_from(&a.v)?,
                out: be.linear_from(&a.out)?,
                num_heads: a.num_heads,
            },
            norm2: be.layer_norm_from(&self.norm2)?,
            mlp: Mlp { fc1: be.linear_from(&m.fc1)?, fc2: be.linear_from(&m.fc2)?, act: m.act },
        })
    }
}

impl<B: Backend> EncoderLayer<B> {
    /// x + attn(norm1(x)), then x + mlp(norm2(x)), on `be`.
    pub fn forward_on(&self, be: &B, xs: &B::Tensor) -> std::result::Result<B::Tensor, B::Error> {
        // All but attention's mixing is per token, so on the CPU the tokens are split over the
        // threads (`by_tokens`): the norm and the projections, then — every token's at hand —
        // the mixing split by heads (each head's keys packed once, for all of its queries:
        // split by tokens, each part packed them all and the mixing cost a third more on two
        // threads), then the rest of the layer.
        let (a, m) = (&self.attn, &self.mlp);
        let [q, k, v] = be.by_tokens(&[xs], |part| {
            let xs = be.layer_norm(part[0], &self.norm1)?;
            Ok([be.linear(&xs, &a.q, None)?, be.linear(&xs, &a.k, None)?, be.linear(&xs, &a.v, None)?])
        })?;
        let mixed = be.self_attention(&q, &k, &v, a.num_heads)?;
        let [out] = be.by_tokens(&[xs, &mixed], |part| {
            let xs = be.add(part[0], &be.linear(part[1], &a.out, None)?)?;
            let hidden = be.linear(&be.layer_norm(&xs, &self.norm2)?, &m.fc1, Some(&m.act))?;
            Ok([be.add(&xs, &be.linear(&hidden, &m.fc2, None)?)?])
        })?;
        Ok(out)
    }
}
