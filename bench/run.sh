#!/usr/bin/env bash
# ./build.sh bench — full-size random SigLIP-B/16-224 + GPT-2 small (cross-attention), one image,
# 20 new tokens, median of 3, natively (candle's threads, then 1 thread) and in headless Chromium
# (one thread, SIMD128). Prints a table; quote it with the machine load (printed too).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=bench/configs/siglip-base-gpt2.json
TOKENS=${TOKENS:-20}
REPEATS=${REPEATS:-3}
[ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)  cores: $(nproc)" >&2
cargo build --release --example bench
native=$(cargo run -q --release --example bench -- "$CONFIG" "$TOKENS" "$REPEATS")
native1=$(RAYON_NUM_THREADS=1 cargo run -q --release --example bench -- "$CONFIG" "$TOKENS" "$REPEATS")
wasm-pack build --target web --release --out-dir pkg >&2
browser=$(node bench/browser.mjs "$CONFIG" "$TOKENS" "$REPEATS")
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
node -e '
const rows = [["native (all cores)", JSON.parse(process.argv[1])], ["native (1 thread)", JSON.parse(process.argv[2])], ["chromium wasm (1 thread)", JSON.parse(process.argv[3])]];
const f = (x, d = 0) => Number(x).toFixed(d);
console.log("SigLIP-B/16-224 + GPT-2 small (cross-attention), fp32, random weights, " + rows[0][1].newTokens + " new tokens, median of " + rows[0][1].repeats);
console.log("| where | encoder ms | first token ms | ms/token | tokens/s | peak memory MiB |");
console.log("|---|---|---|---|---|---|");
for (const [name, r] of rows) console.log(`| ${name} | ${f(r.encoderMs)} | ${f(r.firstTokenMs)} | ${f(r.msPerToken, 1)} | ${f(r.tokensPerS, 1)} | ${f(r.peakMemoryBytes / 2 ** 20)} |`);
' "$native" "$native1" "$browser"
