//! PEFT LoRA adapters merged into the base weights at load time:
//! W' = W + s·B·A with s = lora_alpha / r (lora_alpha / √r with rsLoRA), so inference runs the
//! plain model at full speed. Reads `adapter_config.json` and `adapter_model.safetensors` as PEFT
//! writes them (`base_model.model.<module>.lora_A.weight`, `….lora_B.weight`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::loading;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The files of a PEFT adapter folder, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct AdapterFiles<'a> {
    pub config: &'a [u8],
    pub weights: &'a [u8],
}

/// `adapter_config.json`: the fields that change the merged weights.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default = "default_bias")]
    pub bias: String,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_bias() -> String {
    "none".into()
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    /// A regular expression over full module names; we do not re-check it (every adapter
    /// tensor must still find its base weight).
    Regex(String),
}

/// PEFT matches a pattern key against a module path as a suffix on dot boundaries.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

impl LoraConfig {
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let value = loading::parse_json(ADAPTER_CONFIG, bytes)?;
        let cfg: Self = serde_json::from_value(value).map_err(|e| Error::config(ADAPTER_CONFIG, e))?;
        if cfg.peft_type != "LORA" {
            return Err(Error::config(ADAPTER_CONFIG, format!("peft_type {:?} is not supported (only LORA)", cfg.peft_type)));
        }
        if cfg.use_dora {
            return Err(Error::config(ADAPTER_CONFIG, "use_dora adapters are not supported"));
        }
        if cfg.fan_in_fan_out {
            return Err(Error::config(ADAPTER_CONFIG, "fan_in_fan_out (Conv1D targets) is not supported"));
        }
        if cfg.bias != "none" {
            return Err(Error::config(ADAPTER_CONFIG, format!("bias {:?} is not supported (only \"none\")", cfg.bias)));
        }
        if cfg.r == 0 {
            return Err(Error::config(ADAPTER_CONFIG, "r must be positive"));
        }
        Ok(cfg)
    }

    fn rank_and_alpha(&self, module: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(p, _)| pattern_matches(p, module)).map(|(_, r)| *r).unwrap_or(self.r);
        let alpha = self.alpha_pattern.iter().find(|(p, _)| pattern_matches(p, module)).map(|(_, a)| *a).unwrap_or(self.lora_alpha);
        (r, alpha)
    }

    fn scale(&self, r: usize, alpha: f64) -> f64 {
        scale(alpha, r, self.use_rslora)
    }
}

/// PEFT's scale of B·A: `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA. The trainer's
/// adapters use it too, so what it trains is what merging applies.
pub fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// Merges the adapter into `base` (tensors keyed as the model loads them). `rename` maps a
/// PEFT module path (without `base_model.model.`) to the base checkpoint's naming, the same
/// folding the base weights went through. Returns the merged module paths.
pub fn merge(base: &mut HashMap<String, Tensor>, adapter: AdapterFiles<'_>, rename: impl Fn(&str) -> String) -> Result<Vec<String>> {
    let cfg = LoraConfig::from_json(adapter.config)?;
    let tensors = loading::load_safetensors(ADAPTER_WEIGHTS, adapter.weights, |n| n.to_string())?;

    if let Some(TargetModules::Names(names)) = &cfg.target_modules {
        let known: BTreeSet<&str> = base.keys().filter_map(|k| k.strip_suffix(".weight")).filter_map(|m| m.rsplit('.').next()).collect();
        let unknown: Vec<&str> = names.iter().map(String::as_str).filter(|n| !known.contains(n)).collect();
        if !unknown.is_empty() {
            return Err(Error::config(ADAPTER_CONFIG, format!("target_modules {unknown:?} match no module of the base model")));
        }
    }

    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, tensor) in tensors {
        let stripped = name.strip_prefix("base_model.model.").unwrap_or(&name);
        let (module, is_a) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(Error::Safetensors {
                file: ADAPTER_WEIGHTS.into(),
                reason: format!("tensor `{name}` is not a LoRA weight (expected ….lora_A.weight / ….lora_B.weight)"),
            });
        };
        let entry = pairs.entry(module.to_string()).or_default();
        if is_a {
            entry.0 = Some(tensor);
        } else {
            entry.1 = Some(tensor);
        }
    }
    if pairs.is_empty() {
        return Err(Error::Safetensors { file: ADAPTER_WEIGHTS.into(), reason: "no LoRA weights in the adapter".into() });
    }

    let mut merged = Vec::with_capacity(pairs.len());
    for (module, pair) in pairs {
        let (Some(a), Some(b)) = pair else {
            return Err(Error::MissingTensor { file: ADAPTER_WEIGHTS.into(), name: format!("{module}: lora_A and lora_B must both be present") });
        };
        let key = rename(&format!("{module}.weight"));
        let Some(w) = base.get(&key) else {
            return Err(Error::config(ADAPTER_CONFIG, format!("the adapter targets `{module}`, which the base model does not have (no `{key}`)")));
        };
        let (r, alpha) = cfg.rank_and_alpha(&module);
        let (out_dim, in_dim) = w.dims2().map_err(|_| Error::config(ADAPTER_CONFIG, format!("`{module}` is not a linear layer")))?;
        let shape_err = |which: &str, t: &Tensor, expected: Vec<usize>| Error::ShapeMismatch {
            file: ADAPTER_WEIGHTS.into(),
            name: format!("{module}.{which}.weight (r = {r})"),
            expected,
            found: t.dims().to_vec(),
        };
        if a.dims() != [r, in_dim] {
            return Err(shape_err("lora_A", &a, vec![r, in_dim]));
        }
        if b.dims() != [out_dim, r] {
            return Err(shape_err("lora_B", &b, vec![out_dim, r]));
        }
        // In f32, whatever the files store: a 16-bit base merges as in a float32 model.
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let delta = (f32(&b)?.matmul(&f32(&a)?)? * cfg.scale(r, alpha))?;
        let updated = (f32(w)? + delta)?;
        base.insert(key, updated);
        merged.push(module);
    }
    Ok(merged)
}
