//! The model a training run updates: built from HF folders (encoder + decoder), an existing
//! captioner folder, or a config with fresh weights; through the inference modules
//! (`crate::models`), with the trainable tensors as candle `Var`s. Also turns the trained state
//! back into a folder in the HF layout (`config.json`, `model.safetensors`, tokenizer,
//! preprocessor, generation config; a PEFT adapter for LoRA).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde_json::{json, Value};

use super::optim::Param;
use super::{create_dir, write_atomic};
use crate::error::{from_candle_weights, Error, Result};
use crate::loading::{llava_key, load_safetensors, read_path as read, vision_encoder_decoder_key};
use crate::models::linear::LoraUpdate;
use crate::models::llava::{Llava, LlavaConfig};
use crate::models::vision_encoder_decoder::{VisionEncoderDecoder, VisionEncoderDecoderConfig};
use crate::preprocess::PreprocessorConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// SigLIP → GPT-2 with cross-attention (🤗 VisionEncoderDecoderModel).
    CrossAttention,
    /// SigLIP → projector → image embeddings before the text of a Llama (🤗 LlavaForConditionalGeneration).
    Prefix,
}

/// LoRA settings (PEFT's names).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub rslora: bool,
}

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        crate::lora::scale(self.alpha, self.r, self.rslora)
    }
}

/// Initial weights and data order come from the crate's one generator (`crate::rng`): the same
/// seed gives the same model on every machine, which resume-equality tests rely on.
pub type InitRng = crate::rng::SplitMix64;

/// A tensor of `shape` whose values `f` draws from `rng`.
pub fn random_tensor(rng: &mut InitRng, shape: &Shape, f: impl Fn(&mut InitRng) -> f64) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..shape.elem_count()).map(|_| f(rng) as f32).collect();
    Tensor::from_vec(data, shape.clone(), &Device::Cpu)
}

/// Hands the model builder loaded tensors (or fresh ones), as `Var`s where `trainable` says so,
/// and remembers every tensor it handed out so the trained model can be written back.
struct TrainBackend {
    loaded: HashMap<String, Tensor>,
    trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Tensors the files may lack and get fresh weights (all of them when training from a config).
    may_init: Box<dyn Fn(&str) -> bool + Send + Sync>,
    state: Arc<Mutex<BuiltState>>,
}

#[derive(Default)]
struct BuiltState {
    rng: Option<InitRng>,
    /// Name → (tensor, var if trainable), in the order the builder asked.
    tensors: Vec<(String, Tensor, Option<Var>)>,
    initialised: Vec<String>,
}

impl SimpleBackend for TrainBackend {
    fn get(&self, shape: Shape, name: &str, hint: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut state = self.state.lock().map_err(|_| candle_core::Error::Msg("weights lock poisoned".into()))?;
        if let Some((_, t, _)) = state.tensors.iter().find(|(n, _, _)| n == name) {
            return Ok(t.clone());
        }
        let tensor = match self.loaded.get(name) {
            Some(t) => {
                if t.shape() != &shape {
                    return Err(candle_core::Error::UnexpectedShape {
                        msg: format!("shape mismatch for {name}"),
                        expected: shape,
                        got: t.shape().clone(),
                    }
                    .bt());
                }
                t.to_dtype(dtype)?.to_device(dev)?
            }
            None if (self.may_init)(name) => {
                let rng = state.rng.get_or_insert_with(|| InitRng::new(0));
                // transformers' _init_weights: N(0, 0.02) for matrices and embeddings, zeros for
                // biases, ones for norm gains (the hint says which). Except a Llama's token
                // embeddings: N(0, 1/hidden), rows of norm ≈ 1. The prefix recipe freezes the
                // language model, and with a tied head of norm 0.02·√hidden the logits could never
                // leave ±0.02·hidden — too flat for any adapter to make a confident caption.
                let t = match hint {
                    Init::Const(c) if c != 0.0 => random_tensor(rng, &shape, |_| c)?,
                    _ if name.ends_with("bias") => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
                    _ if name.ends_with("language_model.embed_tokens.weight") => {
                        let std = 1.0 / (*shape.dims().last().unwrap_or(&1) as f64).sqrt();
                        random_tensor(rng, &shape, |r| std * r.normal())?
                    }
                    _ => random_tensor(rng, &shape, |r| 0.02 * r.normal())?,
                };
                state.initialised.push(name.to_string());
                t.to_dtype(dtype)?.to_device(dev)?
            }
            None => return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt()),
        };
        let (tensor, var) = if (self.trainable)(name) {
            let var = Var::from_tensor(&tensor)?;
            (var.as_tensor().clone(), Some(var))
        } else {
            (tensor, None)
        };
        state.tensors.push((name.to_string(), tensor.clone(), var));
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        self.loaded.get(name).cloned().ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.loaded.contains_key(name)
    }
}

pub enum Network {
    CrossAttention(VisionEncoderDecoder),
    Prefix(Llava),
}

/// A LoRA update attached to one Llama projection while it trains.
pub struct LoraLayer {
    /// PEFT's module path under the language model, e.g. `layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: Var,
    pub b: Var,
}

pub struct TrainModel {
    pub arch: Arch,
    /// The whole HF `config.json`, as it will be written.
    pub config: Value,
    pub network: Network,
    pub params: Vec<Param>,
    /// Every tensor of the model by canonical name (trainable ones are the `Var`s' tensors).
    tensors: Vec<(String, Tensor, Option<Var>)>,
    pub lora: Option<(LoraSettings, Vec<LoraLayer>)>,
    pub tokenizer: tokenizers::Tokenizer,
    pub preprocessor: PreprocessorConfig,
    pub preprocessor_json: Value,
    pub specials: SpecialTokens,
    /// Tensors that got fresh weights (cross-attention added to a pretrained GPT-2, …).
    pub initialised: Vec<String>,
    /// Caption length in tokens the generation config allows (capped by the decoder's positions).
    pub max_caption_tokens: usize,
    /// Where the tensors live and what they compute in (f32, or bf16 with f32 masters).
    pub device: Device,
    pub dtype: DType,
    /// bf16 runs: the optimizer's f32 master values of trainable tensors (by parameter name),
    /// written instead of the rounded working copies when the model is exported.
    pub masters: HashMap<String, Tensor>,
}

/// The ids training needs to lay out sequences.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecialTokens {
    /// Cross-attention: first decoder input. Prefix: unused.
    pub decoder_start: u32,
    pub eos: u32,
    pub pad: u32,
    /// Prefix: the `<image>` id.
    pub image: Option<u32>,
}

/// Where the weights come from.
pub enum Source<'a> {
    /// An encoder folder (SigLIP) and a decoder folder (GPT-2 or Llama).
    Folders { encoder: &'a Path, decoder: &'a Path },
    /// A captioner folder this crate (or transformers) wrote: continue training it.
    Model(&'a Path),
    /// A full `config.json` (vision-encoder-decoder or llava): every weight fresh.
    Config(&'a Path),
}

pub struct BuildOptions {
    pub arch: Arch,
    pub train_encoder: bool,
    /// Prefix: train the language model in full (a base for later LoRA runs) instead of LoRA.
    pub train_decoder: bool,
    pub lora: Option<LoraSettings>,
    pub seed: u64,
    /// A tokenizer to use instead of the decoder's (e.g. a word-level one built from the data).
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

fn read_json(path: &Path) -> Result<Value> {
    crate::loading::parse_json(&path.display().to_string(), &read(path)?)
}

fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_bytes(read(path)?).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// `vision_config` of a SigLIP folder: a `siglip` (text + vision) or a `siglip_vision_model` config.
fn vision_config(value: &Value, file: &str) -> Result<Value> {
    let mut vision = match value.get("model_type").and_then(Value::as_str) {
        Some("siglip") => value.get("vision_config").cloned().ok_or_else(|| Error::config(file, "a siglip config without vision_config"))?,
        Some("siglip_vision_model") => value.clone(),
        other => return Err(Error::config(file, format!("the encoder must be SigLIP (model_type siglip or siglip_vision_model), found {other:?}"))),
    };
    vision["model_type"] = json!("siglip_vision_model");
    Ok(vision)
}

fn rename_all(tensors: HashMap<String, Tensor>, f: impl Fn(&str) -> Option<String>) -> HashMap<String, Tensor> {
    tensors.into_iter().filter_map(|(k, v)| f(&k).map(|k| (k, v))).collect()
}

fn special_id(tokenizer: &tokenizers::Tokenizer, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|n| tokenizer.token_to_id(n))
}

impl TrainModel {
    /// On the CPU in f32.
    pub fn build(source: Source<'_>, options: BuildOptions) -> Result<Self> {
        Self::build_on(source, options, &Device::Cpu, DType::F32)
    }

    /// On `device`, computing in `dtype` (every tensor of the model, frozen or trainable, is held
    /// in it; weights are read in f32 and converted once).
    pub fn build_on(source: Source<'_>, options: BuildOptions, device: &Device, dtype: DType) -> Result<Self> {
        let (mut config, loaded, mut tokenizer, preprocessor_json, fresh) = match source {
            Source::Folders { encoder, decoder } => {
                let enc_file = encoder.join("config.json");
                let vision = vision_config(&read_json(&enc_file)?, &enc_file.display().to_string())?;
                let enc_weights = load_safetensors("encoder model.safetensors", &read(&encoder.join("model.safetensors"))?, |k| k.to_string())?;
                let dec_file = decoder.join("config.json");
                let mut text = read_json(&dec_file)?;
                let dec_weights = load_safetensors("decoder model.safetensors", &read(&decoder.join("model.safetensors"))?, |k| k.to_string())?;
                let tokenizer = match options.tokenizer.clone() {
                    Some(t) => t,
                    None => load_tokenizer(&decoder.join("tokenizer.json"))?,
                };
                let preprocessor = match read(&encoder.join("preprocessor_config.json")) {
                    Ok(bytes) => crate::loading::parse_json("preprocessor_config.json", &bytes)?,
                    Err(Error::MissingFile(_)) => default_preprocessor(&vision),
                    Err(e) => return Err(e),
                };
                let strip_vision = |k: &str| k.strip_prefix("vision_model.").map(str::to_string);
                let text_type = text.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
                match options.arch {
                    Arch::CrossAttention => {
                        if text_type != "gpt2" {
                            return Err(Error::config(
                                &dec_file.display().to_string(),
                                format!("--arch cross-attention needs a GPT-2 decoder, found model_type {text_type:?}"),
                            ));
                        }
                        text["add_cross_attention"] = json!(true);
                        text["is_decoder"] = json!(true);
                        let mut tensors = rename_all(enc_weights, |k| strip_vision(k).map(|k| format!("encoder.{k}")));
                        tensors.extend(rename_all(dec_weights, |k| {
                            let k = k.strip_prefix("transformer.").unwrap_or(k);
                            Some(if k.starts_with("lm_head.") { format!("decoder.{k}") } else { format!("decoder.transformer.{k}") })
                        }));
                        let config = json!({
                            "model_type": "vision-encoder-decoder",
                            "architectures": ["VisionEncoderDecoderModel"],
                            "encoder": vision,
                            "decoder": text,
                            "tie_word_embeddings": false,
                        });
                        (config, tensors, tokenizer, preprocessor, false)
                    }
                    Arch::Prefix => {
                        if text_type != "llama" {
                            return Err(Error::config(
                                &dec_file.display().to_string(),
                                format!("--arch prefix needs a Llama decoder, found model_type {text_type:?}"),
                            ));
                        }
                        let mut tensors = rename_all(enc_weights, |k| strip_vision(k).map(|k| format!("model.vision_tower.{k}")));
                        tensors.extend(rename_all(dec_weights, |k| {
                            Some(match k.strip_prefix("model.") {
                                Some(rest) => format!("model.language_model.{rest}"),
                                None => k.to_string(),
                            })
                        }));
                        let patches = vision_patches(&vision);
                        let config = json!({
                            "model_type": "llava",
                            "architectures": ["LlavaForConditionalGeneration"],
                            "vision_config": vision,
                            "text_config": text,
                            "image_seq_length": patches,
                            "vision_feature_layer": -1,
                            "vision_feature_select_strategy": "full",
                            "projector_hidden_act": "gelu",
                            "multimodal_projector_bias": true,
                            "tie_word_embeddings": text.get("tie_word_embeddings").cloned().unwrap_or(json!(true)),
                        });
                        (config, tensors, tokenizer, preprocessor, false)
                    }
                }
            }
            Source::Model(dir) => {
                let config = read_json(&dir.join("config.json"))?;
                let weights = read(&dir.join("model.safetensors"))?;
                let arch = arch_of(&config, "config.json")?;
                let tensors = match arch {
                    Arch::CrossAttention => load_safetensors("model.safetensors", &weights, vision_encoder_decoder_key)?,
                    Arch::Prefix => load_safetensors("model.safetensors", &weights, llava_key)?,
                };
                let tokenizer = match options.tokenizer.clone() {
                    Some(t) => t,
                    None => load_tokenizer(&dir.join("tokenizer.json"))?,
                };
                let preprocessor = read_json(&dir.join("preprocessor_config.json"))?;
                (config, tensors, tokenizer, preprocessor, false)
            }
            Source::Config(path) => {
                let config = read_json(path)?;
                let tokenizer = options.tokenizer.clone().ok_or_else(|| {
                    Error::config(&path.display().to_string(), "training from a config needs a tokenizer (--tokenizer FILE or word-level)")
                })?;
                let vision = match arch_of(&config, &path.display().to_string())? {
                    Arch::CrossAttention => config.get("encoder").cloned().unwrap_or_default(),
                    Arch::Prefix => config.get("vision_config").cloned().unwrap_or_default(),
                };
                let preprocessor = default_preprocessor(&vision);
                (config, HashMap::new(), tokenizer, preprocessor, true)
            }
        };
        let arch = arch_of(&config, "config.json")?;
        if arch != options.arch {
            return Err(Error::config("config.json", format!("the model is {arch:?} but --arch says {:?}", options.arch)));
        }

        // Special tokens, and the vocabulary size the tokenizer needs.
        let specials = match arch {
            Arch::CrossAttention => {
                let eos = special_id(&tokenizer, &["<eos>", "<|endoftext|>", "</s>"]).or_else(|| id_in(&config["decoder"], "eos_token_id"));
                let eos =
                    eos.ok_or_else(|| Error::Tokenizer("no end-of-sequence token (<eos>, <|endoftext|> or </s>) in the tokenizer or config".into()))?;
                let start = special_id(&tokenizer, &["<bos>"])
                    .or_else(|| id_in(&config, "decoder_start_token_id"))
                    .or_else(|| id_in(&config["decoder"], "bos_token_id"))
                    .unwrap_or(eos);
                let pad = special_id(&tokenizer, &["<pad>"]).unwrap_or(eos);
                config["decoder_start_token_id"] = json!(start);
                config["eos_token_id"] = json!(eos);
                config["pad_token_id"] = json!(pad);
                config["decoder"]["bos_token_id"] = json!(start);
                config["decoder"]["eos_token_id"] = json!(eos);
                config["decoder"]["pad_token_id"] = json!(pad);
                SpecialTokens { decoder_start: start, eos, pad, image: None }
            }
            Arch::Prefix => {
                if tokenizer.token_to_id("<image>").is_none() {
                    tokenizer
                        .add_special_tokens([tokenizers::AddedToken::from("<image>", true)])
                        .map_err(|e| Error::Tokenizer(format!("could not add <image>: {e}")))?;
                }
                let image = tokenizer.token_to_id("<image>").ok_or_else(|| Error::Tokenizer("could not add <image>".into()))?;
                let eos = special_id(&tokenizer, &["<eos>", "<|endoftext|>", "<|im_end|>", "</s>"])
                    .or_else(|| id_in(&config["text_config"], "eos_token_id"));
                let eos = eos.ok_or_else(|| Error::Tokenizer("no end-of-sequence token in the tokenizer or config".into()))?;
                let pad = special_id(&tokenizer, &["<pad>"]).unwrap_or(eos);
                config["image_token_index"] = json!(image);
                config["text_config"]["eos_token_id"] = json!(eos);
                config["text_config"]["pad_token_id"] = json!(pad);
                config["pad_token_id"] = json!(pad);
                SpecialTokens { decoder_start: eos, eos, pad, image: Some(image) }
            }
        };
        let vocab = tokenizer.get_vocab_size(true);
        let vocab_key = match arch {
            Arch::CrossAttention => "decoder",
            Arch::Prefix => "text_config",
        };
        let config_vocab = config[vocab_key].get("vocab_size").and_then(Value::as_u64).unwrap_or(0) as usize;
        if fresh {
            // Room for every token; a config may ask for more (unused rows, as in padded vocabularies).
            config[vocab_key]["vocab_size"] = json!(vocab.max(config_vocab));
        } else if vocab > config_vocab {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has {vocab} tokens but the decoder's vocabulary is {config_vocab}; pass a model whose vocabulary holds every token (including <image>)"
            )));
        }

        // Which tensors train, which may be created.
        let (train_encoder, train_decoder) = (options.train_encoder, options.train_decoder);
        if train_decoder && options.lora.is_some() {
            return Err(Error::config("train", "--train-decoder trains the language model in full; use it with --lora-rank 0"));
        }
        let trainable: Box<dyn Fn(&str) -> bool + Send + Sync> = match arch {
            Arch::CrossAttention => Box::new(move |n: &str| {
                n.starts_with("decoder.") || n.starts_with("enc_to_dec_proj.") || (train_encoder && n.starts_with("encoder."))
            }),
            Arch::Prefix => Box::new(move |n: &str| {
                n.starts_with("model.multi_modal_projector.")
                    || (train_encoder && n.starts_with("model.vision_tower."))
                    || (train_decoder && (n.starts_with("model.language_model.") || n.starts_with("lm_head.")))
            }),
        };
        let may_init: Box<dyn Fn(&str) -> bool + Send + Sync> = if fresh {
            Box::new(|_| true)
        } else {
            match arch {
                // A pretrained GPT-2 has no cross-attention yet; a folder pair has no projection.
                Arch::CrossAttention => {
                    Box::new(|n: &str| n.contains(".crossattention.") || n.contains(".ln_cross_attn.") || n.starts_with("enc_to_dec_proj."))
                }
                Arch::Prefix => Box::new(|n: &str| n.starts_with("model.multi_modal_projector.")),
            }
        };
        let state = Arc::new(Mutex::new(BuiltState { rng: Some(InitRng::new(options.seed)), ..Default::default() }));
        let backend = TrainBackend { loaded, trainable, may_init, state: state.clone() };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let network = match arch {
            Arch::CrossAttention => {
                let cfg = VisionEncoderDecoderConfig::from_json(&config).map_err(|e| Error::config("config.json", e))?;
                Network::CrossAttention(VisionEncoderDecoder::new(&cfg, vb).map_err(|e| from_candle_weights("model.safetensors", e))?)
            }
            Arch::Prefix => {
                let cfg = LlavaConfig::from_json(&config).map_err(|e| Error::config("config.json", e))?;
                Network::Prefix(Llava::new(&cfg, vb).map_err(|e| from_candle_weights("model.safetensors", e))?)
            }
        };
        let (tensors, initialised, mut rng) = {
            let mut s = state.lock().map_err(|_| Error::Compute("weights lock poisoned".into()))?;
            (std::mem::take(&mut s.tensors), std::mem::take(&mut s.initialised), s.rng.take().unwrap_or_else(|| InitRng::new(options.seed)))
        };
        let mut params: Vec<Param> = tensors
            .iter()
            .filter_map(|(name, t, var)| {
                var.as_ref().map(|v| Param { name: name.clone(), var: v.clone(), decay: t.rank() > 1 && !name.contains("embedding") })
            })
            .collect();

        let mut model = Self {
            arch,
            config,
            network,
            params: vec![],
            tensors,
            lora: None,
            tokenizer,
            preprocessor: PreprocessorConfig::from_json(preprocessor_json.to_string().as_bytes())?,
            preprocessor_json,
            specials,
            initialised,
            max_caption_tokens: 32,
            device: device.clone(),
            dtype,
            masters: HashMap::new(),
        };
        if let Some(settings) = options.lora {
            let layers = model.attach_lora(&settings, &mut rng)?;
            for l in &layers {
                params.push(Param { name: format!("lora.{}.lora_A", l.module), var: l.a.clone(), decay: true });
                params.push(Param { name: format!("lora.{}.lora_B", l.module), var: l.b.clone(), decay: true });
            }
            model.lora = Some((settings, layers));
        }
        if params.is_empty() {
            return Err(Error::config("train", "nothing to train: no trainable tensors"));
        }
        model.params = params;
        Ok(model)
    }

    fn attach_lora(&mut self, settings: &LoraSettings, rng: &mut InitRng) -> Result<Vec<LoraLayer>> {
        let Network::Prefix(llava) = &mut self.network else {
            return Err(Error::config("train", "--lora-rank applies to the prefix architecture (the cross-attention decoder trains in full)"));
        };
        if settings.r == 0 {
            return Err(Error::config("train", "--lora-rank must be at least 1"));
        }
        let known = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        if let Some(bad) = settings.targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(Error::config("train", format!("unknown LoRA target `{bad}` (Llama has {})", known.join(", "))));
        }
        let mut layers = Vec::new();
        for (module, linear) in llava.language_model_mut().projections_mut() {
            let leaf = module.rsplit('.').next().unwrap_or_default();
            if !settings.targets.iter().any(|t| t == leaf) {
                continue;
            }
            let (d_in, d_out) = linear.dims()?;
            // PEFT: A ~ kaiming_uniform(a = √5) = U(±1/√in), B = 0, so training starts at the base model.
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = random_tensor(rng, &Shape::from((settings.r, d_in)), |r| (2.0 * r.uniform() - 1.0) * bound)?;
            let a = Var::from_tensor(&a.to_dtype(self.dtype)?.to_device(&self.device)?)?;
            let b = Var::zeros((d_out, settings.r), self.dtype, &self.device)?;
            linear.set_lora(Some(LoraUpdate { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: settings.scale() }));
            layers.push(LoraLayer { module, a, b });
        }
        Ok(layers)
    }

    /// Feeds everything the image features depend on into `d`: the vision config and every
    /// encoder / vision-tower tensor (name, shape, values).
    pub fn digest_encoder(&self, d: &mut super::features::Digest) -> Result<()> {
        let (prefix, vision) = match self.arch {
            Arch::CrossAttention => ("encoder.", self.config.get("encoder").cloned().unwrap_or_default()),
            Arch::Prefix => (
                "model.vision_tower.",
                json!([self.config.get("vision_config"), self.config.get("vision_feature_layer"), self.config.get("vision_feature_select_strategy")]),
            ),
        };
        d.write(vision.to_string().as_bytes());
        let mut encoder: Vec<&(String, Tensor, Option<Var>)> = self.tensors.iter().filter(|(n, _, _)| n.starts_with(prefix)).collect();
        encoder.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t, _) in encoder {
            d.write(name.as_bytes());
            d.write(format!("{:?}", t.dims()).as_bytes());
            let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            d.write(&bytes);
        }
        Ok(())
    }

    /// Sets trainable tensors from a checkpoint (names as in `params`).
    pub fn load_params(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for p in &self.params {
            let t = tensors.get(&p.name).ok_or_else(|| Error::MissingTensor { file: "checkpoint".into(), name: p.name.clone() })?;
            if t.dims() != p.var.dims() {
                return Err(Error::ShapeMismatch {
                    file: "checkpoint".into(),
                    name: p.name.clone(),
                    expected: p.var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            p.var.set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
        }
        Ok(())
    }

    /// Trainable tensors by parameter name (the f32 masters in bf16 runs).
    pub fn param_tensors(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|p| (p.name.clone(), self.trained(&p.name, p.var.as_tensor()).detach())).collect()
    }

    pub fn num_trainable(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    pub fn num_total(&self) -> usize {
        let lora: usize = self.lora.as_ref().map(|(_, l)| l.iter().map(|l| l.a.elem_count() + l.b.elem_count()).sum()).unwrap_or(0);
        self.tensors.iter().map(|(_, t, _)| t.elem_count()).sum::<usize>() + lora
    }

    /// A trainable tensor's value for export: the f32 master in bf16 runs, else the tensor.
    fn trained(&self, param: &str, tensor: &Tensor) -> Tensor {
        self.masters.get(param).unwrap_or(tensor).clone()
    }

    /// Weights as the saved `model.safetensors` names them (LoRA merged: W + s·B·A).
    pub fn export_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut merged: HashMap<String, Tensor> = HashMap::new();
        if let Some((settings, layers)) = &self.lora {
            for l in layers {
                let a = self.trained(&format!("lora.{}.lora_A", l.module), l.a.as_tensor()).to_dtype(DType::F32)?;
                let b = self.trained(&format!("lora.{}.lora_B", l.module), l.b.as_tensor()).to_dtype(DType::F32)?;
                let name = format!("model.language_model.{}.weight", l.module);
                let base = self
                    .tensors
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .map(|(_, t, _)| t.clone())
                    .ok_or_else(|| Error::MissingTensor { file: "model".into(), name: name.clone() })?;
                let delta = (b.matmul(&a)? * settings.scale())?;
                merged.insert(name, (base.to_dtype(DType::F32)? + delta)?);
            }
        }
        let mut out = BTreeMap::new();
        for (name, tensor, _) in &self.tensors {
            let value = merged.remove(name).unwrap_or_else(|| self.trained(name, tensor)).detach().contiguous()?;
            out.insert(saved_name(self.arch, name), value);
        }
        Ok(out)
    }

    /// The LoRA updates as a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) for
    /// the model written without them (`export_tensors_unmerged`).
    pub fn export_adapter(&self, base_name: &str) -> Result<Option<(Value, BTreeMap<String, Tensor>)>> {
        let Some((settings, layers)) = &self.lora else { return Ok(None) };
        let mut tensors = BTreeMap::new();
        for l in layers {
            let prefix = format!("base_model.model.model.language_model.{}", l.module);
            tensors.insert(format!("{prefix}.lora_A.weight"), self.trained(&format!("lora.{}.lora_A", l.module), l.a.as_tensor()).detach());
            tensors.insert(format!("{prefix}.lora_B.weight"), self.trained(&format!("lora.{}.lora_B", l.module), l.b.as_tensor()).detach());
        }
        let config = json!({
            "peft_type": "LORA",
            "base_model_name_or_path": base_name,
            "r": settings.r,
            "lora_alpha": settings.alpha,
            "use_rslora": settings.rslora,
            // A pattern, so the vision tower's q_proj/k_proj/… are not adapted too.
            "target_modules": format!(".*language_model.*\\.({})", settings.targets.join("|")),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_dora": false,
            "task_type": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        Ok(Some((config, tensors)))
    }

    /// Weights without the LoRA updates (the base an adapter applies to).
    pub fn export_tensors_unmerged(&self) -> Result<BTreeMap<String, Tensor>> {
        self.tensors.iter().map(|(name, t, _)| Ok((saved_name(self.arch, name), t.detach().contiguous()?))).collect()
    }

    pub fn generation_config(&self) -> Value {
        match &self.network {
            Network::CrossAttention(m) => json!({
                "decoder_start_token_id": self.specials.decoder_start,
                "bos_token_id": self.specials.decoder_start,
                "eos_token_id": self.specials.eos,
                "pad_token_id": self.specials.pad,
                // transformers counts the start token into max_length.
                "max_length": (self.max_caption_tokens + 1).min(m.decoder().config().n_positions),
            }),
            Network::Prefix(m) => {
                let room = m.config().text_config.max_position_embeddings.saturating_sub(m.config().num_image_tokens() + 8);
                json!({ "eos_token_id": self.specials.eos, "pad_token_id": self.specials.pad, "max_new_tokens": self.max_caption_tokens.min(room.max(1)) })
            }
        }
    }

    /// Writes the folder the browser package and transformers load: `config.json`,
    /// `model.safetensors` (LoRA merged), tokenizer, preprocessor and generation configs; with
    /// LoRA, also `adapter/` (PEFT) and `base/` (the weights the adapter applies to).
    /// Each file is replaced atomically, next to whatever else the folder holds (checkpoints, logs).
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        create_dir(dir)?;
        for (name, bytes) in self.model_files(&self.export_tensors()?)? {
            write_atomic(&dir.join(name), &bytes)?;
        }
        if let Some((adapter_config, adapter)) = self.export_adapter("../base")? {
            let base = dir.join("base");
            create_dir(&base)?;
            for (name, bytes) in self.model_files(&self.export_tensors_unmerged()?)? {
                write_atomic(&base.join(name), &bytes)?;
            }
            let ad = dir.join("adapter");
            create_dir(&ad)?;
            write_atomic(&ad.join("adapter_config.json"), &pretty(&adapter_config)?)?;
            write_atomic(&ad.join("adapter_model.safetensors"), &safetensors_bytes(&adapter)?)?;
        }
        Ok(())
    }

    /// The files of a model folder, by name, for these weights.
    pub fn model_files(&self, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let tokenizer = self.tokenizer.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(vec![
            ("config.json", pretty(&self.config)?),
            ("generation_config.json", pretty(&self.generation_config())?),
            ("preprocessor_config.json", pretty(&self.preprocessor_json)?),
            ("tokenizer.json", tokenizer.into_bytes()),
            ("tokenizer_config.json", pretty(&self.tokenizer_config())?),
            ("model.safetensors", safetensors_bytes(tensors)?),
        ])
    }

    /// What `AutoTokenizer` needs to load `tokenizer.json` with the right special tokens.
    fn tokenizer_config(&self) -> Value {
        let name = |id: u32| self.tokenizer.id_to_token(id);
        let mut v = json!({ "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024 });
        if let Some(t) = name(self.specials.eos) {
            v["eos_token"] = json!(t);
        }
        if let Some(t) = name(self.specials.pad) {
            v["pad_token"] = json!(t);
        }
        if self.arch == Arch::CrossAttention {
            if let Some(t) = name(self.specials.decoder_start) {
                v["bos_token"] = json!(t);
            }
        }
        if let Some(t) = self.tokenizer.token_to_id("<unk>").and_then(name) {
            v["unk_token"] = json!(t);
        }
        if let Some(t) = self.specials.image.and_then(name) {
            v["image_token"] = json!(t);
            v["extra_special_tokens"] = json!({ "image_token": t });
        }
        v
    }
}

fn id_in(value: &Value, key: &str) -> Option<u32> {
    value.get(key).and_then(Value::as_u64).map(|v| v as u32)
}

fn vision_patches(vision: &Value) -> u64 {
    let size = vision.get("image_size").and_then(Value::as_u64).unwrap_or(224);
    let patch = vision.get("patch_size").and_then(Value::as_u64).unwrap_or(16).max(1);
    (size / patch).pow(2)
}

pub fn arch_of(config: &Value, file: &str) -> Result<Arch> {
    match config.get("model_type").and_then(Value::as_str) {
        Some("vision-encoder-decoder") => Ok(Arch::CrossAttention),
        Some("llava") => Ok(Arch::Prefix),
        other => Err(Error::config(file, format!("model_type must be vision-encoder-decoder or llava, found {other:?}"))),
    }
}

/// SigLIP's image processor defaults at the tower's image size.
fn default_preprocessor(vision: &Value) -> Value {
    let size = vision.get("image_size").and_then(Value::as_u64).unwrap_or(224);
    json!({
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": true, "size": { "height": size, "width": size }, "resample": 3,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": true,
    })
}

/// Canonical (in-memory) name → the name transformers 5 writes in `model.safetensors`.
fn saved_name(arch: Arch, name: &str) -> String {
    match arch {
        Arch::CrossAttention => name.to_string(),
        Arch::Prefix => {
            if let Some(rest) = name.strip_prefix("model.language_model.") {
                format!("language_model.model.{rest}")
            } else if let Some(rest) = name.strip_prefix("lm_head.") {
                format!("language_model.lm_head.{rest}")
            } else {
                name.strip_prefix("model.").unwrap_or(name).to_string()
            }
        }
    }
}

pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((name.clone(), values.iter().flat_map(|v| v.to_le_bytes()).collect(), t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(name, bytes, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Compute(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::tensor::serialize(views, metadata).map_err(|e| Error::Compute(e.to_string()))
}

pub fn pretty(value: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::Compute(e.to_string()))
}

/// A word-level tokenizer over the words of `captions` (lowercased, split on whitespace), with
/// `<pad>`, `<bos>`, `<eos>`, `<unk>` (and `<image>` for prefix models) as special tokens. For
/// models trained from scratch on a small vocabulary: the embedding stays tiny.
pub fn word_level_tokenizer<'a>(captions: impl Iterator<Item = &'a str>, with_image: bool) -> Result<tokenizers::Tokenizer> {
    let mut words: BTreeMap<String, usize> = BTreeMap::new();
    for c in captions {
        for w in c.split_whitespace() {
            *words.entry(w.to_lowercase()).or_default() += 1;
        }
    }
    let mut specials = vec!["<pad>", "<bos>", "<eos>", "<unk>"];
    if with_image {
        specials.push("<image>");
    }
    let mut vocab: Vec<(String, u32)> = specials.iter().enumerate().map(|(i, s)| (s.to_string(), i as u32)).collect();
    vocab.extend(words.keys().enumerate().map(|(i, w)| (w.clone(), (i + specials.len()) as u32)));
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| json!({ "id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true }))
        .collect();
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "Lowercase" },
        "pre_tokenizer": { "type": "WhitespaceSplit" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab.into_iter().map(|(w, i)| (w, json!(i))).collect::<serde_json::Map<String, Value>>(), "unk_token": "<unk>" },
    });
    tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| Error::Tokenizer(e.to_string()))
}
