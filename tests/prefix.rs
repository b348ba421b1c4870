//! The prefix architecture (🤗 Llava: SigLIP → projector → image prefix → SmolLM-shaped Llama,
//! LoRA merged ahead or at load) against transformers + PEFT on the fixtures of
//! tests/fixtures/make_prefix_fixtures.py. Runs natively and in headless Chromium.

mod common;

use common::{image, max_abs_diff, prefix_cases, report, PHOTOS, PIXEL_TOL, PREFIX_PROMPTS, STATE_TOL};
use wasmcap::loading::ModelFiles;
use wasmcap::lora::AdapterFiles;
use wasmcap::tokenizer::CaptionTokenizer;
use wasmcap::{CaptionOptions, Captioner, Error};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

fn options(prompt: Option<&str>, max_new_tokens: Option<usize>) -> CaptionOptions {
    CaptionOptions { max_new_tokens, prompt: prompt.map(str::to_string), ..Default::default() }
}

#[test]
fn prompt_ids_are_what_llava_processor_makes() {
    for case in prefix_cases() {
        let captioner = Captioner::from_files(case.files()).unwrap();
        for (key, prompt) in PREFIX_PROMPTS {
            assert_eq!(captioner.prompt_ids(prompt).unwrap(), case.input_ids(key), "{} {key}", case.name);
        }
    }
}

#[test]
fn pixels_image_embeddings_and_logits_match() {
    // Once as it is, once with the work split in two parts (crate::parallel), as the
    // threaded WASM build runs it.
    for threads in [1, 2] {
        wasmcap::parallel::with_threads(threads, || {
            for case in prefix_cases() {
                let captioner = Captioner::from_files(case.files()).unwrap();
                let reference = case.reference_tensors();
                for name in PHOTOS {
                    let ours = captioner.pixel_values_from_bytes(image(name)).unwrap();
                    let theirs = &reference[&format!("pixel_values.{name}")];
                    let diff = max_abs_diff(&ours, theirs);
                    assert!(diff <= PIXEL_TOL, "{} {name} [{threads} threads]: pixel values differ by {diff}", case.name);

                    // The model check runs on transformers' own (f16-stored) pixels, as its references do.
                    let embeddings = captioner.encode(theirs).unwrap();
                    let diff = max_abs_diff(&embeddings, &reference[&format!("image_embeddings.{name}")]);
                    report(&format!("{} {name} image embeddings max-abs", case.name), diff);
                    assert!(diff <= STATE_TOL, "{} {name} [{threads} threads]: image embeddings differ by {diff}", case.name);

                    for (key, prompt) in PREFIX_PROMPTS {
                        let logits = captioner.first_step_logits(theirs, &options(prompt, None)).unwrap();
                        let diff = max_abs_diff(&logits, &reference[&format!("logits.{name}.{key}")]);
                        report(&format!("{} {name} {key} first-step logits max-abs", case.name), diff);
                        assert!(diff <= STATE_TOL, "{} {name} [{threads} threads] {key}: logits differ by {diff}", case.name);
                    }
                }
            }
        });
    }
}

#[test]
fn greedy_ids_match_generate() {
    // Once as it is, once with the work split in two parts (crate::parallel), as the
    // threaded WASM build runs it.
    for threads in [1, 2] {
        wasmcap::parallel::with_threads(threads, || {
            for case in prefix_cases() {
                let captioner = Captioner::from_files(case.files()).unwrap();
                let reference = case.reference_tensors();
                for name in PHOTOS {
                    // transformers' (f16-stored) pixels (its ids from those are the same,
                    // `greedy_ids_from_f16_pixels`), and the photo's own bytes.
                    let inputs = [
                        (reference[&format!("pixel_values.{name}")].clone(), "transformers' pixels"),
                        (captioner.pixel_values_from_bytes(image(name)).unwrap().values().clone(), "the image file"),
                    ];
                    for (pixels, source) in inputs {
                        for (key, prompt) in PREFIX_PROMPTS {
                            let expected = case.greedy_ids(name, key);
                            let caption = captioner.caption(&pixels, &options(prompt, Some(expected.len())), |_| {}).unwrap();
                            assert_eq!(caption.token_ids, expected, "{} {name} [{threads} threads] {key} from {source}", case.name);
                            assert_eq!(caption.text, case.greedy_text(name, key), "{} {name} [{threads} threads] {key}", case.name);
                        }
                    }
                }
            }
        });
    }
}

#[test]
fn lora_changes_the_tokens_merged_ahead_or_at_load() {
    // merged-v5 is base-v5 + lora-r4 merged by PEFT; loading base + adapter must agree with it,
    // and differ from the base (a zero adapter would prove nothing).
    let cases = prefix_cases();
    let by_name = |n: &str| cases.iter().find(|c| c.name == n).unwrap();
    let (base, merged, at_load) = (by_name("base-v5"), by_name("merged-v5"), by_name("base-v5+lora-r4"));
    for name in PHOTOS {
        for (key, _) in PREFIX_PROMPTS {
            assert_eq!(merged.greedy_ids(name, key), at_load.greedy_ids(name, key));
            assert_ne!(base.greedy_ids(name, key), at_load.greedy_ids(name, key), "{name} {key}");
        }
    }
}

#[test]
fn tokenizer_matches_the_fast_tokenizer() {
    let case = &prefix_cases()[0];
    let tokenizer = CaptionTokenizer::from_bytes(case.tokenizer).unwrap();
    let samples: serde_json::Value = serde_json::from_slice(common::PREFIX_TOKENIZER_SAMPLES).unwrap();
    for sample in samples["samples"].as_array().unwrap() {
        let text = sample["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, true).unwrap(), common::ids(&sample["ids"]), "{text:?}");
    }
}

fn adapter_err(config: &[u8], weights: &[u8]) -> Error {
    let case = &prefix_cases()[0];
    let files = ModelFiles { adapter: Some(AdapterFiles { config, weights }), ..case.files() };
    match Captioner::from_files(files) {
        Ok(_) => panic!("the adapter should have been refused"),
        Err(e) => e,
    }
}

fn edited_adapter_config(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut config: serde_json::Value = serde_json::from_slice(common::LORA_RS8.0).unwrap();
    edit(&mut config);
    serde_json::to_vec(&config).unwrap()
}

#[test]
fn bad_adapters_are_named() {
    let config = edited_adapter_config(|c| c["target_modules"] = serde_json::json!(["q_proj", "qkv_fused"]));
    let msg = adapter_err(&config, common::LORA_RS8.1).to_string();
    assert!(msg.contains("adapter_config.json") && msg.contains("qkv_fused"), "{msg}");

    let config = edited_adapter_config(|c| c["r"] = serde_json::json!(16));
    let err = adapter_err(&config, common::LORA_RS8.1);
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("lora_A") && msg.contains("r = 16") && msg.contains("[16, 96]") && msg.contains("[8, 96]"), "{msg}");

    let config = edited_adapter_config(|c| c["use_dora"] = serde_json::json!(true));
    assert!(adapter_err(&config, common::LORA_RS8.1).to_string().contains("use_dora"));

    let msg = adapter_err(common::LORA_RS8.0, &common::LORA_RS8.1[..100]).to_string();
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
}

#[test]
fn prompts_are_refused_by_the_cross_attention_model() {
    let fx = &common::fixtures()[0];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let pixels = captioner.pixel_values_from_bytes(image("astronaut.png")).unwrap();
    let err = captioner.start(&pixels, &options(Some("a photo of"), None)).err().unwrap();
    assert!(err.to_string().contains("prefix"), "{err}");
}
