#!/usr/bin/env bash
# ./build.sh bench-train — training throughput of the native trainer on full-size configs with
# fresh weights (bench/configs: SigLIP-B/16-224 + GPT-2 small; SigLIP-B/16-224 + SmolLM-135M),
# the same batch for both, on the built-in shapes data at 224 px:
#   cross-attention: decoder (GPT-2 + new cross-attention) trained in full, encoder frozen
#   prefix: encoder and language model frozen, projector + LoRA (r 8 on q,k,v,o) trained
# Two epochs over IMAGES images: epoch 1 runs the frozen encoder, epoch 2 reads the feature cache.
# Prints a table; quote it with the machine load (printed too).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${IMAGES:-16}
BATCH=${BATCH:-4}
THREADS=${THREADS:-$(nproc)}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)  cores: $(nproc), RAYON_NUM_THREADS=$THREADS" >&2
cargo build --release --bin train >&2
bin="${CARGO_TARGET_DIR:-target}/release/train"
out=$(mktemp -d)
run() { # arch config tokenizer
  RAYON_NUM_THREADS=$THREADS "$bin" --arch "$1" --init-from-config "$2" --tokenizer "$3" --dataset shapes \
    --shapes-train "$IMAGES" --shapes-val 1 --shapes-size 224 --epochs 2 --batch-size "$BATCH" --lr 1e-4 \
    --eval-samples 1 --save-every 1000000 --no-progress --json --output "$out/$1" 2>/dev/null
}
cross=$(run cross-attention bench/configs/siglip-base-gpt2.json tests/fixtures/gpt2-tokenizer/tokenizer.json)
prefix=$(run prefix bench/configs/siglip-base-smollm-135m.json word-level)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
rm -rf "$out"
node -e '
const [c, p] = process.argv.slice(1).map(JSON.parse);
const images = Number(process.argv[3]);
const row = (name, r) => {
  const [e1, e2] = r.epoch_seconds;
  return `| ${name} | ${(r.trainable_params / 1e6).toFixed(2)} M of ${(r.total_params / 1e6).toFixed(1)} M | ${(images / e1).toFixed(2)} | ${(images / e2).toFixed(2)} | ${(e1 / e2).toFixed(2)}× |`;
};
console.log(`fp32 CPU, fresh weights, ${images} images × 2 epochs, batch ${process.argv[4]}, shapes at 224 px`);
console.log("| run | trainable params | samples/s epoch 1 (encoder runs) | samples/s epoch 2 (feature cache) | cache speed-up |");
console.log("|---|---|---|---|---|");
console.log(row("SigLIP-B + GPT-2, cross-attention, full decoder", c));
console.log(row("SigLIP-B + SmolLM-135M, prefix, projector + LoRA r8", p));
const ratio = (p_, c_) => (images / p_) / (images / c_);
console.log(`prefix+LoRA vs cross-attention samples/s (epoch 2): ${ratio(p.epoch_seconds[1], c.epoch_seconds[1]).toFixed(2)}×`);
' "$cross" "$prefix" "$IMAGES" "$BATCH"
