#!/usr/bin/env python3
"""Tables of bench/TRAINING.md from the raw results of bench/train-gpu.sh: python3 bench/train_report.py OUT...

check-*.json: the loss and gradient norms of one batch on the CPU and the GPU; curve-*.jsonl: 200-step
loss curves; bench-*.jsonl: full-size throughput. Samples/s are timed between the steps of one epoch
(metrics.jsonl time_s), so checkpoints and evaluation are not in them; epoch 1 runs the frozen
encoder, epoch 2 reads the feature cache."""
import glob
import json
import os
import sys


def steps(path):
    return [json.loads(line) for line in open(path) if '"time_s"' in line]


def epoch_rate(rows, epoch, batch=32):
    s = [r for r in rows if r["epoch"] == epoch]
    return batch * (len(s) - 1) / (s[-1]["time_s"] - s[0]["time_s"]) if len(s) > 1 else float("nan")


def check(out):
    print("| model | GPU mode | loss rel. diff | global grad-norm rel. diff | per-tensor grad-norm rel. diff: max (median) |")
    print("|---|---|---|---|---|")
    for cpu_path in sorted(glob.glob(f"{out}/check-*-cpu.json")):
        name = os.path.basename(cpu_path)[len("check-"):-len("-cpu.json")]
        cpu = json.load(open(cpu_path))
        for tag in ("gpu-f32", "gpu-tf32", "gpu-bf16"):
            path = f"{out}/check-{name}-{tag}.json"
            if not os.path.exists(path):
                continue
            gpu = json.load(open(path))
            # Tensors whose gradient is zero in exact arithmetic (SigLIP's key bias: softmax ignores
            # it) hold rounding noise only; they are left out of the relative figure.
            floor = 1e-6 * cpu["grad_norm"]
            rel = sorted(abs(gpu["grad_norms"][k] - v) / v for k, v in cpu["grad_norms"].items() if v > floor)
            print(f"| {name} | {tag[4:]} | {abs(gpu['loss'] - cpu['loss']) / cpu['loss']:.1e} | "
                  f"{abs(gpu['grad_norm'] - cpu['grad_norm']) / cpu['grad_norm']:.1e} | {rel[-1]:.1e} ({rel[len(rel) // 2]:.1e}), {len(rel)} tensors |")


def curve(out):
    print("| run | compared with | max abs loss diff (step) | final loss | mean over last 20 steps |")
    print("|---|---|---|---|---|")
    for ref_path in sorted(glob.glob(f"{out}/curve-*-cpu.jsonl")) + sorted(glob.glob(f"{out}/curve-*-gpus1.jsonl")):
        ref_tag = "cpu" if ref_path.endswith("-cpu.jsonl") else "gpus1"
        name = os.path.basename(ref_path)[len("curve-"):-len(f"-{ref_tag}.jsonl")]
        ref = steps(ref_path)
        for path in sorted(glob.glob(f"{out}/curve-{name}-*.jsonl")):
            if path == ref_path or (ref_tag == "gpus1" and "gpus" not in path) or (ref_tag == "cpu" and "gpus" in path):
                continue
            other = steps(path)
            d = [abs(a["loss"] - b["loss"]) for a, b in zip(ref, other)]
            tag = path[len(f"{out}/curve-{name}-"):-len(".jsonl")]
            last = lambda rows: sum(r["loss"] for r in rows[-20:]) / 20
            print(f"| {name} {tag} | {ref_tag} | {max(d):.1e} ({d.index(max(d)) + 1}) | {other[-1]['loss']:.4f} vs {ref[-1]['loss']:.4f} | "
                  f"{last(other):.4f} vs {last(ref):.4f} |")


def bench(out):
    print("| run | trainable | samples/s epoch 1 (encoder) | epoch 2 (feature cache) | cache speed-up | Flickr8k-size epoch (40k captions): first / cached | GPU memory: tensors peak / nvidia-smi max |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(f"{out}/bench-*.jsonl")):
        name = os.path.basename(path)[len("bench-"):-len(".jsonl")]
        rows = steps(path)
        try:
            summary = json.load(open(path[:-1]))
        except (OSError, ValueError):
            print(f"| {name} | failed (see log.txt) | | | | | |")
            continue
        e1, e2 = epoch_rate(rows, 1), epoch_rate(rows, 2)
        peak = summary.get("gpu_peak_tensor_mib")
        smi = summary.get("gpu_memory_mib")
        mem = f"{peak / 1024:.1f} / {smi / 1024:.1f} GiB" if peak else "—"
        print(f"| {name} | {summary['trainable_params'] / 1e6:.1f} M of {summary['total_params'] / 1e6:.0f} M | {e1:.1f} | {e2:.1f} | "
              f"{e2 / e1:.2f}× | {40000 / e1 / 60:.1f} / {40000 / e2 / 60:.1f} min | {mem} |")


for out in sys.argv[1:] or ["bench-out"]:
    print(f"## {out}\n")
    if os.path.exists(f"{out}/machine.txt"):
        print("```\n" + open(f"{out}/machine.txt").read().strip() + "\n```\n")
    for part, fn in (("check", check), ("curve", curve), ("bench", bench)):
        if glob.glob(f"{out}/{part}-*"):
            fn(out)
            print()
