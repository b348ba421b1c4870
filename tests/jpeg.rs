//! JPEG decoding against PIL (libjpeg-turbo) and transformers' `load_image` (EXIF orientation) on
//! the variants of tests/fixtures/make_jpeg_fixtures.py: every sample equal, natively and in
//! headless Chromium; and no damaged file that takes the decoder down.

use wasmcap::preprocess::decode_image;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

macro_rules! variants {
    ($($name:literal,)+) => {
        [$((
            $name,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/", $name, ".jpg")).as_slice(),
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/", $name, ".png")).as_slice(),
        ),)+]
    };
}

/// (name, the JPEG, transformers' `load_image` of it as a PNG).
const VARIANTS: [(&str, &[u8], &[u8]); 40] = variants!(
    "exif_orientation_1",
    "exif_orientation_2",
    "exif_orientation_3",
    "exif_orientation_4",
    "exif_orientation_5",
    "exif_orientation_6",
    "exif_orientation_6_big_endian",
    "exif_orientation_7",
    "exif_orientation_8",
    "exif_orientation_9_invalid",
    "face_420_q20",
    "face_422_progressive",
    "face_4x2",
    "face_chroma_larger",
    "face_cmyk_progressive",
    "face_gray_progressive",
    "face_rgb",
    "photo_411",
    "photo_420",
    "photo_420_progressive",
    "photo_420_restart_1row",
    "photo_420_restart_3mcus_progressive",
    "photo_422_q50",
    "photo_440",
    "photo_444_progressive_optimized",
    "photo_444_q97",
    "photo_cmyk",
    "photo_gray",
    "tiny_17x9_420",
    "tiny_17x9_422_progressive",
    "tiny_1x1_420",
    "tiny_1x1_422_progressive",
    "tiny_2x3_420",
    "tiny_2x3_422_progressive",
    "tiny_3x2_420",
    "tiny_3x2_422_progressive",
    "tiny_5x5_420",
    "tiny_5x5_422_progressive",
    "tiny_6x17_420",
    "tiny_6x17_422_progressive",
);

#[test]
fn every_variant_decodes_to_libjpeg_turbos_samples() {
    for (name, jpg, png) in VARIANTS {
        let ours = decode_image(jpg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pil = decode_image(png).unwrap();
        assert_eq!(ours.dimensions(), pil.dimensions(), "{name}");
        let differ = ours.as_raw().iter().zip(pil.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{name}: {differ} samples differ from PIL's");
    }
}

#[test]
fn a_png_is_turned_upright_by_its_exif_chunk() {
    let png = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/exif_png_orientation_8.in.png"));
    let want = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jpeg/exif_png_orientation_8.png"));
    assert_eq!(wasmcap::preprocess::exif_orientation(png), Some(8));
    let (ours, theirs) = (decode_image(png).unwrap(), decode_image(want).unwrap());
    assert_eq!((ours.dimensions(), ours.as_raw()), (theirs.dimensions(), theirs.as_raw()));
}

#[test]
fn a_file_cut_short_is_an_error_that_says_so() {
    for (name, jpg, _) in VARIANTS.iter().filter(|v| v.0.starts_with("photo")) {
        // Past the headers (the first scan starts within 700 bytes), short of the last scan's end.
        for cut in [700, jpg.len() / 2, jpg.len() - 40] {
            let err = decode_image(&jpg[..cut]).unwrap_err().to_string();
            assert!(err.contains("could not decode JPEG") && err.contains("truncated"), "{name} cut at {cut}: {err}");
        }
    }
}

#[test]
fn a_header_that_claims_a_huge_image_is_refused_before_allocating() {
    let (_, jpg, _) = VARIANTS[0];
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let mut huge = jpg.to_vec();
    huge[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let err = decode_image(&huge).unwrap_err().to_string();
    assert!(err.contains("too large") && err.contains("65535x65535"), "{err}");
}

/// Every damaged copy decodes or fails with an error; none panics (a panic kills a WASM instance).
#[test]
fn damaged_files_never_panic() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let rounds = if cfg!(target_arch = "wasm32") { 40 } else { 150 };
    for (name, jpg, _) in VARIANTS {
        for cut in (2..jpg.len()).step_by(jpg.len() / 50 + 1) {
            let _ = decode_image(&jpg[..cut]);
        }
        for _ in 0..rounds {
            let mut bad = jpg.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = next() as usize % bad.len();
                bad[at] = match next() % 3 {
                    0 => bad[at] ^ (1 << (next() % 8)),
                    1 => 0xFF,
                    _ => next() as u8,
                };
            }
            if let Ok(rgb) = decode_image(&bad) {
                assert!(rgb.width() > 0 && rgb.height() > 0, "{name}");
            }
        }
    }
}
