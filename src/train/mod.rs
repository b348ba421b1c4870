//! The native trainer (`bin/train`): datasets, the trainable model built on `crate::models`,
//! AdamW, the training loop with checkpoints, metrics and the exported HF folder.

pub mod data;
pub mod data_parallel;
pub mod device;
pub mod features;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod run;

use std::path::Path;

use crate::error::{Error, Result};

pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })
}

/// Writes `bytes` to `path` so that a reader (or a crash) sees the old file or the new one,
/// never half of one: `path` + `.tmp`, flushed, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let io = |source| Error::Io { path: tmp.display().to_string(), source };
    let mut f = std::fs::File::create(tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(tmp, path).map_err(|source| {
        // Best effort: the rename error is the one worth reporting.
        let _ = std::fs::remove_file(tmp);
        Error::Io { path: path.display().to_string(), source }
    })
}
