//! Native half of `./build.sh bench`:
//! `cargo run --release --example bench -- CONFIG.json [PROMPT_TOKENS] [NEW_TOKENS] [REPEATS] [IMAGES] [BEAMS] [f32|f16|bf16|q8_0|q4_0] [TILES]`
//! prints one JSON line (`bench::BenchReport`).
//! `cargo run --release --example bench -- memory BYTES [REPEATS]` prints the streaming-read
//! speed in GB/s over a buffer of BYTES.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: bench CONFIG.json [PROMPT_TOKENS=8] [NEW_TOKENS=20] [REPEATS=3]");
        return std::process::ExitCode::FAILURE;
    };
    let arg = |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    if path == "memory" {
        println!("{}", wasmcap::bench::memory_read_gbps(arg(2, 1 << 29), arg(3, 5)));
        return std::process::ExitCode::SUCCESS;
    }
    let (prompt_tokens, tokens, repeats) = (arg(2, 8), arg(3, 20), arg(4, 3));
    let mut shape = wasmcap::bench::BenchShape { images: arg(5, 1), beams: arg(6, 1), tiles: arg(8, 1), ..Default::default() };
    if let Some(weights) = args.get(7).filter(|w| !shape.set_weights(w)) {
        eprintln!("unknown weights {weights} (f32, f16, bf16, q8_0, q4_0)");
        return std::process::ExitCode::FAILURE;
    }
    let result = std::fs::read_to_string(path)
        .map_err(|e| wasmcap::Error::Io { path: path.clone(), source: e })
        .and_then(|json| wasmcap::bench::bench_model_shaped(&json, prompt_tokens, tokens, repeats, shape));
    match result {
        Ok(report) => {
            let mut line = serde_json::to_value(&report).unwrap_or_default();
            line["threads"] = serde_json::json!(candle_core::utils::get_num_threads());
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
