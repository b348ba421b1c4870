//! Ahead-of-time quantization of a checkpoint (the `quantize` binary): a `model.safetensors`
//! the browser downloads at about a third of the f32 size and loads as it is.
//!
//! What changes, by tensor name: the matrices of every `nn.Linear` (SigLIP's and ViT's attention
//! and MLP, the projector, Llama's projections, an untied LM head) and of GPT-2's `Conv1D`s become q8_0
//! (`crate::models::linear::q8_0_blocks`, stored as `<name>.q8_0` + `<name>.q8_0_scales`, see
//! there) when their rows are whole blocks of 32 — those of the encoder side with one scale per
//! row, as they will run in 8 bits (`encoder_side`); the token embeddings (`wte`, `embed_tokens`,
//! tied to the LM head, which is quantized from them at load) become f16; everything else (norms,
//! biases, position embeddings, the patch convolution) is copied unchanged.

use std::collections::HashMap;

use crate::models::linear::{per_output_q8_0_blocks, q8_0_blocks, Q8_0_SCALES_SUFFIX, Q8_0_SUFFIX};
use crate::{Error, Result};

/// Modules that are `nn.Linear` (weight `[out, in]`) in the architectures we load: SigLIP's,
/// Llama's and the projectors', and ViT's (`attention.attention.query` …, `attention.output.dense`,
/// `intermediate.dense`, `output.dense`; without them a ViT-GPT2 file kept its encoder in f32,
/// 62 % of the quantized file).
const LINEAR: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "o_proj",
    "fc1",
    "fc2",
    "gate_proj",
    "up_proj",
    "down_proj",
    "linear_1",
    "linear_2",
    "lm_head",
    "query",
    "key",
    "value",
    "dense",
];
/// GPT-2's `Conv1D` modules (weight `[in, out]`).
const GPT2_CONV1D: &[&str] = &["c_attn", "q_attn", "c_proj", "c_fc"];
/// Token embeddings: f16 in the file (their rows are looked up; the tied LM head is quantized
/// from them at load).
const TOKEN_EMBEDDINGS: &[&str] = &["wte", "embed_tokens"];

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct QuantizeReport {
    /// Tensors written as q8_0.
    pub q8_0: Vec<String>,
    /// Tensors written as f16.
    pub f16: Vec<String>,
    /// Matrices left in f32 because their rows are not whole blocks of 32.
    pub kept_f32: Vec<String>,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

enum Plan {
    /// q8_0 of the `[out, in]` matrix; `transpose`: the file holds `[in, out]` (GPT-2 Conv1D).
    Q8 {
        transpose: bool,
    },
    F16,
    Copy,
}

fn plan(name: &str, shape: &[usize], dtype: safetensors::Dtype, gpt2_decoder: bool) -> Plan {
    let float = matches!(dtype, safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16);
    let Some(module) = name.strip_suffix(".weight").map(|m| m.rsplit('.').next().unwrap_or(m)) else { return Plan::Copy };
    if !float || shape.len() != 2 {
        return Plan::Copy;
    }
    if TOKEN_EMBEDDINGS.contains(&module) {
        return if dtype == safetensors::Dtype::F32 { Plan::F16 } else { Plan::Copy };
    }
    if LINEAR.contains(&module) {
        return Plan::Q8 { transpose: false };
    }
    if gpt2_decoder && name.starts_with("decoder.") && GPT2_CONV1D.contains(&module) {
        return Plan::Q8 { transpose: true };
    }
    Plan::Copy
}

/// Matrices the loaded model multiplies in 8 bits per output feature (the vision tower, the
/// projectors, cross-attention's keys and values: `Architecture::encoder_side_linears`) rather
/// than as q8_0: their blocks carry the row's scale (`per_output_q8_0_blocks`), so they are
/// rounded once. By name, as the rest of this file decides: the model is not built here.
fn encoder_side(model_type: &str, name: &str) -> bool {
    match model_type {
        "vision-encoder-decoder" => name.starts_with("encoder.") || name.starts_with("enc_to_dec_proj.") || name.contains(".crossattention.c_attn."),
        _ => name.contains("vision_tower.") || name.contains("multi_modal_projector."),
    }
}

fn weights_error(reason: String) -> Error {
    Error::Safetensors { file: crate::loading::WEIGHTS.to_string(), reason }
}

/// `weights` (a `model.safetensors`) of the model `config` describes, rewritten with q8_0
/// matrices; tensor names are kept as the file has them.
pub fn quantize_checkpoint(config: &serde_json::Value, weights: &[u8]) -> Result<(Vec<u8>, QuantizeReport)> {
    let model_type = config.get("model_type").and_then(|t| t.as_str()).unwrap_or_default();
    let gpt2_decoder = match model_type {
        "vision-encoder-decoder" => config.pointer("/decoder/model_type").and_then(|t| t.as_str()) == Some("gpt2"),
        "llava" => false,
        other => {
            return Err(Error::config(
                crate::loading::CONFIG,
                format!("model_type {other:?} cannot be quantized (expected \"vision-encoder-decoder\" or \"llava\")"),
            ))
        }
    };
    let st = safetensors::SafeTensors::deserialize(weights).map_err(|e| weights_error(e.to_string()))?;
    if let Some(name) = st.names().into_iter().find(|n| n.ends_with(Q8_0_SUFFIX)) {
        return Err(weights_error(format!("`{name}` is q8_0 already: this checkpoint is quantized")));
    }
    let mut report = QuantizeReport { bytes_in: weights.len(), ..Default::default() };
    // (name, dtype, shape, bytes)
    let mut out: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| weights_error(format!("tensor `{name}`: {e}")))?;
        let shape = view.shape().to_vec();
        let as_f32 = || -> Result<Vec<f32>> {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => candle_core::DType::F32,
                safetensors::Dtype::F16 => candle_core::DType::F16,
                _ => candle_core::DType::BF16,
            };
            let t = candle_core::Tensor::from_raw_buffer(view.data(), dtype, &shape, &candle_core::Device::Cpu)?;
            Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        match plan(name, &shape, view.dtype(), gpt2_decoder) {
            Plan::Q8 { transpose } => {
                let (out_dim, in_dim) = if transpose { (shape[1], shape[0]) } else { (shape[0], shape[1]) };
                if in_dim % 32 != 0 {
                    report.kept_f32.push(name.to_string());
                    out.push((name.to_string(), view.dtype(), shape, view.data().to_vec()));
                    continue;
                }
                let mut w = as_f32()?;
                if transpose {
                    let t = candle_core::Tensor::from_vec(w, (in_dim, out_dim), &candle_core::Device::Cpu)?;
                    w = t.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                }
                let (qs, scales) = if encoder_side(model_type, name) { per_output_q8_0_blocks(&w, in_dim) } else { q8_0_blocks(&w) };
                let base = name.to_string();
                out.push((format!("{base}{Q8_0_SUFFIX}"), safetensors::Dtype::I8, vec![out_dim, in_dim], qs.into_iter().map(|q| q as u8).collect()));
                let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                out.push((format!("{base}{Q8_0_SCALES_SUFFIX}"), safetensors::Dtype::F32, vec![out_dim, in_dim / 32], scale_bytes));
                report.q8_0.push(base);
            }
            Plan::F16 => {
                let half: Vec<u8> = as_f32()?.into_iter().flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect();
                out.push((name.to_string(), safetensors::Dtype::F16, shape, half));
                report.f16.push(name.to_string());
            }
            Plan::Copy => out.push((name.to_string(), view.dtype(), shape, view.data().to_vec())),
        }
    }
    let views = out
        .iter()
        .map(|(name, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| weights_error(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("wasmcap_quantization".to_string(), "q8_0".to_string());
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| weights_error(e.to_string()))?;
    report.bytes_out = bytes.len();
    Ok((bytes, report))
}
