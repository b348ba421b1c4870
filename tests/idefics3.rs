//! Idefics3 / SmolVLM (SigLIP tiles → pixel shuffle → projection → Llama, the prompt through the
//! chat template with `<image>` expanded per tile) against 🤗 transformers on the fixtures of
//! tests/fixtures/make_idefics3_fixtures.py: a square, a landscape and an odd-sized portrait photo
//! at their original sizes, split into tiles and not. Runs natively and in headless Chromium.

mod common;

use common::{image, max_abs_diff, report, smolvlm, PIXEL_TOL, STATE_TOL};
use wasmcap::preprocess::{Grid, Pixels};
use wasmcap::{BeamOptions, CaptionOptions, Captioner};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

const PHOTOS: [&str; 3] = ["astronaut.png", "chelsea.jpg", "chelsea_portrait.png"];
const MODES: [&str; 2] = ["split", "unsplit"];

/// The fixture's captioner, splitting images as its preprocessor_config.json says (`split`) or
/// with `do_image_splitting` off (`unsplit`, as the reference's `processor(do_image_splitting=False)`).
fn captioner(mode: &str) -> Captioner {
    let fx = smolvlm();
    let mut preprocessor: serde_json::Value = serde_json::from_slice(fx.preprocessor).unwrap();
    preprocessor["do_image_splitting"] = (mode == "split").into();
    let bytes = serde_json::to_vec(&preprocessor).unwrap();
    Captioner::from_files(fx.files(Some(&bytes))).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn options(reference: &serde_json::Value) -> CaptionOptions {
    CaptionOptions {
        prompt: Some(reference["prompt"].as_str().unwrap().to_string()),
        max_new_tokens: Some(reference["max_new_tokens"].as_u64().unwrap() as usize),
        ..Default::default()
    }
}

#[test]
fn tiles_grids_and_prompt_ids_are_the_processors() {
    let reference = smolvlm().reference();
    for mode in MODES {
        let captioner = captioner(mode);
        for name in PHOTOS {
            let want = &reference["images"][name][mode];
            let pixels = captioner.pixel_values_from_bytes(image(name)).unwrap();
            let grid = Grid { rows: want["rows"].as_u64().unwrap() as usize, cols: want["cols"].as_u64().unwrap() as usize };
            assert_eq!(pixels.grids(), &[grid], "{name} {mode}");
            assert_eq!(pixels.dims()[0], want["tiles"].as_u64().unwrap() as usize, "{name} {mode}");
            let prompt = reference["prompt"].as_str();
            assert_eq!(captioner.prompt_ids_for(prompt, grid).unwrap(), ids(&want["input_ids"]), "{name} {mode}");
        }
    }
}

#[test]
fn pixels_connector_output_and_logits_match() {
    let fx = smolvlm();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    for mode in MODES {
        let captioner = captioner(mode);
        for name in PHOTOS {
            let key = format!("{name}.{mode}");
            let ours = captioner.pixel_values_from_bytes(image(name)).unwrap();
            let theirs = &tensors[&format!("pixel_values.{key}")];
            let diff = max_abs_diff(&ours, theirs);
            report(&format!("idefics3 {key} pixel values max-abs"), diff);
            assert!(diff <= PIXEL_TOL, "{key}: pixel values differ by {diff}");

            // The model on transformers' own (f16-stored) pixels, cut as ours are.
            let theirs = Pixels::tiled(theirs.clone(), ours.grids().to_vec()).unwrap();
            let features = captioner.encode(&theirs).unwrap();
            let (tiles, per_tile, hidden) = features.dims3().unwrap();
            let features = features.reshape((tiles * per_tile, hidden)).unwrap();
            let diff = max_abs_diff(&features, &tensors[&format!("image_features.{key}")]);
            report(&format!("idefics3 {key} connector output max-abs"), diff);
            assert!(diff <= STATE_TOL, "{key}: connector output differs by {diff}");

            let logits = captioner.first_step_logits(&theirs, &options(&reference)).unwrap();
            let diff = max_abs_diff(&logits, &tensors[&format!("logits.{key}")]);
            report(&format!("idefics3 {key} first-step logits max-abs"), diff);
            assert!(diff <= STATE_TOL, "{key}: first-step logits differ by {diff}");
        }
    }
}

#[test]
fn greedy_and_beam_ids_match_generate() {
    let fx = smolvlm();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let beams = BeamOptions { num_beams: reference["num_beams"].as_u64().unwrap() as usize, ..BeamOptions::default() };
    for mode in MODES {
        let captioner = captioner(mode);
        for name in PHOTOS {
            let want = &reference["images"][name][mode];
            let ours = captioner.pixel_values_from_bytes(image(name)).unwrap();
            // These random models are chaotic enough that a JPEG decoder's ±2/255 can flip a token,
            // so every photo runs on transformers' pixels (its ids from them are its ids from f32
            // pixels: the fixture script checks it); the PNGs also run from their bytes.
            let theirs = Pixels::tiled(tensors[&format!("pixel_values.{name}.{mode}")].clone(), ours.grids().to_vec()).unwrap();
            let mut inputs = vec![(theirs, "transformers' pixels")];
            if name.ends_with(".png") {
                inputs.push((ours, "the image file"));
            }
            for (pixels, source) in inputs {
                let caption = captioner.caption(&pixels, &options(&reference), |_| {}).unwrap();
                assert_eq!(caption.token_ids, ids(&want["greedy_ids"]), "{name} {mode} from {source}: greedy");
                assert_eq!(caption.text, want["greedy_text"].as_str().unwrap(), "{name} {mode}: text");
                let best = captioner.beam_search(&pixels, &options(&reference), &beams).unwrap();
                assert_eq!(best[0].token_ids, ids(&want["beam_ids"]), "{name} {mode} from {source}: {} beams", beams.num_beams);
            }
        }
    }
}

#[test]
fn images_cut_into_different_grids_caption_together_as_one_by_one() {
    let fx = smolvlm();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let captioner = captioner("split");
    // transformers' pixels (see greedy_and_beam_ids_match_generate), each cut as ours are.
    let pixels: Vec<_> = PHOTOS
        .iter()
        .map(|name| {
            let grids = captioner.pixel_values_from_bytes(image(name)).unwrap().grids().to_vec();
            Pixels::tiled(tensors[&format!("pixel_values.{name}.split")].clone(), grids).unwrap()
        })
        .collect();
    // 3×3, 2×3 and 3×2: three grids, and the astronaut twice.
    let batch = Pixels::cat(&[pixels[0].clone(), pixels[1].clone(), pixels[2].clone(), pixels[0].clone()]).unwrap();
    let captions = captioner.caption_many(&batch, &options(&reference), |_, _| {}).unwrap();
    let names = [PHOTOS[0], PHOTOS[1], PHOTOS[2], PHOTOS[0]];
    for (caption, name) in captions.iter().zip(names) {
        assert_eq!(caption.token_ids, ids(&reference["images"][name]["split"]["greedy_ids"]), "{name}");
    }
    let beams = BeamOptions { num_beams: 3, ..BeamOptions::default() };
    let found = captioner.beam_search_many(&batch, &options(&reference), &beams, |_, _| {}).unwrap();
    for (hypotheses, name) in found.iter().zip(names) {
        assert_eq!(hypotheses[0].token_ids, ids(&reference["images"][name]["split"]["beam_ids"]), "{name}");
    }
    // One run holds one grid; the error says what to do.
    let err = captioner.start_many(&batch, &options(&reference)).err().unwrap().to_string();
    assert!(err.contains("grid") && err.contains("caption_many"), "{err}");
}

#[test]
fn a_prompt_with_two_images_and_a_folder_without_a_template_say_what_they_do() {
    let fx = smolvlm();
    let captioner = Captioner::from_files(fx.files(None)).unwrap();
    let err = captioner.prompt_ids(Some("<image> again")).unwrap_err().to_string();
    assert!(err.contains("2 <image>"), "{err}");
    // No chat template: the processor's raw text, `<image>` then the prompt.
    let bare = Captioner::from_files(wasmcap::loading::ModelFiles { chat_template: None, ..fx.files(None) }).unwrap();
    let ids = bare.prompt_ids(Some("hello")).unwrap();
    let text = bare.tokenizer().decode(&ids, false).unwrap();
    assert!(text.starts_with("<fake_token_around_image><global-img><image>") && text.ends_with("<fake_token_around_image>hello"), "{text}");
}

#[test]
fn messages_render_as_the_processor_renders_a_conversation() {
    let fx = smolvlm();
    let reference = fx.reference();
    let conversation = &reference["conversation"];
    let captioner = captioner("split");
    let grid = captioner.pixel_values_from_bytes(image(conversation["image"].as_str().unwrap())).unwrap().grids()[0];
    let given = wasmcap::generation::GenerationOptions { messages: Some(conversation["messages"].clone()), ..Default::default() };
    let options = captioner.plan(&given).unwrap().options;
    assert_eq!(captioner.input_ids_for(&options, grid).unwrap(), ids(&conversation["input_ids"]));
    // A conversation without an image, a prompt with messages, messages for a model without a template.
    let no_image = serde_json::json!([{ "role": "user", "content": [{ "type": "text", "text": "Hi." }] }]);
    let err = captioner.input_ids_for(&CaptionOptions { messages: Some(no_image), ..Default::default() }, grid).unwrap_err().to_string();
    assert!(err.contains("0 <image>"), "{err}");
    let both = wasmcap::generation::GenerationOptions { prompt: Some("x".into()), ..given.clone() };
    assert!(captioner.plan(&both).unwrap_err().to_string().contains("not both"));
    let vit = common::vit_gpt2();
    let err = Captioner::from_files(vit.files()).unwrap().input_ids_for(&options, Grid::WHOLE).unwrap_err().to_string();
    assert!(err.contains("chat template"), "{err}");
}

#[test]
fn tiles_encoded_a_few_at_a_time_give_what_one_batch_gives() {
    let fx = smolvlm();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let captioner = captioner("split");
    let name = "astronaut.png";
    let grids = captioner.pixel_values_from_bytes(image(name)).unwrap().grids().to_vec();
    let pixels = Pixels::tiled(tensors[&format!("pixel_values.{name}.split")].clone(), grids).unwrap();
    let want = ids(&reference["images"][name]["split"]["greedy_ids"]);
    for step in [1, 2, 4] {
        let mut run = captioner.start_encoding(&pixels, &options(&reference)).unwrap();
        assert_eq!(run.tiles(), 10);
        let mut progress = Vec::new();
        while !run.is_encoded() {
            progress.push(captioner.encode_step(&mut run, step).unwrap());
        }
        let expected: Vec<usize> = (1..).map(|i| (i * step).min(10)).take(10_usize.div_ceil(step)).collect();
        assert_eq!(progress, expected, "{step} tiles a step");
        let mut caption = captioner.finish_encoding(run).unwrap();
        let mut got = Vec::new();
        while let Some(event) = captioner.next_token(&mut caption).unwrap() {
            got.push(event.id);
        }
        assert_eq!(got, want, "{step} tiles a step");
    }
    // The options are checked before any tile is encoded.
    let too_long = CaptionOptions { max_new_tokens: Some(100_000), ..options(&reference) };
    assert!(captioner.start_encoding(&pixels, &too_long).err().unwrap().to_string().contains("max_new_tokens"));
}

#[test]
fn a_transformers_4_config_gives_the_same_model() {
    // transformers 4.57 saves the same 59 tensor names (checked by loading and re-saving the fixture
    // with it); its config.json keeps RoPE's θ in text_config.rope_theta, without rope_parameters.
    let fx = smolvlm();
    let reference = fx.reference();
    let mut config: serde_json::Value = serde_json::from_slice(fx.config).unwrap();
    let theta = config["text_config"]["rope_parameters"]["rope_theta"].clone();
    let text = config["text_config"].as_object_mut().unwrap();
    text.remove("rope_parameters");
    text.insert("rope_theta".into(), theta);
    let bytes = serde_json::to_vec(&config).unwrap();
    let captioner = Captioner::from_files(wasmcap::loading::ModelFiles { config: &bytes, ..fx.files(None) }).unwrap();
    let pixels = captioner.pixel_values_from_bytes(image("astronaut.png")).unwrap();
    let caption = captioner.caption(&pixels, &options(&reference), |_| {}).unwrap();
    assert_eq!(caption.token_ids, ids(&reference["images"]["astronaut.png"]["split"]["greedy_ids"]));
}

/// The full-size check (`make_idefics3_fixtures.py --full-size DIR`, not committed): a
/// SmolVLM-256M-shaped model — 17 tiles of 512 px, ~1100 prefill positions — against
/// transformers: prompt ids, pixel values, first-step logits and greedy ids, split and unsplit.
#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "needs WASMCAP_FULL_IDEFICS3=DIR from make_idefics3_fixtures.py --full-size"]
fn full_size_smolvlm_256m_shapes() {
    let dir = std::path::PathBuf::from(std::env::var("WASMCAP_FULL_IDEFICS3").expect("WASMCAP_FULL_IDEFICS3=DIR"));
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let tensors =
        wasmcap::loading::load_safetensors("reference", &std::fs::read(dir.join("reference.safetensors")).unwrap(), |n| n.to_string()).unwrap();
    let bytes = image("astronaut.png");
    for mode in MODES {
        let files = wasmcap::loading::OwnedModelFiles::read_dir(&dir).unwrap();
        let mut preprocessor: serde_json::Value = serde_json::from_slice(&files.preprocessor).unwrap();
        preprocessor["do_image_splitting"] = (mode == "split").into();
        let files = wasmcap::loading::OwnedModelFiles { preprocessor: serde_json::to_vec(&preprocessor).unwrap(), ..files };
        let captioner = Captioner::from_files(files.borrow()).unwrap();
        let want = &reference["cases"][mode];
        let t0 = std::time::Instant::now();
        let ours = captioner.pixel_values_from_bytes(bytes).unwrap();
        let prompt = reference["prompt"].as_str();
        assert_eq!(captioner.prompt_ids_for(prompt, ours.grids()[0]).unwrap(), ids(&want["input_ids"]), "{mode}");
        let diff = max_abs_diff(&ours, &tensors[&format!("pixel_values.{mode}")]);
        report(&format!("full-size {mode} pixel values max-abs"), diff);
        assert!(diff <= PIXEL_TOL);
        let options = CaptionOptions {
            prompt: prompt.map(str::to_string),
            max_new_tokens: Some(want["greedy_ids"].as_array().unwrap().len()),
            ..Default::default()
        };
        let theirs = Pixels::tiled(tensors[&format!("pixel_values.{mode}")].clone(), ours.grids().to_vec()).unwrap();
        let logits = captioner.first_step_logits(&theirs, &options).unwrap();
        let diff = max_abs_diff(&logits, &tensors[&format!("logits.{mode}")]);
        let scale = tensors[&format!("logits.{mode}")].abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        report(&format!("full-size {mode} first-step logits max-abs (largest logit {scale:.1})"), diff);
        let caption = captioner.caption(&theirs, &options, |_| {}).unwrap();
        eprintln!(
            "full-size {mode}: {} tiles, encoder {:.0} ms, first token {:.0} ms, {:.1} tokens/s, all {:.1} s",
            ours.dims()[0],
            caption.encoder_ms,
            caption.first_token_ms,
            caption.tokens_per_s,
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(caption.token_ids, ids(&want["greedy_ids"]), "{mode}: greedy");
        assert!(diff <= STATE_TOL * scale.max(1.0), "{mode}: logits differ by {diff}");
    }
}
