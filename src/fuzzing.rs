//! The bodies of the fuzz targets: each takes untrusted bytes and must return — an error is
//! fine, a panic or an abort is a bug. `fuzz/fuzz_targets/*.rs` run them under libFuzzer
//! (`./build.sh fuzz`); `tests/fuzz_seeds.rs` runs them on the seed corpora and mutations of them
//! in every test run.

use image::RgbImage;
use serde_json::json;

use crate::loading::{ByteSource, ModelFiles};

/// A safetensors file: header length, JSON header, offsets, dtypes, shapes.
pub fn safetensors(data: &[u8]) {
    let _ = crate::loading::load_safetensors("model.safetensors", data, |n| n.to_string());
}

/// A sharded checkpoint's index (`weight_map`), then the shards it names, read from the input
/// itself (even shards: its first half, odd shards: the rest).
pub fn checkpoint_index(data: &[u8]) {
    const INDEX: &str = "model.safetensors.index.json";
    let Ok(names) = crate::loading::shard_names(INDEX, data) else { return };
    let (first, rest) = data.split_at(data.len() / 2);
    let halves: [&dyn ByteSource; 2] = [&first, &rest];
    let shards: Vec<(&str, &dyn ByteSource)> = names.iter().enumerate().map(|(i, n)| (n.as_str(), halves[i % 2])).collect();
    let _ = crate::loading::load_sharded(INDEX, data, &shards, |n| n.to_string());
}

/// A `pytorch_model.bin`: the zip directory, then the pickle run by the data-only machine.
pub fn torch_bin(data: &[u8]) {
    let _ = crate::loading::load_checkpoint_file("pytorch_model.bin", &data, |n| n.to_string());
}

/// Model construction from a folder whose `config.json`, `generation_config.json`,
/// `preprocessor_config.json` or `adapter_config.json` (byte 0 picks) is the rest of the input, the
/// other files those of `fixtures[byte 1]`: every family's config parsing, its checks against the
/// weights, and whatever is sized from the config.
pub fn model_files<'a>(data: &'a [u8], fixtures: &[ModelFiles<'a>]) {
    let [which, fixture, rest @ ..] = data else { return };
    let Some(files) = fixtures.get(*fixture as usize % fixtures.len().max(1)) else { return };
    let mut files = *files;
    match which % 4 {
        0 => files.config = rest,
        1 => files.generation = Some(rest),
        2 => files.preprocessor = rest,
        _ => match &mut files.adapter {
            Some(adapter) => adapter.config = rest,
            None => return,
        },
    }
    let _ = crate::Captioner::from_files(files);
}

/// `preprocessor_config.json`, then preprocessing an odd-sized photo with it (sizes, tiling,
/// filters, normalization).
pub fn preprocessor_config(data: &[u8]) {
    if let Ok(config) = crate::preprocess::PreprocessorConfig::from_json(data) {
        let photo = RgbImage::from_fn(37, 23, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 5) as u8]));
        let _ = config.preprocess(&photo);
    }
}

/// Tokenizer loading — `tokenizer.json`, or what it is built from when a folder lacks it (BERT's
/// `vocab.txt`; GPT-2's `vocab.json` + `merges.txt`, split at the first NUL), byte 0 picks — then
/// encoding and decoding with it.
pub fn tokenizer(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let json = match kind % 3 {
        0 => Ok(rest.to_vec()),
        1 => crate::tokenizer::bert_tokenizer_json(rest, None, None),
        _ => {
            let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            crate::tokenizer::gpt2_tokenizer_json(&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]), None, None)
        }
    };
    let Ok(tokenizer) = json.and_then(|j| crate::tokenizer::CaptionTokenizer::from_bytes(&j)) else { return };
    if let Ok(ids) = tokenizer.encode("A photo of a cat, [CLS] <image> données 😺", true) {
        let _ = tokenizer.decode(&ids, true);
        let _ = tokenizer.decode(&ids, false);
    }
    let _ = tokenizer.decode(&[0, 1, 2, u32::MAX], true);
}

/// A chat template (`chat_template.jinja` text, or `chat_template.json`; byte 0 picks), rendered
/// for an image turn as the prefix families render it.
pub fn chat_template(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let file = if kind % 2 == 0 { "chat_template.jinja" } else { "chat_template.json" };
    let Ok(template) = crate::chat::ChatTemplate::from_file(file, rest) else { return };
    let _ = template.render(&crate::chat::image_turn(Some("Describe the picture.")), true);
    let _ = template.render(&json!([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant"}]), false);
}

/// An image file: decoding (every format, the EXIF orientation), then a processor (SigLIP's,
/// at 32 px: the resampling paths are the same at any size, and a run stays fast).
pub fn image_decode(data: &[u8]) {
    if let Ok(rgb) = crate::preprocess::decode_image(data) {
        assert!(rgb.width() > 0 && rgb.height() > 0, "an empty image decoded");
        if let Ok(config) = crate::preprocess::PreprocessorConfig::from_json(br#"{"size": {"height": 32, "width": 32}}"#) {
            let _ = config.preprocess(&rgb);
        }
    }
}
