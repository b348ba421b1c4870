//! Beam search, logits processors and sampling against 🤗 transformers 5.24
//! (tests/fixtures/make_generation_fixtures.py). Runs natively and in headless Chromium.

mod common;

use candle_core::Tensor;
use serde_json::Value;
use wasmcap::beam::EarlyStopping;
use wasmcap::sampling::{self, SamplingOptions};
use wasmcap::{BeamOptions, CaptionOptions, Captioner};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

const BEAM: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/generation/beam.json"));
const PROCESSORS: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/generation/processors.json"));

/// The captioner and transformers' (f16-stored) pixel values for a beam run's model and photo.
fn model_and_pixels(run: &Value) -> (Captioner, Tensor) {
    let (model, image) = (run["model"].as_str().unwrap(), run["image"].as_str().unwrap());
    let key = format!("pixel_values.{image}");
    if let Some(fx) = common::fixtures().into_iter().find(|f| f.name == model) {
        let pixels = fx.reference_tensors()[&key].clone();
        return (Captioner::from_files(fx.files()).unwrap(), pixels);
    }
    let case = common::prefix_cases().into_iter().find(|c| c.name == model).unwrap();
    let pixels = case.reference_tensors()[&key].clone();
    (Captioner::from_files(case.files()).unwrap(), pixels)
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match x {
            Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
            x => x.as_f64().unwrap() as f32,
        })
        .collect()
}

#[test]
fn beam_search_equals_generate() {
    let fixture: Value = serde_json::from_slice(BEAM).unwrap();
    let runs = fixture["runs"].as_array().unwrap();
    assert!(runs.len() >= 48);
    let mut cache: Vec<(String, Captioner, Tensor)> = Vec::new();
    let (mut eos_runs, mut checked) = (0, 0);
    for run in runs {
        let id = format!("{}/{}", run["model"], run["image"]);
        if !cache.iter().any(|(k, ..)| *k == id) {
            let (c, p) = model_and_pixels(run);
            cache.push((id.clone(), c, p));
        }
        let (_, captioner, pixels) = cache.iter().find(|(k, ..)| *k == id).unwrap();
        let prompt = match run["prompt_key"].as_str() {
            Some("prompt") => Some("a photo of".to_string()),
            _ => None,
        };
        let options = CaptionOptions {
            max_new_tokens: Some(run["max_new_tokens"].as_u64().unwrap() as usize),
            prompt,
            eos_token_ids: Some(vec![run["eos_token_id"].as_u64().unwrap() as u32]),
            ..Default::default()
        };
        let beams = BeamOptions {
            num_beams: run["num_beams"].as_u64().unwrap() as usize,
            length_penalty: run["length_penalty"].as_f64().unwrap() as f32,
            early_stopping: match &run["early_stopping"] {
                Value::Bool(true) => EarlyStopping::Stop,
                Value::Bool(false) => EarlyStopping::Heuristic,
                _ => EarlyStopping::Never,
            },
            num_return_sequences: run["num_return_sequences"].as_u64().unwrap() as usize,
        };
        let ours = captioner.beam_search(pixels, &options, &beams).unwrap();
        let expected: Vec<Vec<u32>> = run["sequences"].as_array().unwrap().iter().map(common::ids).collect();
        let scores = f32s(&run["sequences_scores"]);
        let got: Vec<Vec<u32>> = ours.iter().map(|h| h.token_ids.clone()).collect();
        assert_eq!(got, expected, "{id} {:?} {:?}", run["prompt_key"], beams);
        // Scores are length-normalised sums of log-probabilities: the same 1e-3 as the logits.
        for (h, s) in ours.iter().zip(&scores) {
            assert!((h.score - s).abs() < 1e-3, "{id} score {} vs {s}", h.score);
        }
        eos_runs += usize::from(run["returned_eos"].as_bool().unwrap());
        checked += 1;
    }
    assert!(eos_runs >= 4, "the fixture exercises hypotheses that end on EOS ({eos_runs})");
    common::report("beam runs identical to generate", checked as f32);
}

fn assert_row(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let same = (a.is_infinite() && a == b) || (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        assert!(same, "{what}[{i}]: {a} vs {b}");
    }
}

#[test]
fn logits_processors_equal_transformers() {
    let fixture: Value = serde_json::from_slice(PROCESSORS).unwrap();
    let specs = &fixture["singles"];
    for row in fixture["rows"].as_array().unwrap() {
        let logits = f32s(&row["logits"]);
        let prev: Vec<u32> = common::ids(&row["prev_ids"]);
        let eos = [5u32];
        for (name, expected) in row["single"].as_object().unwrap() {
            let spec = &specs[name];
            let mut s = logits.clone();
            let num = |k: &str| spec[k].as_f64().unwrap();
            match spec["class"].as_str().unwrap() {
                "TemperatureLogitsWarper" => sampling::temperature(&mut s, num("temperature") as f32),
                "TopKLogitsWarper" => sampling::top_k(&mut s, num("top_k") as usize, num("min_tokens_to_keep") as usize),
                "TopPLogitsWarper" => sampling::top_p(&mut s, num("top_p") as f32, num("min_tokens_to_keep") as usize),
                "RepetitionPenaltyLogitsProcessor" => sampling::repetition_penalty(&mut s, &prev, num("penalty") as f32),
                "NoRepeatNGramLogitsProcessor" => sampling::no_repeat_ngram(&mut s, &prev, num("ngram_size") as usize),
                // MinLength counts the whole input; MinNewTokens only what follows the prompt.
                "MinLengthLogitsProcessor" => sampling::min_new_tokens(&mut s, prev.len(), num("min_length") as usize, &eos),
                "MinNewTokensLengthLogitsProcessor" => {
                    let skip = num("prompt_length_to_skip") as usize;
                    sampling::min_new_tokens(&mut s, prev.len() - skip, num("min_new_tokens") as usize, &eos)
                }
                "NoBadWordsLogitsProcessor" => {
                    let words: Vec<Vec<u32>> = spec["bad_word_ids"].as_array().unwrap().iter().map(common::ids).collect();
                    sampling::no_bad_words(&mut s, &prev, &words, &eos)
                }
                other => panic!("no Rust counterpart for {other}"),
            }
            assert_row(&s, &f32s(expected), &format!("seed {} {name}", row["seed"]));
        }
        // The chain generate(do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
        // repetition_penalty=1.3, no_repeat_ngram_size=2) builds, in its order.
        let options = SamplingOptions {
            do_sample: true,
            temperature: Some(0.7),
            top_k: Some(5),
            top_p: Some(0.9),
            repetition_penalty: Some(1.3),
            no_repeat_ngram_size: Some(2),
            ..Default::default()
        };
        let mut s = logits.clone();
        sampling::process(&mut s, &prev, 0, &eos, &options);
        assert_row(&s, &f32s(&row["chain_output"]), &format!("seed {} chain", row["seed"]));
    }
}

#[test]
fn sampling_is_reproducible_and_respects_the_warpers() {
    let fx = &common::fixtures()[0];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let pixels = fx.reference_tensors()["pixel_values.astronaut.png"].clone();
    let sample = |seed: u64, top_k: usize| {
        let sampling = SamplingOptions { do_sample: true, temperature: Some(1.5), top_k: Some(top_k), seed: Some(seed), ..Default::default() };
        let options = CaptionOptions { max_new_tokens: Some(12), sampling, ..Default::default() };
        captioner.caption(&pixels, &options, |_| {}).unwrap().token_ids
    };
    assert_eq!(sample(7, 50), sample(7, 50), "same seed, same caption");
    assert_ne!(sample(7, 50), sample(8, 50), "another seed, another caption");
    // top_k = 1 leaves only the argmax: sampling becomes greedy.
    assert_eq!(sample(3, 1), fx.greedy_ids("astronaut.png")[..12]);
}

#[test]
fn invalid_options_are_refused() {
    let fx = &common::fixtures()[0];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let pixels = fx.reference_tensors()["pixel_values.astronaut.png"].clone();
    let err = captioner
        .beam_search(&pixels, &CaptionOptions::default(), &BeamOptions { num_beams: 2, num_return_sequences: 3, ..Default::default() })
        .unwrap_err();
    assert!(err.to_string().contains("num_return_sequences"), "{err}");
    for (sampling, needle) in [
        (SamplingOptions { top_p: Some(1.5), ..Default::default() }, "top_p"),
        (SamplingOptions { top_p: Some(0.0), ..Default::default() }, "top_p"),
        (SamplingOptions { do_sample: true, temperature: Some(0.0), ..Default::default() }, "temperature"),
    ] {
        let err = captioner.start(&pixels, &CaptionOptions { sampling, ..Default::default() }).err().unwrap();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let err =
        captioner.beam_search(&pixels, &CaptionOptions::default(), &BeamOptions { num_beams: 0, num_return_sequences: 0, ..Default::default() });
    assert!(err.is_err());
}

#[test]
fn beam_search_streams_provisional_best_hypotheses() {
    let fx = &common::fixtures()[1];
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let pixels = fx.reference_tensors()["pixel_values.chelsea.jpg"].clone();
    let options = CaptionOptions { max_new_tokens: Some(10), ..Default::default() };
    let mut provisional: Vec<Vec<u32>> = Vec::new();
    let best = captioner.beam_search_streaming(&pixels, &options, &BeamOptions::default(), |b| provisional.push(b.to_vec())).unwrap();
    assert_eq!(provisional.len(), 10, "one provisional hypothesis per step");
    for (step, p) in provisional.iter().enumerate() {
        assert_eq!(p.len(), step + 1);
    }
    assert_eq!(best, captioner.beam_search(&pixels, &options, &BeamOptions::default()).unwrap());
}

/// Every fixture photo's pixel values as one batch [N, 3, H, W], with the photos' names.
fn batch_of(reference: &std::collections::HashMap<String, Tensor>) -> (Vec<String>, Tensor) {
    let mut names: Vec<String> = reference.keys().filter_map(|k| k.strip_prefix("pixel_values.").map(str::to_string)).collect();
    names.sort();
    let rows: Vec<Tensor> = names.iter().map(|n| reference[&format!("pixel_values.{n}")].clone()).collect();
    (names, Tensor::cat(&rows, 0).unwrap())
}

#[test]
fn batch_captioning_equals_one_by_one() {
    let ved = common::fixtures().into_iter().find(|f| f.name == "tiny-ved-v5").unwrap();
    let llava = common::prefix_cases().into_iter().find(|c| c.name == "merged-v5").unwrap();
    let cases = [
        ("tiny-ved-v5", Captioner::from_files(ved.files()).unwrap(), batch_of(&ved.reference_tensors()), None),
        ("tiny-llava-merged-v5", Captioner::from_files(llava.files()).unwrap(), batch_of(&llava.reference_tensors()), Some("a photo of")),
    ];
    for (name, captioner, (images, batch), prompt) in &cases {
        assert!(images.len() >= 2, "{name}: {images:?}");
        let one = |i: usize| batch.narrow(0, i, 1).unwrap();
        // An EOS that image 0's greedy caption reaches at its third token: it leaves the batch
        // early while the others go on.
        let plain = CaptionOptions { max_new_tokens: Some(12), prompt: prompt.map(str::to_string), ..Default::default() };
        let early_eos = captioner.caption(&one(0), &plain, |_| {}).unwrap().token_ids[2];
        let runs = [
            plain.clone(),
            CaptionOptions { eos_token_ids: Some(vec![early_eos]), ..plain.clone() },
            CaptionOptions { sampling: SamplingOptions { do_sample: true, top_k: Some(20), seed: Some(5), ..Default::default() }, ..plain.clone() },
        ];
        for (r, options) in runs.iter().enumerate() {
            let mut streamed = vec![Vec::new(); images.len()];
            let many = captioner.caption_many(batch, options, |i, e| streamed[i].push(e.id)).unwrap();
            assert_eq!(many.len(), images.len());
            for (i, caption) in many.iter().enumerate() {
                let alone = captioner.caption(&one(i), options, |_| {}).unwrap();
                assert_eq!(caption.token_ids, alone.token_ids, "{name} {}: batch vs alone (run {r})", images[i]);
                assert_eq!(caption.text, alone.text);
                assert_eq!(streamed[i], caption.token_ids, "{name}: streamed tokens of image {i}");
            }
            if r == 1 {
                assert_eq!(many[0].token_ids.len(), 3, "{name}: image 0 stops at the EOS override");
                assert!(many.iter().any(|c| c.token_ids.len() > 3), "{name}: no caption outlived image 0's");
            }
        }
        let beams = BeamOptions { num_beams: 3, num_return_sequences: 2, ..Default::default() };
        let options = CaptionOptions { max_new_tokens: Some(10), prompt: prompt.map(str::to_string), ..Default::default() };
        let mut provisional = vec![0; images.len()];
        let many = captioner.beam_search_many(batch, &options, &beams, |i, _| provisional[i] += 1).unwrap();
        for (i, hypotheses) in many.iter().enumerate() {
            let alone = captioner.beam_search(&one(i), &options, &beams).unwrap();
            let ids = |h: &[wasmcap::beam::Hypothesis]| h.iter().map(|h| h.token_ids.clone()).collect::<Vec<_>>();
            assert_eq!(ids(hypotheses), ids(&alone), "{name} {}: beams in a batch vs alone", images[i]);
            // Scores: the same sums, up to float rounding — candle's GEMM may pick another kernel
            // for the encoder's [N·T, d] rows than for [T, d].
            for (a, b) in hypotheses.iter().zip(&alone) {
                assert!((a.score - b.score).abs() <= 1e-5 * b.score.abs().max(1.0), "{name} {}: score {} vs {}", images[i], a.score, b.score);
            }
            assert!(provisional[i] > 0);
        }
    }
}

#[test]
fn beam_sampling_is_reproducible_per_seed_and_batches_like_one_by_one() {
    let fx = common::fixtures().into_iter().find(|f| f.name == "tiny-ved-v5").unwrap();
    let captioner = Captioner::from_files(fx.files()).unwrap();
    let (_, batch) = batch_of(&fx.reference_tensors());
    let one = batch.narrow(0, 0, 1).unwrap();
    let beams = BeamOptions { num_beams: 3, num_return_sequences: 3, ..Default::default() };
    let sampled = |seed: u64, temperature: f32| CaptionOptions {
        max_new_tokens: Some(10),
        sampling: SamplingOptions { do_sample: true, seed: Some(seed), temperature: Some(temperature), top_k: Some(0), ..Default::default() },
        ..Default::default()
    };
    let a = captioner.beam_search(&one, &sampled(1, 100.0), &beams).unwrap();
    assert_eq!(a, captioner.beam_search(&one, &sampled(1, 100.0), &beams).unwrap(), "same seed, same beams");
    let others: Vec<_> = (2..6).map(|seed| captioner.beam_search(&one, &sampled(seed, 100.0), &beams).unwrap()).collect();
    assert!(others.iter().any(|o| o[0].token_ids != a[0].token_ids), "other seeds draw other beams");
    let plain = captioner.beam_search(&one, &CaptionOptions { max_new_tokens: Some(10), ..Default::default() }, &beams).unwrap();
    assert_ne!(a, plain, "sampling at temperature 100 (these fixtures have very peaked logits) leaves the deterministic search");
    // Hypotheses come best first, and each image of a batch gets what it gets alone.
    assert!(a.windows(2).all(|w| w[0].score >= w[1].score));
    let many = captioner.beam_search_many(&batch, &sampled(1, 100.0), &beams, |_, _| {}).unwrap();
    let ids = |h: &[wasmcap::beam::Hypothesis]| h.iter().map(|h| h.token_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&many[0]), ids(&a));
    // top_k 1 leaves one candidate per beam: fewer than the 2·beams a step draws — a clear error.
    let narrow = CaptionOptions { sampling: SamplingOptions { top_k: Some(1), ..sampled(1, 1.0).sampling }, ..sampled(1, 1.0) };
    let err = captioner.beam_search(&one, &narrow, &beams).unwrap_err().to_string();
    assert!(err.contains("beam sampling draws 6 candidates"), "{err}");
}
