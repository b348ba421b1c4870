//! WebP, GIF (the first frame), BMP and TIFF, decoded natively as transformers' `load_image`
//! decodes them through Pillow (tests/fixtures/make_jpeg_fixtures.py). In the browser the JS
//! package hands these formats to the browser's own decoder.
#![cfg(not(target_arch = "wasm32"))]

use std::path::Path;

use wasmcap::preprocess::decode_image;

/// Lossy WebP included: image-webp reproduces libwebp's decoding (fancy chroma upsampling too).
const CASES: [&str; 12] = [
    "lossless.webp",
    "rgba_lossless.webp",
    "lossy_q80.webp",
    "photo_lossy_q60.webp",
    "palette.gif",
    "animated.gif",
    "rgb24.bmp",
    "palette8.bmp",
    "raw.tif",
    "lzw.tif",
    "deflate.tif",
    "gray.tif",
];

#[test]
fn other_formats_decode_as_pillow_opens_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats");
    for file in CASES {
        let ours = decode_image(&std::fs::read(dir.join(file)).unwrap()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let stem = file.rsplit_once('.').unwrap().0;
        let pillow = decode_image(&std::fs::read(dir.join(format!("{stem}.png"))).unwrap()).unwrap();
        assert_eq!(ours.dimensions(), pillow.dimensions(), "{file}");
        let worst = ours.as_raw().iter().zip(pillow.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        let differ = ours.as_raw().iter().zip(pillow.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{file}: {differ} samples differ from Pillow's, by up to {worst}");
    }
}
