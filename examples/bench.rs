//! Native half of `./build.sh bench`: `cargo run --release --example bench -- CONFIG.json [TOKENS] [REPEATS]`
//! prints one JSON line (medians, plus peak resident memory from /proc).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: bench CONFIG.json [NEW_TOKENS=20] [REPEATS=3]");
        return std::process::ExitCode::FAILURE;
    };
    let tokens = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let repeats = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let result = std::fs::read_to_string(path)
        .map_err(|e| wasmcap::Error::Io { path: path.clone(), source: e })
        .and_then(|json| wasmcap::bench::bench_cross_attention(&json, tokens, repeats));
    match result {
        Ok(report) => {
            let mut line = serde_json::to_value(&report).unwrap_or_default();
            line["peakMemoryBytes"] = serde_json::json!(peak_rss_bytes());
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

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
