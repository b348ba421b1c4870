//! BLIP (🤗 `BlipForConditionalGeneration`: ViT-style vision model → BERT-style decoder with
//! cross-attention) against transformers on the fixtures of tests/fixtures/make_blip_fixtures.py:
//! unconditional and prompted captions of two photos. Runs natively and in headless Chromium.

mod common;

use common::{blip, ids, image, max_abs_diff, report, PHOTOS, PIXEL_TOL, STATE_TOL};
use wasmcap::{BeamOptions, CaptionOptions, Captioner};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

const PROMPTS: [&str; 2] = ["noprompt", "prompt"];

fn options(reference: &serde_json::Value, key: &str) -> CaptionOptions {
    CaptionOptions {
        prompt: reference["prompts"][key].as_str().map(str::to_string),
        max_new_tokens: Some(reference["max_new_tokens"].as_u64().unwrap() as usize),
        ..Default::default()
    }
}

#[test]
fn pixels_image_states_and_logits_match() {
    let fx = blip();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let captioner = Captioner::from_files(fx.files()).unwrap();
    for name in PHOTOS {
        let ours = captioner.pixel_values_from_bytes(image(name)).unwrap();
        let theirs = &tensors[&format!("pixel_values.{name}")];
        let diff = max_abs_diff(&ours, theirs);
        report(&format!("blip {name} pixel values max-abs"), diff);
        assert!(diff <= PIXEL_TOL, "{name}: pixel values differ by {diff}");
        let states = captioner.encode(theirs).unwrap();
        let diff = max_abs_diff(&states, &tensors[&format!("image_embeds.{name}")]);
        report(&format!("blip {name} image states max-abs"), diff);
        assert!(diff <= STATE_TOL, "{name}: image states differ by {diff}");
        for key in PROMPTS {
            // The fixture's head is turned up for clear margins (logits of std ~35, up to ~100):
            // the logits are compared in units of their standard deviation.
            let want = &tensors[&format!("logits.{name}.{key}")];
            let logits = captioner.first_step_logits(theirs, &options(&reference, key)).unwrap();
            let std = want.var(0).unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_abs_diff(&logits, want);
            report(&format!("blip {name} {key} first-step logits max-abs (std {std:.1})"), diff);
            assert!(diff / std <= STATE_TOL, "{name} {key}: logits differ by {diff} (std {std})");
        }
    }
}

#[test]
fn prompts_greedy_and_beam_captions_are_generates() {
    let fx = blip();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let beams = BeamOptions { num_beams: reference["num_beams"].as_u64().unwrap() as usize, ..BeamOptions::default() };
    for name in PHOTOS {
        // transformers' (f16-stored) pixels, and the photo's own bytes.
        let inputs = [
            (tensors[&format!("pixel_values.{name}")].clone(), "transformers' pixels"),
            (captioner.pixel_values_from_bytes(image(name)).unwrap().values().clone(), "the file"),
        ];
        for key in PROMPTS {
            let want = &reference["images"][name][key];
            let options = options(&reference, key);
            assert_eq!(captioner.prompt_ids(options.prompt.as_deref()).unwrap(), ids(&want["decoder_input_ids"]), "{name} {key}");
            for (pixels, source) in &inputs {
                let caption = captioner.caption(pixels, &options, |_| {}).unwrap();
                assert_eq!(caption.token_ids, ids(&want["greedy_ids"]), "{name} {key} from {source}");
                // The text is processor.decode(generate(...)): the prompt, then the caption.
                assert_eq!(caption.text, want["greedy_text"].as_str().unwrap(), "{name} {key}");
                let best = captioner.beam_search(pixels, &options, &beams).unwrap();
                let prompt_len = want["decoder_input_ids"].as_array().unwrap().len();
                assert_eq!(best[0].token_ids, ids(&want["beam_sequence"])[prompt_len..], "{name} {key} from {source}: beam");
                assert_eq!(captioner.caption_text(&options, &best[0].token_ids).unwrap(), want["beam_text"].as_str().unwrap(), "{name} {key}");
            }
        }
    }
}

#[test]
fn transformers_4_weights_caption_as_transformers_4_does() {
    // 4.x keeps the prediction decoder's bias as `cls.predictions.bias` (tied to the decoder);
    // 5.x reads `decoder.bias`. The fixture holds two different ones, so each version's ids are its own.
    let fx = blip();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let v4: serde_json::Value = serde_json::from_slice(fx.reference_v4).unwrap();
    let captioner = Captioner::from_files(wasmcap::loading::ModelFiles { weights: fx.weights_v4, ..fx.files() }).unwrap();
    let mut differs = false;
    for name in PHOTOS {
        for key in PROMPTS {
            let caption = captioner.caption(&tensors[&format!("pixel_values.{name}")], &options(&reference, key), |_| {}).unwrap();
            let want = ids(&v4["images"][name][key]["greedy_ids"]);
            assert_eq!(caption.token_ids, want, "{name} {key}");
            differs |= want != ids(&reference["images"][name][key]["greedy_ids"]);
        }
    }
    assert!(differs, "the two biases must give other ids somewhere, or this proves nothing");
}

/// The full-size check (`make_blip_fixtures.py --full-size DIR`, not committed): BLIP-base's
/// shapes — 577 image positions, a 12-layer BERT decoder — against transformers.
#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "needs WASMCAP_FULL_BLIP=DIR from make_blip_fixtures.py --full-size"]
fn full_size_blip_base_shapes() {
    let dir = std::path::PathBuf::from(std::env::var("WASMCAP_FULL_BLIP").expect("WASMCAP_FULL_BLIP=DIR"));
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let tensors =
        wasmcap::loading::load_safetensors("reference", &std::fs::read(dir.join("reference.safetensors")).unwrap(), |n| n.to_string()).unwrap();
    let captioner = Captioner::from_dir(&dir, None).unwrap();
    for name in PHOTOS {
        let ours = captioner.pixel_values_from_bytes(image(name)).unwrap();
        let theirs = &tensors[&format!("pixel_values.{name}")];
        let diff = max_abs_diff(&ours, theirs);
        report(&format!("full-size {name} pixel values max-abs"), diff);
        assert!(diff <= PIXEL_TOL, "{name}: {diff}");
        for key in PROMPTS {
            let want = &reference["images"][name][key];
            let options = options(&reference, key);
            let logits = captioner.first_step_logits(theirs, &options).unwrap();
            let expected = &tensors[&format!("logits.{name}.{key}")];
            let std = expected.var(0).unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_abs_diff(&logits, expected);
            report(&format!("full-size {name} {key} first-step logits max-abs (std {std:.1})"), diff);
            let caption = captioner.caption(theirs, &options, |_| {}).unwrap();
            eprintln!(
                "full-size {name} {key}: encoder {:.0} ms, first token {:.0} ms, {:.1} tokens/s",
                caption.encoder_ms, caption.first_token_ms, caption.tokens_per_s
            );
            assert_eq!(caption.token_ids, ids(&want["greedy_ids"]), "{name} {key}");
            assert!(diff / std <= STATE_TOL, "{name} {key}: logits differ by {diff}");
        }
    }
}

#[test]
fn a_folder_with_berts_vocab_txt_instead_of_tokenizer_json_tokenizes_alike() {
    // The fixture's tokenizer as an older folder ships it: vocab.txt (one token a line) and
    // tokenizer_config.json ([DEC] and [ENC] appended after the vocabulary, as transformers does).
    let fx = blip();
    let tokenizer: serde_json::Value = serde_json::from_slice(fx.tokenizer).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let mut lines = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        lines[id.as_u64().unwrap() as usize] = token.clone();
    }
    let config =
        br#"{"do_lower_case": true, "bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"], "cls_token": "[CLS]", "sep_token": "[SEP]"}"#;
    let made = wasmcap::tokenizer::bert_tokenizer_json(lines.join("\n").as_bytes(), Some(config), None).unwrap();
    let (ours, theirs) =
        (wasmcap::tokenizer::CaptionTokenizer::from_bytes(&made).unwrap(), wasmcap::tokenizer::CaptionTokenizer::from_bytes(fx.tokenizer).unwrap());
    for text in ["a picture of", "A Cat sitting on a COUCH, near the window!", "an astronaut's ice-cream 42", "zebra [DEC] [ENC]"] {
        let ids = theirs.encode(text, true).unwrap();
        assert_eq!(ours.encode(text, true).unwrap(), ids, "{text}");
        assert_eq!(ours.decode(&ids, true).unwrap(), theirs.decode(&ids, true).unwrap(), "{text}");
    }
    assert_eq!(ours.vocab_size(), theirs.vocab_size());
    // The whole folder that way captions as the fixture does.
    let captioner = Captioner::from_files(wasmcap::loading::ModelFiles { tokenizer: &made, ..fx.files() }).unwrap();
    let reference = fx.reference();
    let want = &reference["images"]["astronaut.png"]["prompt"];
    assert_eq!(captioner.prompt_ids(Some("a picture of")).unwrap(), ids(&want["decoder_input_ids"]));

    // A folder on disk with vocab.txt and no tokenizer.json loads through the same conversion.
    #[cfg(not(target_arch = "wasm32"))]
    {
        let dir = std::env::temp_dir().join(format!("wasmcap-blip-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in [("config.json", fx.config), ("model.safetensors", fx.weights), ("preprocessor_config.json", fx.preprocessor)] {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        std::fs::write(dir.join("vocab.txt"), lines.join("\n")).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        let from_dir = Captioner::from_dir(&dir, None).unwrap();
        assert_eq!(from_dir.prompt_ids(Some("a picture of")).unwrap(), ids(&want["decoder_input_ids"]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
