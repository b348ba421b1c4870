//! `quantize --model DIR --out DIR`
//!
//! Writes a copy of a 🤗 model folder whose `model.safetensors` holds q8_0 matrices (encoder,
//! projector and decoder; f16 token embeddings; see `wasmcap::quantize`): about a third of the
//! download, loaded as it is by the browser package, the CLI and the trainer's tools. The other
//! files (config, tokenizer, preprocessor, generation config) are copied unchanged. A folder with
//! a LoRA adapter must be merged first (an adapter cannot merge into q8_0 weights).

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

    use clap::Parser;

    #[derive(Parser)]
    #[command(version, about = "Write a q8_0 copy of a model folder (a smaller download the browser loads as it is)")]
    struct Args {
        /// The 🤗 model folder (config.json, model.safetensors, tokenizer.json, preprocessor_config.json, ...).
        #[arg(long)]
        model: PathBuf,
        /// Where to write the quantized folder (created; an existing model.safetensors there is replaced).
        #[arg(long)]
        out: PathBuf,
        /// Print the report as JSON (tensors quantized, kept, bytes in and out).
        #[arg(long)]
        json: bool,
    }

    pub fn main() -> ExitCode {
        let args = Args::parse();
        match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn run(args: &Args) -> Result<(), String> {
        let read = |name: &str| std::fs::read(args.model.join(name)).map_err(|e| format!("cannot read {}: {e}", args.model.join(name).display()));
        let config: serde_json::Value =
            serde_json::from_slice(&read("config.json")?).map_err(|e| format!("{}: invalid JSON: {e}", args.model.join("config.json").display()))?;
        let weights = read("model.safetensors")?;
        let (bytes, report) = wasmcap::quantize::quantize_checkpoint(&config, &weights).map_err(|e| e.to_string())?;
        if std::fs::canonicalize(&args.model).ok() == std::fs::canonicalize(&args.out).ok() {
            return Err("--out is the model folder itself: write the quantized copy elsewhere".into());
        }
        std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
        let entries = std::fs::read_dir(&args.model).map_err(|e| format!("cannot list {}: {e}", args.model.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_file() && name != "model.safetensors" && !name.to_string_lossy().starts_with("adapter_") {
                std::fs::copy(&path, args.out.join(&name)).map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
            }
        }
        let out = args.out.join("model.safetensors");
        std::fs::write(&out, &bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        if args.json {
            println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
        } else {
            eprintln!(
                "{}: {} q8_0 matrices, {} f16 embeddings, {} matrices kept f32; {:.1} MB → {:.1} MB ({:.0} %)",
                out.display(),
                report.q8_0.len(),
                report.f16.len(),
                report.kept_f32.len(),
                report.bytes_in as f64 / 1e6,
                report.bytes_out as f64 / 1e6,
                100.0 * report.bytes_out as f64 / report.bytes_in.max(1) as f64
            );
        }
        Ok(())
    }
}
