#!/usr/bin/env python3
"""Reference data for wasmcap's image preprocessing (src/preprocess.rs), from Pillow + transformers.

Writes test images (PNG and JPEG) to OUT (default /tmp/wasmcap_pil) and, for each, what Python
computes:

  * decode cases: np.asarray(PIL.Image.open(f).convert("RGB")) as raw uint8 (HWC);
  * preprocess cases: SiglipImageProcessorPil(size=..., resample=...)(
        images=PIL.Image.open(f).convert("RGB"), return_tensors="np")["pixel_values"]
    as raw little-endian float32 [1, 3, H, W], plus PIL's resized uint8 image;
  * a 4000x3000 JPEG for timing.

OUT/manifest.json lists everything. Then run the Rust side:

  /opt/ref/bin/python tests/preprocess_pil.py [OUT]
  cargo test --lib preprocess -- --ignored --nocapture      # WASMCAP_PIL_DIR=OUT if not the default

Needs pillow, numpy, scikit-image and transformers (>= 5: SiglipImageProcessorPil; 4.x:
SiglipImageProcessor is the PIL one). Nothing is downloaded.
"""

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import skimage.data as skd
import transformers
from PIL import Image, ImageOps

try:
    from transformers import SiglipImageProcessorPil as Processor  # transformers 5.x
except ImportError:  # transformers 4.x: the slow processor is the PIL one
    from transformers import SiglipImageProcessor as Processor

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/wasmcap_pil")
OUT.mkdir(parents=True, exist_ok=True)
RNG = np.random.default_rng(1234)
FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def write_png(path, arr, bit_depth, color_type, palette=None, trns=None):
    """Minimal PNG writer (PIL cannot write 16-bit RGB/RGBA or 1-bit gray with full control)."""
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    if bit_depth == 16:
        rows = [arr[y].astype(">u2").tobytes() for y in range(h)]
    elif bit_depth < 8:
        rows = [np.packbits(np.unpackbits(arr[y].astype(np.uint8)[:, None], axis=1)[:, 8 - bit_depth:].ravel()).tobytes()
                for y in range(h)]
    else:
        rows = [arr[y].astype(np.uint8).tobytes() for y in range(h)]
    raw = b"".join(b"\x00" + r for r in rows)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        png += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if trns is not None:
        png += chunk(b"tRNS", trns)
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def noise(w, h):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_rgb_png(name, arr):
    Image.fromarray(arr, "RGB").save(OUT / name)
    return name


manifest = {"pillow": PIL.__version__, "transformers": transformers.__version__,
            "processor": Processor.__name__, "decode": [], "preprocess": []}

# ------------------------------------------------------------------ source images (PNG, RGB)
astronaut = skd.astronaut()                      # 512x512
chelsea = skd.chelsea()                          # 451x300 (w x h)
coffee = skd.coffee()                            # 600x400
sources = {
    "astronaut_512x512": astronaut,
    "chelsea_451x300": chelsea,
    "chelsea_T_300x451": np.ascontiguousarray(chelsea.transpose(1, 0, 2)),  # portrait: Pillow's vertical-first pass
    "coffee_600x400": coffee,
    "odd_7x5": noise(7, 5),
    "single_1x1": noise(1, 1),
    "small_50x37": np.asarray(Image.fromarray(coffee).resize((50, 37), Image.LANCZOS)),
    "noise_97x61": noise(97, 61),
    "noise_1000x700": noise(1000, 700),
    "coffee_big_2000x1500": np.asarray(Image.fromarray(coffee).resize((2000, 1500), Image.BICUBIC)),
    "only_h_224x300": np.ascontiguousarray(coffee[:300, :224]),
    "only_w_300x224": np.ascontiguousarray(coffee[:224, :300]),
    "wide_1200x90": np.asarray(Image.fromarray(coffee).resize((1200, 90), Image.BILINEAR)),
}
files = {name: save_rgb_png(f"{name}.png", arr) for name, arr in sources.items()}

# JPEGs: samples equal to libjpeg-turbo's + PIL's (src/jpeg.rs), CMYK included
Image.fromarray(chelsea).save(OUT / "chelsea_q90_444.jpg", quality=90, subsampling=0)
Image.fromarray(chelsea).save(OUT / "chelsea_q75_420.jpg", quality=75)
Image.fromarray(astronaut).convert("L").save(OUT / "astronaut_gray.jpg", quality=90)
Image.fromarray(chelsea).save(OUT / "chelsea_progressive.jpg", quality=85, progressive=True)
Image.fromarray(chelsea).convert("CMYK").save(OUT / "chelsea_cmyk.jpg", quality=95)
exif = Image.Exif()
exif[0x0112] = 6  # orientation "rotate 90 CW": applied, as transformers' load_image does
Image.fromarray(chelsea).save(OUT / "chelsea_exif_rot.jpg", quality=90, exif=exif.tobytes())
files["chelsea_q90_444_jpg"] = "chelsea_q90_444.jpg"
files["chelsea_q75_420_jpg"] = "chelsea_q75_420.jpg"

# ------------------------------------------------------------------ decode cases (colour types)
small = np.asarray(Image.fromarray(coffee).resize((120, 80), Image.LANCZOS))
alpha = RNG.integers(0, 256, size=small.shape[:2], dtype=np.uint8)
gray = np.asarray(Image.fromarray(small).convert("L"))
Image.fromarray(small).save(OUT / "dec_rgb8.png")
Image.fromarray(np.dstack([small, alpha]), "RGBA").save(OUT / "dec_rgba8.png")
Image.fromarray(gray).save(OUT / "dec_gray8.png")
Image.fromarray(np.dstack([gray, alpha]), "LA").save(OUT / "dec_la8.png")
Image.fromarray(small).convert("P", palette=Image.ADAPTIVE, colors=64).save(OUT / "dec_palette.png")
pal_img = Image.fromarray(small).convert("P", palette=Image.ADAPTIVE, colors=16)
pal_img.save(OUT / "dec_palette_trns.png", transparency=3)
write_png(OUT / "dec_gray1.png", (gray > 128).astype(np.uint8), 1, 0)
write_png(OUT / "dec_gray4.png", gray >> 4, 4, 0)
wide16 = small.astype(np.uint16) * 257 + RNG.integers(0, 257, size=small.shape).astype(np.uint16)
write_png(OUT / "dec_rgb16.png", np.minimum(wide16, 65535), 16, 2)
write_png(OUT / "dec_rgba16.png", np.dstack([np.minimum(wide16, 65535), alpha.astype(np.uint16) * 257]), 16, 6)
write_png(OUT / "dec_la16.png", np.dstack([gray.astype(np.uint16) * 257 + 100, alpha.astype(np.uint16) * 257]), 16, 4)
write_png(OUT / "dec_gray16.png", gray.astype(np.uint16) * 257 + 3, 16, 0)   # PIL quirk: I;16 → RGB saturates
write_png(OUT / "dec_gray16_small_values.png", gray.astype(np.uint16), 16, 0)  # values < 256: PIL keeps them

decode_files = ["dec_rgb8.png", "dec_rgba8.png", "dec_gray8.png", "dec_la8.png", "dec_palette.png",
                "dec_palette_trns.png", "dec_gray1.png", "dec_gray4.png", "dec_rgb16.png", "dec_rgba16.png",
                "dec_la16.png", "dec_gray16.png", "dec_gray16_small_values.png",
                "chelsea_q90_444.jpg", "chelsea_q75_420.jpg", "astronaut_gray.jpg", "chelsea_progressive.jpg",
                "chelsea_cmyk.jpg", "chelsea_exif_rot.jpg"]
# 16-bit grayscale: PIL opens it as mode I;16 and convert("RGB") saturates values >= 256 to 255
# (an image of 257*v is white) and keeps values < 256 as they are; the Rust side takes the high
# byte instead (v >> 8, as PIL does for 16-bit RGB), on purpose.
inexact = {"dec_gray16.png", "dec_gray16_small_values.png"}
for f in decode_files:
    im = Image.open(OUT / f)
    rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    raw = f + ".rgb"
    (OUT / raw).write_bytes(rgb.tobytes())
    manifest["decode"].append({"name": f"{f} ({im.mode})", "file": f, "rgb": raw, "width": rgb.shape[1],
                               "height": rgb.shape[0], "exact": f not in inexact})

# ------------------------------------------------------------------ preprocess cases
SIGLIP = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
          "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
          "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
          "size": {"height": 224, "width": 224}}


def case(src, h=224, w=224, resample=3, **extra):
    cfg = dict(SIGLIP, size={"height": h, "width": w}, resample=resample, **extra)
    kwargs = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    proc = Processor(**kwargs)
    image = Image.open(OUT / files[src]).convert("RGB")
    pv = proc(images=image, return_tensors="np")["pixel_values"]
    # float32 normally; uint8 when neither rescale nor normalize runs (the Rust side gives f32 then)
    assert pv.dtype in (np.float32, np.uint8), pv.dtype
    tag = f"{src}->{w}x{h}_{FILTERS[resample]}" + "".join(f"_{k}={v}" for k, v in extra.items())
    expected = tag.replace(">", "") + ".f32"
    (OUT / expected).write_bytes(pv.astype("<f4").tobytes())
    entry = {"name": tag, "file": files[src], "config": cfg, "shape": list(pv.shape), "expected": expected}
    if cfg["do_resize"]:
        resized = np.asarray(image.resize((w, h), resample=resample))
        (OUT / (expected + ".u8")).write_bytes(resized.tobytes())
        entry["resized"] = expected + ".u8"
        # sanity: the processor is resize → rescale (float64 → float32) → normalize (float32)
        manual = (resized.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
        manual = (manual - np.float32(0.5)) / np.float32(0.5)
        if cfg["image_mean"] == [0.5] * 3 and cfg["image_std"] == [0.5] * 3 and cfg["do_rescale"] and cfg["do_normalize"]:
            assert np.array_equal(manual.transpose(2, 0, 1)[None], pv), tag
    manifest["preprocess"].append(entry)


for r in FILTERS:
    case("astronaut_512x512", resample=r)
    case("chelsea_T_300x451", resample=r)
    case("small_50x37", resample=r)
    case("noise_1000x700", resample=r)
for src in ["chelsea_451x300", "coffee_600x400", "odd_7x5", "single_1x1", "noise_97x61", "coffee_big_2000x1500",
            "only_h_224x300", "only_w_300x224", "wide_1200x90"]:
    case(src, resample=3)
    case(src, resample=2)
case("astronaut_512x512", h=96, w=160)
case("coffee_600x400", h=384, w=256, resample=2)
case("chelsea_451x300", h=300, w=451)                       # no resize needed
case("noise_97x61", h=61, w=200, resample=1)                # width only
case("chelsea_T_300x451", h=450, w=299)
case("odd_7x5", h=1, w=1)
case("astronaut_512x512", image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
case("coffee_600x400", do_rescale=False, do_normalize=False)
case("coffee_600x400", do_resize=False)
case("chelsea_q90_444_jpg")
case("chelsea_q75_420_jpg")

# ------------------------------------------------------------------ timing image
big = Image.fromarray(astronaut).resize((4000, 3000), Image.BICUBIC)
big = np.clip(np.asarray(big).astype(np.int16) + RNG.integers(-20, 21, size=(3000, 4000, 3)), 0, 255).astype(np.uint8)
Image.fromarray(big).save(OUT / "big_4000x3000.jpg", quality=90)
manifest["timing"] = "big_4000x3000.jpg"

(OUT / "manifest.json").write_text(json.dumps(manifest, indent=1))
print(f"wrote {len(manifest['decode'])} decode and {len(manifest['preprocess'])} preprocess cases to {OUT} "
      f"(Pillow {PIL.__version__}, transformers {transformers.__version__}, {Processor.__name__})")
