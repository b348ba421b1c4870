#!/usr/bin/env bash
# bench/train-gpu.sh — the trainer on a GPU (bench/TRAINING.md): correctness against the CPU and
# throughput on the full-size configs. Raw results go to $OUT; `python3 bench/train_report.py $OUT`
# turns them into the tables of bench/TRAINING.md.
#
#   BIN=path/to/train  a binary built with `--features cuda` (or `nccl`); CPU-only binaries run
#                      the bench part with DEVICE=cpu
#   PARTS="check curve bench dp"  which parts (default: check curve bench)
#   IMAGES=512 BATCH=32   bench: scenes per epoch (2 epochs: encoder, then feature cache) and batch
#   DEVICE=cuda        bench: the device (cpu for the contrast table)
#   GPUS="1 2"         dp: GPU counts compared (binary built with `--features nccl`)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/train}
OUT=${OUT:-bench-out}
PARTS=${PARTS:-check curve bench}
IMAGES=${IMAGES:-512}
BATCH=${BATCH:-32}
DEVICE=${DEVICE:-cuda}
GPUS=${GPUS:-1 2}
CPU_THREADS=${CPU_THREADS:-$(nproc)}
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
GPT2_TOK=tests/fixtures/gpt2-tokenizer/tokenizer.json
{
  echo "date: $(date -u +%FT%TZ)  host cores: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} >"$OUT/machine.txt"

# The peak of GPU memory in use (MiB) while "$@" runs, from nvidia-smi every 100 ms: appended to
# $OUT/memory.txt as "NAME MiB".
with_memory() { # name cmd...
  local name=$1; shift
  local log="$tmp/mem-$name"
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | paste -sd' '; sleep 0.1; done) >"$log" &
  local poll=$!
  "$@"
  local rc=$?
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  awk -v n="$name" '{for (i = 1; i <= NF; i++) if ($i > m[i]) m[i] = $i} END {printf "%s", n; for (i in m) printf " gpu%d=%d", i - 1, m[i]; print ""}' "$log" >>"$OUT/memory.txt"
  return $rc
}

# --- check: one batch (every caption of 8 or 16 scenes), loss and per-tensor gradient norms ------
check() { # name tag device extra-args...
  local name=$1 tag=$2 dev=$3; shift 3
  echo "check-step $name $tag: $*" >&2
  RAYON_NUM_THREADS=$CPU_THREADS "$BIN" check-step --dataset shapes --shapes-val 1 --device "$dev" "$@" \
    >"$OUT/check-$name-$tag.json" 2>>"$OUT/log.txt"
}
# `run name tag device args…` (check or curve) for the argument array named `set`: on the CPU,
# then on the GPU in f32 without TF32, with TF32, and in bf16.
on_each_precision() { # run set
  local run=$1 set=$2
  declare -n args=$set
  "$run" "$set" cpu cpu "${args[@]}"
  "$run" "$set" gpu-f32 cuda "${args[@]}" --no-tf32
  "$run" "$set" gpu-tf32 cuda "${args[@]}"
  "$run" "$set" gpu-bf16 cuda "${args[@]}" --dtype bf16
}
if [[ " $PARTS " == *" check "* ]]; then
  tiny=(--init-from-config models/configs/shapes-cross-attention.json --tokenizer word-level --shapes-train 16 --train-encoder)
  cross=(--init-from-config bench/configs/siglip-base-gpt2.json --tokenizer "$GPT2_TOK" --shapes-train 8 --shapes-size 224)
  prefix=(--arch prefix --init-from-config bench/configs/siglip-base-smollm-135m.json --tokenizer word-level --shapes-train 8
    --shapes-size 224 --lora-rank 16 --lora-alpha 32)
  for set in tiny cross prefix; do on_each_precision check "$set"; done
fi

# --- curve: 200 steps on shapes, CPU vs GPU -----------------------------------------------------
curve() { # name tag device extra-args...
  local name=$1 tag=$2 dev=$3; shift 3
  echo "200 steps $name $tag: $*" >&2
  RAYON_NUM_THREADS=$CPU_THREADS "$BIN" --dataset shapes --shapes-train 6400 --shapes-val 1 --shapes-size 64 --batch-size 32 \
    --max-steps 200 --epochs 1 --lr 2e-3 --warmup 0.03 --eval-samples 1 --save-every 1000000 --no-feature-cache \
    --no-progress --json --device "$dev" --output "$tmp/curve-$name-$tag" "$@" >"$OUT/curve-$name-$tag.json" 2>>"$OUT/log.txt" || return 1
  cp "$tmp/curve-$name-$tag/metrics.jsonl" "$OUT/curve-$name-$tag.jsonl"
  rm -rf "$tmp/curve-$name-$tag"
}
if [[ " $PARTS " == *" curve "* ]]; then
  ca=(--init-from-config models/configs/shapes-cross-attention.json --tokenizer word-level --train-encoder)
  pa=(--arch prefix --model models/shapes-prefix/base --lora-rank 16 --lora-alpha 32
    --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
  for set in ca pa; do on_each_precision curve "$set"; done
fi

# --- bench: full-size configs, batch 32, shapes at 224 px, 2 epochs -----------------------------
bench() { # name extra-args...
  local name=$1; shift
  echo "bench $name on $DEVICE $*" >&2
  with_memory "$name" env RAYON_NUM_THREADS=$CPU_THREADS "$BIN" --dataset shapes --shapes-train "$IMAGES" --shapes-val 1 \
    --shapes-size 224 --epochs 2 --batch-size "$BATCH" --lr 1e-4 --eval-samples 1 --save-every 1000000 --no-feature-cache \
    --no-progress --json --device "$DEVICE" --output "$tmp/bench-$name" "$@" >"$OUT/bench-$name.json" 2>>"$OUT/log.txt"
  cp "$tmp/bench-$name/metrics.jsonl" "$OUT/bench-$name.jsonl"
  rm -rf "$tmp/bench-$name"
}
cross_full=(--init-from-config bench/configs/siglip-base-gpt2.json --tokenizer "$GPT2_TOK")
prefix_full=(--arch prefix --init-from-config bench/configs/siglip-base-smollm-135m.json --tokenizer word-level --lora-rank 16 --lora-alpha 32)
if [[ " $PARTS " == *" bench "* ]]; then
  # The first CUDA process on a machine JIT-compiles candle's kernels (~20 s): not in the timings.
  [ "$DEVICE" = cpu ] || "$BIN" check-step --dataset shapes --shapes-train 2 --shapes-val 1 --init-from-config \
    models/configs/shapes-cross-attention.json --tokenizer word-level --dtype bf16 --device cuda >/dev/null 2>>"$OUT/log.txt"
  if [ "$DEVICE" = cpu ]; then
    bench cross-cpu-f32 "${cross_full[@]}"
    bench prefix-cpu-f32 "${prefix_full[@]}"
  else
    bench cross-gpu-tf32 "${cross_full[@]}"
    bench prefix-gpu-tf32 "${prefix_full[@]}"
    bench cross-gpu-bf16 "${cross_full[@]}" --dtype bf16
    bench prefix-gpu-bf16 "${prefix_full[@]}" --dtype bf16
  fi
fi

# --- dp: data-parallel, the same global batch on 1 and N GPUs -----------------------------------
if [[ " $PARTS " == *" dp "* ]]; then
  for n in $GPUS; do
    bench "cross-bf16-gpus$n" "${cross_full[@]}" --dtype bf16 --gpus "$n"
    bench "prefix-bf16-gpus$n" "${prefix_full[@]}" --dtype bf16 --gpus "$n"
    curve ca "gpus$n" cuda --no-tf32 --init-from-config models/configs/shapes-cross-attention.json --tokenizer word-level --train-encoder --gpus "$n"
  done
fi
echo "done; load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
