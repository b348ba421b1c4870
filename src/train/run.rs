//! The training run: data → token rows → (cached) encoder features → loss → AdamW, with
//! checkpoints that a `kill -9` cannot corrupt and a resume that continues bit-for-bit, periodic
//! BLEU/CIDEr-D on the validation split, a metrics log, a plot, and the exported folder.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use serde_json::{json, Value};

use super::data::{load_dataset, Dataset, DatasetOptions, Split};
use super::device::{DeviceSpec, Precision};
use super::features::{batch_features, cache_key, FeatureCache};
use super::metrics::{score, CaptionScores};
use super::model::{pretty, safetensors_bytes, BuildOptions, InitRng, LoraSettings, Source, TrainModel};
use super::optim::{accumulate, clip_grad_norm, learning_rate, named_grads, AdamW, AdamWConfig};
use super::{create_dir, write_atomic};
use crate::architecture::family_for_arch;
use crate::captioner::{CaptionOptions, Captioner};
use crate::error::{Error, Result};
use crate::loading::ModelFiles;

/// Everything `train` takes (the CLI's flags).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// `--arch`: the family composed from an encoder and a decoder folder (`family_for_arch`);
    /// with a model or a config, the family it must be. `None`: cross-attention for a folder
    /// pair, else the config's own.
    pub arch: Option<String>,
    pub dataset: String,
    pub data_root: Option<PathBuf>,
    pub data: DatasetOptions,
    pub encoder_model: Option<PathBuf>,
    pub decoder_model: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub init_from_config: Option<PathBuf>,
    /// `word-level`, or a tokenizer.json path; default: the decoder's.
    pub tokenizer: Option<String>,
    pub train_encoder: bool,
    pub train_decoder: bool,
    pub lora: Option<LoraSettings>,
    pub prompt: Option<String>,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    /// Steps, or a fraction of all steps when below 1.
    pub warmup: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub max_len: usize,
    pub seed: u64,
    pub output: PathBuf,
    pub resume: bool,
    pub eval_every: usize,
    pub eval_samples: usize,
    pub save_every: usize,
    /// Where frozen-encoder features persist between runs (`None`: memory only).
    pub feature_cache: Option<PathBuf>,
    pub progress: bool,
    pub pause_ms: u64,
    /// `--device`: cpu, cuda[:N], or auto (the GPU when there is one and the binary has CUDA).
    pub device: DeviceSpec,
    /// `--dtype`: f32, or bf16 (GPU) with f32 master weights and optimizer state.
    pub precision: Precision,
    /// Allow TF32 in f32 matrix products on the GPU.
    pub tf32: bool,
    /// Data-parallel over this many GPUs (cuda:0 … cuda:N-1); 1: one device.
    pub gpus: usize,
}

/// The family `--arch` means when an encoder and a decoder folder are given without it.
pub const DEFAULT_ARCH: &str = "cross-attention";

/// One (image, caption) pair as token rows (`Layout::row`).
struct Example {
    image: usize,
    input: Vec<u32>,
    /// The target at each position of `input`; `None` = not in the loss.
    labels: Vec<Option<u32>>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RunState {
    epoch: usize,
    /// Next micro-batch within the epoch.
    batch: usize,
    step: usize,
    samples_seen: usize,
    fingerprint: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub epochs: usize,
    pub final_loss: f64,
    pub samples_per_s: f64,
    pub epoch_seconds: Vec<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub eval: Option<CaptionScores>,
    pub skipped_rows: String,
    pub device: String,
    pub dtype: Precision,
    /// GPU memory in use (total − free, MiB), the most seen after any optimizer step; CPU: none.
    pub gpu_memory_mib: Option<f64>,
    /// The most GPU memory the tensors held at once (the allocator's high-water mark, MiB).
    pub gpu_peak_tensor_mib: Option<f64>,
    /// `WASMCAP_PROFILE=1`: seconds spent in features + forward, backward, and the update
    /// (gradients, clipping, AdamW), the device synchronised after each.
    pub profile_s: Option<[f64; 3]>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

pub fn load_split(cfg: &TrainConfig, split: Split) -> Result<Dataset> {
    load_dataset(&cfg.dataset, cfg.data_root.as_deref(), split, &cfg.data)
}

/// The datasets and the model of a run, on the device and in the precision `cfg` asks for.
struct Prepared {
    train_set: Dataset,
    val_set: Option<Dataset>,
    model: TrainModel,
}

fn prepare(cfg: &TrainConfig) -> Result<Prepared> {
    let device = super::device::open(cfg.device)?;
    super::device::configure(&device, cfg.precision, cfg.tf32)?;
    let train_set = load_split(cfg, Split::Train)?;
    let val_set = match load_split(cfg, Split::Val) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("no validation split ({e}); evaluation is skipped");
            None
        }
    };
    eprintln!(
        "{}: {} train images ({}), {} val images",
        train_set.name,
        train_set.samples.len(),
        train_set.skipped,
        val_set.as_ref().map(|v| v.samples.len()).unwrap_or(0)
    );
    if train_set.samples.is_empty() {
        return Err(Error::config("dataset", "the training split has no usable samples"));
    }

    let source = match (&cfg.model, &cfg.init_from_config, &cfg.encoder_model, &cfg.decoder_model) {
        (Some(dir), _, _, _) => Source::Model(dir),
        (None, Some(path), _, _) => Source::Config(path),
        (None, None, Some(encoder), Some(decoder)) => Source::Folders { encoder, decoder },
        _ => return Err(Error::config("train", "give --encoder-model and --decoder-model, or --model DIR, or --init-from-config CONFIG.json")),
    };
    let asked = match (cfg.arch.as_deref(), &source) {
        (Some(arch), _) => Some(family_for_arch(arch).map_err(|e| Error::config("train", e))?),
        (None, Source::Folders { .. }) => Some(family_for_arch(DEFAULT_ARCH).map_err(|e| Error::config("train", e))?),
        (None, _) => None,
    };
    let family = match asked {
        Some(f) => f,
        None => source.family()?,
    };
    let tokenizer = match cfg.tokenizer.as_deref() {
        Some("word-level") => {
            let captions = train_set.samples.iter().flat_map(|s| s.captions.iter().map(String::as_str));
            Some(super::model::word_level_tokenizer(captions, family.recipe()?.extra_tokens())?)
        }
        Some(path) => Some(tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{path}: {e}")))?),
        None => None,
    };
    let options = BuildOptions {
        family: asked,
        train_encoder: cfg.train_encoder,
        train_decoder: cfg.train_decoder,
        // The CLI's LoRA settings (rank 8 unless told) adapt the families that have a language
        // model to adapt; the others train their decoder in full.
        lora: cfg.lora.clone().filter(|_| family.training.is_some_and(|t| t.lora_scope().is_some())),
        seed: cfg.seed,
        tokenizer,
    };
    let mut model = TrainModel::build_on(source, options, &device, cfg.precision.dtype())?;
    model.max_caption_tokens = cfg.max_len;
    eprintln!(
        "{}: {} trainable of {} parameters ({:.2} %){}{}",
        model.family.model_type,
        model.num_trainable(),
        model.num_total(),
        100.0 * model.num_trainable() as f64 / model.num_total().max(1) as f64,
        if model.initialised.is_empty() { String::new() } else { format!("; {} tensors freshly initialised", model.initialised.len()) },
        if device.is_cpu() { String::new() } else { format!("; on {} in {:?}", super::device::describe(&device), cfg.precision) }
    );
    Ok(Prepared { train_set, val_set, model })
}

pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let mut group = if cfg.gpus > 1 { Some(Group::start(cfg)?) } else { None };
    let Prepared { train_set, val_set, mut model } = prepare(cfg)?;

    let examples = make_examples(&model, &train_set, cfg.max_len, cfg.prompt.as_deref())?;
    let batches_per_epoch = examples.len().div_ceil(cfg.batch_size.max(1));
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum.max(1));
    let total_steps = cfg.max_steps.unwrap_or(usize::MAX).min(steps_per_epoch * cfg.epochs);
    let warmup = if cfg.warmup < 1.0 { (cfg.warmup * total_steps as f64).round() as usize } else { cfg.warmup as usize };
    let fingerprint = run_fingerprint(cfg, model.family.model_type, examples.len());

    create_dir(&cfg.output)?;
    let mut opt = AdamW::new(AdamWConfig { weight_decay: cfg.weight_decay, ..Default::default() }, &model.params)?;
    let mut state = RunState { epoch: 0, batch: 0, step: 0, samples_seen: 0, fingerprint: fingerprint.clone() };
    if cfg.resume {
        match load_checkpoint(&cfg.output, &model, &mut opt)? {
            Some(s) if s.fingerprint != fingerprint => {
                return Err(Error::config(
                    "checkpoint",
                    "the checkpoint was written by a run with other data, model or batch settings; resume with the same flags",
                ))
            }
            Some(s) => {
                eprintln!("resuming at epoch {} step {}", s.epoch + 1, s.step);
                state = s;
            }
            None => eprintln!("--resume: no checkpoint in {}, starting fresh", cfg.output.display()),
        }
    }
    let nccl = match group.as_mut() {
        Some(g) => Some(g.join(&model)?),
        None => None,
    };
    let metrics_path = cfg.output.join("metrics.jsonl");
    let mut metrics_log = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io_err(&metrics_path))?;

    let mut features = match (&cfg.feature_cache, cfg.train_encoder) {
        (Some(root), false) => {
            let key = cache_key(&model, &train_set)?;
            let cache = FeatureCache::open(root, &key)?.to_device(&model.device, model.dtype)?;
            eprintln!("feature cache: {} of {} images read back from {}", cache.loaded, train_set.samples.len(), root.join(&key).display());
            cache
        }
        _ => FeatureCache::in_memory(),
    };
    if let Some(group) = &group {
        if !cfg.train_encoder {
            // Every replica encodes every image once, now (each GPU a batch at a time, all at
            // once), so that no share of any batch waits for the encoder later.
            group.send_all(|_| Job::Prefill)?;
            prefill(&model, &train_set, &mut features, cfg.batch_size)?;
            group.wait_all()?;
        }
    }
    let bars = Progress::new(cfg.progress, cfg.epochs, steps_per_epoch);
    let mut history: Vec<Value> = read_history(&metrics_path);
    let mut last_loss = f64::NAN;
    let mut epoch_seconds = Vec::new();
    let mut last_eval = None;
    let started = Instant::now();
    let samples_at_start = state.samples_seen;
    let mut gpu_memory: Option<u64> = None;
    let profile = std::env::var("WASMCAP_PROFILE").is_ok_and(|v| v == "1");
    let mut phases = [0f64; 3];
    let device = model.device.clone();
    let lap = |phases: &mut [f64; 3], phase: usize, since: &mut Instant| -> Result<()> {
        if profile {
            device.synchronize()?;
            phases[phase] += since.elapsed().as_secs_f64();
            *since = Instant::now();
        }
        Ok(())
    };

    'epochs: while state.epoch < cfg.epochs && state.step < total_steps {
        let epoch_start = Instant::now();
        let order = epoch_order(examples.len(), cfg.seed, state.epoch);
        bars.start_epoch(state.epoch, state.batch / cfg.grad_accum.max(1));
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        let mut micro = 0;
        while state.batch < batches_per_epoch {
            let ids: Vec<usize> = order.iter().skip(state.batch * cfg.batch_size).take(cfg.batch_size).copied().collect();
            let batch: Vec<&Example> = ids.iter().map(|&i| &examples[i]).collect();
            let mut since = Instant::now();
            match &group {
                None => {
                    let loss = batch_loss(&model, &train_set, &batch, &mut features, cfg.train_encoder)?;
                    lap(&mut phases, 0, &mut since)?;
                    let scaled = (&loss / cfg.grad_accum.max(1) as f64)?;
                    let g = scaled.backward()?;
                    lap(&mut phases, 1, &mut since)?;
                    accumulate(&mut grads, named_grads(&model.params, &g)?)?;
                    loss_sum += loss.to_scalar::<f32>()? as f64;
                }
                Some(group) => {
                    let world = group.world();
                    let tokens = target_tokens(&batch);
                    group.send_all(|rank| Job::Micro { ids: ids[super::data_parallel::shard(ids.len(), rank, world)].to_vec(), tokens })?;
                    let own = &batch[super::data_parallel::shard(batch.len(), 0, world)];
                    loss_sum += shard_step(&model, &train_set, own, tokens, cfg, &mut features, &mut grads)?;
                    loss_sum += group.wait_all()?;
                }
            }
            micro += 1;
            state.batch += 1;
            state.samples_seen += batch.len();
            if micro == cfg.grad_accum.max(1) || state.batch == batches_per_epoch {
                let lr = learning_rate(cfg.lr, state.step, warmup, total_steps);
                if let Some(group) = &group {
                    group.send_all(|_| Job::Step { lr })?;
                }
                let norm = apply_update(nccl.as_ref(), &model, &mut grads, &mut opt, cfg.grad_clip, lr)?;
                if let Some(group) = &group {
                    group.wait_all()?;
                }
                lap(&mut phases, 2, &mut since)?;
                if let Some(used) = super::device::gpu_memory_used(&model.device) {
                    gpu_memory = Some(gpu_memory.map_or(used, |m| m.max(used)));
                }
                state.step += 1;
                last_loss = loss_sum / micro as f64;
                let elapsed = started.elapsed().as_secs_f64().max(1e-9);
                let sps = (state.samples_seen - samples_at_start) as f64 / elapsed;
                // time_s: seconds since this process started training; differences between the
                // steps of one epoch time the steps alone (no checkpoint, no evaluation).
                let mut line = json!({ "step": state.step, "epoch": state.epoch + 1, "loss": last_loss, "lr": lr, "grad_norm": norm, "samples_per_s": sps, "time_s": elapsed });
                if let Some(used) = super::device::gpu_memory_used(&model.device) {
                    line["gpu_mib"] = json!(used / (1024 * 1024));
                }
                log_line(&mut metrics_log, &line)?;
                history.push(line);
                bars.step(state.step, last_loss, lr, sps);
                loss_sum = 0.0;
                micro = 0;
                if let Some(val) = val_set.as_ref().filter(|_| cfg.eval_every > 0 && state.step % cfg.eval_every == 0) {
                    model.masters = opt.masters().clone();
                    let scores = evaluate_model(&model, val, cfg.eval_samples, cfg.prompt.as_deref())?;
                    bars.println(&format!("step {}: {scores}", state.step));
                    let line = json!({ "step": state.step, "epoch": state.epoch + 1, "eval": scores });
                    log_line(&mut metrics_log, &line)?;
                    history.push(line);
                    last_eval = Some(scores);
                }
                let epoch_done = state.batch == batches_per_epoch;
                if epoch_done {
                    state.epoch += 1;
                    state.batch = 0;
                }
                if (cfg.save_every > 0 && state.step % cfg.save_every == 0) || epoch_done || state.step == total_steps {
                    // Features first: a checkpoint never claims work whose features are lost.
                    features.save()?;
                    save_checkpoint(&cfg.output, &model, &opt, &state)?;
                }
                if cfg.pause_ms > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(cfg.pause_ms));
                }
                if epoch_done {
                    break;
                }
                if state.step >= total_steps {
                    break 'epochs;
                }
            }
        }
        epoch_seconds.push(epoch_start.elapsed().as_secs_f64());
        bars.println(&format!("epoch {} done in {:.1} s, loss {last_loss:.4}", state.epoch, epoch_start.elapsed().as_secs_f64()));
    }
    bars.finish();
    if let Some(group) = group.take() {
        group.stop();
    }
    features.save()?;

    model.masters = opt.masters().clone();
    model.save_folder(&cfg.output)?;
    let final_eval = match &val_set {
        Some(val) => {
            let scores = evaluate_model(&model, val, cfg.eval_samples, cfg.prompt.as_deref())?;
            let line = json!({ "step": state.step, "epoch": state.epoch, "eval": scores, "final": true });
            log_line(&mut metrics_log, &line)?;
            history.push(line);
            Some(scores)
        }
        None => last_eval,
    };
    if let Err(e) = write_plot(&cfg.output.join("training.png"), &history) {
        eprintln!("could not write the plot: {e}");
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    Ok(TrainSummary {
        steps: state.step,
        epochs: state.epoch,
        final_loss: last_loss,
        samples_per_s: (state.samples_seen - samples_at_start) as f64 / elapsed,
        epoch_seconds,
        trainable_params: model.num_trainable(),
        total_params: model.num_total(),
        eval: final_eval,
        skipped_rows: train_set.skipped.to_string(),
        device: super::device::describe(&model.device),
        dtype: cfg.precision,
        gpu_memory_mib: gpu_memory.map(|b| b as f64 / (1024.0 * 1024.0)),
        gpu_peak_tensor_mib: super::device::gpu_peak_tensor_mib(&model.device),
        profile_s: profile.then_some(phases),
    })
}

fn log_line(file: &mut std::fs::File, line: &Value) -> Result<()> {
    writeln!(file, "{line}").map_err(|source| Error::Io { path: "metrics.jsonl".into(), source })
}

fn read_history(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).map(|s| s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()).unwrap_or_default()
}

/// Changes when anything that decides the data order or the shapes of the state changes.
fn run_fingerprint(cfg: &TrainConfig, model_type: &str, examples: usize) -> String {
    format!(
        "{model_type}|{}|{:?}|{examples}|{}|{}|{}|{}|{:?}",
        cfg.dataset,
        cfg.data_root,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seed,
        cfg.epochs,
        cfg.lora.as_ref().map(|l| (l.r, l.targets.clone()))
    )
}

/// A permutation of 0..n that depends only on (seed, epoch): a resumed run sees the same order.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = InitRng::new(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64 + 1));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn make_examples(model: &TrainModel, data: &Dataset, max_len: usize, prompt: Option<&str>) -> Result<Vec<Example>> {
    let start = model.start_ids(prompt)?;
    let layout = model.recipe.layout();
    let mut out = Vec::new();
    for (image, sample) in data.samples.iter().enumerate() {
        for caption in &sample.captions {
            let mut ids = model.tokenizer.encode(caption.as_str(), false).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec();
            ids.truncate(max_len.saturating_sub(1).max(1));
            ids.push(model.specials.eos);
            let (input, labels) = layout.row(&start, &ids);
            out.push(Example { image, input, labels });
        }
    }
    Ok(out)
}

/// Labelled positions of a batch (the loss averages over them).
fn target_tokens(batch: &[&Example]) -> usize {
    batch.iter().map(|e| e.labels.iter().filter(|l| l.is_some()).count()).sum()
}

/// Data-parallel: one rank's share of a micro-batch whose whole has `tokens` labelled positions.
/// Its loss is weighted by its share of them, so that the gradients summed over the ranks are
/// those of the whole batch's mean loss (what one GPU computes). Returns that weighted loss.
fn shard_step(
    model: &TrainModel,
    data: &Dataset,
    shard: &[&Example],
    tokens: usize,
    cfg: &TrainConfig,
    cache: &mut FeatureCache,
    grads: &mut HashMap<String, Tensor>,
) -> Result<f64> {
    if shard.is_empty() {
        return Ok(0.0);
    }
    let weight = target_tokens(shard) as f64 / tokens.max(1) as f64;
    let loss = (batch_loss(model, data, shard, cache, cfg.train_encoder)? * weight)?;
    let g = (&loss / cfg.grad_accum.max(1) as f64)?.backward()?;
    accumulate(grads, named_grads(&model.params, &g)?)?;
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// One optimizer step on the accumulated gradients, which it then clears: summed over the GPUs
/// first when data-parallel (every rank takes this same step), clipped, AdamW. Returns the
/// gradient norm before clipping.
fn apply_update(
    nccl: Option<&super::data_parallel::Nccl>,
    model: &TrainModel,
    grads: &mut HashMap<String, Tensor>,
    opt: &mut AdamW,
    grad_clip: f64,
    lr: f64,
) -> Result<f64> {
    if let Some(nccl) = nccl {
        super::data_parallel::all_reduce_grads(nccl, &model.params, grads, &model.device)?;
    }
    let norm = clip_grad_norm(grads, grad_clip)?;
    opt.update(&model.params, grads, lr)?;
    grads.clear();
    Ok(norm)
}

/// Encodes every image of `data` into `cache`, `batch` at a time.
fn prefill(model: &TrainModel, data: &Dataset, cache: &mut FeatureCache, batch: usize) -> Result<()> {
    let all: Vec<usize> = (0..data.samples.len()).collect();
    for chunk in all.chunks(batch.max(1)) {
        batch_features(model, data, chunk, cache, false)?;
    }
    Ok(())
}

/// What the driving thread (rank 0) asks a replica to do.
enum Job {
    /// Encode every training image into the replica's feature cache.
    Prefill,
    /// Loss and gradients of these examples (this rank's share of a micro-batch whose whole
    /// has `tokens` labelled positions), accumulated.
    Micro { ids: Vec<usize>, tokens: usize },
    /// All-reduce the accumulated gradients, clip, update with this learning rate.
    Step { lr: f64 },
}

/// The replicas on GPUs 1 … N-1, one thread each; rank 0 is the calling thread.
struct Group {
    jobs: Vec<std::sync::mpsc::Sender<Job>>,
    replies: std::sync::mpsc::Receiver<std::result::Result<f64, String>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    id: super::data_parallel::GroupId,
}

impl Group {
    /// Starts the replicas; each builds its model (same seed, so the same weights) on its GPU
    /// and says whether that worked.
    fn start(cfg: &TrainConfig) -> Result<Self> {
        if !super::device::HAS_NCCL {
            return Err(super::data_parallel::needs_nccl());
        }
        if !matches!(cfg.device, DeviceSpec::Auto | DeviceSpec::Cuda(0)) {
            return Err(Error::config("--gpus", "data-parallel training runs on GPUs 0 … N-1; leave --device out (or say cuda)"));
        }
        if cfg.resume {
            return Err(Error::config("--gpus", "--resume is not supported with --gpus > 1 yet; resume on one GPU"));
        }
        let id = super::data_parallel::group_id()?;
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let (mut jobs, mut threads) = (Vec::new(), Vec::new());
        for rank in 1..cfg.gpus {
            let (tx, rx) = std::sync::mpsc::channel();
            let cfg = TrainConfig { device: DeviceSpec::Cuda(rank), progress: false, ..cfg.clone() };
            let reply = reply_tx.clone();
            let world = cfg.gpus;
            threads.push(std::thread::spawn(move || {
                if let Err(e) = replica(&cfg, rank, world, id, rx, &reply) {
                    let _ = reply.send(Err(format!("GPU {rank}: {e}")));
                }
            }));
            jobs.push(tx);
        }
        let group = Group { jobs, replies, threads, id };
        group.wait_all()?;
        Ok(group)
    }

    fn world(&self) -> usize {
        self.jobs.len() + 1
    }

    /// Rank 0 joins the NCCL group (the replicas are joining it already).
    fn join(&mut self, model: &TrainModel) -> Result<super::data_parallel::Nccl> {
        super::data_parallel::Nccl::join(&model.device, 0, self.world(), self.id)
    }

    fn send_all(&self, job: impl Fn(usize) -> Job) -> Result<()> {
        for (i, tx) in self.jobs.iter().enumerate() {
            tx.send(job(i + 1)).map_err(|_| Error::Compute(format!("GPU {}: its thread has stopped", i + 1)))?;
        }
        Ok(())
    }

    /// One reply from every replica; the sum of their values.
    fn wait_all(&self) -> Result<f64> {
        let mut sum = 0.0;
        for _ in 0..self.jobs.len() {
            match self.replies.recv() {
                Ok(Ok(v)) => sum += v,
                Ok(Err(e)) => return Err(Error::Compute(e)),
                Err(_) => return Err(Error::Compute("a GPU's thread has stopped".into())),
            }
        }
        Ok(sum)
    }

    fn stop(self) {
        drop(self.jobs);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A replica's thread: build, report ready, join NCCL, then do the jobs until the channel closes.
fn replica(
    cfg: &TrainConfig,
    rank: usize,
    world: usize,
    id: super::data_parallel::GroupId,
    jobs: std::sync::mpsc::Receiver<Job>,
    reply: &std::sync::mpsc::Sender<std::result::Result<f64, String>>,
) -> Result<()> {
    let Prepared { train_set, model, .. } = prepare(cfg)?;
    let examples = make_examples(&model, &train_set, cfg.max_len, cfg.prompt.as_deref())?;
    let mut opt = AdamW::new(AdamWConfig { weight_decay: cfg.weight_decay, ..Default::default() }, &model.params)?;
    let _ = reply.send(Ok(0.0));
    let nccl = super::data_parallel::Nccl::join(&model.device, rank, world, id)?;
    let mut cache = FeatureCache::in_memory();
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    for job in jobs {
        let value = match job {
            Job::Prefill => {
                prefill(&model, &train_set, &mut cache, cfg.batch_size)?;
                0.0
            }
            Job::Micro { ids, tokens } => {
                let shard: Vec<&Example> = ids.iter().map(|&i| &examples[i]).collect();
                shard_step(&model, &train_set, &shard, tokens, cfg, &mut cache, &mut grads)?
            }
            Job::Step { lr } => apply_update(Some(&nccl), &model, &mut grads, &mut opt, cfg.grad_clip, lr)?,
        };
        let _ = reply.send(Ok(value));
    }
    Ok(())
}

/// Mean cross-entropy over the labelled positions of a right-padded batch.
fn batch_loss(model: &TrainModel, data: &Dataset, batch: &[&Example], cache: &mut FeatureCache, train_encoder: bool) -> Result<Tensor> {
    let images: Vec<usize> = batch.iter().map(|e| e.image).collect();
    let feats = batch_features(model, data, &images, cache, train_encoder)?;
    let t = batch.iter().map(|e| e.input.len()).max().unwrap_or(1);
    let pad = model.specials.pad;
    let rows: Vec<Vec<u32>> = batch
        .iter()
        .map(|e| {
            let mut r = e.input.clone();
            r.resize(t, pad);
            r
        })
        .collect();
    let logits = model.network.train_logits(&feats, &rows)?;
    let vocab = logits.dim(D::Minus1)?;
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for (b, e) in batch.iter().enumerate() {
        for (i, l) in e.labels.iter().enumerate() {
            if let Some(l) = l {
                positions.push((b * t + i) as u32);
                targets.push(*l);
            }
        }
    }
    if positions.is_empty() {
        return Err(Error::Compute("a batch without any target token".into()));
    }
    let picked = logits.reshape((batch.len() * t, vocab))?.index_select(&Tensor::new(positions, &model.device)?, 0)?;
    Ok(candle_nn::loss::cross_entropy(&picked.to_dtype(DType::F32)?, &Tensor::new(targets, &model.device)?)?)
}

/// One batch exactly as a training step sees it: every caption of `data` in file order, its
/// token rows and targets (`None` = not in the loss), the loss, and the gradient norm of each
/// trainable tensor before clipping. What the trainer is checked with against transformers.
#[derive(Debug, serde::Serialize)]
pub struct BatchCheck {
    pub inputs: Vec<Vec<u32>>,
    pub labels: Vec<Vec<Option<u32>>>,
    pub loss: f64,
    pub grad_norm: f64,
    pub grad_norms: BTreeMap<String, f64>,
}

/// [`check_batch`] for the model and training data `cfg` describes, on its device and in its
/// precision (`train check-step`: the CPU and the GPU compared on one step).
pub fn check_step(cfg: &TrainConfig) -> Result<BatchCheck> {
    let Prepared { train_set, model, .. } = prepare(cfg)?;
    check_batch(&model, &train_set, cfg.max_len, cfg.prompt.as_deref(), cfg.train_encoder)
}

pub fn check_batch(model: &TrainModel, data: &Dataset, max_len: usize, prompt: Option<&str>, train_encoder: bool) -> Result<BatchCheck> {
    let examples = make_examples(model, data, max_len, prompt)?;
    let batch: Vec<&Example> = examples.iter().collect();
    let loss = batch_loss(model, data, &batch, &mut FeatureCache::in_memory(), train_encoder)?;
    let mut grads = named_grads(&model.params, &loss.backward()?)?;
    let mut grad_norms = BTreeMap::new();
    for (name, g) in &grads {
        grad_norms.insert(name.clone(), (g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt());
    }
    Ok(BatchCheck {
        inputs: examples.iter().map(|e| e.input.clone()).collect(),
        labels: examples.iter().map(|e| e.labels.clone()).collect(),
        loss: loss.to_scalar::<f32>()? as f64,
        grad_norm: clip_grad_norm(&mut grads, 0.0)?,
        grad_norms,
    })
}

/// Greedy captions of (up to `limit` images of) `data` by the model as it is now, through the
/// same `Captioner` the browser runs, scored against all reference captions.
pub fn evaluate_model(model: &TrainModel, data: &Dataset, limit: usize, prompt: Option<&str>) -> Result<CaptionScores> {
    let files = model.model_files(&model.export_tensors()?)?;
    let get = |name: &str| files.iter().find(|(n, _)| *n == name).map(|(_, b)| b.as_slice()).unwrap_or_default();
    let captioner = Captioner::from_files(ModelFiles {
        config: get("config.json"),
        weights: get("model.safetensors"),
        weights_name: crate::loading::WEIGHTS,
        shards: &[],
        tokenizer: get("tokenizer.json"),
        preprocessor: get("preprocessor_config.json"),
        generation: Some(get("generation_config.json")),
        chat_template: None,
        adapter: None,
    })?;
    evaluate_captioner(&captioner, data, limit, prompt).map(|(scores, _)| scores)
}

/// Scores plus (image key, caption, references) per image.
pub fn evaluate_captioner(
    captioner: &Captioner,
    data: &Dataset,
    limit: usize,
    prompt: Option<&str>,
) -> Result<(CaptionScores, Vec<(String, String, Vec<String>)>)> {
    let n = if limit == 0 { data.samples.len() } else { limit.min(data.samples.len()) };
    // Lengths from generation_config.json, as the browser would caption.
    let options = CaptionOptions { max_new_tokens: None, prompt: prompt.map(str::to_string), ..Default::default() };
    let (mut candidates, mut references, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    for sample in &data.samples[..n] {
        let pixels = captioner.preprocessor().preprocess(&sample.image.load_rgb()?)?;
        let caption = captioner.caption(&pixels, &options, |_| {})?;
        pairs.push((sample.image.key(), caption.text.clone(), sample.captions.clone()));
        candidates.push(caption.text.trim().to_string());
        references.push(sample.captions.clone());
    }
    Ok((score(&candidates, &references), pairs))
}

// Checkpoints: `checkpoint/` holds trainable.safetensors, optimizer.safetensors, state.json. It is
// written whole as `checkpoint.tmp/` and swapped in by renames, so a kill at any moment leaves
// either the previous checkpoint or the new one (`checkpoint.old/` between the two renames).

fn save_checkpoint(out: &Path, model: &TrainModel, opt: &AdamW, state: &RunState) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    create_dir(&tmp)?;
    let params: BTreeMap<String, Tensor> = model.param_tensors().into_iter().collect();
    write_atomic(&tmp.join("trainable.safetensors"), &safetensors_bytes(&params)?)?;
    let moments: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    write_atomic(&tmp.join("optimizer.safetensors"), &safetensors_bytes(&moments)?)?;
    let state_json = serde_json::to_value(state).map_err(|e| Error::Compute(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), &pretty(&state_json)?)?;
    let (current, old) = (out.join("checkpoint"), out.join("checkpoint.old"));
    let _ = std::fs::remove_dir_all(&old);
    if current.exists() {
        std::fs::rename(&current, &old).map_err(io_err(&current))?;
    }
    std::fs::rename(&tmp, &current).map_err(io_err(&current))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(out: &Path, model: &TrainModel, opt: &mut AdamW) -> Result<Option<RunState>> {
    let dir = [out.join("checkpoint"), out.join("checkpoint.old")].into_iter().find(|d| d.join("state.json").exists());
    let Some(dir) = dir else { return Ok(None) };
    let read = |name: &str| -> Result<Vec<u8>> { std::fs::read(dir.join(name)).map_err(io_err(&dir.join(name))) };
    let state: RunState = serde_json::from_slice(&read("state.json")?).map_err(|e| Error::config("checkpoint state.json", e))?;
    let params = crate::loading::load_safetensors("checkpoint trainable.safetensors", &read("trainable.safetensors")?, |k| k.to_string())?;
    model.load_params(&params)?;
    let mut moments = crate::loading::load_safetensors("checkpoint optimizer.safetensors", &read("optimizer.safetensors")?, |k| k.to_string())?;
    // The parameters too: a bf16 run resumed from an f32 checkpoint takes its masters from them.
    for (name, t) in params {
        moments.entry(name).or_insert(t);
    }
    opt.load_state(&moments, state.step).map_err(|e| Error::config("checkpoint optimizer.safetensors", e))?;
    Ok(Some(state))
}

fn write_plot(path: &Path, history: &[Value]) -> Result<()> {
    use super::plot::{line_plot_png, Series};
    let series = |key: &str, name: &str| Series {
        name: name.to_string(),
        points: history.iter().filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?))).collect(),
    };
    let eval = |key: &str, name: &str| Series {
        name: name.to_string(),
        points: history.iter().filter_map(|l| Some((l.get("step")?.as_f64()?, l.get("eval")?.get(key)?.as_f64()?))).collect(),
    };
    let bleu4 = Series {
        name: "BLEU-4".into(),
        points: history.iter().filter_map(|l| Some((l.get("step")?.as_f64()?, l.get("eval")?.get("bleu")?.get(3)?.as_f64()?))).collect(),
    };
    line_plot_png(
        path,
        "wasmcap training",
        "step",
        &[
            vec![series("loss", "loss")],
            vec![series("lr", "learning rate")],
            vec![bleu4, eval("cider_d", "CIDEr-D"), eval("exact_match", "exact match")],
        ],
    )
}

/// indicatif bars: one for epochs, one for the steps of the current epoch.
struct Progress {
    multi: Option<(indicatif::MultiProgress, indicatif::ProgressBar, indicatif::ProgressBar)>,
}

impl Progress {
    fn new(enabled: bool, epochs: usize, steps_per_epoch: usize) -> Self {
        if !enabled {
            return Self { multi: None };
        }
        let multi = indicatif::MultiProgress::new();
        let style = |t: &str| indicatif::ProgressStyle::with_template(t).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let epoch = multi.add(indicatif::ProgressBar::new(epochs as u64));
        epoch.set_style(style("epoch {pos}/{len} [{bar:30}] {elapsed_precise} ETA {eta_precise}"));
        let step = multi.add(indicatif::ProgressBar::new(steps_per_epoch as u64));
        step.set_style(style("step  {pos}/{len} [{bar:30}] {msg} ETA {eta}"));
        Self { multi: Some((multi, epoch, step)) }
    }

    fn start_epoch(&self, epoch: usize, step_in_epoch: usize) {
        if let Some((_, e, s)) = &self.multi {
            e.set_position(epoch as u64);
            s.set_position(step_in_epoch as u64);
        }
    }

    fn step(&self, step: usize, loss: f64, lr: f64, sps: f64) {
        match &self.multi {
            Some((_, _, s)) => {
                s.inc(1);
                s.set_message(format!("loss {loss:.4} lr {lr:.2e} {sps:.1} samples/s (step {step})"));
            }
            None => {
                if step % 50 == 0 {
                    eprintln!("step {step}: loss {loss:.4} lr {lr:.2e} {sps:.1} samples/s");
                }
            }
        }
    }

    fn println(&self, line: &str) {
        match &self.multi {
            Some((m, _, _)) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some((_, e, s)) = &self.multi {
            s.finish_and_clear();
            e.finish();
        }
    }
}
