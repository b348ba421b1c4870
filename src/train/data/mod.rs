//! Captioning datasets for the native trainer.
//!
//! Every format ends up as the same thing: a [`Dataset`] of [`Sample`]s, each one image with
//! all of its captions. Rows that cannot be used (missing image, empty caption, malformed entry,
//! undecodable file) are counted in [`SkipCounts`] instead of failing the load, because real
//! caption dumps always contain a few of them and one bad row should not cost a training run.
//! Only a problem with the top-level file or folder is an error.
//!
//! `spec` in [`load_dataset`] is one of
//! * a format name (`shapes`, `flickr`/`flickr8k`, `coco`, `karpathy`, `jsonl`, `csv`); the data
//!   then lives at `root` (a folder or file),
//! * `name:PATH`, the format named explicitly with its location, or
//! * a bare path whose format is inferred (`.jsonl`, `.csv`, a COCO or Karpathy `.json`, a
//!   Flickr8k folder ...).
//!
//! When the location comes from `spec`, `root` (if given) is where relative image paths are
//! resolved, so a caption file can live apart from its images (a Flickr8k folder always uses
//! its own image folder).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{Rgb, RgbImage};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::rng::mix64;

mod coco;
mod csv_file;
mod flickr;
mod jsonl;
mod karpathy;
mod shapes;
#[cfg(test)]
mod tests;

use coco::*;
use csv_file::*;
use flickr::*;
use jsonl::*;
use karpathy::*;
use shapes::*;
pub use shapes::{shapes_scene, shapes_vocabulary};

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Where a sample's pixels come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageSource {
    File(PathBuf),
    /// Rendered on demand by [`shapes_scene`], so the synthetic set needs no disk space.
    Shapes {
        seed: u64,
        index: u64,
        size: u32,
    },
}

/// One image and every caption it has (at least one, none empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub image: ImageSource,
    pub captions: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

/// Rows left out of a [`Dataset`]. A row is one (image, caption) pair, except that a malformed
/// entry whose captions cannot even be counted is one bad row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkipCounts {
    pub missing_image: usize,
    pub empty_caption: usize,
    /// Malformed entries, captions that are not text, and images that exist but do not decode.
    pub bad_row: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub name: String,
    pub split: Split,
    pub samples: Vec<Sample>,
    pub skipped: SkipCounts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetOptions {
    pub shapes_train: usize,
    pub shapes_val: usize,
    pub shapes_test: usize,
    pub shapes_seed: u64,
    pub shapes_size: u32,
    /// Decode every image file once while loading and skip those that fail, so a corrupt file
    /// is reported up front rather than aborting an epoch hours in.
    pub check_images: bool,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions { shapes_train: 3000, shapes_val: 300, shapes_test: 300, shapes_seed: 0, shapes_size: 64, check_images: true }
    }
}

/// Smallest and largest canvas the shapes scenes are meant for: below 16 px the shapes are too
/// few pixels to tell apart, and far above any vision-encoder input the allocation is wasted.
pub const SHAPES_MIN_SIZE: u32 = 16;
pub const SHAPES_MAX_SIZE: u32 = 2048;

/// Index offsets of the shapes splits; keeps them disjoint as long as a split has fewer samples.
const SHAPES_SPLIT_STRIDE: u64 = 1_000_000;

// ---------------------------------------------------------------------------------------------
// Split, SkipCounts, Dataset
// ---------------------------------------------------------------------------------------------

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// Split names as they appear inside data files; Karpathy's `restval` is extra training data.
    fn from_field(s: &str) -> Option<Split> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "restval" => Some(Split::Train),
            "val" | "valid" | "validation" | "dev" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// A bare message, so a caller that wraps it (`Error::config("--split", e)`) does not repeat
/// the "invalid configuration" prefix; `?` still turns it into an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown split `{0}`: expected train, val (validation) or test")]
pub struct ParseSplitError(pub String);

impl From<ParseSplitError> for Error {
    fn from(e: ParseSplitError) -> Self {
        Error::config("split", e)
    }
}

impl FromStr for Split {
    type Err = ParseSplitError;

    fn from_str(s: &str) -> std::result::Result<Split, ParseSplitError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "val" | "validation" | "dev" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            _ => Err(ParseSplitError(s.trim().to_string())),
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SkipCounts {
    pub fn total(&self) -> usize {
        self.missing_image + self.empty_caption + self.bad_row
    }
}

impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        write!(f, "skipped {total} {}", if total == 1 { "row" } else { "rows" })?;
        let parts: Vec<String> = [(self.missing_image, "missing image"), (self.empty_caption, "empty caption"), (self.bad_row, "bad row")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        if !parts.is_empty() {
            write!(f, ": {}", parts.join(", "))?;
        }
        Ok(())
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn caption_count(&self) -> usize {
        self.samples.iter().map(|s| s.captions.len()).sum()
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]: {} images, {} captions; {}", self.name, self.split, self.len(), self.caption_count(), self.skipped)
    }
}

// ---------------------------------------------------------------------------------------------
// ImageSource
// ---------------------------------------------------------------------------------------------

impl ImageSource {
    pub fn load_rgb(&self) -> Result<RgbImage> {
        match self {
            ImageSource::File(path) => decode_file(path),
            ImageSource::Shapes { seed, index, size } => {
                check_shapes_size(*size).map_err(Error::Image)?;
                Ok(shapes_scene(*seed, *index, *size).0)
            }
        }
    }

    /// Identity for caches: equal keys mean equal pixels.
    pub fn key(&self) -> String {
        match self {
            ImageSource::File(path) => path.to_string_lossy().into_owned(),
            ImageSource::Shapes { seed, index, size } => format!("shapes:{seed}:{index}:{size}"),
        }
    }
}

fn decode_file(path: &Path) -> Result<RgbImage> {
    let bytes = fs::read(path).map_err(|e| io_error(path, e))?;
    // The captioner's own decoder and RGB conversion (16-bit, gray, alpha), so a model trains on
    // the pixels it will caption. The format comes from the bytes, not the extension: Flickr and
    // COCO dumps contain PNGs named .jpg and vice versa.
    crate::preprocess::decode_image(&bytes).map_err(|e| Error::Image(format!("{}: not a decodable image ({e})", path.display())))
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    if source.kind() == std::io::ErrorKind::NotFound {
        Error::MissingFile(path.display().to_string())
    } else {
        Error::Io { path: path.display().to_string(), source }
    }
}

fn check_shapes_size(size: u32) -> std::result::Result<(), String> {
    if (SHAPES_MIN_SIZE..=SHAPES_MAX_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!("shapes image size {size} is outside {SHAPES_MIN_SIZE}..={SHAPES_MAX_SIZE}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point and format detection
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Shapes,
    Flickr,
    Coco,
    Karpathy,
    Jsonl,
    Csv,
}

impl Format {
    fn from_name(name: &str) -> Option<Format> {
        match name.trim().to_ascii_lowercase().as_str() {
            "shapes" => Some(Format::Shapes),
            "flickr" | "flickr8k" => Some(Format::Flickr),
            "coco" => Some(Format::Coco),
            "karpathy" => Some(Format::Karpathy),
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Shapes => "shapes",
            Format::Flickr => "flickr8k",
            Format::Coco => "coco",
            Format::Karpathy => "karpathy",
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

/// Loads split `split` of the dataset named by `spec` (see the module docs for `spec` and
/// `root`).
///
/// Samples keep the order of the source file. Unusable rows are counted in
/// [`Dataset::skipped`]; an empty result is not an error, so callers decide whether it is fatal.
/// Errors are reserved for an unknown spec, a missing or unreadable caption file or folder, and
/// a file that is not the announced format; each names the path.
pub fn load_dataset(spec: &str, root: Option<&Path>, split: Split, opts: &DatasetOptions) -> Result<Dataset> {
    let spec = spec.trim();
    let (format, location, image_base) = if let Some(format) = Format::from_name(spec) {
        (format, root.map(Path::to_path_buf), None)
    } else if let Some((format, rest)) =
        spec.split_once(':').and_then(|(name, rest)| Some((Format::from_name(name)?, rest))).filter(|(_, rest)| !rest.trim().is_empty())
    {
        (format, Some(PathBuf::from(rest.trim())), root.map(Path::to_path_buf))
    } else if spec.is_empty() {
        return Err(Error::config("dataset", "empty dataset spec"));
    } else {
        let path = PathBuf::from(spec);
        let (format, location) = infer_format(&path)?;
        (format, Some(location), root.map(Path::to_path_buf))
    };

    let location = || {
        location.as_deref().ok_or_else(|| {
            Error::config("dataset", format!("`{}` needs a location: pass a root path or write `{}:PATH`", format.name(), format.name()))
        })
    };
    let base = image_base.as_deref();
    let loaded = match format {
        Format::Shapes => return load_shapes(split, opts),
        Format::Flickr => load_flickr(location()?, split)?,
        Format::Coco => load_coco(location()?, base, split)?,
        Format::Karpathy => load_karpathy(location()?, base, split)?,
        Format::Jsonl => load_jsonl(location()?, base, split)?,
        Format::Csv => load_csv(location()?, base, split)?,
    };
    let (samples, skipped) = finish(loaded.rows, loaded.skipped, opts.check_images);
    Ok(Dataset { name: loaded.name, split, samples, skipped })
}

fn infer_format(path: &Path) -> Result<(Format, PathBuf)> {
    if !path.exists() {
        let text = path.to_string_lossy();
        // A bare word that is no file is far more likely a mistyped format name.
        if !text.contains(['/', '\\', '.']) {
            return Err(Error::config(
                "dataset",
                format!(
                    "unknown dataset `{text}`: expected shapes, flickr8k, coco, karpathy, jsonl, \
                     csv, or a path to a dataset file or folder"
                ),
            ));
        }
        return Err(Error::MissingFile(path.display().to_string()));
    }
    let shown = path.display().to_string();
    if path.is_dir() {
        if flickr_captions_present(path) {
            return Ok((Format::Flickr, path.to_path_buf()));
        }
        if path.join("annotations").is_dir() {
            return Ok((Format::Coco, path.to_path_buf()));
        }
        if KARPATHY_FILES.iter().any(|f| path.join(f).is_file()) {
            return Ok((Format::Karpathy, path.to_path_buf()));
        }
        return Err(Error::config(
            &shown,
            "cannot tell the dataset format of this folder: expected Flickr8k.token.txt or \
             captions.txt (Flickr8k), annotations/ (COCO) or dataset_*.json (Karpathy)",
        ));
    }
    let file_name = file_name_lower(path);
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jsonl" => return Ok((Format::Jsonl, path.to_path_buf())),
        "csv" => return Ok((Format::Csv, path.to_path_buf())),
        "txt" if file_name == FLICKR_TOKEN.to_ascii_lowercase() || file_name == KAGGLE_CAPTIONS => {
            // The caption file sits in the dataset folder, or in Flickr8k_text/ beside the images.
            let mut dir = parent_dir(path);
            if file_name_lower(&dir) == "flickr8k_text" {
                dir = parent_dir(&dir);
            }
            return Ok((Format::Flickr, dir));
        }
        "json" => {}
        _ => {
            return Err(Error::config(
                &shown,
                "cannot tell the dataset format from this file name: expected .jsonl, .csv or \
                 a COCO/Karpathy .json (or name the format, e.g. `coco:PATH`)",
            ))
        }
    }
    if file_name.starts_with("dataset_") {
        return Ok((Format::Karpathy, path.to_path_buf()));
    }
    if file_name.starts_with("captions_") {
        return Ok((Format::Coco, path.to_path_buf()));
    }
    #[derive(Deserialize)]
    struct SniffImage {
        sentences: Option<serde::de::IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Sniff {
        annotations: Option<serde::de::IgnoredAny>,
        images: Option<Vec<SniffImage>>,
    }
    let sniff: Sniff = parse_json_file(path)?;
    if sniff.annotations.is_some() {
        return Ok((Format::Coco, path.to_path_buf()));
    }
    if sniff.images.as_ref().is_some_and(|imgs| imgs.iter().any(|i| i.sentences.is_some())) {
        return Ok((Format::Karpathy, path.to_path_buf()));
    }
    Err(Error::config(&shown, "neither a COCO captions file (no `annotations`) nor a Karpathy split file (no `sentences`)"))
}

// ---------------------------------------------------------------------------------------------
// Shared loading machinery
// ---------------------------------------------------------------------------------------------

/// One (image, caption) pair that passed parsing and split selection.
struct RawRow {
    image: PathBuf,
    caption: String,
}

struct Loaded {
    name: String,
    rows: Vec<RawRow>,
    /// What parsing already rejected.
    skipped: SkipCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileStatus {
    Ok,
    Missing,
    Undecodable,
}

/// Normalises captions, checks each distinct image once and groups captions per image,
/// keeping the order in which images first appear.
fn finish(rows: Vec<RawRow>, mut skipped: SkipCounts, check_images: bool) -> (Vec<Sample>, SkipCounts) {
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        let caption = normalize_caption(&row.caption);
        if caption.is_empty() {
            skipped.empty_caption += 1;
        } else {
            kept.push((row.image, caption));
        }
    }

    let mut unique_of: HashMap<PathBuf, usize> = HashMap::new();
    let mut unique: Vec<PathBuf> = Vec::new();
    let mut row_unique = Vec::with_capacity(kept.len());
    for (path, _) in &kept {
        let id = match unique_of.get(path) {
            Some(&id) => id,
            None => {
                unique_of.insert(path.clone(), unique.len());
                unique.push(path.clone());
                unique.len() - 1
            }
        };
        row_unique.push(id);
    }
    drop(unique_of);

    let status = check_files(&unique, check_images);
    let mut sample_of: Vec<Option<usize>> = vec![None; unique.len()];
    let mut samples: Vec<Sample> = Vec::new();
    for ((path, caption), id) in kept.into_iter().zip(row_unique) {
        match status.get(id).copied().unwrap_or(FileStatus::Missing) {
            FileStatus::Missing => skipped.missing_image += 1,
            FileStatus::Undecodable => skipped.bad_row += 1,
            FileStatus::Ok => match sample_of.get(id).copied().flatten() {
                Some(s) => {
                    if let Some(sample) = samples.get_mut(s) {
                        sample.captions.push(caption);
                    }
                }
                None => {
                    if let Some(slot) = sample_of.get_mut(id) {
                        *slot = Some(samples.len());
                    }
                    samples.push(Sample { image: ImageSource::File(path), captions: vec![caption] });
                }
            },
        }
    }
    (samples, skipped)
}

/// Caption dumps carry stray newlines, tabs and double spaces (COCO has all three); they carry
/// no meaning for a tokenizer, so they are collapsed here once.
fn normalize_caption(caption: &str) -> String {
    caption.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Decoding is the slow part of loading a large set, so it is spread over a few threads; where
/// threads are unavailable (wasm) or fail to start, the leftovers are checked on this thread.
fn check_files(paths: &[PathBuf], decode: bool) -> Vec<FileStatus> {
    let check = |p: &Path| -> FileStatus {
        if !p.is_file() {
            FileStatus::Missing
        } else if !decode {
            FileStatus::Ok
        } else {
            // A decoder bug on one hostile file must not take the whole load down.
            match std::panic::catch_unwind(|| decode_file(p).is_ok()) {
                Ok(true) => FileStatus::Ok,
                _ => FileStatus::Undecodable,
            }
        }
    };
    let mut out: Vec<Option<FileStatus>> = vec![None; paths.len()];
    let workers =
        if decode && paths.len() > 1 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8).min(paths.len()) } else { 1 };
    if workers > 1 {
        let next = AtomicUsize::new(0);
        let results: Vec<Vec<(usize, FileStatus)>> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for _ in 0..workers {
                let spawned = std::thread::Builder::new().spawn_scoped(scope, || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        match paths.get(i) {
                            Some(p) => done.push((i, check(p))),
                            None => break,
                        }
                    }
                    done
                });
                match spawned {
                    Ok(handle) => handles.push(handle),
                    Err(_) => break,
                }
            }
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for (i, status) in results.into_iter().flatten() {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(status);
            }
        }
    }
    out.iter().zip(paths).map(|(done, p)| done.unwrap_or_else(|| check(p))).collect()
}

/// Finds an image among several candidate folders. The folder that matched last is tried
/// first, so a large set costs about one stat per image.
struct Resolver {
    dirs: Vec<PathBuf>,
    hint: usize,
}

impl Resolver {
    fn new(dirs: Vec<PathBuf>) -> Self {
        let mut seen = HashSet::new();
        let dirs = dirs.into_iter().filter(|d| seen.insert(d.clone())).collect();
        Resolver { dirs, hint: 0 }
    }

    /// The first existing `dir/rel` over all candidates; if none exists, the most likely
    /// location, so the row is reported as a missing image there.
    fn resolve(&mut self, rels: &[PathBuf]) -> PathBuf {
        for rel in rels {
            if rel.is_absolute() {
                return rel.clone();
            }
        }
        if let Some(dir) = self.dirs.get(self.hint) {
            for rel in rels {
                let p = dir.join(rel);
                if p.is_file() {
                    return p;
                }
            }
        }
        for (i, dir) in self.dirs.iter().enumerate() {
            for rel in rels {
                let p = dir.join(rel);
                if p.is_file() {
                    self.hint = i;
                    return p;
                }
            }
        }
        let first_rel = rels.first().cloned().unwrap_or_default();
        match self.dirs.first() {
            Some(dir) => dir.join(first_rel),
            None => first_rel,
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| io_error(path, e))?;
    // Lossy: one stray Latin-1 byte in a caption file should cost one caption, not the file.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

fn parse_json_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| Error::config(&path.display().to_string(), format!("not a usable captions JSON file ({e})")))
}

fn file_name_lower(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A split that depends only on the image name as written in the data file, so it survives
/// moving the dataset and is identical on every platform (FNV-1a, then a final mix so the low
/// digits are well spread).
fn hash_split(key: &str) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    split_of_bucket(mix64(h) % 10)
}

fn split_of_bucket(bucket: u64) -> Split {
    match bucket {
        0..=7 => Split::Train,
        8 => Split::Val,
        _ => Split::Test,
    }
}

const HASH_SPLIT_NOTE: &str = "no split field: 80/10/10 by image path hash";

fn value_str(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
}

fn value_key(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
