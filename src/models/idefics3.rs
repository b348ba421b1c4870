//! 🤗 `Idefics3ForConditionalGeneration` (transformers `modeling_idefics3.py`; SmolVLM, and
//! SmolVLM2's `model_type: "smolvlm"`, which transformers builds the same way): every tile of the
//! image through a SigLIP tower (with `post_layernorm`) → the connector (pixel shuffle by
//! `scale_factor`, then `modality_projection`) → the tiles' features, in order, in place of the
//! prompt's `<image>` tokens → Llama → `lm_head`. The prompt is `Idefics3Processor`'s: the chat
//! template's text with each `<image>` expanded for the image's tile grid.
//! Tensor names (`model.vision_model.*`, `model.connector.*`, `model.text_model.*`, `lm_head.*`)
//! are the same in transformers 4.x and 5.x files.

use std::any::Any;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::architecture::{state_of, Architecture, Builder, DecodeState, Family, PromptInputs};
use crate::loading::GenerationDefaults;
use crate::preprocess::Grid;

use super::backend::Cpu;
use super::linear::{linear_b, Linear};
use super::llama::{Llama, LlamaConfig};
use super::llava::{decode_step_reads, image_token_text, synthetic_prefix_ids, PrefixState};
use super::siglip::{SiglipVisionConfig, SiglipVisionTransformer};

/// `Idefics3Config` (`config.json` with `model_type` `idefics3` or `smolvlm`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Idefics3Config {
    pub vision_config: SiglipVisionConfig,
    pub text_config: LlamaConfig,
    #[serde(default = "default_scale_factor")]
    pub scale_factor: usize,
    #[serde(default = "default_image_token_id")]
    pub image_token_id: u32,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

fn default_scale_factor() -> usize {
    2
}
fn default_image_token_id() -> u32 {
    128257
}

/// `Idefics3VisionConfig`'s defaults, for the keys a config leaves out (SmolVLM's write only
/// what differs from them).
const VISION_DEFAULTS: [(&str, f64); 8] = [
    ("hidden_size", 1152.0),
    ("intermediate_size", 3072.0),
    ("num_hidden_layers", 12.0),
    ("num_attention_heads", 16.0),
    ("num_channels", 3.0),
    ("image_size", 224.0),
    ("patch_size", 32.0),
    ("layer_norm_eps", 1e-6),
];

impl Idefics3Config {
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let mut value = value.clone();
        let section_type = |value: &serde_json::Value, section: &str| {
            value.get(section).and_then(|s| s.get("model_type")).and_then(|t| t.as_str()).map(str::to_string)
        };
        match section_type(&value, "vision_config").as_deref() {
            None | Some("idefics3_vision" | "smolvlm_vision" | "idefics3" | "smolvlm") => {}
            Some(other) => return Err(format!("vision_config.model_type must be \"idefics3_vision\", found {other:?}")),
        }
        match section_type(&value, "text_config").as_deref() {
            None | Some("llama") => {}
            Some(other) => return Err(format!("text_config.model_type must be \"llama\", found {other:?}")),
        }
        let vision = value.get_mut("vision_config").and_then(|v| v.as_object_mut()).ok_or("no vision_config object")?;
        for (key, default) in VISION_DEFAULTS {
            if vision.get(key).is_none_or(|v| v.is_null()) {
                let number = if default.fract() == 0.0 { serde_json::Value::from(default as u64) } else { serde_json::Value::from(default) };
                vision.insert(key.into(), number);
            }
        }
        let mut cfg: Self = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        if let Some(tie) = cfg.tie_word_embeddings {
            if value.get("text_config").and_then(|t| t.get("tie_word_embeddings")).is_none() {
                cfg.text_config.tie_word_embeddings = tie;
            }
        }
        cfg.vision_config.validate().map_err(|e| format!("vision_config: {e}"))?;
        cfg.text_config.validate().map_err(|e| format!("text_config: {e}"))?;
        let side = cfg.vision_config.image_size / cfg.vision_config.patch_size;
        if cfg.scale_factor == 0 || side % cfg.scale_factor != 0 {
            return Err(format!("scale_factor {} does not divide the {side} patches of a tile's side", cfg.scale_factor));
        }
        Ok(cfg)
    }

    /// `<image>` tokens per tile: `Idefics3Processor`'s `image_seq_len`.
    pub fn image_seq_len(&self) -> usize {
        self.vision_config.num_patches() / (self.scale_factor * self.scale_factor)
    }
}

/// `Idefics3Connector.pixel_shuffle`: [B, seq, D] → [B, seq / s², D·s²], each s × s block of
/// patches gathered into one position.
pub fn pixel_shuffle(xs: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, seq, d) = xs.dims3()?;
    let side = (seq as f64).sqrt().round() as usize;
    if side * side != seq || side % scale != 0 {
        candle_core::bail!("pixel shuffle by {scale} of {seq} positions: not a square grid divisible by {scale}");
    }
    let xs = xs.reshape((b, side, side / scale, d * scale))?.permute((0, 2, 1, 3))?.contiguous()?;
    let xs = xs.reshape((b, side / scale, side / scale, d * scale * scale))?.permute((0, 2, 1, 3))?.contiguous()?;
    xs.reshape((b, seq / (scale * scale), d * scale * scale))
}

#[derive(Debug, Clone)]
pub struct Idefics3 {
    vision_model: SiglipVisionTransformer,
    /// `connector.modality_projection.proj` (no bias).
    modality_projection: Linear,
    text_model: Llama,
    config: Idefics3Config,
}

impl Idefics3 {
    pub fn new(cfg: &Idefics3Config, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let (v, s) = (cfg.vision_config.hidden_size, cfg.scale_factor);
        Ok(Self {
            vision_model: SiglipVisionTransformer::new(&cfg.vision_config, vb_m.pp("vision_model"))?,
            modality_projection: linear_b(v * s * s, cfg.text_config.hidden_size, false, vb_m.pp("connector.modality_projection.proj"))?,
            text_model: Llama::new(&cfg.text_config, vb_m.pp("text_model"), vb.pp("lm_head"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Idefics3Config {
        &self.config
    }

    /// The connector's output for tiles [T, 3, H, W]: [T, image_seq_len, text hidden].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let states = self.vision_model.forward(pixel_values)?;
        self.modality_projection.forward(&pixel_shuffle(&states, self.config.scale_factor)?)
    }

    /// `Idefics3Processor`'s text for one image cut into `grid`, in place of its `<image>`.
    fn image_prompt(&self, image: &str, grid: Grid) -> String {
        const FAKE: &str = "<fake_token_around_image>";
        let tokens = image.repeat(self.config.image_seq_len());
        let global = format!("{FAKE}<global-img>{tokens}{FAKE}");
        if grid == Grid::WHOLE {
            return global;
        }
        let mut text = String::new();
        for r in 1..=grid.rows {
            for c in 1..=grid.cols {
                text.push_str(&format!("{FAKE}<row_{r}_col_{c}>{tokens}"));
            }
            text.push('\n');
        }
        format!("{text}\n{global}")
    }
}

pub const FAMILY: Family = Family { model_type: "idefics3", decoder_section: "text_config", rename: same_name, config: builder, training: None };

/// SmolVLM2's `model_type`: the same model and processor as transformers builds them.
pub const SMOLVLM: Family = Family { model_type: "smolvlm", ..FAMILY };

fn same_name(name: &str) -> String {
    name.to_string()
}

fn builder(config: &serde_json::Value) -> std::result::Result<Builder, String> {
    let cfg = Idefics3Config::from_json(config)?;
    Ok(Box::new(move |vb| Ok(Box::new(Idefics3::new(&cfg, vb)?) as Box<dyn Architecture>)))
}

impl Architecture for Idefics3 {
    fn image_shape(&self) -> [usize; 3] {
        let v = &self.config.vision_config;
        [v.num_channels, v.image_size, v.image_size]
    }

    /// Every tile's features: [tiles, image_seq_len, hidden]; `start` lays each image's tiles in a row.
    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_features(pixel_values)
    }

    /// The connector's pixel shuffle as a gather of the tower's rows, in the order
    /// [`pixel_shuffle`] puts them (the same function, on the rows' indices).
    #[cfg(feature = "webgpu")]
    fn gpu_encoder(&self, gpu: &crate::gpu::Gpu) -> crate::Result<crate::gpu::GpuEncoder> {
        use super::backend::Backend;
        let (tower, projection) = (self.vision_model.to_backend(gpu)?, gpu.linear_from(&self.modality_projection)?);
        let scale = self.config.scale_factor;
        Ok(Box::new(move |gpu, pixel_values| {
            let states = tower.forward_on(gpu, pixel_values)?;
            let &[b, seq, d] = states.shape() else {
                return Err(crate::Error::Gpu(format!("pixel shuffle of states {:?}", states.shape())));
            };
            let positions = Tensor::arange(0u32, seq as u32, &candle_core::Device::Cpu)?.reshape((1, seq, 1))?;
            let order = pixel_shuffle(&positions, scale)?.flatten_all()?.to_vec1::<u32>()?;
            let rows: Vec<u32> = (0..b as u32).flat_map(|i| order.iter().map(move |&r| i * seq as u32 + r)).collect();
            let shuffled = gpu.gather_rows(&states, &rows)?.reshape(&[b, seq / (scale * scale), d * scale * scale])?;
            Backend::linear(gpu, &shuffled, &projection, None)
        }))
    }

    /// The user's turn (the image, then the prompt) — or the caller's `messages` — through the
    /// folder's chat template with the assistant's turn opened (no template: `<image>` and the
    /// prompt, as raw processor text), its `<image>` expanded for the grid, tokenized.
    fn input_ids(&self, inputs: &PromptInputs<'_>) -> crate::Result<Vec<u32>> {
        let image = image_token_text(inputs.tokenizer, self.config.image_token_id)?;
        let text = match (inputs.chat_template, inputs.messages) {
            (Some(template), Some(messages)) => template.render(messages, true)?,
            (Some(template), None) => template.render(&crate::chat::image_turn(inputs.prompt), true)?,
            (None, None) => format!("{image}{}", inputs.prompt.unwrap_or_default()),
            (None, Some(_)) => {
                return Err(crate::Error::Generation(
                    "messages need the folder's chat template (chat_template.jinja or .json), which it lacks".into(),
                ))
            }
        };
        let parts: Vec<&str> = text.split(image.as_str()).collect();
        if parts.len() != 2 {
            return Err(crate::Error::Generation(format!(
                "the prompt text {text:?} has {} {image} tokens; one image needs exactly one",
                parts.len() - 1
            )));
        }
        let expanded = format!("{}{}{}", parts[0], self.image_prompt(&image, inputs.grid), parts[1]);
        inputs.tokenizer.encode(&expanded, true)
    }

    /// Each image's tiles regrouped into one row of features (`features_per_image`).
    fn start(&self, conditioning: Tensor, input_ids: &[u32]) -> Result<Box<dyn DecodeState>> {
        let features = features_per_image(conditioning, input_ids, self.config.image_token_id)?;
        let lm = &self.text_model;
        Ok(Box::new(PrefixState::new(&Arc::new(Cpu), lm, lm.embed_tokens(), self.config.image_token_id, input_ids, &features)?))
    }

    fn next_logits(&self, state: &mut dyn DecodeState) -> Result<Tensor> {
        state_of::<PrefixState>(state)?.next_logits(&self.text_model)
    }

    #[cfg(feature = "webgpu")]
    fn gpu_decoder(&self, gpu: &Arc<crate::gpu::Gpu>) -> crate::Result<Option<Box<dyn crate::architecture::GpuDecoder>>> {
        Ok(Some(Box::new(super::llava::GpuPrefixDecoding {
            gpu: gpu.clone(),
            lm: self.text_model.to_backend(&**gpu)?,
            table: self.text_model.embed_tokens().clone(),
            image_token: self.config.image_token_id,
            features: features_per_image,
        })))
    }

    fn max_positions(&self) -> usize {
        self.text_model.config().max_position_embeddings
    }

    /// transformers would count the image positions into its default `max_length` of 20.
    fn default_max_new_tokens(&self) -> usize {
        20
    }

    fn quantize_decoder(&mut self, dtype: GgmlDType) -> Result<(usize, usize)> {
        self.text_model.quantize(dtype)
    }

    fn encoder_side_linears(&mut self) -> Vec<&mut Linear> {
        let mut linears: Vec<_> = self.vision_model.linears_mut().collect();
        linears.push(&mut self.modality_projection);
        linears
    }

    /// The image positions of `tiles` tiles, then `text_positions` ids spread over the vocabulary.
    fn synthetic_input_ids(&self, _: &GenerationDefaults, text_positions: usize, tiles: usize) -> Vec<u32> {
        let positions = self.config.image_seq_len() * tiles.max(1);
        synthetic_prefix_ids(self.config.image_token_id, positions, &self.config.text_config, text_positions)
    }

    fn decode_step_reads(&self, name: &str) -> bool {
        decode_step_reads(name, "text_model.", &self.config.text_config)
    }

    fn train_logits(&self, _: &Tensor, _: &[Vec<u32>]) -> Result<Tensor> {
        candle_core::bail!("the trainer does not train Idefics3 / SmolVLM yet")
    }

    fn lora_projections(&mut self) -> Vec<(String, &mut Linear)> {
        self.text_model.projections_mut()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `conditioning` holds the tiles of every image, each image's in order: regrouped into one
/// row of features per image, as many as the prompt has `<image>` positions.
fn features_per_image(conditioning: Tensor, input_ids: &[u32], image_token: u32) -> Result<Tensor> {
    let positions = input_ids.iter().filter(|&&id| id == image_token).count();
    let (tiles, per_tile, hidden) = conditioning.dims3()?;
    if positions == 0 || (tiles * per_tile) % positions != 0 {
        candle_core::bail!("{tiles} tiles of {per_tile} features do not fill prompts of {positions} image positions");
    }
    conditioning.reshape((tiles * per_tile / positions, positions, hidden))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_shuffle_gathers_each_block_as_transformers_does() {
        // 4×4 patches of 1 channel numbered by position; scale 2.
        let xs = Tensor::arange(0f32, 16., &candle_core::Device::Cpu).unwrap().reshape((1, 16, 1)).unwrap();
        let out = pixel_shuffle(&xs, 2).unwrap();
        assert_eq!(out.dims(), &[1, 4, 4]);
        // torch: x.view(1,4,2,2).permute(0,2,1,3).reshape(1,2,2,4).permute(0,2,1,3).reshape(1,4,4)
        let want: Vec<f32> = vec![0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.];
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}
