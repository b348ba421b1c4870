#!/usr/bin/env bash
# ./build.sh bench --vs-transformers-js [driver options] — wasmcap vs transformers.js
# (@huggingface/transformers, ONNX Runtime Web) in the same headless Chromium, same full-size
# random weights (SigLIP-B/16-224 + GPT-2 small), same image, fp32 and q8, 1 and 2 threads.
#   1. a side Python venv (~/.cache/wasmcap/vs-tjs-venv, requirements.txt) if missing
#   2. the model, safetensors + ONNX (+ q8 ONNX), in ~/.cache/wasmcap/vs-tjs (make_model.py;
#      cached: rebuilt only when make_model.py or the config changes)
#   3. npm ci here (transformers.js + playwright-core), when package-lock.json changed
#   4. node driver.mjs: prints the markdown table (also saved as JSON next to the model)
# Env: VS_TJS_CONFIG (bench/configs/siglip-base-gpt2.json; vit-base-gpt2.json for ViT-B/16 + GPT-2),
# TOKENS (20), REPEATS (3), THREADS (1,2), DTYPES (fp32,q8), OURS_THREADS (auto|always|never),
# OURS_JS (serve pkg/index.js + worker.js from this folder, e.g. js), VS_TJS_VENV, VS_TJS_DATA.
# Uses pkg/ as it is (builds it only if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${1:-}" = --vs-transformers-js ] && shift
HERE=bench/vs-tjs
VENV=${VS_TJS_VENV:-$HOME/.cache/wasmcap/vs-tjs-venv}
# VS_TJS_CONFIG=bench/configs/vit-base-gpt2.json: ViT-B/16 + GPT-2 (nlpconnect's architecture).
CONFIG=${VS_TJS_CONFIG:-bench/configs/siglip-base-gpt2.json}
case "$CONFIG" in
  */siglip-base-gpt2.json) DATA=${VS_TJS_DATA:-$HOME/.cache/wasmcap/vs-tjs} ;;
  *) DATA=${VS_TJS_DATA:-$HOME/.cache/wasmcap/vs-tjs-$(basename "$CONFIG" .json)} ;;
esac
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if ! "$VENV/bin/python" -c 'import torch, transformers, optimum.exporters.onnx, onnxruntime.quantization, PIL, accelerate' 2>/dev/null; then
  log "making the Python venv $VENV (torch, transformers 4.57, optimum-onnx, onnxruntime)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
fi
log "model (cached in $DATA)"
"$VENV/bin/python" "$HERE/make_model.py" --config "$CONFIG" --out "$DATA"

lock_hash=$(sha256sum "$HERE/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$HERE/node_modules/.vs-tjs-lock" 2>/dev/null)" != "$lock_hash" ]; then
  log "npm ci in $HERE (transformers.js, playwright-core)"
  # onnxruntime-node's install script would download binaries from GitHub; the browser needs none.
  (cd "$HERE" && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund)
  echo "$lock_hash" > "$HERE/node_modules/.vs-tjs-lock"
fi
if [ ! -f pkg/index.js ] || [ ! -f pkg/wasmcap_bg.wasm ]; then
  log "pkg/ missing: building it"
  bash build.sh build
fi
# Every run (a few seconds): the file must be what this checkout's quantize writes.
log "quantizing the model ahead of time (the quantize binary) into $DATA/model-q8"
rm -rf "$DATA/model-q8"
cargo run -q --release --bin quantize -- --model "$DATA/model" --out "$DATA/model-q8"
log "pkg/wasmcap_bg.wasm built $(date -r pkg/wasmcap_bg.wasm '+%F %T')"
exec node "$HERE/driver.mjs" --data "$DATA" --tokens "${TOKENS:-20}" --repeats "${REPEATS:-3}" \
  --threads "${THREADS:-1,2}" --dtypes "${DTYPES:-fp32,q8}" --ours-threads "${OURS_THREADS:-auto}" \
  --json "$DATA/last-run.json" ${OURS_JS:+--ours-js "$OURS_JS"} "$@"
