//! `caption --model DIR IMAGE... [--max-new-tokens N] [--json]`
//!
//! Captions images with a 🤗 model folder. Text streams to stdout token by token; with `--json`
//! each image gives one JSON line instead. A bad image is reported and the others still run.

// Native only: in a wasm32 build (e.g. `wasm-pack test`) this binary is an empty shell.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;

    use clap::Parser;
    use wasmcap::generation::GenerationOptions;
    use wasmcap::{BeamOptions, CaptionOptions, Captioner};

    #[derive(Parser)]
    #[command(version, about = "Caption images with a 🤗 model folder: SigLIP + GPT-2 (VisionEncoderDecoder) or SigLIP + Llama (Llava)")]
    struct Args {
        /// Model folder (config.json, the weights — model.safetensors, sharded, or pytorch_model.bin
        /// —, tokenizer, preprocessor_config.json, generation_config.json when present), or a hub
        /// id `org/name[@revision]` fetched into the hub cache (HF_ENDPOINT, HF_HOME,
        /// HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN as huggingface_hub reads them); a local folder
        /// of that name wins.
        #[arg(long)]
        model: String,
        /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors), merged at load.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Text after the image: a llava model's caption continues it; for SmolVLM / Idefics3 it is
        /// the user's turn (the image, then this text) through the folder's chat template.
        #[arg(long)]
        prompt: Option<String>,
        /// Maximum number of new tokens (default: generation_config.json, else transformers' default).
        #[arg(long)]
        max_new_tokens: Option<usize>,
        // Every generation flag defaults to generation_config.json (then transformers' default),
        // as generate() does.
        /// Beam search with this many beams (1: greedy, streamed) [default: generation_config.json, else 1].
        #[arg(long)]
        num_beams: Option<usize>,
        /// Beam search: score = Σ log p / length^length_penalty [default: generation_config.json, else 1].
        #[arg(long)]
        length_penalty: Option<f32>,
        /// Beam search stopping: true, false (transformers' heuristic) or never.
        #[arg(long, value_parser = ["true", "false", "never"])]
        early_stopping: Option<String>,
        /// Beam search: how many of the best hypotheses to print.
        #[arg(long)]
        num_return_sequences: Option<usize>,
        /// Sample instead of picking the most likely token (with --temperature/--top-k/--top-p/--seed);
        /// `--do-sample false` overrides a generation_config.json that samples.
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        do_sample: Option<bool>,
        /// Quantize the decoder's matrices at load: q8_0 or q4_0 (f32 where rows are not a multiple of 32).
        #[arg(long, value_parser = ["q8_0", "q4_0"])]
        quantize: Option<String>,
        /// Caption the images in batches of this many: one encoder pass and one decoding loop per
        /// batch (the same captions as one by one).
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        #[arg(long)]
        temperature: Option<f32>,
        /// Sampling: keep the k most likely tokens (transformers' default 50; 0 turns it off).
        #[arg(long)]
        top_k: Option<usize>,
        /// Sampling: keep the smallest set of tokens whose probability reaches p, in (0, 1].
        #[arg(long)]
        top_p: Option<f32>,
        /// Sampling: seed of the random generator (same seed, same caption).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        repetition_penalty: Option<f32>,
        #[arg(long)]
        no_repeat_ngram_size: Option<usize>,
        #[arg(long)]
        min_new_tokens: Option<usize>,
        /// Token id sequences never to generate, as JSON: '[[7], [3, 9]]'.
        #[arg(long)]
        bad_words_ids: Option<String>,
        /// One JSON object per image: image, text, token_ids, encoder_ms, first_token_ms, total_ms, tokens_per_s
        /// (with beam search: image, text, token_ids, score, sequences).
        #[arg(long)]
        json: bool,
        /// PNG or JPEG files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    }

    pub fn main() -> ExitCode {
        let args = Args::parse();
        // An error before any image: on stderr, and with --json also a line `{"error": …}` on stdout.
        let fatal = |message: String| {
            if args.json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        };
        let loaded = wasmcap::hub::Hub::from_env()
            .model_folder(&args.model)
            .and_then(|dir| Captioner::from_dir(dir, args.adapter.as_deref()))
            .and_then(|mut c| {
                // clap admits only the names decoder_format knows.
                let Some(dtype) = args.quantize.as_deref().and_then(wasmcap::captioner::decoder_format) else { return Ok(c) };
                let (done, kept) = c.quantize_decoder(dtype)?;
                eprintln!("quantized {done} decoder matrices to {dtype:?} ({kept} kept in f32: rows not a multiple of 32)");
                let encoder = c.quantize_encoder()?;
                eprintln!("quantized {encoder} encoder-side matrices to 8 bits (multiplied in 8 bits)");
                Ok(c)
            });
        let captioner = match loaded {
            Ok(c) => c,
            Err(e) => return fatal(format!("cannot load model from {}: {e}", args.model)),
        };
        let bad_words_ids = match args.bad_words_ids.as_deref().map(serde_json::from_str::<Vec<Vec<u32>>>).transpose() {
            Ok(ids) => ids,
            Err(e) => return fatal(format!("--bad-words-ids must be a JSON list of token id lists, e.g. '[[7], [3, 9]]': {e}")),
        };
        let early_stopping = args.early_stopping.as_deref().map(|v| match v {
            "true" => serde_json::Value::Bool(true),
            "false" => serde_json::Value::Bool(false),
            other => serde_json::Value::from(other),
        });
        let given = GenerationOptions {
            max_new_tokens: args.max_new_tokens,
            prompt: args.prompt.clone(),
            messages: None,
            do_sample: args.do_sample,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            repetition_penalty: args.repetition_penalty,
            no_repeat_ngram_size: args.no_repeat_ngram_size,
            min_new_tokens: args.min_new_tokens,
            bad_words_ids,
            num_beams: args.num_beams,
            length_penalty: args.length_penalty,
            early_stopping,
            num_return_sequences: args.num_return_sequences,
        };
        let (options, beams) = match captioner.plan(&given) {
            Ok(plan) => (plan.options, plan.beams),
            Err(e) => return fatal(e.to_string()),
        };
        let mut failed = false;
        let mut report = |image: &Path, e: &wasmcap::Error| {
            failed = true;
            if args.json {
                println!("{}", serde_json::json!({ "image": image.display().to_string(), "error": e.to_string() }));
            } else {
                eprintln!("error: {}: {e}", image.display());
            }
        };
        if args.batch_size > 1 {
            for chunk in args.images.chunks(args.batch_size) {
                if let Err(e) = batch(&captioner, chunk, &options, beams.as_ref(), args.json) {
                    // A batch fails as a whole (an unreadable image names itself in the error).
                    for image in chunk {
                        report(image, &e);
                    }
                }
            }
        } else {
            for image in &args.images {
                let result = match &beams {
                    Some(beams) => beam_one(&captioner, image, &options, beams, args.json),
                    None => caption_one(&captioner, image, &options, args.json),
                };
                if let Err(e) = result {
                    report(image, &e);
                }
            }
        }
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }

    fn pixel_values(captioner: &Captioner, image: &Path) -> wasmcap::Result<wasmcap::preprocess::Pixels> {
        let bytes = std::fs::read(image).map_err(|source| wasmcap::Error::Io { path: image.display().to_string(), source })?;
        captioner.pixel_values_from_bytes(&bytes)
    }

    fn batch(captioner: &Captioner, images: &[PathBuf], options: &CaptionOptions, beams: Option<&BeamOptions>, json: bool) -> wasmcap::Result<()> {
        let pixels = images
            .iter()
            .map(|image| pixel_values(captioner, image).map_err(|e| wasmcap::Error::Image(format!("{}: {e}", image.display()))))
            .collect::<wasmcap::Result<Vec<_>>>()?;
        let pixels = wasmcap::preprocess::Pixels::cat(&pixels)?;
        match beams {
            Some(beams) => {
                for (image, hypotheses) in images.iter().zip(captioner.beam_search_many(&pixels, options, beams, |_, _| {})?) {
                    print_beams(captioner, options, image, &hypotheses, json)?;
                }
            }
            None => {
                for (image, caption) in images.iter().zip(captioner.caption_many(&pixels, options, |_, _| {})?) {
                    if json {
                        let mut line = serde_json::to_value(&caption).map_err(|e| wasmcap::Error::Compute(e.to_string()))?;
                        line["image"] = serde_json::Value::String(image.display().to_string());
                        println!("{line}");
                    } else {
                        println!("{}: {}", image.display(), caption.text);
                    }
                }
            }
        }
        Ok(())
    }

    fn beam_one(captioner: &Captioner, image: &Path, options: &CaptionOptions, beams: &BeamOptions, json: bool) -> wasmcap::Result<()> {
        let pixel_values = pixel_values(captioner, image)?;
        let hypotheses = captioner.beam_search(&pixel_values, options, beams)?;
        print_beams(captioner, options, image, &hypotheses, json)
    }

    fn print_beams(
        captioner: &Captioner,
        options: &CaptionOptions,
        image: &Path,
        hypotheses: &[wasmcap::beam::Hypothesis],
        json: bool,
    ) -> wasmcap::Result<()> {
        let decoded = hypotheses.iter().map(|h| Ok((captioner.caption_text(options, &h.token_ids)?, h))).collect::<wasmcap::Result<Vec<_>>>()?;
        if json {
            let sequences: Vec<_> =
                decoded.iter().map(|(text, h)| serde_json::json!({ "text": text, "token_ids": h.token_ids, "score": h.score })).collect();
            let best = sequences.first().cloned().unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({ "image": image.display().to_string(), "text": best["text"], "token_ids": best["token_ids"], "score": best["score"], "sequences": sequences })
            );
        } else {
            for (text, h) in decoded {
                println!("{}: {text}  [score {:.4}]", image.display(), h.score);
            }
        }
        Ok(())
    }

    fn caption_one(captioner: &Captioner, image: &Path, options: &CaptionOptions, json: bool) -> wasmcap::Result<()> {
        let pixel_values = pixel_values(captioner, image)?;
        let mut stdout = std::io::stdout();
        if !json {
            print!("{}: ", image.display());
        }
        let caption = captioner.caption(&pixel_values, options, |event| {
            if !json {
                print!("{}", event.delta);
                let _ = stdout.flush();
            }
        })?;
        if json {
            let mut line = serde_json::to_value(&caption).map_err(|e| wasmcap::Error::Compute(e.to_string()))?;
            line["image"] = serde_json::Value::String(image.display().to_string());
            println!("{line}");
        } else {
            println!();
            eprintln!(
                "  [{} tokens, encoder {:.0} ms, first token {:.0} ms, {:.1} tokens/s]",
                caption.token_ids.len(),
                caption.encoder_ms,
                caption.first_token_ms,
                caption.tokens_per_s
            );
        }
        Ok(())
    }
}
