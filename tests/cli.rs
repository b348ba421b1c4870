//! The `caption` binary: `--json` lines carry transformers' greedy ids; a bad image is reported
//! and the other images still get captions.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::process::Command;

fn fixture_path(rel: &str) -> String {
    format!("{}/tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn json_lines_match_transformers_and_bad_images_do_not_stop_the_rest() {
    let garbage = std::env::temp_dir().join(format!("wasmcap-not-an-image-{}.png", std::process::id()));
    std::fs::write(&garbage, b"this is not a PNG").unwrap();
    for fx in common::fixtures() {
        let out = Command::new(env!("CARGO_BIN_EXE_caption"))
            // Greedy, whatever generation_config.json asks for (tiny-vit-gpt2's asks for 4 beams).
            .args(["--model", &fixture_path(fx.name), "--json", "--num-beams", "1", "--max-new-tokens", &fx.max_new_tokens().to_string()])
            .arg(fixture_path("images/astronaut.png"))
            .arg(&garbage)
            .arg(fixture_path("images/chelsea.jpg"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "a bad image makes the exit status non-zero");
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "one line per image");
        for (line, name) in [(&lines[0], "astronaut.png"), (&lines[2], "chelsea.jpg")] {
            let ids: Vec<u32> = line["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(ids, fx.greedy_ids(name), "{} {name}", fx.name);
            assert_eq!(line["text"], fx.greedy_text(name));
            for key in ["image", "encoder_ms", "first_token_ms", "total_ms", "tokens_per_s"] {
                assert!(line.get(key).is_some(), "missing {key} in {line}");
            }
        }
        let error = lines[1]["error"].as_str().unwrap();
        assert!(error.contains("image") && error.contains("decode"), "{error}");
    }
    let _ = std::fs::remove_file(garbage);
}

#[test]
fn missing_model_folder_is_a_clear_error() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_caption")).args(["--model", "/nonexistent/model", &fixture_path("images/astronaut.png")]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model") && stderr.contains("config.json"), "{stderr}");
    // With --json the same error is a JSON line on stdout.
    let out = Command::new(env!("CARGO_BIN_EXE_caption"))
        .args(["--json", "--model", "/nonexistent/model", &fixture_path("images/astronaut.png")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("/nonexistent/model") && error.contains("config.json"), "{error}");
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes_as_json() {
    // The fixture's config with twice the vocabulary its weights have.
    let dir = std::env::temp_dir().join(format!("wasmcap-bad-shape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "model.safetensors",
        "preprocessor_config.json",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(fixture_path(&format!("tiny-vit-gpt2/{f}")), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture_path("tiny-vit-gpt2/config.json")).unwrap()).unwrap();
    let vocab = config["decoder"]["vocab_size"].as_u64().unwrap();
    config["decoder"]["vocab_size"] = (vocab * 2).into();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_caption"))
        .args(["--json", "--model", dir.to_str().unwrap(), &fixture_path("images/astronaut.png")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("wte") && error.contains(&vocab.to_string()) && error.contains(&(vocab * 2).to_string()), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adapter_and_prompt_flags_for_a_prefix_model() {
    let case = common::prefix_cases().into_iter().find(|c| c.name == "base-v5+lora-r4").unwrap();
    let expected = case.greedy_ids("astronaut.png", "prompt");
    let out = Command::new(env!("CARGO_BIN_EXE_caption"))
        .args(["--model", &fixture_path("prefix/tiny-llava-base-v5"), "--adapter", &fixture_path("prefix/lora-r4")])
        .args(["--prompt", "a photo of", "--json", "--max-new-tokens", &expected.len().to_string()])
        .arg(fixture_path("images/astronaut.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(common::ids(&line["token_ids"]), expected);

    let out = Command::new(env!("CARGO_BIN_EXE_caption"))
        .args(["--model", &fixture_path("prefix/tiny-llava-base-v5"), "--adapter", "/nonexistent/adapter"])
        .arg(fixture_path("images/astronaut.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("adapter_config.json"), "{stderr}");
}

/// `caption --json` over the fixture photos with `flags`, for `model`: each line's token ids.
fn ids_of(model: &str, flags: &[&str]) -> Vec<Vec<u64>> {
    let out = Command::new(env!("CARGO_BIN_EXE_caption"))
        .args(["--model", model, "--json"])
        .args(flags)
        .args(["astronaut.png", "chelsea.jpg", "coffee_rgba.png"].map(|f| fixture_path(&format!("images/{f}"))))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect())
        .collect()
}

#[test]
fn generation_config_sets_the_defaults_and_flags_override_them() {
    // tiny-ved-v4 with a generation_config.json that asks for beam search and n-gram blocking.
    let dir = std::env::temp_dir().join(format!("wasmcap-genconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_path("tiny-ved-v4");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(format!("{src}/{f}"), dir.join(f)).unwrap();
    }
    let mut generation: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{src}/generation_config.json")).unwrap()).unwrap();
    for (k, v) in [("num_beams", 3.into()), ("length_penalty", 0.5.into()), ("no_repeat_ngram_size", 2.into()), ("max_new_tokens", 9.into())] {
        generation[k] = v;
    }
    std::fs::write(dir.join("generation_config.json"), generation.to_string()).unwrap();
    let configured = dir.display().to_string();

    let explicit = ids_of(&src, &["--num-beams", "3", "--length-penalty", "0.5", "--no-repeat-ngram-size", "2", "--max-new-tokens", "9"]);
    assert_eq!(ids_of(&configured, &[]), explicit, "no flags: generation_config.json's beam search");
    assert_ne!(explicit, ids_of(&src, &["--max-new-tokens", "9"]), "the settings change the captions");
    // A flag wins over the file: one beam is greedy, still with the file's n-gram blocking.
    assert_eq!(ids_of(&configured, &["--num-beams", "1"]), ids_of(&src, &["--no-repeat-ngram-size", "2", "--max-new-tokens", "9"]));
    // Batches: the same captions.
    assert_eq!(ids_of(&configured, &["--batch-size", "2"]), explicit);
    assert_eq!(ids_of(&src, &["--batch-size", "3", "--max-new-tokens", "9"]), ids_of(&src, &["--max-new-tokens", "9"]));

    // A wrong type is a config error naming the file.
    generation["num_beams"] = "three".into();
    std::fs::write(dir.join("generation_config.json"), generation.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_caption")).args(["--model", &configured, &fixture_path("images/astronaut.png")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("generation_config.json") && stderr.contains("num_beams"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quantize_flag_keeps_the_embedded_models_captions() {
    let model = format!("{}/models/shapes-prefix", env!("CARGO_MANIFEST_DIR"));
    let sample = format!("{}/www/samples/shapes-test-2.png", env!("CARGO_MANIFEST_DIR"));
    let run =
        |extra: &[&str]| Command::new(env!("CARGO_BIN_EXE_caption")).args(["--model", &model, "--json"]).args(extra).arg(&sample).output().unwrap();
    let f32_out = run(&[]);
    let q8_out = run(&["--quantize", "q8_0"]);
    assert!(q8_out.status.success(), "{}", String::from_utf8_lossy(&q8_out.stderr));
    assert!(String::from_utf8_lossy(&q8_out.stderr).contains("quantized 15 decoder matrices"), "{}", String::from_utf8_lossy(&q8_out.stderr));
    let text = |o: &std::process::Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"].clone();
    assert_eq!(text(&q8_out), text(&f32_out));
    assert_eq!(text(&f32_out), "a red triangle above a yellow triangle");
    assert!(!run(&["--quantize", "q3_k"]).status.success(), "an unknown format is refused");
}

#[test]
fn quantize_command_writes_a_folder_the_captioner_loads() {
    let model = format!("{}/models/shapes-cross-attention", env!("CARGO_MANIFEST_DIR"));
    let sample = format!("{}/www/samples/shapes-test-0.png", env!("CARGO_MANIFEST_DIR"));
    let out_dir = std::env::temp_dir().join(format!("wasmcap-quantize-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_quantize")).args(["--model", &model, "--out"]).arg(&out_dir).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["bytes_out"].as_u64().unwrap(), std::fs::metadata(out_dir.join("model.safetensors")).unwrap().len());
    for file in ["config.json", "tokenizer.json", "preprocessor_config.json", "generation_config.json"] {
        assert!(out_dir.join(file).is_file(), "{file} not copied");
    }
    let caption = |dir: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_caption")).args(["--model", dir, "--json", &sample]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"].clone()
    };
    assert_eq!(caption(out_dir.to_str().unwrap()), caption(&model));
    // Quantizing the quantized folder is refused, naming a q8_0 tensor.
    let again = Command::new(env!("CARGO_BIN_EXE_quantize")).arg("--model").arg(&out_dir).arg("--out").arg(out_dir.join("again")).output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && stderr.contains("q8_0 already"), "{stderr}");
    let _ = std::fs::remove_dir_all(out_dir);
}

#[test]
fn an_adapter_on_a_quantized_base_is_refused_naming_a_q8_tensor() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out_dir = std::env::temp_dir().join(format!("wasmcap-quantize-base-{}", std::process::id()));
    let q = Command::new(env!("CARGO_BIN_EXE_quantize"))
        .args(["--model", &format!("{root}/models/shapes-prefix/base"), "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_caption"))
        .arg("--model")
        .arg(&out_dir)
        .args(["--adapter", &format!("{root}/models/shapes-prefix/adapter"), &format!("{root}/www/samples/shapes-test-0.png")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(".q8_0") && stderr.contains("adapter merges into f32 weights"), "{stderr}");
    let _ = std::fs::remove_dir_all(out_dir);
}

#[test]
fn generation_options_follow_the_one_rule_of_crate_generation() {
    // tiny-vit-gpt2's generation_config.json asks for 4 beams: --num-return-sequences 2 alone is a
    // beam search returning two; tiny-ved-v5's asks for none: 2 sequences need beams (as generate()).
    let run = |model: &str, flags: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_caption"))
            .args(["--model", &fixture_path(model), "--json"])
            .args(flags)
            .arg(fixture_path("images/astronaut.png"))
            .output()
            .unwrap()
    };
    let out = run("tiny-vit-gpt2", &["--num-return-sequences", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fx = common::vit_gpt2();
    let want: Vec<Vec<u32>> = fx.reference()["images"]["astronaut.png"]["two_sequences"].as_array().unwrap().iter().map(common::ids).collect();
    let got: Vec<Vec<u32>> = line["sequences"].as_array().unwrap().iter().map(|s| common::ids(&s["token_ids"])).collect();
    assert_eq!(got, want);
    let out = run("tiny-ved-v5", &["--num-return-sequences", "2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("num_return_sequences (2) must be between 1 and num_beams (1)"), "{stderr}");
}

#[test]
fn a_folder_without_any_tokenizer_names_what_it_looked_for() {
    let dir = std::env::temp_dir().join(format!("wasmcap-no-tokenizer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json", "generation_config.json", "vocab.json"] {
        std::fs::copy(fixture_path(&format!("tiny-vit-gpt2/{f}")), dir.join(f)).unwrap();
    }
    let out =
        Command::new(env!("CARGO_BIN_EXE_caption")).args(["--model", dir.to_str().unwrap(), &fixture_path("images/astronaut.png")]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokenizer.json") && stderr.contains("merges.txt"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
