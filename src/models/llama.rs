//! Llama decoder (SmolLM, SmolLM2 and any other `model_type: "llama"` config), as 🤗
//! transformers `modeling_llama.py` (`LlamaForCausalLM`). The `VarBuilder` points where the
//! decoder's `embed_tokens`, `layers.*` and `norm` live; `lm_head` is passed separately because
//! wrappers store it elsewhere (or tie it to `embed_tokens`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Activation, VarBuilder};

use super::backend::{Backend, Cpu};
use super::embedding::{embedding, Embedding};
use super::linear::{linear_b, quantize_each, Linear};
use super::norm::rms_norm;
use super::rope::RotaryEmbedding;

/// `LlamaConfig` (the `text_config` section of a Llava `config.json`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x writes `{"rope_theta": …, "rope_type": …}` here instead of the two
    /// fields above.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_vocab_size() -> usize {
    32000
}
fn default_hidden_size() -> usize {
    4096
}
fn default_intermediate_size() -> usize {
    11008
}
fn default_num_hidden_layers() -> usize {
    32
}
fn default_num_attention_heads() -> usize {
    32
}
fn default_hidden_act() -> Activation {
    Activation::Silu
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()).unwrap_or(self.rope_theta)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let (heads, kv) = (self.num_attention_heads, self.num_kv_heads());
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"));
        }
        if self.head_dim.is_none() && self.hidden_size % heads != 0 {
            return Err(format!("hidden_size {} is not divisible by num_attention_heads {heads}", self.hidden_size));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        // Plain RoPE only; a "default" rope_type is the same thing.
        for scaling in [&self.rope_scaling, &self.rope_parameters].into_iter().flatten().filter(|s| !s.is_null()) {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str());
            if kind.unwrap_or("default") != "default" {
                return Err(format!("rope scaling {scaling} is not supported (only the default RoPE)"));
            }
        }
        Ok(())
    }
}

// transformers modeling_llama.py: LlamaAttention
#[derive(Debug, Clone)]
struct LlamaAttention<B: Backend = Cpu> {
    q_proj: B::Linear,
    k_proj: B::Linear,
    v_proj: B::Linear,
    o_proj: B::Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear_b(cfg.hidden_size, h * d, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(cfg.hidden_size, kv * d, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(cfg.hidden_size, kv * d, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(h * d, cfg.hidden_size, bias, vb.pp("o_proj"))?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }
}

impl<B: Backend> LlamaAttention<B> {
    fn forward(&self, be: &B, xs: &B::Tensor, rope: &B::Rope, cache: Option<&mut B::KvCache>) -> std::result::Result<B::Tensor, B::Error> {
        let offset = cache.as_deref().map_or(0, |c| be.kv_cache_len(c));
        let q = be.rope(&be.linear(xs, &self.q_proj, None)?, self.num_heads, rope, offset)?;
        let k = be.rope(&be.linear(xs, &self.k_proj, None)?, self.num_kv_heads, rope, offset)?;
        let v = be.linear(xs, &self.v_proj, None)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mixed = be.causal_attention(&q, &k, &v, cache, (self.num_heads, self.num_kv_heads), scale)?;
        be.linear(&mixed, &self.o_proj, None)
    }
}

// transformers modeling_llama.py: LlamaMLP
#[derive(Debug, Clone)]
struct LlamaMlp<B: Backend = Cpu> {
    gate_proj: B::Linear,
    up_proj: B::Linear,
    down_proj: B::Linear,
    act: Activation,
}

impl LlamaMlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear_b(h, i, bias, vb.pp("gate_proj"))?,
            up_proj: linear_b(h, i, bias, vb.pp("up_proj"))?,
            down_proj: linear_b(i, h, bias, vb.pp("down_proj"))?,
            act: cfg.hidden_act,
        })
    }
}

impl<B: Backend> LlamaMlp<B> {
    fn forward(&self, be: &B, xs: &B::Tensor) -> std::result::Result<B::Tensor, B::Error> {
        let gate = be.linear(xs, &self.gate_proj, Some(&self.act))?;
        be.linear(&be.mul(&gate, &be.linear(xs, &self.up_proj, None)?)?, &self.down_proj, None)
    }
}

// transformers modeling_llama.py: LlamaDecoderLayer
#[derive(Debug, Clone)]
struct LlamaDecoderLayer<B: Backend = Cpu> {
    input_layernorm: B::RmsNorm,
    self_attn: LlamaAttention<B>,
    post_attention_layernorm: B::RmsNorm,
    mlp: LlamaMlp<B>,
}

impl LlamaDecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: LlamaAttention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            mlp: LlamaMlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }

    fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<LlamaDecoderLayer<B>, B::Error> {
        let (a, m) = (&self.self_attn, &self.mlp);
        Ok(LlamaDecoderLayer {
            input_layernorm: be.rms_norm_from(&self.input_layernorm)?,
            self_attn: LlamaAttention {
                q_proj: be.linear_from(&a.q_proj)?,
                k_proj: be.linear_from(&a.k_proj)?,
                v_proj: be.linear_from(&a.v_proj)?,
                o_proj: be.linear_from(&a.o_proj)?,
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
            },
            post_attention_layernorm: be.rms_norm_from(&self.post_attention_layernorm)?,
            mlp: LlamaMlp {
                gate_proj: be.linear_from(&m.gate_proj)?,
                up_proj: be.linear_from(&m.up_proj)?,
                down_proj: be.linear_from(&m.down_proj)?,
                act: m.act,
            },
        })
    }
}

/// A layer's projections as PEFT names them, in `LlamaDecoderLayer::linears_mut`'s order.
const PROJECTIONS: [&str; 7] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

impl<B: Backend> LlamaDecoderLayer<B> {
    fn forward(&self, be: &B, xs: &B::Tensor, rope: &B::Rope, cache: Option<&mut B::KvCache>) -> std::result::Result<B::Tensor, B::Error> {
        let xs = be.add(xs, &self.self_attn.forward(be, &be.rms_norm(xs, &self.input_layernorm)?, rope, cache)?)?;
        be.add(&xs, &self.mlp.forward(be, &be.rms_norm(&xs, &self.post_attention_layernorm)?)?)
    }
}

/// Self-attention KV cache of every layer, preallocated in chunks (no quadratic copying).
#[derive(Debug)]
pub struct LlamaCache<B: Backend = Cpu> {
    layers: Vec<B::KvCache>,
}

impl<B: Backend> LlamaCache<B> {
    /// Bytes of the keys and values cached so far.
    pub fn bytes(&self, be: &B) -> usize {
        be.cached_bytes(&self.layers, &[])
    }

    /// The cache of batch rows `rows` (in that order, repeats allowed), sharing no storage with `self`.
    pub fn select(&self, be: &B, rows: &[usize]) -> std::result::Result<Self, B::Error> {
        Ok(Self { layers: self.layers.iter().map(|c| be.select_kv_cache(c, rows)).collect::<std::result::Result<Vec<_>, _>>()? })
    }

    pub fn seq_len(&self, be: &B) -> usize {
        self.layers.first().map(|c| be.kv_cache_len(c)).unwrap_or(0)
    }
}

// transformers modeling_llama.py: LlamaModel + lm_head (LlamaForCausalLM)
#[derive(Debug, Clone)]
pub struct Llama<B: Backend = Cpu> {
    embed_tokens: B::Embedding,
    layers: Vec<LlamaDecoderLayer<B>>,
    norm: B::RmsNorm,
    lm_head: B::Linear,
    rope: B::Rope,
    config: LlamaConfig,
}

impl Llama {
    /// `vb` holds `embed_tokens`, `layers.*`, `norm`; `lm_head_vb` holds `weight` of an untied head.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, lm_head_vb: VarBuilder) -> Result<Self> {
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers).map(|i| LlamaDecoderLayer::new(cfg, vb.pp("layers").pp(i))).collect::<Result<Vec<_>>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let lm_head =
            if cfg.tie_word_embeddings { Linear::tied(&embed_tokens) } else { linear_b(cfg.hidden_size, cfg.vocab_size, false, lm_head_vb)? };
        let rope = RotaryEmbedding::new(cfg, vb.device())?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rope, config: cfg.clone() })
    }

    /// The decoder with its weights where `be` computes (a tied head shares the token table).
    pub fn to_backend<B: Backend>(&self, be: &B) -> std::result::Result<Llama<B>, B::Error> {
        let embed_tokens = be.embedding_from(&self.embed_tokens)?;
        let lm_head = if self.config.tie_word_embeddings { be.tied_linear(&embed_tokens)? } else { be.linear_from(&self.lm_head)? };
        Ok(Llama {
            layers: self.layers.iter().map(|l| l.to_backend(be)).collect::<std::result::Result<Vec<_>, _>>()?,
            norm: be.rms_norm_from(&self.norm)?,
            rope: be.rope_from(&self.rope)?,
            embed_tokens,
            lm_head,
            config: self.config.clone(),
        })
    }

    /// Every projection LoRA can adapt, named as PEFT names them under the language model
    /// (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, linear) in PROJECTIONS.iter().zip(layer.linears_mut()) {
                out.push((format!("layers.{i}.{name}"), linear));
            }
        }
        out
    }

    /// Quantizes every projection and the LM head to `dtype` where rows allow; returns
    /// (quantized, kept in f32).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<(usize, usize)> {
        quantize_each(self.layers.iter_mut().flat_map(LlamaDecoderLayer::linears_mut).chain([&mut self.lm_head]), dtype)
    }

    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    pub fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }

    /// Training forward over whole sequences from position 0, no cache: `embeds` [B, T, hidden]
    /// (right-padded; the causal mask keeps real positions from seeing the padding). Returns
    /// logits [B, T, vocab].
    pub fn forward_train(&self, embeds: &Tensor) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        if t == 0 || t > self.config.max_position_embeddings {
            candle_core::bail!("sequence of {t} positions does not fit max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let mut xs = embeds.clone();
        for layer in &self.layers {
            xs = layer.forward(&Cpu, &xs, &self.rope, None)?;
        }
        self.logits(&self.norm.forward(&xs)?)
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }
}

impl<B: Backend> Llama<B> {
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn new_cache(&self, be: &B) -> LlamaCache<B> {
        LlamaCache { layers: (0..self.layers.len()).map(|_| be.new_kv_cache(self.config.max_position_embeddings)).collect() }
    }

    /// Token embeddings of `ids` (`rows` sequences): [rows, T, hidden].
    pub fn embed_on(&self, be: &B, ids: &[u32], rows: usize) -> std::result::Result<B::Tensor, B::Error> {
        be.embed(&self.embed_tokens, ids, rows)
    }

    /// Runs input embeddings [B, T, hidden] after the positions in `cache`; logits [B, vocab]
    /// of the last position.
    pub fn last_logits(&self, be: &B, embeds: &B::Tensor, t: usize, cache: &mut LlamaCache<B>) -> std::result::Result<B::Tensor, B::Error> {
        let past = cache.seq_len(be);
        let fail = |m: String| Err(candle_core::Error::Msg(m).into());
        if t == 0 {
            return fail("no input positions".into());
        }
        if past + t > self.config.max_position_embeddings {
            return fail(format!("sequence of {} positions exceeds max_position_embeddings {}", past + t, self.config.max_position_embeddings));
        }
        let mut xs = embeds.clone();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(be, &xs, &self.rope, Some(kv))?;
        }
        be.linear(&be.last_position(&be.rms_norm(&xs, &self.norm)?)?, &self.lm_head, None)
    }
}
