"""Seed corpora for the fuzz targets (fuzz/seeds/<target>/), from the committed fixtures plus a few
small files made here (a safetensors file, a torch .bin, an index). Needs torch and safetensors.

    python fuzz/make_seeds.py
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

FUZZ = Path(__file__).parent
FIX = FUZZ.parent / "tests/fixtures"
SEEDS = FUZZ / "seeds"
shutil.rmtree(SEEDS, ignore_errors=True)


def seed(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


g = torch.Generator().manual_seed(0)
tensors = {
    "a.weight": torch.randn(3, 4, generator=g),
    "a.bias": torch.randn(4, generator=g).half(),
    "b.weight": torch.randn(2, 2, generator=g).bfloat16(),
}
save_file(tensors, "/tmp/seed.safetensors")
seed("safetensors", "small", Path("/tmp/seed.safetensors").read_bytes())
save_file({"w.q8_0": torch.randint(-128, 127, (2, 34), dtype=torch.int8, generator=g)}, "/tmp/seed_q8.safetensors")
seed("safetensors", "q8_0", Path("/tmp/seed_q8.safetensors").read_bytes())
torch.save(tensors, "/tmp/seed.bin")
seed("torch_bin", "small", Path("/tmp/seed.bin").read_bytes())
torch.save({"h.0.attn.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool), "x": torch.arange(6).reshape(2, 3)}, "/tmp/seed2.bin")
seed("torch_bin", "mask", Path("/tmp/seed2.bin").read_bytes())
seed("checkpoint_index", "two_shards", json.dumps({"metadata": {"total_size": 64},
     "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors"}}))

folders = ["prefix/tiny-llava-base-v5", "blip/tiny-blip", "idefics3/tiny-smolvlm"]
for f, folder in enumerate(folders):
    for w, name in enumerate(["config.json", "generation_config.json", "preprocessor_config.json"]):
        seed("model_files", f"{w}{f}_{name}", bytes([w, f]) + (FIX / folder / name).read_bytes())
    seed("preprocessor_config", folder.replace("/", "_"), (FIX / folder / "preprocessor_config.json").read_bytes())
seed("model_files", "3_adapter_config.json", bytes([3, 0]) + (FIX / "prefix/lora-r4/adapter_config.json").read_bytes())
seed("preprocessor_config", "siglip", (FIX / "tiny-ved-v5/preprocessor_config.json").read_bytes())

blip_tok = (FIX / "blip/tiny-blip/tokenizer.json").read_bytes()
seed("tokenizer", "wordpiece_json", b"\0" + blip_tok)
vocab = json.loads(blip_tok)["model"]["vocab"]
seed("tokenizer", "vocab_txt", b"\1" + "\n".join(sorted(vocab, key=vocab.get)).encode())
seed("tokenizer", "bpe_json", b"\0" + (FIX / "idefics3/tiny-smolvlm/tokenizer.json").read_bytes())
seed("tokenizer", "gpt2_files", b"\2" + json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}).encode() + b"\0#version: 0.2\na b\n")

chat = (FIX / "idefics3/tiny-smolvlm/chat_template.jinja").read_bytes()
seed("chat_template", "smolvlm_jinja", b"\0" + chat)
seed("chat_template", "smolvlm_json", b"\1" + json.dumps({"chat_template": chat.decode()}).encode())

for img in sorted((FIX / "jpeg").glob("*")):
    if img.stat().st_size <= 8000 and (img.suffix == ".jpg" or img.name.endswith(".in.png")):
        seed("image_decode", img.name, img.read_bytes())
for img in sorted((FIX / "formats").glob("*")):
    if img.suffix != ".png" and img.stat().st_size <= 12000:
        seed("image_decode", img.name, img.read_bytes())
for img in ["coffee_gray.png", "coffee_rgba.png"]:
    seed("image_decode", img, (FIX / "images" / img).read_bytes())
print({d.name: len(list(d.iterdir())) for d in sorted(SEEDS.iterdir())})
