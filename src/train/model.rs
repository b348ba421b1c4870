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
pub use crate::architecture::SpecialTokens;
use crate::architecture::{family_of, Architecture, Family, TrainParts, Training};
use crate::error::{from_candle_weights, Error, Result};
use crate::loading::{
    parse_json, read_dir_tensors, read_path as read, read_tokenizer, GenerationDefaults, OwnedModelFiles, CONFIG, GENERATION, PREPROCESSOR,
};
use crate::models::linear::LoraUpdate;
use crate::preprocess::PreprocessorConfig;
use crate::tokenizer::CaptionTokenizer;

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
    loaded: Arc<HashMap<String, Tensor>>,
    /// Which tensors train, which a pair of folders lacks, how fresh ones are drawn.
    recipe: &'static dyn Training,
    parts: TrainParts,
    /// Every tensor may get fresh weights (training from a config).
    fresh: bool,
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
            None if self.fresh || self.recipe.fresh_in_pair(name) => {
                let rng = state.rng.get_or_insert_with(|| InitRng::new(0));
                // transformers' _init_weights: N(0, 0.02) for matrices and embeddings, zeros for
                // biases, ones for norm gains (the hint says which); a family may draw some
                // tensors with another deviation (`Training::init_std`).
                let t = match hint {
                    Init::Const(c) if c != 0.0 => random_tensor(rng, &shape, |_| c)?,
                    _ if name.ends_with("bias") => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
                    _ => {
                        let std = self.recipe.init_std(name, shape.dims()).unwrap_or(0.02);
                        random_tensor(rng, &shape, |r| std * r.normal())?
                    }
                };
                state.initialised.push(name.to_string());
                t.to_dtype(dtype)?.to_device(dev)?
            }
            None => return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt()),
        };
        let (tensor, var) = if self.recipe.trainable(name, self.parts) {
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

/// A LoRA update attached to one projection while it trains.
pub struct LoraLayer {
    /// PEFT's module path under the family's LoRA scope, e.g. `layers.0.self_attn.q_proj`.
    pub module: String,
    pub a: Var,
    pub b: Var,
}

pub struct TrainModel {
    pub family: &'static Family,
    /// The family's training recipe.
    pub recipe: &'static dyn crate::architecture::Training,
    /// The whole HF `config.json`, as it will be written.
    pub config: Value,
    pub network: Box<dyn Architecture>,
    pub params: Vec<Param>,
    /// Every tensor of the model by canonical name (trainable ones are the `Var`s' tensors).
    tensors: Vec<(String, Tensor, Option<Var>)>,
    /// Tensors of the files the model does not read, kept to be written back unchanged.
    unused: Vec<(String, Tensor)>,
    pub lora: Option<(LoraSettings, Vec<LoraLayer>)>,
    pub tokenizer: tokenizers::Tokenizer,
    pub preprocessor: PreprocessorConfig,
    pub preprocessor_json: Value,
    pub specials: SpecialTokens,
    /// Tensors that got fresh weights (cross-attention added to a pretrained GPT-2, …).
    pub initialised: Vec<String>,
    /// The `generation_config.json` of the folder training continued from: its other settings
    /// (beams, penalties) are written back beside the lengths and ids of this run.
    pub folder_generation: Option<Value>,
    /// Caption length in tokens the generation config allows (capped by the decoder's positions).
    pub max_caption_tokens: usize,
    /// Where the tensors live and what they compute in (f32, or bf16 with f32 masters).
    pub device: Device,
    pub dtype: DType,
    /// bf16 runs: the optimizer's f32 master values of trainable tensors (by parameter name),
    /// written instead of the rounded working copies when the model is exported.
    pub masters: HashMap<String, Tensor>,
}

/// Where the weights come from.
pub enum Source<'a> {
    /// An encoder folder (SigLIP) and a decoder folder (GPT-2 or Llama).
    Folders { encoder: &'a Path, decoder: &'a Path },
    /// A captioner folder this crate (or transformers) wrote: continue training it.
    Model(&'a Path),
    /// A full `config.json` (any family of `crate::architecture::FAMILIES`): every weight fresh.
    Config(&'a Path),
}

impl Source<'_> {
    /// The family a model folder or a config names (`None` for a folder pair: `--arch` says).
    pub fn family(&self) -> Result<&'static Family> {
        let path = match self {
            Source::Model(dir) => dir.join("config.json"),
            Source::Config(path) => path.to_path_buf(),
            Source::Folders { .. } => return Err(Error::config("train", "an encoder and a decoder folder need --arch")),
        };
        family_of(&read_json(&path)?).map_err(|e| Error::config(&path.display().to_string(), e))
    }
}

pub struct BuildOptions {
    /// The family that `Source::Folders` composes (`family_for_arch`); with a model or a config,
    /// the family it must be (`None`: whichever its `model_type` names).
    pub family: Option<&'static Family>,
    pub train_encoder: bool,
    /// Train the language model of a family that would otherwise keep it frozen (a prefix
    /// model's: a base for later LoRA runs) instead of LoRA.
    pub train_decoder: bool,
    pub lora: Option<LoraSettings>,
    pub seed: u64,
    /// A tokenizer to use instead of the decoder's (e.g. a word-level one built from the data).
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

fn read_json(path: &Path) -> Result<Value> {
    crate::loading::parse_json(&path.display().to_string(), &read(path)?)
}

/// A folder's tokenizer, read as inference reads it (`tokenizer.json`, else GPT-2's files).
fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_bytes(read_tokenizer(dir)?).map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))
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

impl TrainModel {
    /// On the CPU in f32.
    pub fn build(source: Source<'_>, options: BuildOptions) -> Result<Self> {
        Self::build_on(source, options, &Device::Cpu, DType::F32)
    }

    /// On `device`, computing in `dtype` (every tensor of the model, frozen or trainable, is held
    /// in it; weights are read in f32 and converted once).
    pub fn build_on(source: Source<'_>, options: BuildOptions, device: &Device, dtype: DType) -> Result<Self> {
        // A folder's own generation settings (beams, penalties, …) are kept when it is written back.
        let mut generation = None;
        let (mut config, loaded, mut tokenizer, preprocessor_json, fresh) = match source {
            Source::Folders { encoder, decoder } => {
                let family = options.family.ok_or_else(|| Error::config("train", "an encoder and a decoder folder need --arch"))?;
                let recipe = family.recipe()?;
                let enc_file = encoder.join("config.json");
                let vision = vision_config(&read_json(&enc_file)?, &enc_file.display().to_string())?;
                let enc_weights = read_dir_tensors(encoder, |k| k.to_string())?;
                let dec_file = decoder.join("config.json");
                let text = read_json(&dec_file)?;
                let dec_weights = read_dir_tensors(decoder, |k| k.to_string())?;
                let tokenizer = match options.tokenizer.clone() {
                    Some(t) => t,
                    None => load_tokenizer(decoder)?,
                };
                let preprocessor = match read(&encoder.join("preprocessor_config.json")) {
                    Ok(bytes) => crate::loading::parse_json("preprocessor_config.json", &bytes)?,
                    Err(Error::MissingFile(_)) => default_preprocessor(&vision),
                    Err(e) => return Err(e),
                };
                let config = recipe.compose(vision, text).map_err(|e| Error::config(&dec_file.display().to_string(), e))?;
                let mut tensors = rename_all(enc_weights, |k| k.strip_prefix("vision_model.").map(|k| format!("{}{k}", recipe.encoder_prefix())));
                tensors.extend(rename_all(dec_weights, |k| Some(recipe.decoder_tensor(k))));
                (config, tensors, tokenizer, preprocessor, false)
            }
            Source::Model(dir) => {
                // Read as the captioner reads it.
                let files = OwnedModelFiles::read_dir(dir)?;
                let config = parse_json(CONFIG, &files.config)?;
                let family = family_of(&config).map_err(|e| Error::config(CONFIG, e))?;
                let borrowed = files.borrow();
                let tensors = borrowed.tensors(family.rename)?;
                let tokenizer = match options.tokenizer.clone() {
                    Some(t) => t,
                    None => tokenizers::Tokenizer::from_bytes(&files.tokenizer).map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?,
                };
                generation = files.generation.as_deref().map(|g| parse_json(GENERATION, g)).transpose()?;
                (config, tensors, tokenizer, parse_json(PREPROCESSOR, &files.preprocessor)?, false)
            }
            Source::Config(path) => {
                let file = path.display().to_string();
                let config = read_json(path)?;
                let tokenizer = options
                    .tokenizer
                    .clone()
                    .ok_or_else(|| Error::config(&file, "training from a config needs a tokenizer (--tokenizer FILE or word-level)"))?;
                let family = family_of(&config).map_err(|e| Error::config(&file, e))?;
                let preprocessor = default_preprocessor(&family.recipe()?.vision_config(&config));
                (config, HashMap::new(), tokenizer, preprocessor, true)
            }
        };
        let family = family_of(&config).map_err(|e| Error::config("config.json", e))?;
        if let Some(asked) = options.family.filter(|f| f.model_type != family.model_type) {
            return Err(Error::config(
                "config.json",
                format!("the model is {} (--arch {}) but --arch says {}", family.model_type, family.recipe()?.arch(), asked.recipe()?.arch()),
            ));
        }
        let recipe = family.recipe()?;

        // Special tokens, and the vocabulary size the tokenizer needs.
        let specials = recipe.special_tokens(&mut config, &mut tokenizer)?;
        let vocab = tokenizer.get_vocab_size(true);
        let section = family.decoder_section;
        let config_vocab = config.get(section).and_then(|s| s.get("vocab_size")).and_then(Value::as_u64).unwrap_or(0) as usize;
        if fresh {
            // Room for every token; a config may ask for more (unused rows, as in padded vocabularies).
            if let Some(s) = config.get_mut(section).and_then(Value::as_object_mut) {
                s.insert("vocab_size".into(), json!(vocab.max(config_vocab)));
            }
        } else if vocab > config_vocab {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has {vocab} tokens but the decoder's vocabulary is {config_vocab}; pass a model whose vocabulary holds every token (including <image>)"
            )));
        }

        // Which tensors train, which may be created.
        if options.train_decoder && options.lora.is_some() {
            return Err(Error::config("train", "--train-decoder trains the language model in full; use it with --lora-rank 0"));
        }
        let parts = TrainParts { encoder: options.train_encoder, decoder: options.train_decoder };
        let state = Arc::new(Mutex::new(BuiltState { rng: Some(InitRng::new(options.seed)), ..Default::default() }));
        let loaded = Arc::new(loaded);
        let backend = TrainBackend { loaded: loaded.clone(), recipe, parts, fresh, state: state.clone() };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let builder = (family.config)(&config).map_err(|e| Error::config("config.json", e))?;
        let network = builder(vb).map_err(|e| from_candle_weights("model.safetensors", e))?;
        let (tensors, initialised, mut rng) = {
            let mut s = state.lock().map_err(|_| Error::Compute("weights lock poisoned".into()))?;
            (std::mem::take(&mut s.tensors), std::mem::take(&mut s.initialised), s.rng.take().unwrap_or_else(|| InitRng::new(options.seed)))
        };
        // What the files hold that the model does not use (a ViT's pooler, a SigLIP's head) is
        // written back as it was read.
        let unused: Vec<(String, Tensor)> = {
            let mut unused: Vec<(String, Tensor)> =
                loaded.iter().filter(|(name, _)| !tensors.iter().any(|(n, _, _)| n == *name)).map(|(n, t)| (n.clone(), t.clone())).collect();
            unused.sort_by(|a, b| a.0.cmp(&b.0));
            unused
        };
        drop(loaded);
        let mut params: Vec<Param> = tensors
            .iter()
            .filter_map(|(name, t, var)| {
                var.as_ref().map(|v| Param { name: name.clone(), var: v.clone(), decay: t.rank() > 1 && !name.contains("embedding") })
            })
            .collect();

        let mut model = Self {
            family,
            recipe,
            config,
            network,
            params: vec![],
            tensors,
            unused,
            lora: None,
            tokenizer,
            preprocessor: PreprocessorConfig::from_json(preprocessor_json.to_string().as_bytes())?,
            preprocessor_json,
            specials,
            initialised,
            folder_generation: generation,
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
        let recipe = self.recipe;
        if recipe.lora_scope().is_none() {
            return Err(Error::config(
                "train",
                format!("--lora-rank applies to families with a language model to adapt; {} trains its decoder in full", self.family.model_type),
            ));
        }
        if settings.r == 0 {
            return Err(Error::config("train", "--lora-rank must be at least 1"));
        }
        let known = recipe.lora_targets();
        if let Some(bad) = settings.targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(Error::config("train", format!("unknown LoRA target `{bad}` ({} has {})", self.family.model_type, known.join(", "))));
        }
        let (dtype, device) = (self.dtype, self.device.clone());
        let mut layers = Vec::new();
        for (module, linear) in self.network.lora_projections() {
            let leaf = module.rsplit('.').next().unwrap_or_default();
            if !settings.targets.iter().any(|t| t == leaf) {
                continue;
            }
            let (d_in, d_out) = linear.dims()?;
            // PEFT: A ~ kaiming_uniform(a = √5) = U(±1/√in), B = 0, so training starts at the base model.
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = random_tensor(rng, &Shape::from((settings.r, d_in)), |r| (2.0 * r.uniform() - 1.0) * bound)?;
            let a = Var::from_tensor(&a.to_dtype(dtype)?.to_device(&device)?)?;
            let b = Var::zeros((d_out, settings.r), dtype, &device)?;
            linear.set_lora(Some(LoraUpdate { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: settings.scale() }));
            layers.push(LoraLayer { module, a, b });
        }
        Ok(layers)
    }

    /// The ids a caption follows, as generation starts from them (`Architecture::input_ids`): an
    /// encoder–decoder's start token; a prefix model's image tokens and `prompt`.
    pub fn start_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        let generation = GenerationDefaults::resolve(Some(&self.generation_config()?), &self.config, self.family.decoder_section)?;
        let tokenizer = CaptionTokenizer::from(self.tokenizer.clone());
        let inputs = crate::architecture::PromptInputs {
            tokenizer: &tokenizer,
            chat_template: None,
            generation: &generation,
            prompt,
            messages: None,
            grid: crate::preprocess::Grid::WHOLE,
        };
        self.network.input_ids(&inputs)
    }

    /// Feeds everything the image features depend on into `d`: what the family names in the
    /// config and every encoder / vision-tower tensor (name, shape, values).
    pub fn digest_encoder(&self, d: &mut super::features::Digest) -> Result<()> {
        let recipe = self.recipe;
        d.write(recipe.feature_config(&self.config).to_string().as_bytes());
        let prefix = recipe.encoder_prefix();
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
                let name = format!("{}{}.weight", self.lora_scope(), l.module);
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
        let mut out = self.unused_tensors();
        for (name, tensor, _) in &self.tensors {
            let value = merged.remove(name).unwrap_or_else(|| self.trained(name, tensor)).detach().contiguous()?;
            out.insert(self.recipe.saved_name(name), value);
        }
        Ok(out)
    }

    /// The LoRA updates as a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) for
    /// the model written without them (`export_tensors_unmerged`).
    pub fn export_adapter(&self, base_name: &str) -> Result<Option<(Value, BTreeMap<String, Tensor>)>> {
        let Some((settings, layers)) = &self.lora else { return Ok(None) };
        let mut tensors = BTreeMap::new();
        for l in layers {
            let prefix = format!("base_model.model.{}{}", self.lora_scope(), l.module);
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
            "target_modules": format!(".*{}.*\\.({})", self.lora_scope().trim_end_matches('.').rsplit('.').next().unwrap_or_default(), settings.targets.join("|")),
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
        let mut out = self.unused_tensors();
        for (name, t, _) in &self.tensors {
            out.insert(self.recipe.saved_name(name), t.detach().contiguous()?);
        }
        Ok(out)
    }

    fn unused_tensors(&self) -> BTreeMap<String, Tensor> {
        self.unused.iter().map(|(name, t)| (self.recipe.saved_name(name), t.clone())).collect()
    }

    /// Where the LoRA modules live (`model.language_model.`).
    fn lora_scope(&self) -> &'static str {
        self.recipe.lora_scope().unwrap_or_default()
    }

    pub fn generation_config(&self) -> Result<Value> {
        let mut ours = self.recipe.generation_config(&self.config, &self.specials, self.max_caption_tokens)?;
        if let (Some(Value::Object(folder)), Some(map)) = (&self.folder_generation, ours.as_object_mut()) {
            for (key, value) in folder {
                // Lengths are this run's (transformers prefers max_new_tokens to max_length).
                if key != "max_length" && key != "max_new_tokens" {
                    map.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
        }
        Ok(ours)
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
            ("generation_config.json", pretty(&self.generation_config()?)?),
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
        if let Some(t) = self.specials.decoder_start.and_then(name) {
            v["bos_token"] = json!(t);
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
/// `<pad>`, `<bos>`, `<eos>`, `<unk>` and the family's `extra` tokens (a prefix model's `<image>`)
/// as special tokens. For models trained from scratch on a small vocabulary: the embedding stays tiny.
pub fn word_level_tokenizer<'a>(captions: impl Iterator<Item = &'a str>, extra: &[&str]) -> Result<tokenizers::Tokenizer> {
    let mut words: BTreeMap<String, usize> = BTreeMap::new();
    for c in captions {
        for w in c.split_whitespace() {
            *words.entry(w.to_lowercase()).or_default() += 1;
        }
    }
    let mut specials = vec!["<pad>", "<bos>", "<eos>", "<unk>"];
    specials.extend_from_slice(extra);
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
