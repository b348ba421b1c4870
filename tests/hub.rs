//! Hub ids in the CLI against a local server that answers as the hub's `resolve` endpoint does
//! (tests/hub-server.mjs, the one the Node.js suite and the page tests use: `X-Repo-Commit`,
//! ETags, weights redirected to a CDN path, `Range` → 206, 404 with `X-Error-Code`), serving the
//! committed fixtures as `tiny/*`: the files land in the standard
//! cache layout, the captions are the local folder's, a second run needs no network, a dropped
//! download resumes and leaves nothing corrupt, a local folder of the same name wins.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The repositories: each the files of a fixture folder, with a folder of
/// tests/fixtures/checkpoints in place of its model.safetensors; `tiny/vit-gpt2-drop` loses the
/// connection halfway through its first model.safetensors download.
fn repos() -> serde_json::Value {
    let base = fixtures().join("tiny-vit-gpt2");
    let weights = |w: &str| fixtures().join("checkpoints").join(w);
    serde_json::json!({
        "tiny/vit-gpt2": { "base": base },
        "tiny/vit-gpt2-bin": { "base": base, "weights": weights("bin-f32") },
        "tiny/vit-gpt2-sharded": { "base": base, "weights": weights("sharded-safetensors") },
        "tiny/no-weights": { "base": base, "weights": weights("none") },
        "tiny/vit-gpt2-drop": { "base": base, "drop": ["model.safetensors"] },
        "tiny/smolvlm": { "base": fixtures().join("idefics3/tiny-smolvlm") },
    })
}

/// tests/hub-server.mjs — the hub the Node.js suite and the page tests use — as a child
/// process, answering until this is dropped.
struct Server {
    endpoint: String,
    commits: serde_json::Value,
    log: PathBuf,
    child: Child,
}

impl Server {
    fn start() -> Self {
        let log = std::env::temp_dir().join(format!("wasmcap-hub-log-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&log);
        let config = serde_json::json!({ "repos": repos(), "log": log });
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hub-server.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .arg(config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("tests/hub-server.mjs needs Node.js (./build.sh test installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("hub-server.mjs said {line:?}: {e}"));
        let endpoint = started["url"].as_str().unwrap().trim_end_matches('/').to_string();
        Server { endpoint, commits: started["commits"].clone(), log, child }
    }

    fn commit_of(&self, id: &str) -> String {
        self.commits[id].as_str().unwrap().to_string()
    }

    /// Every request so far as `{ url, auth, range }`, in order (each logged before its answer).
    fn requests(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn urls(&self) -> Vec<String> {
        self.requests().iter().map(|r| r["url"].as_str().unwrap().to_string()).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmcap-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn caption(model: &str, endpoint: &str, home: &Path, env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    caption_with(model, &[], endpoint, home, env, cwd)
}

fn caption_with(model: &str, args: &[&str], endpoint: &str, home: &Path, env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let image = fixtures().join("images/chelsea.jpg");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption"));
    cmd.args(["--model", model, "--json", "--num-beams", "1", "--max-new-tokens", "8"]).args(args).arg(image);
    for var in ["HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "XDG_CACHE_HOME"] {
        cmd.env_remove(var);
    }
    cmd.env("HF_ENDPOINT", endpoint).env("HF_HOME", home).env("RAYON_NUM_THREADS", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().unwrap()
}

fn ids(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "caption failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    line["token_ids"].clone()
}

fn local_ids() -> serde_json::Value {
    let home = scratch("local");
    ids(&caption(&fixtures().join("tiny-vit-gpt2").display().to_string(), "http://127.0.0.1:9", &home, &[], None))
}

/// An endpoint where nothing listens.
const NO_NETWORK: &str = "http://127.0.0.1:9";

#[test]
fn hub_ids_caption_as_their_folders_do_then_work_offline_from_the_cache() {
    let server = Server::start();
    let want = local_ids();
    let home = scratch("cache");
    for id in ["tiny/vit-gpt2", "tiny/vit-gpt2-bin", "tiny/vit-gpt2-sharded"] {
        assert_eq!(ids(&caption(id, &server.endpoint, &home, &[], None)), want, "{id}");
        // No network at all, then HF_HUB_OFFLINE: the cache answers.
        assert_eq!(ids(&caption(id, NO_NETWORK, &home, &[], None)), want, "{id} without network");
        assert_eq!(ids(&caption(id, NO_NETWORK, &home, &[("HF_HUB_OFFLINE", "1")], None)), want, "{id} offline");
    }
    // Only what the loader needs was asked for: weights in transformers' order (stopping at the
    // first found), the tokenizer files, the processor and generation configs.
    let asked: HashSet<String> = server.urls().iter().filter_map(|u| u.split("/resolve/main/").nth(1).map(str::to_string)).collect();
    let allowed = [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "chat_template.json",
    ];
    assert!(asked.iter().all(|f| allowed.contains(&f.as_str())), "{asked:?}");
    assert!(!server.urls().iter().any(|u| u.contains("vit-gpt2-bin/resolve/main/pytorch_model.bin.index.json")), "stops at the first weights");

    // The hub cache layout huggingface_hub and transformers read.
    let repo = home.join("hub/models--tiny--vit-gpt2-sharded");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(commit, server.commit_of("tiny/vit-gpt2-sharded"));
    let pointer = repo.join("snapshots").join(&commit).join("model-00002-of-00003.safetensors");
    assert!(std::fs::symlink_metadata(&pointer).unwrap().file_type().is_symlink());
    assert_eq!(
        std::fs::read(&pointer).unwrap(),
        std::fs::read(fixtures().join("checkpoints/sharded-safetensors/model-00002-of-00003.safetensors")).unwrap()
    );
    assert!(repo.join(".no_exist").join(&commit).join("tokenizer.json").exists(), "a 404 is remembered");
}

#[test]
fn revisions_tokens_and_the_cache_folder_follow_the_environment() {
    let server = Server::start();
    let want = local_ids();
    let home = scratch("env");
    let elsewhere = home.join("elsewhere");
    let id = format!("tiny/vit-gpt2@{}", server.commit_of("tiny/vit-gpt2"));
    let env = [("HF_HUB_CACHE", elsewhere.to_str().unwrap()), ("HF_TOKEN", "hf_secret")];
    assert_eq!(ids(&caption(&id, &server.endpoint, &home, &env, None)), want);
    assert!(elsewhere.join("models--tiny--vit-gpt2/snapshots").join(server.commit_of("tiny/vit-gpt2")).join("config.json").exists());
    assert!(!home.join("hub").exists(), "HF_HUB_CACHE, not HF_HOME/hub");
    // The CDN it redirects to is the same host here, so every request carries it.
    assert!(server.requests().iter().all(|r| r["auth"] == "Bearer hf_secret"), "the token goes with every request to the hub");
}

#[test]
fn unknown_repos_revisions_and_files_are_errors_that_say_so() {
    let server = Server::start();
    let home = scratch("errors");
    let err = |model: &str, endpoint: &str, env: &[(&str, &str)]| {
        let out = caption(model, endpoint, &home, env, None);
        assert!(!out.status.success(), "{model} loaded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = err("tiny/nope", &server.endpoint, &[]);
    assert!(e.contains("tiny/nope") && e.contains("no such repository") && e.contains("HF_TOKEN"), "{e}");
    let e = err("tiny/vit-gpt2@v9", &server.endpoint, &[]);
    assert!(e.contains("no revision v9"), "{e}");
    let e = err("tiny/no-weights", &server.endpoint, &[]);
    assert!(e.contains("model.safetensors") && e.contains("pytorch_model.bin"), "{e}");
    let e = err("tiny/vit-gpt2", NO_NETWORK, &[]);
    assert!(e.contains("could not download") && e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = err("tiny/vit-gpt2", &server.endpoint, &[("HF_HUB_OFFLINE", "1")]);
    assert!(e.contains("not in the cache"), "{e}");
    // Not a hub id: a folder path, and what it lacks is named.
    let e = err("not a/hub id", &server.endpoint, &[]);
    assert!(e.contains("not a/hub id/config.json"), "{e}");
}

#[test]
fn a_dropped_download_resumes_and_leaves_nothing_corrupt() {
    let server = Server::start();
    let want = local_ids();
    let home = scratch("drop");
    let out = caption("tiny/vit-gpt2-drop", &server.endpoint, &home, &[], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("run again"), "{stderr}");
    let repo = home.join("hub/models--tiny--vit-gpt2-drop");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    let size = std::fs::metadata(fixtures().join("tiny-vit-gpt2/model.safetensors")).unwrap().len();
    for b in &blobs {
        let len = std::fs::metadata(repo.join("blobs").join(b)).unwrap().len();
        assert!(b.ends_with(".incomplete") || len != size / 2, "{b}: a partial file under a final name");
    }
    assert!(blobs.iter().any(|b| b.ends_with(".incomplete")), "{blobs:?}");
    let commit = server.commit_of("tiny/vit-gpt2-drop");
    assert!(!repo.join("snapshots").join(&commit).join("model.safetensors").exists());
    // The next run resumes where the bytes stopped.
    assert_eq!(ids(&caption("tiny/vit-gpt2-drop", &server.endpoint, &home, &[], None)), want);
    let resumed = server.requests().iter().any(|r| r["url"] == "/cdn/tiny/vit-gpt2-drop/model.safetensors" && r["range"].is_string());
    assert!(resumed, "a Range request resumed it: {:?}", server.requests());
    assert!(!std::fs::read_dir(repo.join("blobs")).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".incomplete")));
}

#[test]
fn a_local_folder_of_the_same_name_wins() {
    let server = Server::start();
    let want = local_ids();
    let cwd = scratch("local-wins");
    let folder = cwd.join("tiny/vit-gpt2");
    std::fs::create_dir_all(&folder).unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-vit-gpt2")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, folder.join(path.file_name().unwrap())).unwrap();
    }
    assert_eq!(ids(&caption("tiny/vit-gpt2", &server.endpoint, &cwd, &[], Some(&cwd))), want);
    assert!(server.requests().is_empty(), "{:?}", server.urls());
}

#[test]
fn a_smolvlm_repo_brings_its_chat_template_and_prompts_as_its_folder_does() {
    let server = Server::start();
    let home = scratch("smolvlm");
    let prompt = ["--prompt", "Describe this image."];
    let folder = fixtures().join("idefics3/tiny-smolvlm").display().to_string();
    let want = ids(&caption_with(&folder, &prompt, NO_NETWORK, &home, &[], None));
    assert_eq!(ids(&caption_with("tiny/smolvlm", &prompt, &server.endpoint, &home, &[], None)), want);
    let snapshot = home.join("hub/models--tiny--smolvlm/snapshots").join(server.commit_of("tiny/smolvlm"));
    assert!(snapshot.join("chat_template.jinja").exists());
    assert!(!server.urls().iter().any(|u| u.ends_with("/chat_template.json")), "the .jinja found, the .json is not asked for");
    // Another prompt, other ids: the prompt reaches the model.
    let other = ids(&caption_with(&folder, &["--prompt", "Describe this image!"], NO_NETWORK, &home, &[], None));
    assert_ne!(other, want);
}
