//! The wasm-bindgen surface as JS sees it: errors are JS `Error`s naming what is wrong, and the
//! same instance captions correctly after any of them. Browser only (`wasm-pack test`).
#![cfg(target_arch = "wasm32")]

mod common;

use common::{checkpoint, edit_safetensors, fixtures, image};
use js_sys::Uint8Array;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::*;
use wasmcap::wasm::{WasmCaptioner, WasmWeights};

wasm_bindgen_test_configure!(run_in_browser);

fn message(err: wasm_bindgen::JsError) -> String {
    let value: JsValue = err.into();
    value.dyn_into::<js_sys::Error>().map(|e| String::from(e.message())).unwrap_or_else(|v| format!("not an Error: {v:?}"))
}

fn options(max_new_tokens: usize) -> JsValue {
    let o = js_sys::Object::new();
    js_sys::Reflect::set(&o, &"maxNewTokens".into(), &(max_new_tokens as f64).into()).unwrap();
    o.into()
}

fn ids_of(result: &JsValue) -> Vec<u32> {
    let ids = js_sys::Reflect::get(result, &"tokenIds".into()).unwrap();
    js_sys::Array::from(&ids).iter().map(|v| v.as_f64().unwrap() as u32).collect()
}

/// The weights as the JS shim streams them: `name` (None: `model.safetensors`) and a sharded
/// checkpoint's shards, each cut into chunks by `cut`, the files' chunks interleaved. A chunk that
/// fails is kept as the failure the constructor reports, as in the shim.
fn streamed(name: Option<&str>, bytes: &[u8], shards: &[(&str, &[u8])], cut: &dyn Fn(&[u8]) -> Vec<Uint8Array>) -> WasmWeights {
    let mut weights = WasmWeights::new(name.map(str::to_string)).unwrap_or_else(|_| panic!("{name:?}"));
    let first = name.unwrap_or("model.safetensors");
    let mut files: Vec<(&str, Vec<Uint8Array>)> = vec![(first, cut(bytes))];
    files.extend(shards.iter().map(|(n, b)| (*n, cut(b))));
    for (file, _) in &files {
        weights.open(file.to_string(), None).unwrap();
    }
    for i in 0..files.iter().map(|(_, c)| c.len()).max().unwrap_or(0) {
        for (file, chunks) in &files {
            if let Some(chunk) = chunks.get(i) {
                let _ = weights.push(file, chunk);
            }
        }
    }
    weights
}

/// A file in one chunk.
fn one(bytes: &[u8]) -> Vec<Uint8Array> {
    vec![Uint8Array::from(bytes)]
}

/// Chunks of uneven sizes (an empty one among them): tensors straddle the seams.
fn uneven(bytes: &[u8]) -> Vec<Uint8Array> {
    let (mut out, mut at, mut i) = (Vec::new(), 0, 0);
    while at < bytes.len() {
        let n = [1, 0, 4093, 65536, 7, 100_003][i % 6].min(bytes.len() - at);
        out.push(Uint8Array::from(&bytes[at..at + n]));
        at += n;
        i += 1;
    }
    out
}

fn whole(bytes: &[u8]) -> WasmWeights {
    streamed(None, bytes, &[], &one)
}

fn new_captioner(fx: &common::Fixture, weights: &[u8]) -> Result<WasmCaptioner, wasm_bindgen::JsError> {
    WasmCaptioner::new(fx.config, whole(weights), &fx.tokenizer, fx.preprocessor, Some(fx.generation.to_vec()), None, None, None, None)
}

#[wasm_bindgen_test]
fn load_errors_are_js_errors_naming_the_tensor() {
    let fx = &fixtures()[0];
    let name = "decoder.transformer.ln_f.bias";
    let weights = edit_safetensors(fx.weights, |n, t| (n != name).then_some(t));
    let msg = message(new_captioner(fx, &weights).err().unwrap());
    assert!(msg.contains("model.safetensors") && msg.contains(name), "{msg}");
    let msg = message(new_captioner(fx, &fx.weights[..1000]).err().unwrap());
    assert!(msg.contains("model.safetensors"), "{msg}");
    let msg = message(WasmCaptioner::new(b"[]", whole(fx.weights), &fx.tokenizer, fx.preprocessor, None, None, None, None, None).err().unwrap());
    assert!(msg.contains("config.json"), "{msg}");
    let msg = message(WasmCaptioner::new(fx.config, whole(fx.weights), b"{}", fx.preprocessor, None, None, None, None, None).err().unwrap());
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[wasm_bindgen_test]
fn streams_the_reference_tokens_and_survives_bad_input() {
    for fx in fixtures() {
        let mut c = new_captioner(&fx, fx.weights).unwrap();
        let n = fx.max_new_tokens();

        let msg = message(c.next_token().err().unwrap());
        assert!(msg.contains("start"), "{msg}");
        let msg = message(c.start(b"GIF89a not really", options(n)).err().unwrap());
        assert!(msg.contains("could not decode"), "{msg}");
        let msg = message(c.start(image("astronaut.png"), JsValue::from_str("nonsense")).err().unwrap());
        assert!(msg.contains("options"), "{msg}");
        let typo = options(n);
        js_sys::Reflect::set(&typo, &"maxNewTokenz".into(), &3.into()).unwrap();
        let msg = message(c.start(image("astronaut.png"), typo).err().unwrap());
        assert!(msg.contains("maxNewTokenz"), "unknown keys are refused: {msg}");

        // Step-wise, as the JS worker drives it.
        c.start(image("astronaut.png"), options(n)).unwrap();
        let mut ids = vec![];
        loop {
            let event = c.next_token().unwrap();
            if event.is_undefined() {
                break;
            }
            ids.push(js_sys::Reflect::get(&event, &"id".into()).unwrap().as_f64().unwrap() as u32);
        }
        let result = c.finish().unwrap();
        assert_eq!(ids, fx.greedy_ids("astronaut.png"), "{}", fx.name);
        assert_eq!(ids_of(&result), ids);
        let text = js_sys::Reflect::get(&result, &"text".into()).unwrap().as_string().unwrap();
        assert_eq!(text, fx.greedy_text("astronaut.png"));

        // Abort mid-caption, then a one-call caption of the other photo.
        c.start(image("astronaut.png"), options(n)).unwrap();
        c.next_token().unwrap();
        c.abort();
        assert!(c.next_token().is_err());
        let result = c.caption(image("chelsea.jpg"), options(n)).unwrap();
        assert_eq!(ids_of(&result), fx.greedy_ids("chelsea.jpg"), "{}", fx.name);
    }
}

#[wasm_bindgen_test]
fn rgba_pixels_from_a_canvas() {
    let fx = &fixtures()[0];
    let mut c = new_captioner(fx, fx.weights).unwrap();
    let rgb = wasmcap::preprocess::decode_image(image("astronaut.png")).unwrap();
    let rgba: Vec<u8> = rgb.pixels().flat_map(|p| [p[0], p[1], p[2], 255]).collect();
    let msg = message(c.start_rgba(&rgba[..rgba.len() - 4], rgb.width(), rgb.height(), options(3)).err().unwrap());
    assert!(msg.contains("RGBA"), "{msg}");
    c.start_rgba(&rgba, rgb.width(), rgb.height(), options(fx.max_new_tokens())).unwrap();
    while !c.next_token().unwrap().is_undefined() {}
    assert_eq!(ids_of(&c.finish().unwrap()), fx.greedy_ids("astronaut.png"));
}

#[wasm_bindgen_test]
fn prefix_model_with_adapter_bytes_and_a_prompt() {
    let case = common::prefix_cases().into_iter().find(|c| c.name == "base-v5+lora-r4").unwrap();
    let (adapter_config, adapter_weights) = common::LORA_R4;
    let msg = message(
        WasmCaptioner::new(
            case.config,
            whole(case.weights),
            case.tokenizer,
            case.preprocessor,
            None,
            Some(adapter_config.to_vec()),
            None,
            None,
            None,
        )
        .err()
        .unwrap(),
    );
    assert!(msg.contains("adapter"), "{msg}");
    let mut c = WasmCaptioner::new(
        case.config,
        whole(case.weights),
        case.tokenizer,
        case.preprocessor,
        Some(case.generation.to_vec()),
        Some(adapter_config.to_vec()),
        Some(adapter_weights.to_vec()),
        None,
        None,
    )
    .unwrap();
    let expected = case.greedy_ids("astronaut.png", "prompt");
    let o = options(expected.len());
    js_sys::Reflect::set(&o, &"prompt".into(), &"a photo of".into()).unwrap();
    let result = c.caption(image("astronaut.png"), o).unwrap();
    assert_eq!(ids_of(&result), expected);
}

#[wasm_bindgen_test]
fn caption_many_streams_each_image_and_equals_one_by_one() {
    let fx = &fixtures()[0];
    let mut c = new_captioner(fx, fx.weights).unwrap();
    let n = fx.max_new_tokens();
    // Encoded bytes and RGBA pixels may be mixed in one batch.
    let rgb = wasmcap::preprocess::decode_image(image("chelsea.jpg")).unwrap();
    let rgba = js_sys::Object::new();
    let data: Vec<u8> = rgb.pixels().flat_map(|p| [p[0], p[1], p[2], 255]).collect();
    js_sys::Reflect::set(&rgba, &"data".into(), &js_sys::Uint8Array::from(&data[..])).unwrap();
    js_sys::Reflect::set(&rgba, &"width".into(), &rgb.width().into()).unwrap();
    js_sys::Reflect::set(&rgba, &"height".into(), &rgb.height().into()).unwrap();
    let images = js_sys::Array::of3(&js_sys::Uint8Array::from(image("astronaut.png")), &rgba, &js_sys::Uint8Array::from(image("coffee_rgba.png")));

    let events = js_sys::Array::new();
    let sink = events.clone();
    let on_event = wasm_bindgen::closure::Closure::<dyn FnMut(JsValue, JsValue)>::new(move |i: JsValue, e: JsValue| {
        sink.push(&js_sys::Array::of2(&i, &e));
    });
    let results = c.caption_many(images.clone(), options(n), Some(on_event.as_ref().unchecked_ref::<js_sys::Function>().clone())).unwrap();
    let results = js_sys::Array::from(&results);
    assert_eq!(results.length(), 3);
    assert_eq!(ids_of(&results.get(0)), fx.greedy_ids("astronaut.png"));
    assert_eq!(ids_of(&results.get(1)), fx.greedy_ids("chelsea.jpg"));
    let alone = c.caption(image("coffee_rgba.png"), options(n)).unwrap();
    assert_eq!(ids_of(&results.get(2)), ids_of(&alone));
    // Every token of every image was streamed, tagged with its image.
    for i in 0..3u32 {
        let streamed: Vec<u32> = events
            .iter()
            .map(|v| js_sys::Array::from(&v))
            .filter(|pair| pair.get(0).as_f64() == Some(i as f64))
            .map(|pair| js_sys::Reflect::get(&pair.get(1), &"id".into()).unwrap().as_f64().unwrap() as u32)
            .collect();
        assert_eq!(streamed, ids_of(&results.get(i)), "image {i}");
    }

    // Beam search over the batch: per image, what beamSearch gives alone; provisional events stream.
    let beam = options(6);
    js_sys::Reflect::set(&beam, &"numBeams".into(), &3.into()).unwrap();
    events.set_length(0);
    let results = js_sys::Array::from(
        &c.caption_many(images.clone(), beam.clone(), Some(on_event.as_ref().unchecked_ref::<js_sys::Function>().clone())).unwrap(),
    );
    let alone = js_sys::Array::from(&c.beam_search(Uint8Array::from(image("astronaut.png")).into(), beam.clone(), None).unwrap());
    assert_eq!(ids_of(&results.get(0)), ids_of(&alone.get(0)));
    let provisional = js_sys::Reflect::get(&js_sys::Array::from(&events.get(0)).get(1), &"provisional".into()).unwrap();
    assert_eq!(provisional.as_bool(), Some(true));
    assert!(events.length() >= 3, "one provisional hypothesis per image and step");

    // beamSearch streams too; a callback that throws is reported, and the instance goes on.
    let count = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = count.clone();
    let on_provisional = wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(move |_e: JsValue| seen.set(seen.get() + 1));
    c.beam_search(
        Uint8Array::from(image("astronaut.png")).into(),
        beam.clone(),
        Some(on_provisional.as_ref().unchecked_ref::<js_sys::Function>().clone()),
    )
    .unwrap();
    assert_eq!(count.get(), 6, "one provisional hypothesis per step");
    let thrower = js_sys::Function::new_with_args("e", "throw new Error('boom')");
    let msg = message(c.beam_search(Uint8Array::from(image("astronaut.png")).into(), beam, Some(thrower)).err().unwrap());
    assert!(msg.contains("boom"), "{msg}");
    let msg = message(c.caption_many(js_sys::Array::of1(&JsValue::from_str("not an image")), options(3), None).err().unwrap());
    assert!(msg.contains("image 0"), "{msg}");
    assert_eq!(ids_of(&c.caption(image("chelsea.jpg"), options(n)).unwrap()), fx.greedy_ids("chelsea.jpg"));
}

#[wasm_bindgen_test]
fn generation_config_defaults_apply_unless_options_say_otherwise() {
    let fx = &fixtures()[0];
    let mut generation: serde_json::Value = serde_json::from_slice(fx.generation).unwrap();
    generation["num_beams"] = 3.into();
    generation["no_repeat_ngram_size"] = 2.into();
    generation["max_new_tokens"] = 7.into();
    let mut configured = WasmCaptioner::new(
        fx.config,
        whole(fx.weights),
        &fx.tokenizer,
        fx.preprocessor,
        Some(generation.to_string().into_bytes()),
        None,
        None,
        None,
        None,
    )
    .unwrap();
    let mut plain = new_captioner(fx, fx.weights).unwrap();
    let defaults = configured.generation_defaults().unwrap();
    let get = |k: &str| js_sys::Reflect::get(&defaults, &k.into()).unwrap();
    assert_eq!(get("numBeams").as_f64(), Some(3.0));
    assert_eq!(get("noRepeatNgramSize").as_f64(), Some(2.0));
    assert_eq!(get("doSample").as_bool(), Some(false));

    let with = |pairs: &[(&str, JsValue)]| {
        let o = js_sys::Object::new();
        for (k, v) in pairs {
            js_sys::Reflect::set(&o, &(*k).into(), v).unwrap();
        }
        JsValue::from(o)
    };
    // Streaming (one beam): the file's n-gram blocking and length apply.
    let greedy = configured.caption(image("astronaut.png"), with(&[])).unwrap();
    let explicit = plain.caption(image("astronaut.png"), with(&[("noRepeatNgramSize", 2.into()), ("maxNewTokens", 7.into())])).unwrap();
    assert_eq!(ids_of(&greedy), ids_of(&explicit));
    // ... and an option given overrides it.
    let overridden = configured.caption(image("astronaut.png"), with(&[("noRepeatNgramSize", 3.into())])).unwrap();
    let explicit3 = plain.caption(image("astronaut.png"), with(&[("noRepeatNgramSize", 3.into()), ("maxNewTokens", 7.into())])).unwrap();
    assert_eq!(ids_of(&overridden), ids_of(&explicit3));
    // beamSearch and captionMany without numBeams: the file's 3 beams.
    let beams = js_sys::Array::from(&configured.beam_search(Uint8Array::from(image("astronaut.png")).into(), with(&[]), None).unwrap());
    let explicit_beams = js_sys::Array::from(
        &plain
            .beam_search(Uint8Array::from(image("astronaut.png")).into(), with(&[("numBeams", 3.into()), ("maxNewTokens", 7.into())]), None)
            .unwrap(),
    );
    assert_eq!(ids_of(&beams.get(0)), ids_of(&explicit_beams.get(0)));
    let many = js_sys::Array::from(
        &configured.caption_many(js_sys::Array::of1(&js_sys::Uint8Array::from(image("astronaut.png"))), with(&[]), None).unwrap(),
    );
    assert!(js_sys::Reflect::get(&many.get(0), &"sequences".into()).unwrap().is_object(), "captionMany ran beam search");
    assert_eq!(ids_of(&many.get(0)), ids_of(&explicit_beams.get(0)));
    let one_beam = js_sys::Array::from(
        &configured
            .caption_many(js_sys::Array::of1(&js_sys::Uint8Array::from(image("astronaut.png"))), with(&[("numBeams", 1.into())]), None)
            .unwrap(),
    );
    assert_eq!(ids_of(&one_beam.get(0)), ids_of(&greedy));
}

#[wasm_bindgen_test]
fn quantize_q8_keeps_the_embedded_models_captions() {
    macro_rules! model_file {
        ($file:literal) => {
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-cross-attention/", $file)).as_slice()
        };
    }
    let new = || {
        WasmCaptioner::new(
            model_file!("config.json"),
            whole(model_file!("model.safetensors")),
            model_file!("tokenizer.json"),
            model_file!("preprocessor_config.json"),
            Some(model_file!("generation_config.json").to_vec()),
            None,
            None,
            None,
            None,
        )
        .unwrap()
    };
    let (mut f32_model, mut q8) = (new(), new());
    assert_eq!(q8.quantize("q8_0").unwrap(), 15);
    let msg = message(q8.quantize("q3").err().unwrap());
    assert!(msg.contains("q8_0 or q4_0"), "{msg}");
    let sample: &[u8] = include_bytes!("../www/samples/shapes-test-1.png");
    let a = f32_model.caption(sample, JsValue::UNDEFINED).unwrap();
    let b = q8.caption(sample, JsValue::UNDEFINED).unwrap();
    assert_eq!(ids_of(&a), ids_of(&b));
}

/// The checkpoint formats through the constructor JS calls, streamed in one chunk a file and in
/// uneven chunks (tensors straddling the seams, files interleaved): `pytorch_model.bin` and a
/// sharded index give the captions of `model.safetensors`; a missing shard, a chunk of a file not
/// opened, an unknown weights name and a file that ends early are JS errors naming them.
#[wasm_bindgen_test]
fn streamed_weights_of_every_format_load_as_the_whole_file() {
    let fx = common::vit_gpt2();
    let build = |weights: WasmWeights| WasmCaptioner::new(fx.config, weights, &fx.tokenizer, fx.preprocessor, None, None, None, None, None);
    let caption = |c: &mut WasmCaptioner| ids_of(&c.caption(image("chelsea.jpg"), options(8)).unwrap());
    let want = caption(&mut build(whole(fx.weights)).unwrap());
    let bin = checkpoint("bin-f32/pytorch_model.bin");
    let shards = [
        ("model-00001-of-00003.safetensors", checkpoint("sharded-safetensors/model-00001-of-00003.safetensors")),
        ("model-00002-of-00003.safetensors", checkpoint("sharded-safetensors/model-00002-of-00003.safetensors")),
        ("model-00003-of-00003.safetensors", checkpoint("sharded-safetensors/model-00003-of-00003.safetensors")),
    ];
    let index = checkpoint("sharded-safetensors/model.safetensors.index.json");
    let index_name = Some("model.safetensors.index.json");
    for cut in [&one as &dyn Fn(&[u8]) -> Vec<Uint8Array>, &uneven] {
        assert_eq!(caption(&mut build(streamed(None, fx.weights, &[], cut)).unwrap()), want);
        // A zip under either name.
        for name in [Some("pytorch_model.bin"), None] {
            assert_eq!(caption(&mut build(streamed(name, bin, &[], cut)).unwrap()), want, "{name:?}");
        }
        assert_eq!(caption(&mut build(streamed(index_name, index, &shards, cut)).unwrap()), want);
        let msg = message(build(streamed(index_name, index, &shards[..2], cut)).err().unwrap());
        assert!(msg.contains("model-00003-of-00003.safetensors"), "{msg}");
        let msg = message(build(streamed(None, &fx.weights[..fx.weights.len() - 3], &[], cut)).err().unwrap());
        assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
    }
    let msg = message(WasmWeights::new(Some("weights.pt".into())).err().unwrap());
    assert!(msg.contains("weights.pt"), "{msg}");
    let mut weights = WasmWeights::new(None).unwrap();
    let msg = message(weights.push("model.safetensors", &Uint8Array::from(&fx.weights[..10])).err().unwrap());
    assert!(msg.contains("model.safetensors") && msg.contains("not opened"), "{msg}");
}
