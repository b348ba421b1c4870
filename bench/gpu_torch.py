"""PyTorch's side of bench/gpu.sh: F.linear on CUDA for SigLIP-B/16-224's three matrix shapes,
then the whole vision tower, then decoding; fp32 with TF32 off (the honest fp32 reference), then
fp16 (weights and activations in fp16, tensor cores: what ours, f16 weights computed in f32, is
up against), the same inputs and repeats as examples/gpu_bench.rs; JSON lines of ms (GFLOP/s),
tokens/s."""
import json
import sys
import time

import torch

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 50
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
adapter = torch.cuda.get_device_name() + " (PyTorch " + torch.__version__ + ", TF32 off)"
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

STEPS = 64


def decode(model, first_ids, **extra):
    """Tokens/s of STEPS steps after `first_ids`: each one token through the KV cache, its
    logits' argmax read back."""
    with torch.no_grad():
        out = model(input_ids=first_ids, use_cache=True, **extra)
        past = out.past_key_values
        ids = first_ids[:, -1:]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(STEPS):
            out = model(input_ids=ids, past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            token = (int(out.logits[0, -1].argmax().item()) + 1) % 1000
            ids = torch.tensor([[token]], device=dev)
        return STEPS / (time.perf_counter() - start)


def run(dtype, name):
    for rows, in_dim, out_dim in [(196, 768, 768), (196, 768, 3072), (196, 3072, 768)]:
        x = torch.randn(rows, in_dim, device=dev, dtype=dtype)
        w = torch.randn(out_dim, in_dim, device=dev, dtype=dtype)
        b = torch.randn(out_dim, device=dev, dtype=dtype)
        torch.nn.functional.linear(x, w, b)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            y = torch.nn.functional.linear(x, w, b)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeats
        flop = 2.0 * rows * in_dim * out_dim
        print(json.dumps({"adapter": adapter, "weights": name, "shape": [rows, in_dim, out_dim], "ms": ms, "gflops": flop / ms / 1e6}))

    # SigLIP-B/16-224's vision tower (transformers' SiglipVisionModel, random weights: the time does
    # not depend on them), one image: forward, then the states copied to the host as ours are read
    # back.

    model = SiglipVisionModel(SiglipVisionConfig()).to(dev, dtype).eval()
    pixels = torch.randn(1, 3, 224, 224, device=dev, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            model(pixel_values=pixels).last_hidden_state.cpu()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            states = model(pixel_values=pixels).last_hidden_state.cpu()
        end.record()
        torch.cuda.synchronize()
    print(json.dumps({"adapter": adapter, "weights": name, "encoder": "siglip-base-patch16-224", "ms": start.elapsed_time(end) / repeats}))

    # Decoding, as ours: GPT-2 cross-attending to 196 image states, then SmolLM-135M after a
    # 64-position prefix.
    gpt2 = GPT2LMHeadModel(GPT2Config(add_cross_attention=True)).to(dev, dtype).eval()
    states = torch.randn(1, 196, 768, device=dev, dtype=dtype)
    for _ in range(2):
        tps = decode(gpt2, torch.zeros(1, 1, dtype=torch.long, device=dev), encoder_hidden_states=states)
        print(json.dumps({"adapter": adapter, "weights": name, "decoder": "gpt2 (cross-attention, 196 states)", "tokens_per_s": tps}))
    smollm = LlamaForCausalLM(
        LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)
    ).to(dev, dtype).eval()
    for _ in range(2):
        tps = decode(smollm, torch.arange(64, device=dev).unsqueeze(0))
        print(json.dumps({"adapter": adapter, "weights": name, "decoder": "smollm-135m (after 64 positions)", "tokens_per_s": tps}))


run(torch.float32, "f32")
run(torch.float16, "f16")
