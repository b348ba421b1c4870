//! 🤗 `VisionEncoderDecoderModel` with a SigLIP vision encoder and a GPT-2 decoder, as
//! transformers `modeling_vision_encoder_decoder.py`: `encoder.*`, an optional
//! `enc_to_dec_proj` (when the hidden sizes differ) and `decoder.*`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{linear, Linear};

use super::gpt2::{Gpt2Cache, Gpt2Config, Gpt2LMHeadModel};
use super::siglip::{SiglipVisionConfig, SiglipVisionTransformer};

/// `VisionEncoderDecoderConfig` (`config.json` with `model_type: "vision-encoder-decoder"`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct VisionEncoderDecoderConfig {
    pub encoder: SiglipVisionConfig,
    pub decoder: Gpt2Config,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

impl VisionEncoderDecoderConfig {
    /// Parses `config.json`, checking the sub-model types we implement so that, say, a ViT
    /// encoder is refused by name instead of failing on its first tensor.
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = |section: &str| value.get(section).and_then(|s| s.get("model_type")).and_then(|t| t.as_str());
        match model_type("encoder") {
            Some("siglip_vision_model") => {}
            other => return Err(format!("encoder.model_type must be \"siglip_vision_model\", found {other:?}")),
        }
        match model_type("decoder") {
            Some("gpt2") => {}
            other => return Err(format!("decoder.model_type must be \"gpt2\", found {other:?}")),
        }
        if value.get("decoder").and_then(|d| d.get("cross_attention_hidden_size")).is_some_and(|v| !v.is_null()) {
            return Err("decoder.cross_attention_hidden_size is not supported by GPT-2".into());
        }
        let cfg: Self = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        cfg.encoder.validate().map_err(|e| format!("encoder: {e}"))?;
        cfg.decoder.validate().map_err(|e| format!("decoder: {e}"))?;
        if !cfg.decoder.add_cross_attention {
            return Err("decoder.add_cross_attention must be true for a VisionEncoderDecoder".into());
        }
        Ok(cfg)
    }

    pub fn has_projection(&self) -> bool {
        self.encoder.hidden_size != self.decoder.n_embd
    }
}

#[derive(Debug, Clone)]
pub struct VisionEncoderDecoder {
    encoder: SiglipVisionTransformer,
    enc_to_dec_proj: Option<Linear>,
    decoder: Gpt2LMHeadModel,
}

impl VisionEncoderDecoder {
    pub fn new(cfg: &VisionEncoderDecoderConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = SiglipVisionTransformer::new(&cfg.encoder, vb.pp("encoder"))?;
        let enc_to_dec_proj =
            if cfg.has_projection() { Some(linear(cfg.encoder.hidden_size, cfg.decoder.n_embd, vb.pp("enc_to_dec_proj"))?) } else { None };
        let decoder = Gpt2LMHeadModel::new(&cfg.decoder, vb.pp("decoder"))?;
        Ok(Self { encoder, enc_to_dec_proj, decoder })
    }

    pub fn encoder(&self) -> &SiglipVisionTransformer {
        &self.encoder
    }

    /// The encoder side (tower and `enc_to_dec_proj`) back to f32 where a quantized checkpoint
    /// stored q8_0: it only multiplies many rows at once, which the f32 GEMM does faster.
    pub fn dequantize_encoder(&mut self) -> Result<usize> {
        let proj = match &mut self.enc_to_dec_proj {
            Some(p) => usize::from(p.dequantize()?),
            None => 0,
        };
        Ok(self.encoder.dequantize()? + proj)
    }

    /// The f32 matrices that only multiply the image's many rows — the encoder, `enc_to_dec_proj`
    /// and the decoder's cross-attention keys/values — packed for the WASM GEMM kernel
    /// (`Linear::pack`; nothing natively). Returns how many.
    pub fn pack_encoder(&mut self) -> Result<usize> {
        let proj = match &mut self.enc_to_dec_proj {
            Some(p) => usize::from(p.pack()?),
            None => 0,
        };
        Ok(self.encoder.pack()? + proj + self.decoder.pack_cross_attention()?)
    }

    pub fn decoder_mut(&mut self) -> &mut Gpt2LMHeadModel {
        &mut self.decoder
    }

    pub fn decoder(&self) -> &Gpt2LMHeadModel {
        &self.decoder
    }

    /// The encoder's `last_hidden_state` for pixel values [B, 3, H, W].
    pub fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.encoder.forward(pixel_values)
    }

    /// A decoding cache for these encoder states: projected once, cross-attention K/V once.
    pub fn start_decoding(&self, encoder_hidden_states: &Tensor) -> Result<Gpt2Cache> {
        let states = match &self.enc_to_dec_proj {
            Some(proj) => proj.forward(encoder_hidden_states)?,
            None => encoder_hidden_states.clone(),
        };
        Ok(self.decoder.new_cache(Some(self.decoder.cross_attention_cache(&states)?)))
    }

    /// Training forward: logits [B, T, vocab] for `decoder_input_ids` [B, T] attending to
    /// `encoder_hidden_states` (the encoder's output, before `enc_to_dec_proj`).
    pub fn forward_train(&self, encoder_hidden_states: &Tensor, decoder_input_ids: &Tensor) -> Result<Tensor> {
        let states = match &self.enc_to_dec_proj {
            Some(proj) => proj.forward(encoder_hidden_states)?,
            None => encoder_hidden_states.clone(),
        };
        self.decoder.forward_train(decoder_input_ids, &states)
    }

    /// Logits [B, vocab] of the last position after feeding `input_ids` [B, T].
    pub fn decode_step(&self, input_ids: &Tensor, cache: &mut Gpt2Cache) -> Result<Tensor> {
        let hidden = self.decoder.forward_hidden(input_ids, cache)?;
        let t = hidden.dim(1)?;
        self.decoder.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}
