"""Checks that folders written by `train` load in 🤗 transformers and caption with the same
tokens as our `caption` binary (greedy).

    CAPTION_BIN=target/release/caption /path/to/python tests/check_export.py MODEL_DIR [IMAGE ...]
    ... --write-reference FILE   also write transformers' ids per image (the embedded models'
                                 reference.json, which tests/embedded.rs checks natively and in Chromium)

MODEL_DIR is a `train --output` folder: vision-encoder-decoder (VisionEncoderDecoderModel) or
llava (LlavaForConditionalGeneration); for llava with LoRA, MODEL_DIR/base + MODEL_DIR/adapter
are checked too (PeftModel on the unmerged base). Needs torch, transformers, peft, pillow.
Prints one line per (model, image) and exits non-zero on any difference.
"""
import json
import pathlib
import subprocess
import sys

import torch
from PIL import Image
from transformers import AutoImageProcessor, LlavaForConditionalGeneration, VisionEncoderDecoderModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
import os

CAPTION = [os.environ.get("CAPTION_BIN", str(ROOT / "target/release/caption"))]


def ours(model_dir, images, adapter=None):
    cmd = CAPTION + ["--model", str(model_dir), "--json"] + (["--adapter", str(adapter)] if adapter else []) + [str(i) for i in images]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [json.loads(line)["token_ids"] for line in out.splitlines()]


def theirs(model_dir, images, adapter=None):
    cfg = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    processor = AutoImageProcessor.from_pretrained(model_dir)
    results = []
    if cfg["model_type"] == "vision-encoder-decoder":
        model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
        for image in images:
            pixels = processor(Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
            with torch.no_grad():
                ids = model.generate(pixels, do_sample=False, num_beams=1, max_length=gen["max_length"])
            results.append(ids[0, 1:].tolist())
    else:
        model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).eval()
        n = cfg["image_seq_length"]
        input_ids = torch.full((1, n), cfg["image_token_index"], dtype=torch.long)
        for image in images:
            pixels = processor(Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
            with torch.no_grad():
                ids = model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids), do_sample=False, num_beams=1, max_new_tokens=gen["max_new_tokens"])
            results.append(ids[0, n:].tolist())
    return results


def main():
    args = sys.argv[1:]
    reference = None
    if "--write-reference" in args:
        i = args.index("--write-reference")
        reference = pathlib.Path(args[i + 1])
        del args[i : i + 2]
    model_dir = pathlib.Path(args[0]).resolve()
    images = [pathlib.Path(p) for p in args[1:]] or sorted((ROOT / "tests/fixtures/images").glob("*.*"))
    checks = [("merged", model_dir, None)]
    if (model_dir / "adapter").exists():
        checks.append(("base+adapter", model_dir / "base", model_dir / "adapter"))
    failures = 0
    import transformers

    for name, folder, adapter in checks:
        a, b = ours(folder, images, adapter), theirs(folder, images, adapter)
        if reference is not None and adapter is None:
            reference.write_text(json.dumps({"source": f"transformers {transformers.__version__} greedy generate (tests/check_export.py)", "greedy_ids": {i.name: ids for i, ids in zip(images, b)}}, indent=1) + "\n")
        for image, x, y in zip(images, a, b):
            # transformers keeps the EOS it stopped on; so do we — compare as they are.
            same = x == y
            failures += not same
            print(f"{'OK  ' if same else 'DIFF'} {model_dir.name} {name} {image.name}: ours {x} transformers {y}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
