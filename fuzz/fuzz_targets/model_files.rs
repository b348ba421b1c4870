//! `wasmcap::fuzzing::model_files` under libFuzzer (`./build.sh fuzz`), over three committed tiny
//! fixtures: a Llava prefix model with its LoRA adapter, BLIP, SmolVLM. (The ViT-GPT2 fixtures
//! carry GPT-2's 50k-token tokenizer, whose parsing would take most of every run.)
#![no_main]
use wasmcap::loading::ModelFiles;
use wasmcap::lora::AdapterFiles;

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/", $path)).as_slice()
    };
}

fn files(which: u8) -> ModelFiles<'static> {
    let adapter =
        Some(AdapterFiles { config: fixture!("prefix/lora-r4/adapter_config.json"), weights: fixture!("prefix/lora-r4/adapter_model.safetensors") });
    match which % 3 {
        0 => ModelFiles {
            config: fixture!("prefix/tiny-llava-base-v5/config.json"),
            weights: fixture!("prefix/tiny-llava-base-v5/model.safetensors"),
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: fixture!("prefix/tiny-llava-base-v5/tokenizer.json"),
            preprocessor: fixture!("prefix/tiny-llava-base-v5/preprocessor_config.json"),
            generation: Some(fixture!("prefix/tiny-llava-base-v5/generation_config.json")),
            chat_template: None,
            adapter,
        },
        1 => ModelFiles {
            config: fixture!("blip/tiny-blip/config.json"),
            weights: fixture!("blip/tiny-blip/model.safetensors"),
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: fixture!("blip/tiny-blip/tokenizer.json"),
            preprocessor: fixture!("blip/tiny-blip/preprocessor_config.json"),
            generation: Some(fixture!("blip/tiny-blip/generation_config.json")),
            chat_template: None,
            adapter: None,
        },
        _ => ModelFiles {
            config: fixture!("idefics3/tiny-smolvlm/config.json"),
            weights: fixture!("idefics3/tiny-smolvlm/model.safetensors"),
            weights_name: wasmcap::loading::WEIGHTS,
            shards: &[],
            tokenizer: fixture!("idefics3/tiny-smolvlm/tokenizer.json"),
            preprocessor: fixture!("idefics3/tiny-smolvlm/preprocessor_config.json"),
            generation: Some(fixture!("idefics3/tiny-smolvlm/generation_config.json")),
            chat_template: Some(("chat_template.jinja", fixture!("idefics3/tiny-smolvlm/chat_template.jinja"))),
            adapter: None,
        },
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmcap::fuzzing::model_files(data, &[files(0), files(1), files(2)]));
