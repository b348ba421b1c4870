//! Rotary position embeddings as 🤗 transformers' Llama applies them (rotate-half, f32 angles).

use candle_core::{DType, Device, Result, Tensor};

use super::llama::LlamaConfig;

/// cos/sin tables for the first [`ROPE_TABLE`] positions, computed once; positions past them
/// (a config may allow 10⁵–10⁹) are computed per call by the same ops, so they are the same values.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// Positions whose cos/sin are kept: a config's `max_position_embeddings` is untrusted, and a
/// table of all of them could need gigabytes.
const ROPE_TABLE: usize = 4096;

impl RotaryEmbedding {
    pub fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
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

    /// cos and sin [T, d / 2] of positions `offset..offset + T` (f32).
    pub fn angles(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        if offset + t <= self.cos.dim(0)? {
            Ok((self.cos.narrow(0, offset, t)?, self.sin.narrow(0, offset, t)?))
        } else {
            Self::tables(&self.inv_freq, offset, t)
        }
    }

    /// The kept table: cos and sin [positions, d / 2].
    pub fn table(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates [B, H, T, d] starting at position `offset` (the rotate-half layout of HF Llama).
    pub fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let t = xs.dim(2)?;
        // The tables stay f32; a bf16 model (training) rotates with them rounded.
        let (cos, sin) = self.angles(offset, t)?;
        let (cos, sin) = (cos.to_dtype(xs.dtype())?, sin.to_dtype(xs.dtype())?);
        if super::tracks_grad(&[xs]) {
            candle_nn::rotary_emb::rope_slow(xs, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin)
        }
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
