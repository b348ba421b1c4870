//! Hub ids in the CLI against a local server that answers as the hub's `resolve` endpoint does
//! (`X-Repo-Commit`, ETags, weights redirected to a CDN path, `Range` → 206, 404 with
//! `X-Error-Code`), serving the committed fixtures as `tiny/*`: the files land in the standard
//! cache layout, the captions are the local folder's, a second run needs no network, a dropped
//! download resumes and leaves nothing corrupt, a local folder of the same name wins.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A repository: the files of `base`, with `weights` (a folder of tests/fixtures/checkpoints)
/// in place of its model.safetensors.
struct Repo {
    id: &'static str,
    base: &'static str,
    weights: Option<&'static str>,
}

const REPOS: [Repo; 4] = [
    Repo { id: "tiny/vit-gpt2", base: "tiny-vit-gpt2", weights: None },
    Repo { id: "tiny/vit-gpt2-bin", base: "tiny-vit-gpt2", weights: Some("bin-f32") },
    Repo { id: "tiny/vit-gpt2-sharded", base: "tiny-vit-gpt2", weights: Some("sharded-safetensors") },
    Repo { id: "tiny/no-weights", base: "tiny-vit-gpt2", weights: Some("evil-none") },
];

fn commit_of(id: &str) -> String {
    let h = fnv(id.as_bytes());
    format!("{h:016x}{h:016x}{:08x}", h as u32)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn file_of(repo: &Repo, name: &str) -> Option<PathBuf> {
    if let Some(w) = repo.weights {
        let own = fixtures().join("checkpoints").join(w).join(name);
        if own.is_file() {
            return Some(own);
        }
        if name == "model.safetensors" {
            return None;
        }
    }
    let path = fixtures().join(repo.base).join(name);
    path.is_file().then_some(path)
}

#[derive(Default)]
struct Seen {
    /// "METHOD PATH [range] [auth]" of every request.
    requests: Vec<String>,
    /// CDN paths whose next answer stops halfway.
    drop_next: HashSet<String>,
}

struct Server {
    endpoint: String,
    seen: Arc<Mutex<Seen>>,
}

impl Server {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = shared.clone();
                std::thread::spawn(move || serve(stream, &seen));
            }
        });
        Server { endpoint, seen }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().requests.clone()
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream, seen: &Mutex<Seen>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or_default();
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => range = v.trim().strip_prefix("bytes=").and_then(|r| r.trim_end_matches('-').parse::<usize>().ok()),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    seen.lock().unwrap().requests.push(format!("{method} {path} {range:?} {auth:?}"));

    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /cdn/ORG/NAME/FILE: the bytes, with Range.
    if let ["cdn", org, name, file] = segments.as_slice() {
        let id = format!("{org}/{name}");
        let Some(bytes) = REPOS.iter().find(|r| r.id == id).and_then(|r| file_of(r, file)).map(|p| std::fs::read(p).unwrap()) else {
            return respond(&mut stream, "404 Not Found", &[], b"");
        };
        let from = range.unwrap_or(0).min(bytes.len());
        let body = &bytes[from..];
        let mut headers = vec![("Content-Length", body.len().to_string()), ("Accept-Ranges", "bytes".to_string())];
        let status = if range.is_some() {
            headers.push(("Content-Range", format!("bytes {from}-{}/{}", bytes.len().saturating_sub(1), bytes.len())));
            "206 Partial Content"
        } else {
            "200 OK"
        };
        if seen.lock().unwrap().drop_next.remove(&path) {
            // The connection drops halfway through the body.
            return respond(&mut stream, status, &headers, &body[..body.len() / 2]);
        }
        return respond(&mut stream, status, &headers, body);
    }
    // /ORG/NAME/resolve/REVISION/FILE
    let (id, revision, file) = match segments.as_slice() {
        [org, name, "resolve", revision, file] => (format!("{org}/{name}"), revision.to_string(), file.to_string()),
        _ => return respond(&mut stream, "404 Not Found", &[], b"not a hub path"),
    };
    let Some(repo) = REPOS.iter().find(|r| r.id == id) else {
        return respond(&mut stream, "401 Unauthorized", &[("X-Error-Code", "RepositoryNotFound".into())], b"");
    };
    let commit = commit_of(&id);
    if revision != "main" && revision != commit {
        return respond(&mut stream, "404 Not Found", &[("X-Error-Code", "RevisionNotFound".into())], b"");
    }
    let Some(file_path) = file_of(repo, &file) else {
        return respond(&mut stream, "404 Not Found", &[("X-Error-Code", "EntryNotFound".into()), ("X-Repo-Commit", commit)], b"");
    };
    let bytes = std::fs::read(file_path).unwrap();
    let etag = format!("{:016x}{:016x}", fnv(&bytes), fnv(file.as_bytes()));
    if file.ends_with(".safetensors") || file.ends_with(".bin") {
        // Large files: the hub answers with a redirect to its CDN.
        let headers = [
            ("Location", format!("/cdn/{id}/{file}")),
            ("X-Repo-Commit", commit),
            ("X-Linked-Etag", format!("\"{etag}\"")),
            ("X-Linked-Size", bytes.len().to_string()),
            ("Content-Length", "0".into()),
        ];
        return respond(&mut stream, "302 Found", &headers, b"");
    }
    let from = range.unwrap_or(0).min(bytes.len());
    let headers = [("ETag", format!("\"{etag}\"")), ("X-Repo-Commit", commit), ("Content-Length", (bytes.len() - from).to_string())];
    respond(&mut stream, if range.is_some() { "206 Partial Content" } else { "200 OK" }, &headers, &bytes[from..]);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmcap-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn caption(model: &str, endpoint: &str, home: &Path, env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let image = fixtures().join("images/chelsea.jpg");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption"));
    cmd.args(["--model", model, "--json", "--num-beams", "1", "--max-new-tokens", "8"]).arg(image);
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
    let asked: HashSet<String> =
        server.requests().iter().filter_map(|r| r.split_whitespace().nth(1)?.split("/resolve/main/").nth(1).map(str::to_string)).collect();
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
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "generation_config.json",
    ];
    assert!(asked.iter().all(|f| allowed.contains(&f.as_str())), "{asked:?}");
    assert!(!server.requests().iter().any(|r| r.contains("vit-gpt2-bin/resolve/main/pytorch_model.bin.index.json")), "stops at the first weights");

    // The hub cache layout huggingface_hub and transformers read.
    let repo = home.join("hub/models--tiny--vit-gpt2-sharded");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(commit, commit_of("tiny/vit-gpt2-sharded"));
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
    let id = format!("tiny/vit-gpt2@{}", commit_of("tiny/vit-gpt2"));
    let env = [("HF_HUB_CACHE", elsewhere.to_str().unwrap()), ("HF_TOKEN", "hf_secret")];
    assert_eq!(ids(&caption(&id, &server.endpoint, &home, &env, None)), want);
    assert!(elsewhere.join("models--tiny--vit-gpt2/snapshots").join(commit_of("tiny/vit-gpt2")).join("config.json").exists());
    assert!(!home.join("hub").exists(), "HF_HUB_CACHE, not HF_HOME/hub");
    assert!(server.requests().iter().all(|r| r.contains("Bearer hf_secret")), "the token goes with every request to the hub");
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
    server.seen.lock().unwrap().drop_next.insert("/cdn/tiny/vit-gpt2/model.safetensors".into());
    let out = caption("tiny/vit-gpt2", &server.endpoint, &home, &[], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("run again"), "{stderr}");
    let repo = home.join("hub/models--tiny--vit-gpt2");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    let size = std::fs::metadata(fixtures().join("tiny-vit-gpt2/model.safetensors")).unwrap().len();
    for b in &blobs {
        let len = std::fs::metadata(repo.join("blobs").join(b)).unwrap().len();
        assert!(b.ends_with(".incomplete") || len != size / 2, "{b}: a partial file under a final name");
    }
    assert!(blobs.iter().any(|b| b.ends_with(".incomplete")), "{blobs:?}");
    let commit = commit_of("tiny/vit-gpt2");
    assert!(!repo.join("snapshots").join(&commit).join("model.safetensors").exists());
    // The next run resumes where the bytes stopped.
    assert_eq!(ids(&caption("tiny/vit-gpt2", &server.endpoint, &home, &[], None)), want);
    assert!(server.requests().iter().any(|r| r.starts_with("GET /cdn/tiny/vit-gpt2/model.safetensors Some(")), "a Range request resumed it");
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
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}
