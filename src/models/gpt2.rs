//! GPT-2 with optional cross-attention, as 🤗 transformers `modeling_gpt2.py`
//! (`GPT2LMHeadModel` with `add_cross_attention`). The `VarBuilder` points where `transformer.*`
//! and `lm_head.*` live (`decoder.` inside a VisionEncoderDecoder checkpoint).
//!
//! HF GPT-2 projections are `Conv1D` modules: the weight is stored `[in, out]` (the transpose of
//! `nn.Linear`) and `c_attn` packs query, key and value side by side as `[q | k | v]` along `out`;
//! the cross-attention `c_attn` packs only `[k | v]` and has a separate `q_attn`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::backend::{Backend, Cpu};
use super::embedding::embedding;
use super::linear::{conv1d, linear_b, quantize_each, Linear};
use super::norm::layer_norm;

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

// transformers modeling_gpt2.py: GPT2Attention (is_cross_attention = False)
#[derive(Debug, Clone)]
struct Gpt2SelfAttention<B: Backend = Cpu> {
    c_attn: B::Linear,
    c_proj: B::Linear,
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

    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<Gpt2SelfAttention<B>, B::Error> {
        Ok(Gpt2SelfAttention {
            c_attn: be.linear_from(&self.c_attn)?,
            c_proj: be.linear_from(&self.c_proj)?,
            num_heads: self.num_heads,
            scale: self.scale,
        })
    }
}

impl<B: Backend> Gpt2SelfAttention<B> {
    fn forward(&self, be: &B, xs: &B::Tensor, cache: Option<&mut B::KvCache>) -> std::result::Result<B::Tensor, B::Error> {
        let [q, k, v] = be.split_last(&be.linear(xs, &self.c_attn, None)?)?;
        let heads = (self.num_heads, self.num_heads);
        be.linear(&be.causal_attention(&q, &k, &v, cache, heads, self.scale)?, &self.c_proj, None)
    }
}

// transformers modeling_gpt2.py: GPT2Attention (is_cross_attention = True)
#[derive(Debug, Clone)]
struct Gpt2CrossAttention<B: Backend = Cpu> {
    q_attn: B::Linear,
    c_attn: B::Linear,
    c_proj: B::Linear,
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

    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<Gpt2CrossAttention<B>, B::Error> {
        Ok(Gpt2CrossAttention {
            q_attn: be.linear_from(&self.q_attn)?,
            c_attn: be.linear_from(&self.c_attn)?,
            c_proj: be.linear_from(&self.c_proj)?,
            num_heads: self.num_heads,
            scale: self.scale,
        })
    }
}

impl<B: Backend> Gpt2CrossAttention<B> {
    fn key_values(&self, be: &B, encoder_hidden_states: &B::Tensor) -> std::result::Result<B::Kv, B::Error> {
        let [k, v] = be.split_last(&be.linear(encoder_hidden_states, &self.c_attn, None)?)?;
        be.kv(&k, &v, self.num_heads)
    }

    fn forward(&self, be: &B, xs: &B::Tensor, kv: &B::Kv) -> std::result::Result<B::Tensor, B::Error> {
        let q = be.linear(xs, &self.q_attn, None)?;
        be.linear(&be.attention(&q, kv, (self.num_heads, self.num_heads), self.scale)?, &self.c_proj, None)
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
struct Gpt2Mlp<B: Backend = Cpu> {
    c_fc: B::Linear,
    c_proj: B::Linear,
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
}

impl<B: Backend> Gpt2Mlp<B> {
    fn forward(&self, be: &B, xs: &B::Tensor) -> std::result::Result<B::Tensor, B::Error> {
        be.linear(&be.linear(xs, &self.c_fc, Some(&self.act))?, &self.c_proj, None)
    }
}

// transformers modeling_gpt2.py: GPT2Block
#[derive(Debug, Clone)]
struct Gpt2Block<B: Backend = Cpu> {
    ln_1: B::LayerNorm,
    attn: Gpt2SelfAttention<B>,
    cross: Option<(B::LayerNorm, Gpt2CrossAttention<B>)>,
    ln_2: B::LayerNorm,
    mlp: Gpt2Mlp<B>,
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

    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<Gpt2Block<B>, B::Error> {
        let cross = match &self.cross {
            Some((ln, cross)) => Some((be.layer_norm_from(ln)?, cross.to_backend(be)?)),
            None => None,
        };
        Ok(Gpt2Block {
            ln_1: be.layer_norm_from(&self.ln_1)?,
            attn: self.attn.to_backend(be)?,
            cross,
            ln_2: be.layer_norm_from(&self.ln_2)?,
            mlp: Gpt2Mlp { c_fc: be.linear_from(&self.mlp.c_fc)?, c_proj: be.linear_from(&self.mlp.c_proj)?, act: self.mlp.act },
        })
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.attn.c_attn, &mut self.attn.c_proj, &mut self.mlp.c_fc, &mut self.mlp.c_proj];
        if let Some((_, cross)) = &mut self.cross {
            out.extend([&mut cross.q_attn, &mut cross.c_attn, &mut cross.c_proj]);
        }
        out
    }
}

impl<B: Backend> Gpt2Block<B> {
    fn forward(&self, be: &B, xs: &B::Tensor, cache: Option<&mut B::KvCache>, cross_kv: Option<&B::Kv>) -> std::result::Result<B::Tensor, B::Error> {
        let mut xs = be.add(xs, &self.attn.forward(be, &be.layer_norm(xs, &self.ln_1)?, cache)?)?;
        if let (Some((ln_cross_attn, crossattention)), Some(kv)) = (&self.cross, cross_kv) {
            xs = be.add(&xs, &crossattention.forward(be, &be.layer_norm(&xs, ln_cross_attn)?, kv)?)?;
        }
        be.add(&xs, &self.mlp.forward(be, &be.layer_norm(&xs, &self.ln_2)?)?)
    }
}

/// Everything a decoding run keeps between steps: the self-attention KV cache of each layer
/// (preallocated, so no quadratic copying) and the per-image cross-attention K/V.
#[derive(Debug)]
pub struct Gpt2Cache<B: Backend = Cpu> {
    self_attn: Vec<B::KvCache>,
    cross_attn: Option<Vec<B::Kv>>,
    /// Which image each row's cross-attention K/V came from: a reorder that keeps every row on
    /// its image (beam search) leaves them as they are instead of copying them.
    row_images: Vec<usize>,
}

impl<B: Backend> Gpt2Cache<B> {
    /// Bytes of the self-attention keys and values cached so far and of the image's
    /// cross-attention ones.
    pub fn bytes(&self, be: &B) -> usize {
        be.cached_bytes(&self.self_attn, self.cross_attn.as_deref().unwrap_or_default())
    }

    /// The cache of batch rows `rows` (in that order, repeats allowed); the self-attention
    /// caches share no storage with `self`.
    pub fn select(&self, be: &B, rows: &[usize]) -> std::result::Result<Self, B::Error> {
        let self_attn = self.self_attn.iter().map(|c| be.select_kv_cache(c, rows)).collect::<std::result::Result<Vec<_>, _>>()?;
        let row_images: Vec<usize> = rows.iter().map(|&r| self.row_images.get(r).copied().unwrap_or(r)).collect();
        let cross_attn = match &self.cross_attn {
            // Every row still reads its own image: the (immutable) K/V are shared, not copied.
            Some(layers) if row_images == self.row_images => Some(layers.clone()),
            Some(layers) => Some(layers.iter().map(|kv| be.select_kv(kv, rows)).collect::<std::result::Result<Vec<_>, _>>()?),
            None => None,
        };
        Ok(Self { self_attn, cross_attn, row_images })
    }

    pub fn seq_len(&self, be: &B) -> usize {
        self.self_attn.first().map(|c| be.kv_cache_len(c)).unwrap_or(0)
    }
}

// transformers modeling_gpt2.py: GPT2LMHeadModel (GPT2Model + lm_head)
#[derive(Debug, Clone)]
pub struct Gpt2LMHeadModel<B: Backend = Cpu> {
    wte: B::Embedding,
    wpe: B::Embedding,
    h: Vec<Gpt2Block<B>>,
    ln_f: B::LayerNorm,
    lm_head: B::Linear,
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

    /// The decoder with its weights where `be` computes (a tied head shares the token table).
    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<Gpt2LMHeadModel<B>, B::Error> {
        let wte = be.embedding_from(&self.wte)?;
        let lm_head = if self.config.tie_word_embeddings { be.tied_linear(&wte)? } else { be.linear_from(&self.lm_head)? };
        Ok(Gpt2LMHeadModel {
            wpe: be.embedding_from(&self.wpe)?,
            h: self.h.iter().map(|b| b.to_backend(be)).collect::<std::result::Result<Vec<_>, _>>()?,
            ln_f: be.layer_norm_from(&self.ln_f)?,
            wte,
            lm_head,
            config: self.config.clone(),
        })
    }

    /// Quantizes every projection and the LM head to `dtype` where rows allow; returns
    /// (quantized, kept in f32).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<(usize, usize)> {
        let blocks = self.h.iter_mut().flat_map(Gpt2Block::linears_mut);
        quantize_each(blocks.chain([&mut self.lm_head]), dtype)
    }

    /// The cross-attention key/value projections: they only ever see the encoder's many rows.
    pub fn cross_attention_kv_linears(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.h.iter_mut().filter_map(|block| block.cross.as_mut()).map(|(_, cross)| &mut cross.c_attn)
    }

    /// Training forward over whole sequences, no cache: `input_ids` [B, T] (right-padded; the
    /// causal mask already keeps real tokens from seeing the padding after them) attending to
    /// `encoder_hidden_states` [B, N, n_embd]. Returns logits [B, T, vocab].
    pub fn forward_train(&self, input_ids: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 || t > self.config.n_positions {
            candle_core::bail!("sequence of {t} tokens does not fit n_positions {}", self.config.n_positions);
        }
        let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
        let mut xs = self.embed_on(&Cpu, &ids, b, 0)?;
        for block in &self.h {
            let cross_kv = match &block.cross {
                Some((_, crossattention)) => Some(crossattention.key_values(&Cpu, encoder_hidden_states)?),
                None => None,
            };
            xs = block.forward(&Cpu, &xs, None, cross_kv.as_ref())?;
        }
        self.logits(&Cpu.layer_norm(&xs, &self.ln_f)?)
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

impl<B: Backend> Gpt2LMHeadModel<B> {
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    pub fn new_cache(&self, be: &B, cross_attn: Option<Vec<B::Kv>>, images: usize) -> Gpt2Cache<B> {
        Gpt2Cache {
            self_attn: (0..self.h.len()).map(|_| be.new_kv_cache(self.config.n_positions)).collect(),
            cross_attn,
            row_images: (0..images).collect(),
        }
    }

    /// Cross-attention K/V of every layer for these encoder states ([B, N, n_embd]).
    pub fn cross_attention_cache(&self, be: &B, encoder_hidden_states: &B::Tensor) -> std::result::Result<Vec<B::Kv>, B::Error> {
        self.h
            .iter()
            .map(|block| match &block.cross {
                Some((_, crossattention)) => crossattention.key_values(be, encoder_hidden_states),
                None => Err(candle_core::Error::Msg("this GPT-2 has no cross-attention (add_cross_attention is false)".into()).into()),
            })
            .collect()
    }

    /// Token embeddings of `ids` (`rows` sequences) plus positions from `past`: [rows, T, n_embd].
    fn embed_on(&self, be: &B, ids: &[u32], rows: usize, past: usize) -> std::result::Result<B::Tensor, B::Error> {
        let t = ids.len().checked_div(rows).unwrap_or(0);
        let positions: Vec<u32> = (past..past + t).map(|p| p as u32).collect();
        be.add(&be.embed(&self.wte, ids, rows)?, &be.embed(&self.wpe, &positions, 1)?)
    }

    /// Runs `ids` (`rows` sequences of T) after the positions already in `cache`; logits
    /// [rows, vocab] of the last position.
    pub fn next_logits(&self, be: &B, ids: &[u32], rows: usize, cache: &mut Gpt2Cache<B>) -> std::result::Result<B::Tensor, B::Error> {
        let t = ids.len().checked_div(rows).unwrap_or(0);
        let fail = |m: String| Err(candle_core::Error::Msg(m).into());
        if t == 0 || t * rows != ids.len() {
            return fail(format!("{} input tokens for {rows} rows", ids.len()));
        }
        let past = cache.seq_len(be);
        if past + t > self.config.n_positions {
            return fail(format!("sequence of {} tokens exceeds n_positions {}", past + t, self.config.n_positions));
        }
        if self.config.add_cross_attention && cache.cross_attn.is_none() {
            return fail("GPT-2 with cross-attention needs encoder states before decoding".into());
        }
        let mut xs = self.embed_on(be, ids, rows, past)?;
        for (i, block) in self.h.iter().enumerate() {
            let cross_kv = cache.cross_attn.as_ref().and_then(|kv| kv.get(i));
            xs = block.forward(be, &xs, cache.self_attn.get_mut(i), cross_kv)?;
        }
        be.linear(&be.last_position(&be.layer_norm(&xs, &self.ln_f)?)?, &self.lm_head, None)
    }
}
