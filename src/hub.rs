//! Hub ids (`org/name[@revision]`) for the native tools: the files a model folder needs, fetched
//! from the hub's `resolve` endpoint into its standard cache layout
//! (`models--org--name/{blobs,snapshots,refs,.no_exist}`, the one huggingface_hub and
//! transformers share), honouring `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
//! `HF_TOKEN`. A local folder of the same name wins, as in transformers. What the cache holds for
//! a revision is used without asking the network again, so a second run works offline. A file is
//! written as `blobs/ETAG.incomplete` and renamed only once it has every byte the server
//! announced; a dropped connection leaves only that partial file, which the next run resumes with
//! a `Range` request.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::loading;

/// `org/name` at a revision (`main` unless `@revision` says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub id: String,
    pub revision: String,
}

impl HubId {
    /// `org/name` or `org/name@revision`; anything else (a path, an empty part) is not a hub id.
    pub fn parse(spec: &str) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, revision)) => (id, revision),
            None => (spec, "main"),
        };
        let part = |s: &str| !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let mut parts = id.split('/');
        let valid = matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(name), None) if part(org) && part(name));
        let revision_ok =
            !revision.is_empty() && !revision.contains("..") && revision.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        (valid && revision_ok).then(|| Self { id: id.to_string(), revision: revision.to_string() })
    }
}

/// The hub client's settings, from the environment as huggingface_hub reads it.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    /// The hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
}

impl Hub {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")));
            base.unwrap_or_else(|| PathBuf::from(".cache")).join("huggingface")
        });
        let token =
            var("HF_TOKEN").or_else(|| std::fs::read_to_string(home.join("token")).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()));
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            cache: var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub")),
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")),
        }
    }

    /// The folder `--model SPEC` means: SPEC itself when it is a folder, else the snapshot of the
    /// hub id SPEC with the files a model needs (`config.json`, the first weight file transformers
    /// would take and the shards its index names, the tokenizer and processor files that exist).
    pub fn model_folder(&self, spec: &str) -> Result<PathBuf> {
        if Path::new(spec).is_dir() {
            return Ok(PathBuf::from(spec));
        }
        // Not a hub id: a folder path, and the loader names the file it lacks.
        let Some(id) = HubId::parse(spec) else { return Ok(PathBuf::from(spec)) };
        let repo = Repo { hub: self, id };
        repo.require(loading::CONFIG)?;
        let mut weights = None;
        for name in loading::WEIGHT_FILES {
            if let Some(path) = repo.fetch(name)? {
                weights = Some((name, path));
                break;
            }
        }
        let (name, path) =
            weights.ok_or_else(|| Error::MissingFile(format!("{}: none of {} on the hub", repo.id.id, loading::WEIGHT_FILES.join(", "))))?;
        if name.ends_with(".index.json") {
            let index = loading::read_path(&path)?;
            for shard in loading::shard_names(name, &index)? {
                repo.require(&shard)?;
            }
        }
        if repo.fetch(loading::TOKENIZER)?.is_none() {
            for file in [loading::GPT2_VOCAB, loading::GPT2_MERGES, loading::BERT_VOCAB, loading::TOKENIZER_CONFIG, loading::SPECIAL_TOKENS_MAP] {
                repo.fetch(file)?;
            }
        }
        for file in [loading::PREPROCESSOR, loading::GENERATION] {
            repo.fetch(file)?;
        }
        // The first chat template the folder has, in transformers' order.
        for file in loading::CHAT_TEMPLATE_FILES {
            if repo.fetch(file)?.is_some() {
                break;
            }
        }
        repo.snapshot()
    }
}

/// One repository of the hub and its folder in the cache.
struct Repo<'a> {
    hub: &'a Hub,
    id: HubId,
}

/// What the server says of a file.
enum Answer {
    File(PathBuf),
    Missing,
}

impl Repo<'_> {
    fn dir(&self) -> PathBuf {
        self.hub.cache.join(format!("models--{}", self.id.id.replace('/', "--")))
    }

    /// The commit the revision names: itself when it is one, else what `refs/` recorded.
    fn commit(&self) -> Option<String> {
        let r = &self.id.revision;
        if is_commit(r) {
            return Some(r.clone());
        }
        std::fs::read_to_string(self.dir().join("refs").join(r)).ok().map(|c| c.trim().to_string()).filter(|c| !c.is_empty())
    }

    fn snapshot(&self) -> Result<PathBuf> {
        let commit = self.commit().ok_or_else(|| {
            Error::MissingFile(format!("{}: no snapshot of revision {} in {}", self.id.id, self.id.revision, self.hub.cache.display()))
        })?;
        Ok(self.dir().join("snapshots").join(commit))
    }

    fn require(&self, file: &str) -> Result<PathBuf> {
        self.fetch(file)?
            .ok_or_else(|| Error::MissingFile(format!("{}: no {file} at revision {} on {}", self.id.id, self.id.revision, self.hub.endpoint)))
    }

    /// The file from the cache, else from the server; `None` when the repo does not have it.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(commit) = self.commit() {
            let cached = self.dir().join("snapshots").join(&commit).join(file);
            if cached.is_file() {
                return Ok(Some(cached));
            }
            if self.dir().join(".no_exist").join(&commit).join(file).exists() {
                return Ok(None);
            }
        }
        if self.hub.offline {
            return Err(Error::MissingFile(format!(
                "{}: {file} of revision {} is not in the cache {} and HF_HUB_OFFLINE is set",
                self.id.id,
                self.id.revision,
                self.hub.cache.display()
            )));
        }
        match self.download(file)? {
            Answer::File(path) => Ok(Some(path)),
            Answer::Missing => Ok(None),
        }
    }

    fn download(&self, file: &str) -> Result<Answer> {
        let url = format!("{}/{}/resolve/{}/{file}", self.hub.endpoint, self.id.id, self.id.revision);
        let fail = |reason: String| {
            Error::MissingFile(format!("{}: could not download {file} from {url} ({reason}); without network, pass its folder instead of the hub id, or set HF_HUB_OFFLINE=1 to use what is cached", self.id.id))
        };
        // Redirects are followed by hand: the hub's own answer carries the commit and the ETag,
        // the CDN's the bytes.
        let agent = ureq::AgentBuilder::new().redirects(0).timeout_connect(std::time::Duration::from_secs(20)).build();
        let get = |url: &str, auth: bool, from: u64| {
            let mut request = agent.get(url);
            if let (true, Some(token)) = (auth, &self.hub.token) {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
            if from > 0 {
                request = request.set("Range", &format!("bytes={from}-"));
            }
            request.call()
        };
        let first = match get(&url, true, 0) {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                let code = r.header("X-Error-Code").unwrap_or_default().to_string();
                return match (status, code.as_str()) {
                    (404, "EntryNotFound") => {
                        self.mark_missing(&r, file);
                        Ok(Answer::Missing)
                    }
                    (404, "RevisionNotFound") => {
                        Err(Error::MissingFile(format!("{}: no revision {} on {}", self.id.id, self.id.revision, self.hub.endpoint)))
                    }
                    (401 | 403 | 404, _) => Err(Error::MissingFile(format!(
                        "{}: no such repository on {} (or it is private or gated: set HF_TOKEN){}",
                        self.id.id,
                        self.hub.endpoint,
                        if code.is_empty() { String::new() } else { format!(" [{code}]") }
                    ))),
                    _ => Err(fail(format!("HTTP {status}"))),
                };
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        // Quotes and a weak validator's `W/` are not part of the ETag huggingface_hub stores.
        let header = |name: &str| first.header(name).map(|v| v.trim_start_matches("W/").trim_matches('"').to_string());
        let commit = header("X-Repo-Commit").ok_or_else(|| fail("no X-Repo-Commit header: is HF_ENDPOINT a hub?".into()))?;
        if !is_commit(&commit) {
            return Err(fail(format!("X-Repo-Commit {commit:?} is not a commit hash")));
        }
        let etag = header("X-Linked-Etag").or_else(|| header("ETag")).ok_or_else(|| fail("no ETag header".into()))?;
        if etag.is_empty() || !etag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(fail(format!("ETag {etag:?} is not a file name")));
        }
        let location = (300..400).contains(&first.status()).then(|| first.header("Location").map(str::to_string)).flatten();
        let blobs = self.dir().join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|source| Error::Io { path: blobs.display().to_string(), source })?;
        let blob = blobs.join(&etag);
        if !blob.is_file() {
            let partial = blobs.join(format!("{etag}.incomplete"));
            let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let response = match (&location, have) {
                (None, 0) => first,
                (to, from) => {
                    let target = to.as_deref().map_or_else(|| url.clone(), |to| absolute(&url, to));
                    // The token goes only to the hub itself, not to another host it redirects to.
                    let same_host = host(&target) == host(&url);
                    get(&target, same_host, from).map_err(|e| {
                        // A partial file the server will not continue (416): start over next time.
                        if matches!(e, ureq::Error::Status(416, _)) {
                            let _ = std::fs::remove_file(&partial);
                        }
                        fail(e.to_string())
                    })?
                }
            };
            let resumed = response.status() == 206;
            let total = match response.header("Content-Range").and_then(|r| r.rsplit('/').next()).and_then(|t| t.parse::<u64>().ok()) {
                Some(total) if resumed => Some(total),
                _ => response.header("Content-Length").and_then(|l| l.parse::<u64>().ok()),
            };
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(resumed)
                .truncate(!resumed)
                .open(&partial)
                .map_err(|source| Error::Io { path: partial.display().to_string(), source })?;
            let mut reader = response.into_reader();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return Err(fail(format!("the connection dropped: {e}; run again to resume"))),
                };
                out.write_all(&buf[..n]).map_err(|source| Error::Io { path: partial.display().to_string(), source })?;
            }
            out.sync_all().map_err(|source| Error::Io { path: partial.display().to_string(), source })?;
            let got = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if let Some(total) = total.filter(|&t| t != got) {
                return Err(fail(format!("got {got} of {total} bytes; run again to resume")));
            }
            std::fs::rename(&partial, &blob).map_err(|source| Error::Io { path: blob.display().to_string(), source })?;
        }
        let pointer = self.dir().join("snapshots").join(&commit).join(file);
        link(&blob, &pointer)?;
        self.write_ref(&commit)?;
        Ok(Answer::File(pointer))
    }

    fn write_ref(&self, commit: &str) -> Result<()> {
        if self.id.revision == commit {
            return Ok(());
        }
        let path = self.dir().join("refs").join(&self.id.revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io { path: parent.display().to_string(), source })?;
        }
        std::fs::write(&path, commit).map_err(|source| Error::Io { path: path.display().to_string(), source })
    }

    /// Remembers that the revision lacks `file` (huggingface_hub's `.no_exist`), so an offline
    /// run does not ask again.
    fn mark_missing(&self, response: &ureq::Response, file: &str) {
        let Some(commit) = response.header("X-Repo-Commit").filter(|c| is_commit(c)) else { return };
        let marker = self.dir().join(".no_exist").join(commit).join(file);
        if let Some(parent) = marker.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&marker, b"");
        let _ = self.write_ref(commit);
    }
}

/// `snapshots/COMMIT/FILE` → `blobs/ETAG`: a relative symlink as huggingface_hub makes; a copy
/// where the file system has none.
fn link(blob: &Path, pointer: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    };
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let _ = std::fs::remove_file(pointer);
    #[cfg(unix)]
    {
        let depth = pointer.parent().and_then(|p| p.strip_prefix(blob.parent()?.parent()?).ok()).map_or(2, |p| p.components().count());
        let name = blob.file_name().unwrap_or_default();
        let target: PathBuf = std::iter::repeat_n(Path::new(".."), depth).collect::<PathBuf>().join("blobs").join(name);
        if std::os::unix::fs::symlink(&target, pointer).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, pointer).map(|_| ()).map_err(io(pointer))
}

/// A full git commit hash (40 hex digits).
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base.find("://").map(|i| i + 3).and_then(|i| base[i..].find('/').map(|j| i + j)).unwrap_or(base.len());
    format!("{}{}{location}", &base[..origin_end], if location.starts_with('/') { "" } else { "/" })
}

fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::{absolute, HubId};

    #[test]
    fn hub_ids_and_what_is_not_one() {
        assert_eq!(
            HubId::parse("nlpconnect/vit-gpt2-image-captioning"),
            Some(HubId { id: "nlpconnect/vit-gpt2-image-captioning".into(), revision: "main".into() })
        );
        assert_eq!(HubId::parse("org/name@v1.0").map(|h| h.revision), Some("v1.0".into()));
        for bad in ["name", "a/b/c", "../x", "org/..", "/abs/path", "org/name@", "org/na me", "org/name@../x", "./org"] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn redirects_resolve_against_the_hub() {
        assert_eq!(absolute("http://h:1/o/n/resolve/main/f", "/cdn/x"), "http://h:1/cdn/x");
        assert_eq!(absolute("http://h:1/o/n/resolve/main/f", "https://cdn/x"), "https://cdn/x");
    }
}
