//! Our outputs against 🤗 transformers' on the committed fixtures (tests/fixtures/make_fixtures.py):
//! pixel values, encoder states, first-step logits, greedy ids, tokenizer ids — and what a user's
//! bad input gives. Runs natively (`cargo test`) and in headless Chromium (`wasm-pack test`).

mod common;

use candle_core::{Tensor, D};
use common::{edit_safetensors, fixtures, image, max_abs_diff, report, IMAGES, PHOTOS, PIXEL_TOL, STATE_TOL};
use wasmcap::loading::ModelFiles;
use wasmcap::tokenizer::{CaptionTokenizer, TextStream};
use wasmcap::{CaptionOptions, Captioner, Error};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

#[test]
fn pixel_values_match_siglip_image_processor() {
    for fx in fixtures() {
        let captioner = Captioner::from_files(fx.files()).unwrap();
        let reference = fx.reference_tensors();
        let mut checked = 0;
        for (name, bytes) in IMAGES {
            // tiny-ved-v4 keeps references for the photos only (fixture size budget).
            let Some(theirs) = reference.get(&format!("pixel_values.{name}")) else {
                continue;
            };
            checked += 1;
            let ours = captioner.pixel_values_from_bytes(bytes).unwrap();
            let diff = max_abs_diff(&ours, theirs);
            report(&format!("{} {name} pixel values max-abs", fx.name), diff);
            assert!(diff <= PIXEL_TOL, "{} {name}: pixel values differ by {diff}", fx.name);
        }
        assert!(checked >= PHOTOS.len(), "{}: only {checked} pixel references", fx.name);
    }
}

#[test]
fn encoder_states_and_first_logits_match() {
    // Once as it is, once with the work split in two parts (crate::parallel), as the
    // threaded WASM build runs it; in WASM, once more on the simd128 GEMM kernel where the
    // browser would take the relaxed-SIMD one (models::packed).
    for (threads, relaxed) in [(1, true), (2, true), (1, false)] {
        wasmcap::models::packed::allow_relaxed_simd(relaxed);
        wasmcap::parallel::with_threads(threads, || {
            for fx in fixtures() {
                let captioner = Captioner::from_files(fx.files()).unwrap();
                let reference = fx.reference_tensors();
                for name in PHOTOS {
                    // transformers' own pixel values (stored f16; its references were computed from the
                    // same f16-rounded pixels): the model check, apart from preprocessing's.
                    let pixels = &reference[&format!("pixel_values.{name}")];
                    let states = captioner.encode(pixels).unwrap();
                    let diff = max_abs_diff(&states, &reference[&format!("encoder_hidden_states.{name}")]);
                    report(&format!("{} {name} encoder states max-abs", fx.name), diff);
                    assert!(
                        diff <= STATE_TOL,
                        "{} {name} [{threads} threads, {}]: encoder states differ by {diff}",
                        fx.name,
                        wasmcap::models::packed::kernel_name()
                    );

                    let logits = captioner.first_step_logits(pixels, &CaptionOptions::default()).unwrap();
                    let diff = max_abs_diff(&logits, &reference[&format!("logits.{name}")]);
                    report(&format!("{} {name} first-step logits max-abs", fx.name), diff);
                    assert!(
                        diff <= STATE_TOL,
                        "{} {name} [{threads} threads, {}]: first-step logits differ by {diff}",
                        fx.name,
                        wasmcap::models::packed::kernel_name()
                    );
                }
            }
        });
    }
    wasmcap::models::packed::allow_relaxed_simd(true);
}

#[test]
fn the_encoder_multiplies_packed_weights_in_wasm() {
    use wasmcap::models::vision_encoder_decoder::VisionEncoderDecoder;
    for fx in fixtures() {
        let captioner = Captioner::from_files(fx.files()).unwrap();
        let m = captioner.model().as_any().downcast_ref::<VisionEncoderDecoder>().expect("a cross-attention fixture");
        let layers = m.config().encoder.num_hidden_layers;
        if cfg!(target_arch = "wasm32") {
            assert_eq!(m.packed_encoder_matrices(), 6 * layers, "{}", fx.name);
            // Chromium has relaxed SIMD: the side module must have loaded.
            assert_eq!(wasmcap::models::packed::kernel_name(), "relaxed-simd");
        } else {
            // Natively candle's multi-threaded GEMM stays.
            assert_eq!(m.packed_encoder_matrices(), 0, "{}", fx.name);
        }
    }
}

#[test]
fn greedy_ids_and_text_match_generate() {
    // Once as it is, once with the work split in two parts (crate::parallel), as the
    // threaded WASM build runs it; in WASM, once more on the simd128 GEMM kernel where the
    // browser would take the relaxed-SIMD one (models::packed).
    for (threads, relaxed) in [(1, true), (2, true), (1, false)] {
        wasmcap::models::packed::allow_relaxed_simd(relaxed);
        wasmcap::parallel::with_threads(threads, || {
            for fx in fixtures() {
                let captioner = Captioner::from_files(fx.files()).unwrap();
                let options = CaptionOptions { max_new_tokens: Some(fx.max_new_tokens()), ..Default::default() };
                for name in PHOTOS {
                    let pixels = captioner.pixel_values_from_bytes(image(name)).unwrap();
                    let mut streamed = String::new();
                    let mut events = 0;
                    let caption = captioner
                        .caption(&pixels, &options, |event| {
                            streamed.push_str(&event.delta);
                            assert_eq!(event.text, streamed, "event text is the caption so far");
                            events += 1;
                        })
                        .unwrap();
                    assert_eq!(caption.token_ids, fx.greedy_ids(name), "{} {name} [{threads} threads]: greedy ids", fx.name);
                    assert_eq!(caption.text, fx.greedy_text(name), "{} {name} [{threads} threads]: text", fx.name);
                    assert_eq!(streamed, caption.text, "{} {name} [{threads} threads]: deltas add up to the caption", fx.name);
                    assert_eq!(events, caption.token_ids.len());
                }
            }
        });
    }
}

#[test]
fn generation_stops_at_eos_like_generate() {
    // tiny-ved-v4 is made so that one photo reaches EOS early; generate() keeps the EOS id.
    let fx = fixtures().into_iter().find(|f| f.reference().get("eos_image").is_some()).expect("a fixture with an EOS image");
    let name = fx.reference()["eos_image"].as_str().unwrap().to_string();
    let eos = fx.reference()["eos_token_id"].as_u64().unwrap() as u32;
    let expected = fx.greedy_ids(&name);
    assert!(expected.len() < fx.max_new_tokens() && expected.last() == Some(&eos), "{expected:?}");
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let pixels = captioner.pixel_values_from_bytes(image(&name)).unwrap();
    let mut run = captioner.start(&pixels, &CaptionOptions { max_new_tokens: Some(fx.max_new_tokens()), ..Default::default() }).unwrap();
    while captioner.next_token(&mut run).unwrap().is_some() {}
    assert!(run.is_done());
    assert_eq!(run.token_ids(), expected);
    assert!(captioner.next_token(&mut run).unwrap().is_none(), "nothing after EOS");
}

#[test]
fn canvas_rgba_pixels_caption_like_the_png() {
    let fx = &fixtures()[0];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let rgb = wasmcap::preprocess::decode_image(image("astronaut.png")).unwrap();
    let rgba: Vec<u8> = rgb.pixels().flat_map(|p| [p[0], p[1], p[2], 255]).collect();
    let from_rgba = captioner.pixel_values_from_rgba(&rgba, rgb.width(), rgb.height()).unwrap();
    let from_png = captioner.pixel_values_from_bytes(image("astronaut.png")).unwrap();
    assert_eq!(max_abs_diff(&from_rgba, &from_png), 0.0);
}

#[test]
fn tokenizer_matches_gpt2_tokenizer_and_round_trips() {
    let tokenizer = CaptionTokenizer::from_bytes(&fixtures()[0].tokenizer).unwrap();
    let samples: serde_json::Value = serde_json::from_slice(common::TOKENIZER_SAMPLES).unwrap();
    let samples = samples["samples"].as_array().unwrap();
    assert!(samples.len() >= 8);
    for sample in samples {
        let text = sample["text"].as_str().unwrap();
        let expected: Vec<u32> = sample["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(ids, expected, "ids for {text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
}

#[test]
fn gpt2_tokenizer_from_vocab_and_merges_matches_transformers() {
    // tiny-vit-gpt2 ships vocab.json + merges.txt (+ tokenizer_config.json,
    // special_tokens_map.json) and no tokenizer.json, as nlpconnect's folder does.
    let fx = common::vit_gpt2();
    let tokenizer = CaptionTokenizer::from_bytes(&fx.tokenizer).unwrap();
    let samples = fx.reference()["tokenizer_samples"].as_array().unwrap().clone();
    assert!(samples.len() >= 4);
    for sample in samples {
        let text = sample["text"].as_str().unwrap();
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, common::ids(&sample["ids"]), "ids for {text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
    // <|endoftext|> is special: skipped when decoding a caption, as transformers skips it.
    assert_eq!(tokenizer.decode(&[2047, 64, 2047], true).unwrap(), "a");
    let err = wasmcap::tokenizer::gpt2_tokenizer_json(b"{\"a\": 0}", b"#version: 0.2\na b c\n", None, None).unwrap_err();
    assert!(err.to_string().contains("merges.txt") && err.to_string().contains("line 2"), "{err}");
    let err = wasmcap::tokenizer::gpt2_tokenizer_json(b"[1, 2]", b"", None, None).unwrap_err();
    assert!(err.to_string().contains("vocab.json"), "{err}");
    let err = wasmcap::tokenizer::gpt2_tokenizer_json(b"{\"a\": 0}", b"", None, None).unwrap_err();
    assert!(err.to_string().contains("<|endoftext|>") && err.to_string().contains("not in vocab.json"), "{err}");
}

#[test]
fn generation_config_defaults_match_generate() {
    // tiny-vit-gpt2's generation_config.json, as nlpconnect's: num_beams 4, max_length 16 (the
    // start token included). generate() with no arguments runs that beam search.
    let fx = common::vit_gpt2();
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let beams = captioner.default_beam_options();
    assert_eq!(beams.num_beams, 4);
    assert!(captioner.beam_search_by_default());
    for (name, _) in IMAGES {
        let expected = &fx.reference()["images"][name];
        let pixels = captioner.pixel_values_from_bytes(image(name)).unwrap();
        let best = captioner.beam_search(&pixels, &captioner.default_options(), &beams).unwrap();
        assert_eq!(best.len(), 1);
        assert_eq!(best[0].token_ids, common::ids(&expected["default_ids"]), "{name}: generate() defaults");
        assert!(best[0].token_ids.len() <= 15, "max_length 16 counts the start token");
        let text = captioner.tokenizer().decode(&best[0].token_ids, true).unwrap();
        assert_eq!(text, expected["default_text"].as_str().unwrap(), "{name}");
        let two = wasmcap::BeamOptions { num_return_sequences: 2, ..beams.clone() };
        let got: Vec<Vec<u32>> =
            captioner.beam_search(&pixels, &captioner.default_options(), &two).unwrap().into_iter().map(|h| h.token_ids).collect();
        let want: Vec<Vec<u32>> = expected["two_sequences"].as_array().unwrap().iter().map(common::ids).collect();
        assert_eq!(got, want, "{name}: num_return_sequences 2");
    }
}

#[test]
fn streaming_holds_back_split_utf8_characters() {
    let tokenizer = CaptionTokenizer::from_bytes(&fixtures()[0].tokenizer).unwrap();
    // An emoji is several byte-level tokens; no delta may contain a replacement character.
    let text = "a cat 🐈 on a mat";
    let ids = tokenizer.encode(text, false).unwrap();
    assert!(ids.len() > text.split(' ').count(), "the emoji spans several tokens");
    let mut stream = TextStream::new();
    let mut joined = String::new();
    for id in ids {
        let delta = stream.push(&tokenizer, id).unwrap();
        assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} has a partial character");
        joined.push_str(&delta);
    }
    joined.push_str(&stream.finish(&tokenizer).unwrap());
    assert_eq!(joined, text);
}

fn load_err(files: ModelFiles<'_>) -> Error {
    match Captioner::from_files(files) {
        Ok(_) => panic!("loading should have failed"),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_is_named() {
    let fx = &fixtures()[0];
    let name = "decoder.transformer.h.1.crossattention.q_attn.weight";
    let weights = edit_safetensors(fx.weights, |n, t| (n != name).then_some(t));
    let err = load_err(ModelFiles { weights: &weights, ..fx.files() });
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert!(err.to_string().contains(name), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let fx = &fixtures()[0];
    let name = "encoder.post_layernorm.weight";
    let weights = edit_safetensors(fx.weights, |n, t| Some(if n == name { Tensor::ones(7, t.dtype(), t.device()).unwrap() } else { t }));
    let err = load_err(ModelFiles { weights: &weights, ..fx.files() });
    let msg = err.to_string();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    assert!(msg.contains(name) && msg.contains("[7]") && msg.contains("[32]"), "{msg}");
}

#[test]
fn vit_tensors_are_named_when_missing_or_misshapen() {
    let fx = common::vit_gpt2();
    for name in ["encoder.embeddings.cls_token", "encoder.encoder.layer.1.attention.attention.value.bias", "encoder.layernorm.weight"] {
        let weights = edit_safetensors(fx.weights, |n, t| (n != name).then_some(t));
        let err = load_err(ModelFiles { weights: &weights, ..fx.files() });
        assert!(matches!(err, Error::MissingTensor { .. }) && err.to_string().contains(name), "{err:?}");
    }
    // 49 patches + CLS = 50 positions of 32; a checkpoint for another image size is refused.
    let name = "encoder.embeddings.position_embeddings";
    let weights = edit_safetensors(fx.weights, |n, t| Some(if n == name { Tensor::zeros((1, 37, 32), t.dtype(), t.device()).unwrap() } else { t }));
    let msg = load_err(ModelFiles { weights: &weights, ..fx.files() }).to_string();
    assert!(msg.contains(name) && msg.contains("[1, 50, 32]") && msg.contains("[1, 37, 32]"), "{msg}");
    // The pooler is not read: a checkpoint without it loads (transformers ignores it too).
    let weights = edit_safetensors(fx.weights, |n, t| (!n.starts_with("encoder.pooler.")).then_some(t));
    assert!(Captioner::from_files(ModelFiles { weights: &weights, ..fx.files() }).is_ok());
}

#[test]
fn truncated_safetensors_is_reported() {
    let fx = &fixtures()[0];
    for len in [0, 5, 100, fx.weights.len() / 2, fx.weights.len() - 1] {
        let err = load_err(ModelFiles { weights: &fx.weights[..len], ..fx.files() });
        assert!(matches!(err, Error::Safetensors { .. }), "{len} bytes: {err:?}");
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
}

#[test]
fn invalid_config_is_reported() {
    let fx = &fixtures()[0];
    let cases: [(&[u8], &str); 5] = [
        (b"{not json", "not valid JSON"),
        (br#"{"model_type": "bert"}"#, "model_type \"bert\" is not supported; supported: \"vision-encoder-decoder\", \"llava\""),
        // An unsupported encoder is refused by name, listing the supported ones.
        (br#"{"model_type": "vision-encoder-decoder", "encoder": {"model_type": "beit"}, "decoder": {"model_type": "gpt2"}}"#, "\"siglip_vision_model\", \"vit\""),
        (br#"{"model_type": "vision-encoder-decoder", "encoder": {"model_type": "vit", "image_size": 100}, "decoder": {"model_type": "gpt2", "add_cross_attention": true}}"#, "multiple of patch_size"),
        (br#"{"model_type": "vision-encoder-decoder", "encoder": {"model_type": "siglip_vision_model", "hidden_size": 30, "num_attention_heads": 4}, "decoder": {"model_type": "gpt2", "add_cross_attention": true}}"#, "divisible"),
    ];
    for (config, needle) in cases {
        let err = load_err(ModelFiles { config, ..fx.files() });
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("config.json") && msg.contains(needle), "{msg}");
    }
}

#[test]
fn bad_image_bytes_are_an_error_and_the_captioner_still_works() {
    let fx = &fixtures()[0];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let png = image("astronaut.png");
    for bad in [&b"definitely not an image"[..], &png[..png.len() / 3], &[][..]] {
        let err = captioner.pixel_values_from_bytes(bad).unwrap_err();
        assert!(matches!(err, Error::Image(_)), "{err:?}");
    }
    let err = captioner.pixel_values_from_rgba(&[0; 10], 2, 2).unwrap_err();
    assert!(err.to_string().contains("16") && err.to_string().contains("10"), "{err}");

    let pixels = captioner.pixel_values_from_bytes(png).unwrap();
    let caption = captioner.caption(&pixels, &CaptionOptions { max_new_tokens: Some(fx.max_new_tokens()), ..Default::default() }, |_| {}).unwrap();
    assert_eq!(caption.token_ids, fx.greedy_ids("astronaut.png"));
}

#[test]
fn max_new_tokens_is_honoured_and_bounded() {
    let fx = &fixtures()[0];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let pixels = captioner.pixel_values_from_bytes(image("chelsea.jpg")).unwrap();
    let five = captioner.caption(&pixels, &CaptionOptions { max_new_tokens: Some(5), ..Default::default() }, |_| {}).unwrap();
    assert_eq!(five.token_ids, fx.greedy_ids("chelsea.jpg")[..5]);
    let err = captioner.start(&pixels, &CaptionOptions { max_new_tokens: Some(10_000), ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("n_positions"), "{err}");
    // Pixel values of the wrong size are refused with both shapes, not a panic.
    let wrong = pixels.narrow(D::Minus1, 0, 8).unwrap();
    let err = captioner.encode(&wrong).unwrap_err();
    assert!(err.to_string().contains("expects"), "{err}");
}
