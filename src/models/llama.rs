//! Llama decoder (SmolLM, SmolLM2 and any other `model_type: "llama"` config), as 🤗
//! transformers `modeling_llama.py` (`LlamaForCausalLM`). The `VarBuilder` points where the
//! decoder's `embed_tokens`, `layers.*` and `norm` live; `lm_head` is passed separately because
//! wrappers store it elsewhere (or tie it to `embed_tokens`).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Activation, VarBuilder};

use super::attention;
use super::embedding::{embedding, Embedding};
use super::linear::{linear_b, Linear};
use super::norm::{rms_norm, RmsNorm};

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

/// cos/sin tables for the first [`ROPE_TABLE`] positions, computed once; positions past them
/// (a config may allow 10⁵–10⁹) are computed per call by the same ops, so they are the same values.
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    inv_freq: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// Positions whose cos/sin are kept: a config's `max_position_embeddings` is untrusted, and a
/// table of all of them could need gigabytes.
const ROPE_TABLE: usize = 4096;

impl RotaryEmbedding {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        // transformers computes inv_freq in f32 from an int64 arange; do the same.
        let inv_freq: Vec<f32> = (0..dim).step_by(2).map(|i| 1f32 / (cfg.rope_theta() as f32).powf(i as f32 / dim as f32)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, dim / 2), device)?;
        let (cos, sin) = Self::tables(&inv_freq, 0, cfg.max_position_embeddings.min(ROPE_TABLE))?;
        Ok(Self { inv_freq, cos, sin })
    }

    fn tables(inv_freq: &Tensor, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let end = u32::try_from(start + len).map_err(|_| candle_core::Error::Msg(format!("position {} is past 2³²", start + len)))?;
        let positions = Tensor::arange(start as u32, end, inv_freq.device())?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = positions.matmul(inv_freq)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Rotates [B, H, T, d] starting at position `offset` (the rotate-half layout of HF Llama).
    fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let t = xs.dim(2)?;
        // The tables stay f32; a bf16 model (training) rotates with them rounded.
        let (cos, sin) = if offset + t <= self.cos.dim(0)? {
            (self.cos.narrow(0, offset, t)?, self.sin.narrow(0, offset, t)?)
        } else {
            Self::tables(&self.inv_freq, offset, t)?
        };
        let (cos, sin) = (cos.to_dtype(xs.dtype())?, sin.to_dtype(xs.dtype())?);
        if super::tracks_grad(&[xs]) {
            candle_nn::rotary_emb::rope_slow(xs, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin)
        }
    }
}

// transformers modeling_llama.py: LlamaAttention
#[derive(Debug, Clone)]
struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
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

    fn forward(&self, xs: &Tensor, rope: &RotaryEmbedding, cache: Option<&mut KvCache>, mask: Option<&Tensor>) -> Result<Tensor> {
        let offset = cache.as_ref().map(|c| c.current_seq_len()).unwrap_or(0);
        let q = rope.apply(&attention::split_heads(&self.q_proj.forward(xs)?, self.num_heads)?, offset)?;
        let k = rope.apply(&attention::split_heads(&self.k_proj.forward(xs)?, self.num_kv_heads)?, offset)?;
        let v = attention::split_heads(&self.v_proj.forward(xs)?, self.num_kv_heads)?;
        let (k, v) = attention::append_kv(cache, &k, &v)?;
        let out = attention::scaled_dot_product(&q, &k, &v, 1.0 / (self.head_dim as f64).sqrt(), mask)?;
        self.o_proj.forward(&attention::merge_heads(&out)?)
    }
}

// transformers modeling_llama.py: LlamaMLP
#[derive(Debug, Clone)]
struct LlamaMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
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

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward_activated(xs, &self.act)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

// transformers modeling_llama.py: LlamaDecoderLayer
#[derive(Debug, Clone)]
struct LlamaDecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: LlamaMlp,
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

    fn forward(&self, xs: &Tensor, rope: &RotaryEmbedding, cache: Option<&mut KvCache>, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.input_layernorm.forward(xs)?, rope, cache, mask)?)?;
        &xs + self.mlp.forward(&self.post_attention_layernorm.forward(&xs)?)?
    }
}

/// Self-attention KV cache of every layer, preallocated in chunks (no quadratic copying).
#[derive(Debug, Clone)]
pub struct LlamaCache {
    layers: Vec<KvCache>,
}

impl LlamaCache {
    /// The cache of batch rows `rows` (in that order, repeats allowed), sharing no storage with `self`.
    pub fn select(&self, rows: &[usize]) -> Result<Self> {
        let index = attention::row_index(rows, &candle_core::Device::Cpu)?;
        Ok(Self { layers: self.layers.iter().map(|c| attention::select_kv(c, &index)).collect::<Result<Vec<_>>>()? })
    }

    /// Bytes of the keys and values cached so far.
    pub fn bytes(&self) -> usize {
        attention::cached_bytes(&self.layers, &[])
    }

    pub fn seq_len(&self) -> usize {
        self.layers.first().map(|c| c.current_seq_len()).unwrap_or(0)
    }
}

// transformers modeling_llama.py: LlamaModel + lm_head (LlamaForCausalLM)
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
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

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Every projection LoRA can adapt, named as PEFT names them under the language model
    /// (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (name, linear) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("layers.{i}.{name}"), linear));
            }
        }
        out
    }

    /// Quantizes every projection and the LM head to `dtype` where rows allow; returns
    /// (quantized, kept in f32).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<(usize, usize)> {
        let mut done = (0, 0);
        for (_, linear) in self.projections_mut() {
            if linear.quantize(dtype)? {
                done.0 += 1;
            } else {
                done.1 += 1;
            }
        }
        if self.lm_head.quantize(dtype)? {
            done.0 += 1;
        } else {
            done.1 += 1;
        }
        Ok(done)
    }

    pub fn new_cache(&self) -> LlamaCache {
        // Grows by CACHE_CHUNK positions at a time rather than reserving max_position_embeddings.
        let chunk = self.config.max_position_embeddings.min(super::attention::CACHE_CHUNK);
        LlamaCache { layers: (0..self.layers.len()).map(|_| KvCache::new(2, chunk)).collect() }
    }

    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Runs input embeddings [B, T, hidden] after the positions in `cache`; returns the final
    /// hidden states (after `norm`).
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut LlamaCache) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        let past = cache.seq_len();
        if t == 0 {
            candle_core::bail!("no input positions");
        }
        if past + t > self.config.max_position_embeddings {
            candle_core::bail!("sequence of {} positions exceeds max_position_embeddings {}", past + t, self.config.max_position_embeddings);
        }
        let mask = if t > 1 { Some(attention::causal_mask(t, past, embeds.device())?) } else { None };
        let mut xs = embeds.clone();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, &self.rope, Some(kv), mask.as_ref())?;
        }
        self.norm.forward(&xs)
    }

    /// Training forward over whole sequences from position 0, no cache: `embeds` [B, T, hidden]
    /// (right-padded; the causal mask keeps real positions from seeing the padding). Returns
    /// logits [B, T, vocab].
    pub fn forward_train(&self, embeds: &Tensor) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        if t == 0 || t > self.config.max_position_embeddings {
            candle_core::bail!("sequence of {t} positions does not fit max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let mask = if t > 1 { Some(attention::causal_mask(t, 0, embeds.device())?) } else { None };
        let mut xs = embeds.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, &self.rope, None, mask.as_ref())?;
        }
        self.logits(&self.norm.forward(&xs)?)
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// Logits [B, vocab] of the last of `embeds`' positions.
    pub fn last_logits(&self, embeds: &Tensor, cache: &mut LlamaCache) -> Result<Tensor> {
        let hidden = self.forward_embeds(embeds, cache)?;
        let t = hidden.dim(D::Minus2)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions past the kept table rotate exactly as a table of every position would, across
    /// the seam too.
    #[test]
    fn rotations_past_the_table_equal_a_full_table() {
        let cfg: LlamaConfig = serde_json::from_str(r#"{"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 100000}"#).unwrap();
        let rope = RotaryEmbedding::new(&cfg, &Device::Cpu).unwrap();
        assert_eq!(rope.cos.dim(0).unwrap(), ROPE_TABLE);
        let (cos, sin) = RotaryEmbedding::tables(&rope.inv_freq, 0, ROPE_TABLE + 64).unwrap();
        let full = RotaryEmbedding { inv_freq: rope.inv_freq.clone(), cos, sin };
        let xs = Tensor::rand(-1f32, 1., (1, 2, 8, 32), &Device::Cpu).unwrap();
        for offset in [0, ROPE_TABLE - 8, ROPE_TABLE - 3, ROPE_TABLE + 17] {
            let (a, b) = (rope.apply(&xs, offset).unwrap(), full.apply(&xs, offset).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "offset {offset}");
        }
    }
}
