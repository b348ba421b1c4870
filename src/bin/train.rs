//! `train --dataset flickr --encoder-model google/siglip-base-patch16-224 --decoder-model openai-community/gpt2 --epochs 5`
//!
//! Trains a captioner natively (CPU; candle's `cuda`/`metal` features pass through) and writes a
//! folder that the browser package and 🤗 transformers load as it is. `train eval` scores any
//! model folder on a dataset split.

// Native only: in a wasm32 build (e.g. `wasm-pack test`) this binary is an empty shell.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::path::PathBuf;
    use std::process::ExitCode;

    use clap::{Args as ClapArgs, Parser, Subcommand};
    use wasmcap::train::data::{DatasetOptions, Split};
    use wasmcap::train::device::{DeviceSpec, Precision};
    use wasmcap::train::model::LoraSettings;
    use wasmcap::train::run::{check_step, evaluate_captioner, train, TrainConfig};
    use wasmcap::{Captioner, Error};

    #[derive(Parser)]
    #[command(
        version,
        about = "Train a SigLIP captioner (GPT-2 cross-attention or Llama prefix + LoRA); the output folder loads in the browser package and in 🤗 transformers",
        args_conflicts_with_subcommands = true
    )]
    struct Cli {
        #[command(subcommand)]
        command: Option<Command>,
        #[command(flatten)]
        train: TrainArgs,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Caption a dataset split with a model folder and print BLEU-1..4, CIDEr-D and exact match.
        Eval(EvalArgs),
        /// Write scenes of the built-in shapes dataset as PNG files plus a captions.jsonl
        /// (the JSONL dataset format, so `--dataset DIR/captions.jsonl` trains on them).
        Shapes(ShapesArgs),
        /// One training batch (every caption of the training split) without an update: prints the
        /// loss and the gradient norm of each trainable tensor as JSON. Takes the training flags;
        /// run it with --device cpu and --device cuda to compare the two.
        CheckStep(Box<TrainArgs>),
    }

    #[derive(ClapArgs)]
    struct ShapesArgs {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long, default_value_t = 10)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    }

    fn run_shapes(a: ShapesArgs) -> Result<(), Error> {
        let split: Split = a.split.parse()?;
        let options = DatasetOptions {
            shapes_train: a.count,
            shapes_val: a.count,
            shapes_test: a.count,
            shapes_seed: a.seed,
            shapes_size: a.size,
            check_images: false,
        };
        let data = wasmcap::train::data::load_dataset("shapes", None, split, &options)?;
        std::fs::create_dir_all(&a.out).map_err(|source| Error::Io { path: a.out.display().to_string(), source })?;
        let mut lines = String::new();
        for (i, sample) in data.samples.iter().enumerate() {
            let name = format!("shapes-{split}-{i}.png");
            let path = a.out.join(&name);
            sample.image.load_rgb()?.save(&path).map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
            let caption = sample.captions.first().cloned().unwrap_or_default();
            lines.push_str(&serde_json::json!({ "image": name, "caption": caption, "split": split.to_string() }).to_string());
            lines.push('\n');
        }
        let index = a.out.join("captions.jsonl");
        std::fs::write(&index, lines).map_err(|source| Error::Io { path: index.display().to_string(), source })?;
        println!("wrote {} scenes to {}", data.samples.len(), a.out.display());
        Ok(())
    }

    #[derive(ClapArgs)]
    struct DataArgs {
        /// shapes (built in, synthetic), flickr / flickr8k (Flickr8k.token.txt or Kaggle captions.txt),
        /// coco (captions JSON, also Flickr30k), karpathy (dataset_*.json), jsonl, csv, or a .jsonl/.csv path.
        #[arg(long, default_value = "shapes")]
        dataset: String,
        /// Where the dataset lives (folder or file); not needed for shapes or a .jsonl/.csv path.
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// shapes: number of training / validation / test scenes, their seed and size in pixels.
        #[arg(long, default_value_t = 3000)]
        shapes_train: usize,
        #[arg(long, default_value_t = 300)]
        shapes_val: usize,
        #[arg(long, default_value_t = 300)]
        shapes_test: usize,
        #[arg(long, default_value_t = 0)]
        shapes_seed: u64,
        #[arg(long, default_value_t = 64)]
        shapes_size: u32,
        /// Do not decode every image once up front to skip broken ones (faster start on big sets).
        #[arg(long)]
        no_check_images: bool,
    }

    impl DataArgs {
        fn options(&self) -> DatasetOptions {
            DatasetOptions {
                shapes_train: self.shapes_train,
                shapes_val: self.shapes_val,
                shapes_test: self.shapes_test,
                shapes_seed: self.shapes_seed,
                shapes_size: self.shapes_size,
                check_images: !self.no_check_images,
            }
        }
    }

    #[derive(ClapArgs)]
    struct TrainArgs {
        #[command(flatten)]
        data: DataArgs,
        /// How an encoder and a decoder folder make one model: cross-attention (SigLIP → GPT-2
        /// with cross-attention, decoder trained in full; the default) or prefix (SigLIP →
        /// projector → Llama; encoder and base frozen, projector + LoRA trained). With --model or
        /// --init-from-config, the config's model_type decides; --arch then only checks it.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(wasmcap::architecture::FAMILIES.iter().filter_map(|f| f.training.map(|t| t.arch()))))]
        arch: Option<String>,
        /// SigLIP: a local HF folder or a hub id (downloaded when there is network).
        #[arg(long)]
        encoder_model: Option<String>,
        /// GPT-2 (cross-attention) or Llama (prefix): a local HF folder or a hub id.
        #[arg(long)]
        decoder_model: Option<String>,
        /// Continue training a captioner folder (vision-encoder-decoder or llava) instead.
        #[arg(long, conflicts_with_all = ["encoder_model", "decoder_model"])]
        model: Option<PathBuf>,
        /// Train from scratch: a full config.json (vision-encoder-decoder or llava), fresh weights.
        #[arg(long, conflicts_with_all = ["encoder_model", "decoder_model", "model"])]
        init_from_config: Option<PathBuf>,
        /// A tokenizer.json, or `word-level` to build one from the training captions.
        /// Default: the decoder's (or the model's) tokenizer.json.
        #[arg(long)]
        tokenizer: Option<String>,
        /// Train the encoder too (no feature cache then).
        #[arg(long)]
        train_encoder: bool,
        /// Prefix: train the language model in full instead of LoRA (with --lora-rank 0), e.g. to
        /// make a base that a later LoRA run (--model DIR) adapts.
        #[arg(long)]
        train_decoder: bool,
        /// Prefix: LoRA rank on the language model (0 = no LoRA: only the projector trains).
        #[arg(long, default_value_t = 8)]
        lora_rank: usize,
        #[arg(long, default_value_t = 16.0)]
        lora_alpha: f64,
        /// Comma-separated Llama projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
        #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
        lora_targets: String,
        /// Scale LoRA by α/√r (rsLoRA) instead of α/r.
        #[arg(long)]
        use_rslora: bool,
        /// Prefix: text after the image that the caption continues (the same at inference).
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 5)]
        epochs: usize,
        /// Stop after this many optimizer steps (the schedule is laid out for them).
        #[arg(long)]
        max_steps: Option<usize>,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Micro-batches per optimizer step.
        #[arg(long, default_value_t = 1)]
        grad_accum: usize,
        #[arg(long, default_value_t = 5e-5)]
        lr: f64,
        /// Warmup steps (or, below 1, a fraction of all steps); cosine decay after.
        #[arg(long, default_value_t = 0.05)]
        warmup: f64,
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        /// Clip the global gradient norm to this (0: off).
        #[arg(long, default_value_t = 1.0)]
        grad_clip: f64,
        /// Caption tokens per example (longer captions are cut); also the eval generation length.
        #[arg(long, default_value_t = 32)]
        max_len: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder: the model (HF layout), checkpoint/, metrics.jsonl, training.png.
        #[arg(long, default_value = "runs/captioner")]
        output: PathBuf,
        /// Continue from OUTPUT/checkpoint with the same optimizer state, schedule and data order.
        #[arg(long)]
        resume: bool,
        /// Evaluate on the validation split every N optimizer steps (0: only at the end).
        #[arg(long, default_value_t = 0)]
        eval_every: usize,
        /// Validation images per evaluation (0: all).
        #[arg(long, default_value_t = 200)]
        eval_samples: usize,
        /// Checkpoint every N optimizer steps (and at each epoch's end).
        #[arg(long, default_value_t = 100)]
        save_every: usize,
        /// Folder for the frozen encoder's features, reused by later runs on the same images and
        /// encoder (a resumed run, another learning rate, ...) [default: OUTPUT/feature-cache].
        #[arg(long)]
        feature_cache: Option<PathBuf>,
        /// Keep encoder features in memory only.
        #[arg(long)]
        no_feature_cache: bool,
        /// Plain log lines instead of progress bars.
        #[arg(long)]
        no_progress: bool,
        /// Sleep this long after every optimizer step (tests use it to interrupt a run mid-way).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// cpu, cuda, cuda:N, or auto: the GPU when this binary has CUDA (`--features cuda`) and
        /// one answers, else the CPU.
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// f32, or bf16 (GPU): bf16 compute with f32 master weights and optimizer state.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
        /// GPU: keep f32 matrix products in full f32 (by default cuBLAS may use TF32).
        #[arg(long)]
        no_tf32: bool,
        /// Data-parallel over GPUs 0 … N-1 of this host (binary built with `--features nccl`):
        /// each takes 1/N of every batch (--batch-size stays the global batch).
        #[arg(long, default_value_t = 1)]
        gpus: usize,
    }

    #[derive(ClapArgs)]
    struct EvalArgs {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter folder merged at load.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        /// train, val or test.
        #[arg(long, default_value = "test")]
        split: String,
        /// Images to caption (0: all).
        #[arg(long, default_value_t = 0)]
        max_samples: usize,
        /// Prefix models: the prompt the model was trained with.
        #[arg(long)]
        prompt: Option<String>,
        /// Print JSON (scores and every caption).
        #[arg(long)]
        json: bool,
    }

    /// A local folder, or a hub id (`org/name[@revision]`) fetched into the hub cache.
    fn resolve_model(spec: &str, what: &str) -> Result<PathBuf, Error> {
        wasmcap::hub::Hub::from_env().model_folder(spec).map_err(|e| match e {
            Error::MissingFile(m) => Error::MissingFile(format!("{what} {m}")),
            other => other,
        })
    }

    fn train_config(a: TrainArgs) -> Result<TrainConfig, Error> {
        let resolve = |s: &Option<String>, what: &str| s.as_deref().map(|s| resolve_model(s, what)).transpose();
        let lora = (a.lora_rank > 0).then(|| LoraSettings {
            r: a.lora_rank,
            alpha: a.lora_alpha,
            targets: a.lora_targets.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
            rslora: a.use_rslora,
        });
        let cfg = TrainConfig {
            arch: a.arch,
            dataset: a.data.dataset.clone(),
            data_root: a.data.data_root.clone(),
            data: a.data.options(),
            encoder_model: resolve(&a.encoder_model, "--encoder-model")?,
            decoder_model: resolve(&a.decoder_model, "--decoder-model")?,
            model: a.model,
            init_from_config: a.init_from_config,
            tokenizer: a.tokenizer,
            train_encoder: a.train_encoder,
            train_decoder: a.train_decoder,
            lora,
            prompt: a.prompt,
            epochs: a.epochs,
            max_steps: a.max_steps,
            batch_size: a.batch_size.max(1),
            grad_accum: a.grad_accum.max(1),
            lr: a.lr,
            warmup: a.warmup,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
            max_len: a.max_len.max(2),
            seed: a.seed,
            output: a.output.clone(),
            resume: a.resume,
            eval_every: a.eval_every,
            eval_samples: a.eval_samples,
            save_every: a.save_every,
            feature_cache: (!a.no_feature_cache).then(|| a.feature_cache.clone().unwrap_or_else(|| a.output.join("feature-cache"))),
            progress: !a.no_progress,
            pause_ms: a.pause_ms,
            device: a.device,
            precision: a.dtype,
            tf32: !a.no_tf32,
            gpus: a.gpus.max(1),
        };
        Ok(cfg)
    }

    fn run_check_step(a: TrainArgs) -> Result<(), Error> {
        let check = check_step(&train_config(a)?)?;
        println!("{}", serde_json::to_string(&check).map_err(|e| Error::Compute(e.to_string()))?);
        Ok(())
    }

    fn run_train(a: TrainArgs) -> Result<(), Error> {
        let (json, output) = (a.json, a.output.clone());
        let cfg = train_config(a)?;
        let summary = train(&cfg)?;
        if json {
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
        } else {
            println!(
                "trained {} steps ({} epochs), final loss {:.4}, {:.1} samples/s; model written to {}",
                summary.steps,
                summary.epochs,
                summary.final_loss,
                summary.samples_per_s,
                output.display()
            );
            if let Some(scores) = &summary.eval {
                println!("validation: {scores}");
            }
        }
        Ok(())
    }

    fn run_eval(a: EvalArgs) -> Result<(), Error> {
        let split: Split = a.split.parse()?;
        let captioner = Captioner::from_dir(&a.model, a.adapter.as_deref())?;
        let cfg_data = a.data.options();
        let data = wasmcap::train::data::load_dataset(&a.data.dataset, a.data.data_root.as_deref(), split, &cfg_data)?;
        let (scores, pairs) = evaluate_captioner(&captioner, &data, a.max_samples, a.prompt.as_deref())?;
        if a.json {
            let captions: Vec<_> =
                pairs.iter().map(|(image, text, refs)| serde_json::json!({ "image": image, "caption": text, "references": refs })).collect();
            println!(
                "{}",
                serde_json::json!({ "dataset": data.name, "split": a.split, "images": pairs.len(), "scores": scores, "captions": captions })
            );
        } else {
            println!("{} {} ({} images): {scores}", data.name, a.split, pairs.len());
        }
        Ok(())
    }

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        let result = match cli.command {
            Some(Command::Eval(a)) => run_eval(a),
            Some(Command::Shapes(a)) => run_shapes(a),
            Some(Command::CheckStep(a)) => run_check_step(*a),
            None => run_train(cli.train),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }
}
