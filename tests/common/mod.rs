//! Fixture access shared by the native and the browser test runs. Everything is embedded with
//! `include_bytes!`, so the same tests run under `cargo test` and in headless Chromium.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::Tensor;
use wasmcap::loading::{self, ModelFiles};

macro_rules! fixture_file {
    ($($path:expr),+) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/", $($path),+)).as_slice()
    };
}

/// Tolerances of the fidelity checks: pixel values (max-abs) and model outputs (max-abs).
pub const PIXEL_TOL: f32 = 2e-2;
pub const STATE_TOL: f32 = 1e-3;

/// Prints a measured figure; in the browser it goes to the console (`--nocapture` shows it).
pub fn report(what: &str, value: f32) {
    #[cfg(target_arch = "wasm32")]
    web_sys::console::log_1(&format!("{what}: {value:.3e}").into());
    #[cfg(not(target_arch = "wasm32"))]
    println!("{what}: {value:.3e}");
}

pub struct Fixture {
    pub name: &'static str,
    pub config: &'static [u8],
    pub weights: &'static [u8],
    pub tokenizer: std::borrow::Cow<'static, [u8]>,
    pub preprocessor: &'static [u8],
    pub generation: &'static [u8],
    reference_tensors: &'static [u8],
    reference_json: &'static [u8],
}

macro_rules! fixture {
    ($name:literal) => {
        Fixture {
            name: $name,
            config: fixture_file!($name, "/config.json"),
            weights: fixture_file!($name, "/model.safetensors"),
            tokenizer: std::borrow::Cow::Borrowed(fixture_file!($name, "/tokenizer.json")),
            preprocessor: fixture_file!($name, "/preprocessor_config.json"),
            generation: fixture_file!($name, "/generation_config.json"),
            reference_tensors: fixture_file!("reference/", $name, ".safetensors"),
            reference_json: fixture_file!("reference/", $name, ".json"),
        }
    };
}

/// The ViT + GPT-2 folder as nlpconnect/vit-gpt2-image-captioning ships it: no tokenizer.json,
/// GPT-2's vocab.json + merges.txt instead (tests/fixtures/make_vit_fixtures.py).
pub fn vit_gpt2() -> Fixture {
    let tokenizer = wasmcap::tokenizer::gpt2_tokenizer_json(
        fixture_file!("tiny-vit-gpt2/vocab.json"),
        fixture_file!("tiny-vit-gpt2/merges.txt"),
        Some(fixture_file!("tiny-vit-gpt2/tokenizer_config.json")),
        Some(fixture_file!("tiny-vit-gpt2/special_tokens_map.json")),
    )
    .unwrap();
    Fixture {
        name: "tiny-vit-gpt2",
        config: fixture_file!("tiny-vit-gpt2/config.json"),
        weights: fixture_file!("tiny-vit-gpt2/model.safetensors"),
        tokenizer: std::borrow::Cow::Owned(tokenizer),
        preprocessor: fixture_file!("tiny-vit-gpt2/preprocessor_config.json"),
        generation: fixture_file!("tiny-vit-gpt2/generation_config.json"),
        reference_tensors: fixture_file!("reference/tiny-vit-gpt2.safetensors"),
        reference_json: fixture_file!("reference/tiny-vit-gpt2.json"),
    }
}

/// Saved by transformers 5.x (SigLIP, f16 weights, tied lm_head, enc_to_dec_proj), by
/// transformers 4.x (SigLIP, f32, untied lm_head, no projection, scale_attn_by_inverse_layer_idx),
/// and ViT + GPT-2 in nlpconnect's layout.
pub fn fixtures() -> Vec<Fixture> {
    vec![fixture!("tiny-ved-v5"), fixture!("tiny-ved-v4"), vit_gpt2()]
}

pub const IMAGES: [(&str, &[u8]); 5] = [
    ("astronaut.png", fixture_file!("images/astronaut.png")),
    ("chelsea.jpg", fixture_file!("images/chelsea.jpg")),
    ("coffee_rgba.png", fixture_file!("images/coffee_rgba.png")),
    ("coffee_gray.png", fixture_file!("images/coffee_gray.png")),
    ("coffee_rgb16.png", fixture_file!("images/coffee_rgb16.png")),
];

/// The photos with full references (encoder states, logits, greedy ids).
pub const PHOTOS: [&str; 2] = ["astronaut.png", "chelsea.jpg"];

/// The weight files of tests/fixtures/checkpoints (make_checkpoint_fixtures.py), by their path
/// under it.
pub const CHECKPOINTS: [(&str, &[u8]); 14] = [
    ("bin-f32/pytorch_model.bin", fixture_file!("checkpoints/bin-f32/pytorch_model.bin")),
    ("bin-f16/pytorch_model.bin", fixture_file!("checkpoints/bin-f16/pytorch_model.bin")),
    ("bin-bf16/pytorch_model.bin", fixture_file!("checkpoints/bin-bf16/pytorch_model.bin")),
    ("sharded-safetensors/model.safetensors.index.json", fixture_file!("checkpoints/sharded-safetensors/model.safetensors.index.json")),
    ("sharded-safetensors/model-00001-of-00003.safetensors", fixture_file!("checkpoints/sharded-safetensors/model-00001-of-00003.safetensors")),
    ("sharded-safetensors/model-00002-of-00003.safetensors", fixture_file!("checkpoints/sharded-safetensors/model-00002-of-00003.safetensors")),
    ("sharded-safetensors/model-00003-of-00003.safetensors", fixture_file!("checkpoints/sharded-safetensors/model-00003-of-00003.safetensors")),
    ("sharded-bin-f16/pytorch_model.bin.index.json", fixture_file!("checkpoints/sharded-bin-f16/pytorch_model.bin.index.json")),
    ("sharded-bin-f16/pytorch_model-00001-of-00002.bin", fixture_file!("checkpoints/sharded-bin-f16/pytorch_model-00001-of-00002.bin")),
    ("sharded-bin-f16/pytorch_model-00002-of-00002.bin", fixture_file!("checkpoints/sharded-bin-f16/pytorch_model-00002-of-00002.bin")),
    ("single-shard/model.safetensors.index.json", fixture_file!("checkpoints/single-shard/model.safetensors.index.json")),
    ("single-shard/model-00001-of-00001.safetensors", fixture_file!("checkpoints/single-shard/model-00001-of-00001.safetensors")),
    ("evil-system/pytorch_model.bin", fixture_file!("checkpoints/evil-system/pytorch_model.bin")),
    ("evil-eval/pytorch_model.bin", fixture_file!("checkpoints/evil-eval/pytorch_model.bin")),
];

pub fn checkpoint(path: &str) -> &'static [u8] {
    CHECKPOINTS.iter().find(|(p, _)| *p == path).map(|(_, b)| *b).unwrap()
}

/// An odd-sized portrait crop of chelsea.jpg (the Idefics3 fixtures' third photo).
pub const PORTRAIT: (&str, &[u8]) = ("chelsea_portrait.png", fixture_file!("images/chelsea_portrait.png"));

pub fn image(name: &str) -> &'static [u8] {
    IMAGES.iter().chain([&PORTRAIT]).find(|(n, _)| *n == name).map(|(_, b)| *b).unwrap()
}

pub const TOKENIZER_SAMPLES: &[u8] = fixture_file!("gpt2-tokenizer/tokenizer_samples.json");

impl Fixture {
    pub fn files(&self) -> ModelFiles<'_> {
        ModelFiles {
            config: self.config,
            weights: self.weights,
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: &self.tokenizer,
            preprocessor: self.preprocessor,
            generation: Some(self.generation),
            chat_template: None,
            adapter: None,
        }
    }

    pub fn reference_tensors(&self) -> HashMap<String, Tensor> {
        loading::load_safetensors("reference", self.reference_tensors, |n| n.to_string()).unwrap()
    }

    pub fn reference(&self) -> serde_json::Value {
        serde_json::from_slice(self.reference_json).unwrap()
    }

    pub fn greedy_ids(&self, image: &str) -> Vec<u32> {
        let r = self.reference();
        r["images"][image]["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }

    pub fn greedy_text(&self, image: &str) -> String {
        self.reference()["images"][image]["text"].as_str().unwrap().to_string()
    }

    pub fn max_new_tokens(&self) -> usize {
        self.reference()["max_new_tokens"].as_u64().unwrap() as usize
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Rewrites a safetensors buffer: `edit` may drop or replace tensors (for bad-input tests).
pub fn edit_safetensors(bytes: &[u8], edit: impl Fn(&str, Tensor) -> Option<Tensor>) -> Vec<u8> {
    let tensors = loading::load_safetensors("edit", bytes, |n| n.to_string()).unwrap();
    let mut kept: Vec<(String, Tensor)> = tensors.into_iter().filter_map(|(n, t)| edit(&n, t).map(|t| (n, t))).collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = kept
        .iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), t.dims().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, bytes, shape)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A prefix-model (Llava + SmolLM-shaped Llama) case from tests/fixtures/make_prefix_fixtures.py.
pub struct PrefixCase {
    pub name: &'static str,
    pub config: &'static [u8],
    pub weights: &'static [u8],
    pub tokenizer: &'static [u8],
    pub preprocessor: &'static [u8],
    pub generation: &'static [u8],
    pub adapter: Option<(&'static [u8], &'static [u8])>,
    reference_tensors: &'static [u8],
    reference_json: &'static [u8],
}

macro_rules! prefix_case {
    ($case:literal, $dir:literal, $adapter:expr) => {
        PrefixCase {
            name: $case,
            config: fixture_file!("prefix/", $dir, "/config.json"),
            weights: fixture_file!("prefix/", $dir, "/model.safetensors"),
            tokenizer: fixture_file!("prefix/", $dir, "/tokenizer.json"),
            preprocessor: fixture_file!("prefix/", $dir, "/preprocessor_config.json"),
            generation: fixture_file!("prefix/", $dir, "/generation_config.json"),
            adapter: $adapter,
            reference_tensors: fixture_file!("prefix/reference/", $case, ".safetensors"),
            reference_json: fixture_file!("prefix/reference/", $case, ".json"),
        }
    };
}

pub const LORA_R4: (&[u8], &[u8]) = (fixture_file!("prefix/lora-r4/adapter_config.json"), fixture_file!("prefix/lora-r4/adapter_model.safetensors"));
pub const LORA_RS8: (&[u8], &[u8]) =
    (fixture_file!("prefix/lora-rs8/adapter_config.json"), fixture_file!("prefix/lora-rs8/adapter_model.safetensors"));
pub const PREFIX_TOKENIZER_SAMPLES: &[u8] = fixture_file!("prefix/tokenizer/tokenizer_samples.json");

/// Base saved by transformers 5.x and 4.x, base + LoRA merged ahead, base + PEFT adapters
/// merged at load (references from PEFT's unmerged model).
pub fn prefix_cases() -> Vec<PrefixCase> {
    vec![
        prefix_case!("base-v5", "tiny-llava-base-v5", None),
        prefix_case!("base-v4", "tiny-llava-base-v4", None),
        prefix_case!("merged-v5", "tiny-llava-merged-v5", None),
        prefix_case!("base-v5+lora-r4", "tiny-llava-base-v5", Some(LORA_R4)),
        prefix_case!("base-v5+lora-rs8", "tiny-llava-base-v5", Some(LORA_RS8)),
    ]
}

/// The two prompts of the prefix references: (key, text after `<image>`).
pub const PREFIX_PROMPTS: [(&str, Option<&str>); 2] = [("noprompt", None), ("prompt", Some("a photo of"))];

impl PrefixCase {
    pub fn files(&self) -> ModelFiles<'_> {
        ModelFiles {
            config: self.config,
            weights: self.weights,
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: &self.tokenizer,
            preprocessor: self.preprocessor,
            generation: Some(self.generation),
            chat_template: None,
            adapter: self.adapter.map(|(config, weights)| wasmcap::lora::AdapterFiles { config, weights }),
        }
    }

    pub fn reference_tensors(&self) -> HashMap<String, Tensor> {
        loading::load_safetensors("reference", self.reference_tensors, |n| n.to_string()).unwrap()
    }

    pub fn reference(&self) -> serde_json::Value {
        serde_json::from_slice(self.reference_json).unwrap()
    }

    pub fn input_ids(&self, prompt_key: &str) -> Vec<u32> {
        ids(&self.reference()["input_ids"][prompt_key])
    }

    pub fn greedy_ids(&self, image: &str, prompt_key: &str) -> Vec<u32> {
        ids(&self.reference()["images"][image][prompt_key]["greedy_ids"])
    }

    pub fn greedy_text(&self, image: &str, prompt_key: &str) -> String {
        self.reference()["images"][image][prompt_key]["text"].as_str().unwrap().to_string()
    }
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// The Idefics3 / SmolVLM folder (tests/fixtures/make_idefics3_fixtures.py) and its reference.
pub struct Smolvlm {
    pub config: &'static [u8],
    pub weights: &'static [u8],
    pub tokenizer: &'static [u8],
    pub preprocessor: &'static [u8],
    pub generation: &'static [u8],
    pub chat_template: &'static [u8],
    reference_tensors: &'static [u8],
    reference_json: &'static [u8],
}

pub fn smolvlm() -> Smolvlm {
    Smolvlm {
        config: fixture_file!("idefics3/tiny-smolvlm/config.json"),
        weights: fixture_file!("idefics3/tiny-smolvlm/model.safetensors"),
        tokenizer: fixture_file!("idefics3/tiny-smolvlm/tokenizer.json"),
        preprocessor: fixture_file!("idefics3/tiny-smolvlm/preprocessor_config.json"),
        generation: fixture_file!("idefics3/tiny-smolvlm/generation_config.json"),
        chat_template: fixture_file!("idefics3/tiny-smolvlm/chat_template.jinja"),
        reference_tensors: fixture_file!("idefics3/reference.safetensors"),
        reference_json: fixture_file!("idefics3/reference.json"),
    }
}

impl Smolvlm {
    /// The folder's files; `preprocessor` in place of its own when given.
    pub fn files<'a>(&'a self, preprocessor: Option<&'a [u8]>) -> ModelFiles<'a> {
        ModelFiles {
            config: self.config,
            weights: self.weights,
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: self.tokenizer,
            preprocessor: preprocessor.unwrap_or(self.preprocessor),
            generation: Some(self.generation),
            chat_template: Some((wasmcap::chat::CHAT_TEMPLATE_JINJA, self.chat_template)),
            adapter: None,
        }
    }

    pub fn reference(&self) -> serde_json::Value {
        serde_json::from_slice(self.reference_json).unwrap()
    }

    pub fn reference_tensors(&self) -> HashMap<String, Tensor> {
        loading::load_safetensors("reference", self.reference_tensors, |n| n.to_string()).unwrap()
    }
}

/// The BLIP folder (tests/fixtures/make_blip_fixtures.py) and its reference.
pub struct BlipFixture {
    pub config: &'static [u8],
    pub weights: &'static [u8],
    /// The same weights as transformers 4.57 saves them (`--v4` pass), and its greedy ids.
    pub weights_v4: &'static [u8],
    pub reference_v4: &'static [u8],
    pub tokenizer: &'static [u8],
    pub preprocessor: &'static [u8],
    pub generation: &'static [u8],
    reference_tensors: &'static [u8],
    reference_json: &'static [u8],
}

pub fn blip() -> BlipFixture {
    BlipFixture {
        config: fixture_file!("blip/tiny-blip/config.json"),
        weights: fixture_file!("blip/tiny-blip/model.safetensors"),
        weights_v4: fixture_file!("blip/tiny-blip-v4/model.safetensors"),
        reference_v4: fixture_file!("blip/reference-v4.json"),
        tokenizer: fixture_file!("blip/tiny-blip/tokenizer.json"),
        preprocessor: fixture_file!("blip/tiny-blip/preprocessor_config.json"),
        generation: fixture_file!("blip/tiny-blip/generation_config.json"),
        reference_tensors: fixture_file!("blip/reference.safetensors"),
        reference_json: fixture_file!("blip/reference.json"),
    }
}

impl BlipFixture {
    pub fn files(&self) -> ModelFiles<'_> {
        ModelFiles {
            config: self.config,
            weights: self.weights,
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: self.tokenizer,
            preprocessor: self.preprocessor,
            generation: Some(self.generation),
            chat_template: None,
            adapter: None,
        }
    }

    pub fn reference(&self) -> serde_json::Value {
        serde_json::from_slice(self.reference_json).unwrap()
    }

    pub fn reference_tensors(&self) -> HashMap<String, Tensor> {
        loading::load_safetensors("reference", self.reference_tensors, |n| n.to_string()).unwrap()
    }
}
