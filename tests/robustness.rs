//! Untrusted numbers in a model folder: sizes from config.json and from a safetensors header are
//! checked before anything is allocated, and the instance keeps working after the error.
//! Runs natively and in headless Chromium (where an abort would kill the instance).

mod common;

use common::{image, prefix_cases};
use wasmcap::loading::{ModelFiles, WEIGHTS};
use wasmcap::{CaptionOptions, Captioner};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

fn captions_as_the_fixture(captioner: &Captioner, case: &common::PrefixCase) {
    let want = case.greedy_ids("astronaut.png", "noprompt");
    let pixels = captioner.pixel_values_from_bytes(image("astronaut.png")).unwrap();
    let options = CaptionOptions { max_new_tokens: Some(want.len()), ..Default::default() };
    assert_eq!(captioner.caption(pixels.values(), &options, |_| {}).unwrap().token_ids, want);
}

/// A Llama config may allow 10⁵–10⁹ positions; nothing is sized by that number (the rotary
/// tables once took 4 GiB for it and the process aborted).
#[test]
fn a_config_allowing_four_billion_positions_loads_and_captions() {
    let case = &prefix_cases()[0];
    let mut config: serde_json::Value = serde_json::from_slice(case.config).unwrap();
    config["text_config"]["max_position_embeddings"] = 4_000_000_000u64.into();
    let config = serde_json::to_vec(&config).unwrap();
    let captioner = Captioner::from_files(ModelFiles { config: &config, ..case.files() }).unwrap();
    captions_as_the_fixture(&captioner, case);
}

/// A header that claims a 100 GB tensor in a small file: an error naming the file and the tensor,
/// before any allocation; the next load in the same instance captions.
#[test]
fn a_header_claiming_a_100_gb_tensor_is_an_error_and_the_next_load_works() {
    let case = &prefix_cases()[0];
    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[25000,1000000],"data_offsets":[0,100000000000]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 64]);
    let err = Captioner::from_files(ModelFiles { weights: &file, ..case.files() }).err().expect("a 100 GB claim must fail");
    let err = err.to_string();
    assert!(err.contains(WEIGHTS), "{err}");
    // A 32-bit target cannot even hold the claimed size: the header is refused as invalid there.
    assert!(err.contains("model.embed_tokens.weight") || err.contains("invalid header"), "{err}");
    let captioner = Captioner::from_files(case.files()).unwrap();
    captions_as_the_fixture(&captioner, case);
}

/// An allocation that cannot be had is an error (in WASM a failed `memory.grow` would otherwise
/// trap the instance); the tensors of a file are allocated this way.
#[test]
fn an_allocation_that_cannot_be_had_is_an_error() {
    // 2⁶⁰ bytes natively (more than any address space); on wasm32 more than the 2 GiB a Vec may hold.
    let n = if cfg!(target_pointer_width = "64") { 1usize << 60 } else { usize::MAX };
    let err = wasmcap::loading::zeroed::<u8>(n).unwrap_err();
    assert!(err.contains("out of memory"), "{err}");
    assert_eq!(wasmcap::loading::zeroed::<f32>(3).unwrap(), vec![0.0; 3]);
}
