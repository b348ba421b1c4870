//! GPT-2 with optional cross-attention, as 🤗 transformers `modeling_gpt2.py`
//! (`GPT2LMHeadModel` with `add_cross_attention`). The `VarBuilder` points where `transformer.*`
//! and `lm_head.*` live (`decoder.` inside a VisionEncoderDecoder checkpoint).
//!
//! HF GPT-2 projections are `Conv1D` modules: the weight is stored `[in, out]` (the transpose of
//! `nn.Linear`) and `c_attn` packs query, key and value side by side as `[q | k | v]` along `out`;
//! the cross-attention `c_attn` packs only `[k | v]` and has a separate `q_attn`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Activation, VarBuilder};

use super::attention;
use super::embedding::{embedding, Embedding};
use super::linear::{conv1d, linear_b, Linear};
use super::norm::{layer_norm, LayerNorm};

/// `GPT2Config` as in the `decoder` section of `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Gpt2Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_n_positions")]
    pub n_positions: usize,
    #[serde(default = "default_n_embd")]
    pub n_embd: usize,
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation_function")]
    pub activation_function: Activation,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_vocab_size() -> usize {
    50257
}
fn default_n_positions() -> usize {
    1024
}
fn default_n_embd() -> usize {
    768
}
fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    12
}
fn default_activation_function() -> Activation {
    Activation::NewGelu
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return Err(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        Ok(())
    }
}

/// Cross-attention keys and values of one layer, [B, H, N, d]: computed once per image.
pub type CrossAttentionKv = (Tensor, Tensor);

// transformers modeling_gpt2.py: GPT2Attention (is_cross_attention = False)
#[derive(Debug, Clone)]
struct Gpt2SelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Gpt2SelfAttention {
    fn new(cfg: &Gpt2Config, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            c_attn: conv1d(cfg.n_embd, 3 * cfg.n_embd, vb.pp("c_attn"))?,
            c_proj: conv1d(cfg.n_embd, cfg.n_embd, vb.pp("c_proj"))?,
            num_heads: cfg.n_head,
            scale: attention_scale(cfg, layer_idx),
        })
    }

    fn forward(&self, xs: &Tensor, cache: Option<&mut KvCache>, mask: Option<&Tensor>) -> Result<Tensor> {
        let qkv = self.c_attn.forward(xs)?;
        let n_embd = qkv.dim(D::Minus1)? / 3;
        let q = attention::split_heads(&qkv.narrow(D::Minus1, 0, n_embd)?, self.num_heads)?;
        let k = attention::split_heads(&qkv.narrow(D::Minus1, n_embd, n_embd)?, self.num_heads)?;
        let v = attention::split_heads(&qkv.narrow(D::Minus1, 2 * n_embd, n_embd)?, self.num_heads)?;
        let (k, v) = attention::append_kv(cache, &k, &v)?;
        let out = attention::scaled_dot_product(&q, &k, &v, self.scale, mask)?;
        self.c_proj.forward(&attention::merge_heads(&out)?)
    }
}

// transformers modeling_gpt2.py: GPT2Attention (is_cross_attention = True)
#[derive(Debug, Clone)]
struct Gpt2CrossAttention {
    q_attn: Linear,
    c_attn: Linear,
    c_proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Gpt2CrossAttention {
    fn new(cfg: &Gpt2Config, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q_attn: conv1d(cfg.n_embd, cfg.n_embd, vb.pp("q_attn"))?,
            c_attn: conv1d(cfg.n_embd, 2 * cfg.n_embd, vb.pp("c_attn"))?,
            c_proj: conv1d(cfg.n_embd, cfg.n_embd, vb.pp("c_proj"))?,
            num_heads: cfg.n_head,
            scale: attention_scale(cfg, layer_idx),
        })
    }

    fn key_values(&self, encoder_hidden_states: &Tensor) -> Result<CrossAttentionKv> {
        let kv = self.c_attn.forward(encoder_hidden_states)?;
        let n_embd = kv.dim(D::Minus1)? / 2;
        let k = attention::split_heads(&kv.narrow(D::Minus1, 0, n_embd)?, self.num_heads)?;
        let v = attention::split_heads(&kv.narrow(D::Minus1, n_embd, n_embd)?, self.num_heads)?;
        Ok((k, v))
    }

    fn forward(&self, xs: &Tensor, (k, v): &CrossAttentionKv) -> Result<Tensor> {
        let q = attention::split_heads(&self.q_attn.forward(xs)?, self.num_heads)?;
        let out = attention::scaled_dot_product(&q, k, v, self.scale, None)?;
        self.c_proj.forward(&attention::merge_heads(&out)?)
    }
}

fn attention_scale(cfg: &Gpt2Config, layer_idx: usize) -> f64 {
    let mut scale = 1.0;
    if cfg.scale_attn_weights {
        scale /= ((cfg.n_embd / cfg.n_head) as f64).sqrt();
    }
    if cfg.scale_attn_by_inverse_layer_idx {
        scale /= (layer_idx + 1) as f64;
    }
    scale
}

// transformers modeling_gpt2.py: GPT2MLP
#[derive(Debug, Clone)]
struct Gpt2Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
}

impl Gpt2Mlp {
    fn new(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.n_inner.unwrap_or(4 * cfg.n_embd);
        Ok(Self {
            c_fc: conv1d(cfg.n_embd, inner, vb.pp("c_fc"))?,
            c_proj: conv1d(inner, cfg.n_embd, vb.pp("c_proj"))?,
            act: cfg.activation_function,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.c_proj.forward(&super::activation::forward_in_place(&self.act, self.c_fc.forward(xs)?)?)
    }
}

// transformers modeling_gpt2.py: GPT2Block
#[derive(Debug, Clone)]
struct Gpt2Block {
    ln_1: LayerNorm,
    attn: Gpt2SelfAttention,
    cross: Option<(LayerNorm, Gpt2CrossAttention)>,
    ln_2: LayerNorm,
    mlp: Gpt2Mlp,
}

impl Gpt2Block {
    fn new(cfg: &Gpt2Config, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let cross = if cfg.add_cross_attention {
            Some((layer_norm(cfg.n_embd, eps, vb.pp("ln_cross_attn"))?, Gpt2CrossAttention::new(cfg, layer_idx, vb.pp("crossattention"))?))
        } else {
            None
        };
        Ok(Self {
            ln_1: layer_norm(cfg.n_embd, eps, vb.pp("ln_1"))?,
            attn: Gpt2SelfAttention::new(cfg, layer_idx, vb.pp("attn"))?,
            cross,
            ln_2: layer_norm(cfg.n_embd, eps, vb.pp("ln_2"))?,
            mlp: Gpt2Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, cache: Option<&mut KvCache>, cross_kv: Option<&CrossAttentionKv>, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = (xs + self.attn.forward(&self.ln_1.forward(xs)?, cache, mask)?)?;
        if let (Some((ln_cross_attn, crossattention)), Some(kv)) = (&self.cross, cross_kv) {
            xs = (&xs + crossattention.forward(&ln_cross_attn.forward(&xs)?, kv)?)?;
        }
        &xs + self.mlp.forward(&self.ln_2.forward(&xs)?)?
    }
}

/// Everything a decoding run keeps between steps: the self-attention KV cache of each layer
/// (preallocated to `n_positions`, so no quadratic copying) and the per-image cross-attention
/// K/V.
#[derive(Debug, Clone)]
pub struct Gpt2Cache {
    self_attn: Vec<KvCache>,
    cross_attn: Option<Vec<CrossAttentionKv>>,
    /// Which image each row's cross-attention K/V came from: a reorder that keeps every row on
    /// its image (beam search) leaves them as they are instead of copying them.
    row_images: Vec<usize>,
}

impl Gpt2Cache {
    /// Bytes of the self-attention keys and values cached so far and of the image's
    /// cross-attention ones.
    pub fn bytes(&self) -> usize {
        attention::cached_bytes(&self.self_attn, self.cross_attn.as_deref().unwrap_or_default())
    }

    /// The cache of batch rows `rows` (in that order, repeats allowed); the self-attention
    /// caches share no storage with `self`.
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        let index = attention::row_index(rows, &candle_core::Device::Cpu)?;
        let self_attn = self.self_attn.iter().map(|c| attention::select_kv(c, &index)).collect::<Result<Vec<_>>>()?;
        let row_images: Vec<usize> = rows.iter().map(|&r| self.row_images.get(r).copied().unwrap_or(r)).collect();
        let cross_attn = match &self.cross_attn {
            // Every row still reads its own image: the (immutable) K/V are shared, not copied.
            Some(layers) if row_images == self.row_images => Some(layers.clone()),
            Some(layers) => Some(
                layers
                    .iter()
                    .map(|(k, v)| Ok((k.contiguous()?.index_select(&index, 0)?, v.contiguous()?.index_select(&index, 0)?)))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(Self { self_attn, cross_attn, row_images })
    }

    pub fn seq_len(&self) -> usize {
        self.self_attn.first().map(|c| c.current_seq_len()).unwrap_or(0)
    }
}

// transformers modeling_gpt2.py: GPT2LMHeadModel (GPT2Model + lm_head)
#[derive(Debug, Clone)]
pub struct Gpt2LMHeadModel {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Gpt2Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    config: Gpt2Config,
}

impl Gpt2LMHeadModel {
    pub fn new(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let vb_t = vb.pp("transformer");
        let wte = embedding(cfg.vocab_size, cfg.n_embd, vb_t.pp("wte"))?;
        let wpe = embedding(cfg.n_positions, cfg.n_embd, vb_t.pp("wpe"))?;
        let h = (0..cfg.n_layer).map(|i| Gpt2Block::new(cfg, i, vb_t.pp("h").pp(i))).collect::<Result<Vec<_>>>()?;
        let ln_f = layer_norm(cfg.n_embd, cfg.layer_norm_epsilon, vb_t.pp("ln_f"))?;
        // A tied lm_head is not written to the checkpoint; transformers reuses wte.
        let lm_head = if cfg.tie_word_embeddings { Linear::tied(&wte) } else { linear_b(cfg.n_embd, cfg.vocab_size, false, vb.pp("lm_head"))? };
        Ok(Self { wte, wpe, h, ln_f, lm_head, config: cfg.clone() })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// Quantizes every projection and the LM head to `dtype` where rows allow; returns
    /// (quantized, kept in f32).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<(usize, usize)> {
        let mut done = (0, 0);
        let mut count = |q: bool| if q { done.0 += 1 } else { done.1 += 1 };
        for block in &mut self.h {
            for conv in [&mut block.attn.c_attn, &mut block.attn.c_proj, &mut block.mlp.c_fc, &mut block.mlp.c_proj] {
                count(conv.quantize(dtype)?);
            }
            if let Some((_, cross)) = &mut block.cross {
                for conv in [&mut cross.q_attn, &mut cross.c_attn, &mut cross.c_proj] {
                    count(conv.quantize(dtype)?);
                }
            }
        }
        count(self.lm_head.quantize(dtype)?);
        Ok(done)
    }

    /// The cross-attention key/value projections: they only ever see the encoder's many rows.
    pub fn cross_attention_kv_linears(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.h.iter_mut().filter_map(|block| block.cross.as_mut().map(|(_, cross)| &mut cross.c_attn))
    }

    pub fn new_cache(&self, cross_attn: Option<Vec<CrossAttentionKv>>) -> Gpt2Cache {
        let images = cross_attn.as_ref().and_then(|layers| layers.first()).and_then(|(k, _)| k.dim(0).ok()).unwrap_or(1);
        Gpt2Cache {
            self_attn: (0..self.h.len()).map(|_| KvCache::new(2, self.config.n_positions.min(super::attention::CACHE_CHUNK))).collect(),
            cross_attn,
            row_images: (0..images).collect(),
        }
    }

    /// Cross-attention K/V of every layer for these encoder states ([B, N, n_embd]).
    pub fn cross_attention_cache(&self, encoder_hidden_states: &Tensor) -> Result<Vec<CrossAttentionKv>> {
        self.h
            .iter()
            .map(|block| match &block.cross {
                Some((_, crossattention)) => crossattention.key_values(encoder_hidden_states),
                None => candle_core::bail!("this GPT-2 has no cross-attention (add_cross_attention is false)"),
            })
            .collect()
    }

    /// Runs `input_ids` ([B, T]) after the positions already in `cache` and returns the final
    /// hidden states [B, T, n_embd] (after `ln_f`).
    pub fn forward_hidden(&self, input_ids: &Tensor, cache: &mut Gpt2Cache) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if t == 0 {
            candle_core::bail!("no input tokens");
        }
        let past = cache.seq_len();
        if past + t > self.config.n_positions {
            candle_core::bail!("sequence of {} tokens exceeds n_positions {}", past + t, self.config.n_positions);
        }
        if self.config.add_cross_attention && cache.cross_attn.is_none() {
            candle_core::bail!("GPT-2 with cross-attention needs encoder states before decoding");
        }
        let positions = Tensor::arange(past as u32, (past + t) as u32, input_ids.device())?;
        let mut xs = self.wte.forward(input_ids)?.broadcast_add(&self.wpe.forward(&positions)?)?;
        let mask = if t > 1 { Some(attention::causal_mask(t, past, input_ids.device())?) } else { None };
        for (i, block) in self.h.iter().enumerate() {
            let cross_kv = cache.cross_attn.as_ref().and_then(|kv| kv.get(i));
            xs = block.forward(&xs, Some(&mut cache.self_attn[i]), cross_kv, mask.as_ref())?;
        }
        self.ln_f.forward(&xs)
    }

    /// Training forward over whole sequences, no cache: `input_ids` [B, T] (right-padded; the
    /// causal mask already keeps real tokens from seeing the padding after them) attending to
    /// `encoder_hidden_states` [B, N, n_embd]. Returns logits [B, T, vocab].
    pub fn forward_train(&self, input_ids: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if t == 0 || t > self.config.n_positions {
            candle_core::bail!("sequence of {t} tokens does not fit n_positions {}", self.config.n_positions);
        }
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let mut xs = self.wte.forward(input_ids)?.broadcast_add(&self.wpe.forward(&positions)?)?;
        let mask = if t > 1 { Some(attention::causal_mask(t, 0, input_ids.device())?) } else { None };
        for block in &self.h {
            let cross_kv = match &block.cross {
                Some((_, crossattention)) => Some(crossattention.key_values(encoder_hidden_states)?),
                None => None,
            };
            xs = block.forward(&xs, None, cross_kv.as_ref(), mask.as_ref())?;
        }
        self.logits(&self.ln_f.forward(&xs)?)
    }

    /// Logits for hidden states of any rank ending in n_embd.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if hidden.rank() == 3 && super::tracks_grad(&[hidden]) && !hidden.device().is_cpu() {
            // Training on a GPU: one [B·T, n_embd] product. A [B, T, n_embd] input broadcasts
            // the (trainable, tied) head over the batch, and its gradient is then B copies of
            // the vocab × n_embd matrix before they are summed — 2.5 GB at batch 32 in bf16.
            // (The CPU keeps the batched product: same bits as before.)
            let (b, t, d) = hidden.dims3()?;
            return self.lm_head.forward(&hidden.reshape((b * t, d))?)?.reshape((b, t, ()))?.to_dtype(DType::F32);
        }
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }
}
