//! Weights as the hub ships them (tests/fixtures/make_checkpoint_fixtures.py): `pytorch_model.bin`
//! in f32 / f16 / bf16 (with an old GPT-2 upload's mask buffers), sharded safetensors and `.bin`
//! with their index, an index naming one shard — each gives the tensors of `model.safetensors`
//! (rounded to the file's precision) and the same captions. A `.bin` whose pickle calls
//! `os.system` or `builtins.eval` is refused by name; broken shards and truncated files are
//! errors that name the file and tensor. Runs natively and in headless Chromium.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::{checkpoint, image, max_abs_diff, vit_gpt2};
use wasmcap::loading::{ModelFiles, BIN_WEIGHTS, BIN_WEIGHTS_INDEX, WEIGHTS, WEIGHTS_INDEX};
use wasmcap::{CaptionOptions, Captioner, Error};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;
#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

const BIN_F32: &str = "bin-f32/pytorch_model.bin";
const BIN_F16: &str = "bin-f16/pytorch_model.bin";
const BIN_BF16: &str = "bin-bf16/pytorch_model.bin";

fn sharded_safetensors() -> (&'static [u8], Vec<(String, Vec<u8>)>) {
    let shards = [
        ("model-00001-of-00003.safetensors", checkpoint("sharded-safetensors/model-00001-of-00003.safetensors")),
        ("model-00002-of-00003.safetensors", checkpoint("sharded-safetensors/model-00002-of-00003.safetensors")),
        ("model-00003-of-00003.safetensors", checkpoint("sharded-safetensors/model-00003-of-00003.safetensors")),
    ];
    (checkpoint("sharded-safetensors/model.safetensors.index.json"), shards.iter().map(|(n, b)| (n.to_string(), b.to_vec())).collect())
}

fn sharded_bin() -> (&'static [u8], Vec<(String, Vec<u8>)>) {
    let shards = [
        ("pytorch_model-00001-of-00002.bin", checkpoint("sharded-bin-f16/pytorch_model-00001-of-00002.bin")),
        ("pytorch_model-00002-of-00002.bin", checkpoint("sharded-bin-f16/pytorch_model-00002-of-00002.bin")),
    ];
    (checkpoint("sharded-bin-f16/pytorch_model.bin.index.json"), shards.iter().map(|(n, b)| (n.to_string(), b.to_vec())).collect())
}

fn single_shard() -> (&'static [u8], Vec<(String, Vec<u8>)>) {
    let shard = "model-00001-of-00001.safetensors";
    (
        checkpoint("single-shard/model.safetensors.index.json"),
        vec![(shard.to_string(), checkpoint("single-shard/model-00001-of-00001.safetensors").to_vec())],
    )
}

fn tensors(files: &ModelFiles<'_>) -> wasmcap::Result<HashMap<String, Tensor>> {
    files.tensors(|n| n.to_string())
}

fn rounded(t: &Tensor, dtype: DType) -> Vec<f32> {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Every tensor of `model.safetensors`, rounded to `dtype`, is in `got` with the same values; what
/// else `got` holds is only the legacy GPT-2 buffers.
fn assert_same_tensors(label: &str, got: &HashMap<String, Tensor>, dtype: DType) {
    let fx = vit_gpt2();
    let want = wasmcap::loading::load_safetensors(WEIGHTS, fx.weights, |n| n.to_string()).unwrap();
    for (name, t) in &want {
        let ours = got.get(name).unwrap_or_else(|| panic!("{label}: no `{name}`"));
        assert_eq!(ours.dims(), t.dims(), "{label}: {name}");
        assert!(rounded(ours, DType::F32) == rounded(t, dtype), "{label}: `{name}` differs");
    }
    for name in got.keys().filter(|n| !want.contains_key(*n)) {
        // An old upload's mask buffers, and a tied LM head saved as the embedding it shares.
        let tied = name == "decoder.lm_head.weight" && rounded(&got[name], DType::F32) == rounded(&want["decoder.transformer.wte.weight"], dtype);
        assert!(tied || name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"), "{label}: unexpected `{name}`");
    }
}

#[test]
fn every_checkpoint_format_gives_the_tensors_of_model_safetensors() {
    let fx = vit_gpt2();
    let single = |name, weights| ModelFiles { weights, weights_name: name, ..fx.files() };
    for (label, weights, dtype) in
        [("bin f32", checkpoint(BIN_F32), DType::F32), ("bin f16", checkpoint(BIN_F16), DType::F16), ("bin bf16", checkpoint(BIN_BF16), DType::BF16)]
    {
        // In WASM the JS shim hands any single file over as the weights: the bytes say which.
        for name in [BIN_WEIGHTS, WEIGHTS] {
            assert_same_tensors(label, &tensors(&single(name, weights)).unwrap(), dtype);
        }
    }
    let bin = tensors(&single(BIN_WEIGHTS, checkpoint(BIN_F32))).unwrap();
    let mask = &bin["decoder.transformer.h.0.attn.bias"];
    assert_eq!((mask.dtype(), mask.dims().len()), (DType::U8, 4), "a bool buffer keeps its bytes");

    for (label, (index, shards), name, dtype) in [
        ("sharded safetensors", sharded_safetensors(), WEIGHTS_INDEX, DType::F32),
        ("sharded bin", sharded_bin(), BIN_WEIGHTS_INDEX, DType::F16),
        ("single shard", single_shard(), WEIGHTS_INDEX, DType::F16),
    ] {
        let files = ModelFiles { weights: index, weights_name: name, shards: &shards, ..fx.files() };
        assert_same_tensors(label, &tensors(&files).unwrap(), dtype);
    }
}

#[test]
fn f32_checkpoints_caption_as_model_safetensors_does() {
    let fx = vit_gpt2();
    let reference = Captioner::from_files(fx.files()).unwrap();
    let pixels = reference.pixel_values_from_bytes(image("chelsea.jpg")).unwrap();
    let ids = |c: &Captioner| c.caption(&pixels, &CaptionOptions { max_new_tokens: Some(12), ..Default::default() }, |_| {}).unwrap().token_ids;
    let logits = |c: &Captioner| c.first_step_logits(&pixels, &CaptionOptions::default()).unwrap();
    let (index, shards) = sharded_safetensors();
    for (label, files) in [
        ("pytorch_model.bin", ModelFiles { weights: checkpoint(BIN_F32), weights_name: BIN_WEIGHTS, ..fx.files() }),
        ("sharded safetensors", ModelFiles { weights: index, weights_name: WEIGHTS_INDEX, shards: &shards, ..fx.files() }),
    ] {
        let model = Captioner::from_files(files).unwrap();
        assert_eq!(max_abs_diff(&logits(&model), &logits(&reference)), 0.0, "{label}");
        assert_eq!(ids(&model), ids(&reference), "{label}");
    }
    // Half precision loads and captions (its own ids: the weights are rounded).
    let half = Captioner::from_files(ModelFiles { weights: checkpoint(BIN_BF16), weights_name: BIN_WEIGHTS, ..fx.files() }).unwrap();
    assert!(!ids(&half).is_empty());
}

fn load_err(files: ModelFiles<'_>) -> Error {
    match Captioner::from_files(files) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    }
}

#[test]
fn a_pickle_that_calls_anything_but_the_tensor_rebuild_is_refused() {
    let fx = vit_gpt2();
    for (weights, global) in
        [(checkpoint("evil-system/pytorch_model.bin"), "posix.system"), (checkpoint("evil-eval/pytorch_model.bin"), "__builtin__.eval")]
    {
        let msg = load_err(ModelFiles { weights, weights_name: BIN_WEIGHTS, ..fx.files() }).to_string();
        assert!(msg.contains(BIN_WEIGHTS) && msg.contains(&format!("`{global}`")), "{msg}");
    }
    #[cfg(not(target_arch = "wasm32"))]
    assert!(!std::path::Path::new("PWNED").exists(), "the pickle's command ran");
}

#[test]
fn broken_checkpoints_are_errors_that_name_the_file_and_tensor() {
    let fx = vit_gpt2();
    // Truncated anywhere: an error, never a panic.
    for len in [0, 3, 4, 100, 1000, checkpoint(BIN_F16).len() / 2, checkpoint(BIN_F16).len() - 30, checkpoint(BIN_F16).len() - 1] {
        let e = load_err(ModelFiles { weights: &checkpoint(BIN_F16)[..len], weights_name: BIN_WEIGHTS, ..fx.files() });
        assert!(matches!(&e, Error::TorchCheckpoint { file, .. } | Error::Safetensors { file, .. } if file == BIN_WEIGHTS), "{len}: {e}");
    }
    // A shard missing.
    let (index, mut shards) = sharded_safetensors();
    let gone = shards.remove(1).0;
    let e = load_err(ModelFiles { weights: index, weights_name: WEIGHTS_INDEX, shards: &shards, ..fx.files() });
    assert!(matches!(&e, Error::MissingFile(m) if m.contains(&gone) && m.contains('`')), "{e}");

    // The index puts a tensor in a shard that does not hold it.
    let (index, shards) = sharded_safetensors();
    let mut value: serde_json::Value = serde_json::from_slice(index).unwrap();
    let map = value["weight_map"].as_object_mut().unwrap();
    let (tensor, shard) = map.iter().map(|(t, s)| (t.clone(), s.as_str().unwrap().to_string())).next().unwrap();
    let other = shards.iter().map(|(n, _)| n.clone()).find(|n| *n != shard).unwrap();
    map.insert(tensor.clone(), other.clone().into());
    let index = value.to_string().into_bytes();
    let e = load_err(ModelFiles { weights: &index, weights_name: WEIGHTS_INDEX, shards: &shards, ..fx.files() });
    assert!(matches!(&e, Error::MissingTensor { file, name } if file.contains(&other) && *name == tensor), "{e}");

    // A shard name that is a path, and an index that is not one.
    let bad = serde_json::json!({ "weight_map": { tensor.clone(): "../model.safetensors" } }).to_string().into_bytes();
    let e = load_err(ModelFiles { weights: &bad, weights_name: WEIGHTS_INDEX, shards: &shards, ..fx.files() });
    assert!(e.to_string().contains("not a file name"), "{e}");
    let e = load_err(ModelFiles { weights: b"{}", weights_name: WEIGHTS_INDEX, shards: &shards, ..fx.files() });
    assert!(e.to_string().contains("weight_map"), "{e}");
}

/// A folder as the hub has it: transformers' order of preference among the weight files.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn a_folder_loads_whichever_weights_it_has_safetensors_first() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = std::env::temp_dir().join(format!("wasmcap-checkpoints-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(src.join("tiny-vit-gpt2")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != WEIGHTS {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let reference = Captioner::from_dir(src.join("tiny-vit-gpt2"), None).unwrap();
    let pixels = reference.pixel_values_from_bytes(image("astronaut.png")).unwrap();
    let logits = |c: &Captioner| c.first_step_logits(&pixels, &CaptionOptions::default()).unwrap();
    let copy_all = |from: &str| {
        for entry in std::fs::read_dir(src.join("checkpoints").join(from)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    };

    // No weights at all: the error lists what was looked for.
    let e = Captioner::from_dir(&dir, None).err().unwrap().to_string();
    assert!(e.contains(WEIGHTS) && e.contains(BIN_WEIGHTS_INDEX), "{e}");
    // pytorch_model.bin alone (bf16: other logits than the f32 reference).
    copy_all("bin-bf16");
    let bf16 = logits(&Captioner::from_dir(&dir, None).unwrap());
    assert!(max_abs_diff(&bf16, &logits(&reference)) > 0.0);
    // A sharded safetensors index beside it wins.
    copy_all("sharded-safetensors");
    assert_eq!(max_abs_diff(&logits(&Captioner::from_dir(&dir, None).unwrap()), &logits(&reference)), 0.0);
    // A missing shard is named.
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let e = Captioner::from_dir(&dir, None).err().unwrap().to_string();
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");
    // model.safetensors wins over everything.
    std::fs::copy(src.join("tiny-vit-gpt2").join(WEIGHTS), dir.join(WEIGHTS)).unwrap();
    assert_eq!(max_abs_diff(&logits(&Captioner::from_dir(&dir, None).unwrap()), &logits(&reference)), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A safetensors file as it streams in (`SafetensorsStream`: what WASM does with `fetch`'s
/// chunks): in chunks of any size, its length known or not, the tensors are those of the whole
/// file, bit for bit; cut short anywhere it is an error naming the file, never a panic; a header
/// whose tensors overlap is refused before any byte of them is read.
#[test]
fn a_safetensors_file_streamed_in_chunks_gives_the_tensors_of_the_whole_file() {
    use wasmcap::loading::SafetensorsStream;
    let fx = vit_gpt2();
    let bytes = fx.weights;
    let want = wasmcap::loading::load_safetensors_from(WEIGHTS, &bytes, |n| n.to_string()).unwrap();
    let stream = |data: &[u8], chunk: usize, len: Option<usize>| -> wasmcap::Result<HashMap<String, Tensor>> {
        let mut s = SafetensorsStream::new(WEIGHTS, len);
        for piece in data.chunks(chunk) {
            s.push(piece.len(), |from, into| wasmcap::loading::write_bytes(into, &piece[from..from + into.len()]))?;
        }
        s.finish()
    };
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for chunk in [1, 7, 4093, 65536, bytes.len()] {
        for len in [None, Some(bytes.len())] {
            let got = stream(bytes, chunk, len).unwrap();
            assert_eq!(got.len(), want.len());
            for (name, t) in &want {
                assert_eq!((got[name].dtype(), got[name].dims()), (t.dtype(), t.dims()), "{name}");
                assert_eq!(bits(&got[name]), bits(t), "{name}, chunks of {chunk}");
            }
        }
    }
    for cut in [0, 5, 8, 100, bytes.len() / 3, bytes.len() - 1] {
        let e = stream(&bytes[..cut], 4093, None).err().unwrap();
        assert!(matches!(&e, Error::Safetensors { file, reason } if file == WEIGHTS && reason.contains("truncated")), "{cut}: {e}");
        // With the length known, a header reaching past it is refused before any tensor is made.
        if cut > 8 {
            let e = stream(&bytes[..cut], 4093, Some(cut)).err().unwrap();
            assert!(matches!(&e, Error::Safetensors { file, .. } if file == WEIGHTS), "{cut}: {e}");
        }
    }
    // Two tensors over the same bytes.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let names: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    let (a, b) = (&names[0], &names[1]);
    let (sa, sb) = (header[a]["data_offsets"][0].as_u64().unwrap(), header[b]["data_offsets"][0].as_u64().unwrap());
    let (first, second) = if sa < sb { (a.clone(), b.clone()) } else { (b.clone(), a.clone()) };
    let start = header[&first]["data_offsets"][0].clone();
    header[&second]["data_offsets"][0] = start;
    header[&second]["data_offsets"][1] = header[&first]["data_offsets"][1].clone();
    header[&second]["shape"] = header[&first]["shape"].clone();
    header[&second]["dtype"] = header[&first]["dtype"].clone();
    let text = header.to_string();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(text.as_bytes());
    file.extend_from_slice(&bytes[8 + header_len..]);
    let e = stream(&file[..8 + text.len()], 4093, None).err().unwrap();
    assert!(matches!(&e, Error::Safetensors { file, reason } if file == WEIGHTS && reason.contains("offset")), "{e}");
}

/// A checkpoint streamed in as the JS shim does it (`loading::StreamedCheckpoint`, here over
/// chunks in memory): every format, files cut into uneven chunks (an empty one among them) and
/// interleaved, gives the tensors of the whole files bit for bit; a refused chunk fails the
/// checkpoint for good, and misuse is an error that names the file.
#[test]
fn a_checkpoint_streamed_file_by_file_in_chunks_gives_the_tensors_of_the_whole_files() {
    use wasmcap::loading::StreamedCheckpoint;
    let fx = vit_gpt2();
    let uneven = |bytes: &[u8]| {
        let (mut out, mut at, mut i) = (Vec::new(), 0, 0);
        while at < bytes.len() {
            let n = [1usize, 0, 4093, 65536, 2, 100_003][i % 6].min(bytes.len() - at);
            out.push(bytes[at..at + n].to_vec());
            at += n;
            i += 1;
        }
        out
    };
    let whole = |bytes: &[u8]| vec![bytes.to_vec()];
    let streamed = |name: &str, files: &[(&str, &[u8])], cut: &dyn Fn(&[u8]) -> Vec<Vec<u8>>| {
        let mut checkpoint = StreamedCheckpoint::<Vec<u8>>::new(Some(name)).unwrap();
        let chunks: Vec<(&str, Vec<Vec<u8>>)> = files.iter().map(|(n, b)| (*n, cut(b))).collect();
        for (file, _) in &chunks {
            checkpoint.open(file, None).unwrap();
        }
        for i in 0..chunks.iter().map(|(_, c)| c.len()).max().unwrap_or(0) {
            for (file, chunks) in &chunks {
                if let Some(chunk) = chunks.get(i) {
                    checkpoint.push(file, chunk)?;
                }
            }
        }
        checkpoint.tensors(|n| n.to_string())
    };
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let same = |label: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>| {
        assert_eq!(got.len(), want.len(), "{label}");
        for (name, t) in want {
            assert_eq!((got[name].dtype(), got[name].dims(), bits(&got[name])), (t.dtype(), t.dims(), bits(t)), "{label}: {name}");
        }
    };
    let (index, shards) = sharded_safetensors();
    let (bin_index, bin_shards) = sharded_bin();
    let shard_files = |shards: &[(String, Vec<u8>)]| shards.iter().map(|(n, b)| (n.clone(), b.clone())).collect::<Vec<_>>();
    let cases: [(&str, &str, &[u8], Vec<(String, Vec<u8>)>); 5] = [
        ("safetensors", WEIGHTS, fx.weights, vec![]),
        ("bin", BIN_WEIGHTS, checkpoint(BIN_F16), vec![]),
        ("a zip named model.safetensors", WEIGHTS, checkpoint(BIN_BF16), vec![]),
        ("sharded safetensors", WEIGHTS_INDEX, index, shard_files(&shards)),
        ("sharded bin", BIN_WEIGHTS_INDEX, bin_index, shard_files(&bin_shards)),
    ];
    for (label, name, weights, shards) in &cases {
        let files = ModelFiles { weights, weights_name: name, shards, ..fx.files() };
        let want = tensors(&files).unwrap();
        let mut all: Vec<(&str, &[u8])> = vec![(*name, *weights)];
        all.extend(shards.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        for cut in [&whole as &dyn Fn(&[u8]) -> Vec<Vec<u8>>, &uneven] {
            same(label, &streamed(name, &all, cut).unwrap(), &want);
        }
        if !shards.is_empty() {
            let e = streamed(name, &all[..all.len() - 1], &uneven).err().unwrap();
            assert!(matches!(&e, Error::MissingFile(f) if f.contains(&shards[shards.len() - 1].0)), "{label}: {e}");
        }
    }
    let e = streamed(WEIGHTS, &[(WEIGHTS, &fx.weights[..fx.weights.len() - 3])], &uneven).err().unwrap();
    assert!(matches!(&e, Error::Safetensors { file, reason } if file == WEIGHTS && reason.contains("truncated")), "{e}");
    let e = streamed(BIN_WEIGHTS, &[(BIN_WEIGHTS, fx.weights)], &uneven).err().unwrap();
    assert!(matches!(&e, Error::TorchCheckpoint { file, reason } if file == BIN_WEIGHTS && reason.contains("not a zip")), "{e}");

    // A header that is not JSON is refused as its chunk arrives, and so is every later chunk.
    let mut broken = fx.weights.to_vec();
    broken[8] = b'!';
    let mut checkpoint = StreamedCheckpoint::<Vec<u8>>::new(None).unwrap();
    checkpoint.open(WEIGHTS, None).unwrap();
    let first = checkpoint.push(WEIGHTS, &broken[..1 << 16]).err().unwrap();
    assert!(matches!(&first, Error::Safetensors { file, .. } if file == WEIGHTS), "{first}");
    let later = checkpoint.push(WEIGHTS, &broken[1 << 16..]).err().unwrap();
    assert!(later.to_string().contains("refused") && later.to_string().contains(&first.to_string()), "{later}");
    let e = checkpoint.tensors(|n| n.to_string()).err().unwrap();
    assert!(e.to_string().contains(&first.to_string()), "{e}");

    let e = StreamedCheckpoint::<Vec<u8>>::new(Some("weights.pt")).err().unwrap();
    assert!(e.to_string().contains("weights.pt") && e.to_string().contains(WEIGHTS), "{e}");
    let mut checkpoint = StreamedCheckpoint::<Vec<u8>>::new(None).unwrap();
    let e = checkpoint.push(WEIGHTS, &fx.weights[..10]).err().unwrap();
    assert!(matches!(&e, Error::Stream { file, reason } if file == WEIGHTS && reason.contains("not opened")), "{e}");
    let mut checkpoint = StreamedCheckpoint::<Vec<u8>>::new(None).unwrap();
    checkpoint.open(WEIGHTS, None).unwrap();
    let e = checkpoint.open(WEIGHTS, None).err().unwrap();
    assert!(matches!(&e, Error::Stream { file, reason } if file == WEIGHTS && reason.contains("twice")), "{e}");
    let e = StreamedCheckpoint::<Vec<u8>>::new(None).unwrap().tensors(|n| n.to_string()).err().unwrap();
    assert!(matches!(&e, Error::MissingFile(f) if f == WEIGHTS), "{e}");
}

/// The `quantize` command on a ViT-GPT2 checkpoint: ViT's matrices (`query`, `key`, `value`,
/// `attention.output.dense`, `intermediate.dense`, `output.dense`) become q8_0 with GPT-2's, so
/// the encoder is not shipped in f32; the file loads as it is, first-step logits close to f32's.
#[test]
fn a_quantized_vit_gpt2_file_holds_its_encoder_in_8_bits() {
    let fx = vit_gpt2();
    let config: serde_json::Value = serde_json::from_slice(fx.config).unwrap();
    let (bytes, report) = wasmcap::quantize::quantize_checkpoint(&config, fx.weights).unwrap();
    let layers = config["encoder"]["num_hidden_layers"].as_u64().unwrap();
    for layer in 0..layers {
        for module in [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ] {
            let name = format!("encoder.encoder.layer.{layer}.{module}.weight");
            assert!(report.q8_0.contains(&name), "{name} not quantized: {report:?}");
        }
    }
    assert!(report.kept_f32.is_empty(), "{report:?}");
    let f32_model = Captioner::from_files(fx.files()).unwrap();
    let q = Captioner::from_files(ModelFiles { weights: &bytes, ..fx.files() }).unwrap();
    let pixels = f32_model.pixel_values_from_bytes(image("chelsea.jpg")).unwrap();
    let logits = |m: &Captioner| m.first_step_logits(&pixels, &CaptionOptions::default()).unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (logits(&f32_model), logits(&q));
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    let spread = (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / spread;
    let ids = |m: &Captioner| m.caption(&pixels, &CaptionOptions::default(), |_| {}).unwrap().token_ids;
    eprintln!(
        "ViT-GPT2 quantized file: {} → {} bytes; logits max |Δ| / std = {worst:.4}; greedy ids equal to f32: {}",
        fx.weights.len(),
        bytes.len(),
        ids(&f32_model) == ids(&q)
    );
    assert!(worst > 0.0 && worst < 0.1, "logits error {worst}");
}
