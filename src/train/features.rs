//! The frozen-encoder feature cache: what the trainable part reads from an image (the encoder's
//! last hidden state, or the vision tower's feature layer before the projector), computed once.
//! Kept in memory for the run and, unless turned off, on disk under `ROOT/KEY/`, where KEY is a
//! digest of everything the features depend on (the encoder's weights, the vision config, the
//! preprocessing, the image list with each file's size and modification time). A run whose key
//! differs removes the stale folders. New features are appended as numbered parts at every
//! checkpoint, so a killed run keeps what it computed and nothing is rewritten.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::data::{Dataset, ImageSource};
use super::model::{safetensors_bytes, TrainModel};
use super::{create_dir, write_atomic};
use crate::error::{Error, Result};

/// FNV-1a (64-bit) over 8-byte words: a cache key, not a defence against anyone.
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        for &b in chunks.remainder() {
            self.word(b as u64);
        }
        // Length-delimited, so ("ab", "c") and ("a", "bc") differ.
        self.word(bytes.len() as u64);
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The key of `data`'s features under `model`'s (frozen) encoder.
pub fn cache_key(model: &TrainModel, data: &Dataset) -> Result<String> {
    let mut d = Digest::default();
    d.write(b"wasmcap feature cache v1");
    d.write(model.family.model_type.as_bytes());
    d.write(model.preprocessor_json.to_string().as_bytes());
    model.digest_encoder(&mut d)?;
    for sample in &data.samples {
        match &sample.image {
            ImageSource::File(path) => {
                d.write(path.as_os_str().as_encoded_bytes());
                // Size and mtime: a replaced image changes the key without reading every file.
                let meta = std::fs::metadata(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
                let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|t| t.as_nanos()).unwrap_or(0);
                d.write(&meta.len().to_le_bytes());
                d.write(&modified.to_le_bytes());
            }
            ImageSource::Shapes { seed, index, size } => {
                d.write(b"shapes");
                d.write(&seed.to_le_bytes());
                d.write(&index.to_le_bytes());
                d.write(&size.to_le_bytes());
            }
        }
    }
    Ok(d.hex())
}

#[derive(Default)]
pub struct FeatureCache {
    features: HashMap<usize, Tensor>,
    /// Computed since the last part was written.
    unsaved: Vec<usize>,
    /// `ROOT/KEY/` when the cache persists.
    dir: Option<PathBuf>,
    pub hits: usize,
    pub misses: usize,
    /// Features read from disk when the cache was opened.
    pub loaded: usize,
}

fn is_key(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn part_name(n: usize) -> String {
    format!("part-{n:05}.safetensors")
}

impl FeatureCache {
    /// A cache that lives for the run only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The cache at `root` for `key`: earlier features for the same key are read back; folders
    /// of other keys (another encoder, other images) are stale and removed. A part that does not
    /// read back (a crash while writing leaves only `.tmp` files, but a disk can still fail) is
    /// dropped with a warning and its features recomputed.
    pub fn open(root: &Path, key: &str) -> Result<Self> {
        create_dir(root)?;
        let entries = std::fs::read_dir(root).map_err(|source| Error::Io { path: root.display().to_string(), source })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if is_key(&name) && name != key && entry.path().is_dir() {
                eprintln!("feature cache: removing stale features {} (other encoder weights, preprocessing or images)", entry.path().display());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = root.join(key);
        create_dir(&dir)?;
        let mut cache = FeatureCache { dir: Some(dir.clone()), ..Default::default() };
        let mut n = 0;
        loop {
            let path = dir.join(part_name(n));
            let Ok(bytes) = std::fs::read(&path) else { break };
            match crate::loading::load_safetensors(&path.display().to_string(), &bytes, |k| k.to_string()) {
                Ok(tensors) => {
                    for (name, t) in tensors {
                        if let Ok(i) = name.parse::<usize>() {
                            cache.features.insert(i, t);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("feature cache: dropping {} ({e}); its features are recomputed", path.display());
                    // Later parts would be renumbered over it; drop them too.
                    let mut m = n;
                    while std::fs::remove_file(dir.join(part_name(m))).is_ok() {
                        m += 1;
                    }
                    break;
                }
            }
            n += 1;
        }
        cache.loaded = cache.features.len();
        Ok(cache)
    }

    /// Moves the features read back from disk (f32, on the CPU) to where the model computes, in
    /// its precision: on the GPU the whole cache stays in GPU memory.
    pub fn to_device(mut self, device: &candle_core::Device, dtype: candle_core::DType) -> Result<Self> {
        for f in self.features.values_mut() {
            *f = f.to_dtype(dtype)?.to_device(device)?;
        }
        Ok(self)
    }

    pub fn get(&mut self, image: usize) -> Option<Tensor> {
        let f = self.features.get(&image).cloned();
        if f.is_some() {
            self.hits += 1;
        }
        f
    }

    pub fn insert(&mut self, image: usize, features: Tensor) {
        self.misses += 1;
        self.features.insert(image, features);
        self.unsaved.push(image);
    }

    /// Writes the features computed since the last call as the next part.
    pub fn save(&mut self) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        if self.unsaved.is_empty() {
            return Ok(());
        }
        let mut n = 0;
        while dir.join(part_name(n)).exists() {
            n += 1;
        }
        let part: BTreeMap<String, Tensor> = self.unsaved.iter().filter_map(|i| self.features.get(i).map(|t| (i.to_string(), t.clone()))).collect();
        write_atomic(&dir.join(part_name(n)), &safetensors_bytes(&part)?)?;
        self.unsaved.clear();
        Ok(())
    }
}

/// One image preprocessed (on the CPU), then on the model's device in its precision.
fn pixel_values(model: &TrainModel, data: &Dataset, image: usize) -> Result<Tensor> {
    let sample = data.samples.get(image).ok_or_else(|| Error::Compute(format!("no image {image}")))?;
    Ok(model.preprocessor.preprocess(&sample.image.load_rgb()?)?.to_dtype(model.dtype)?.to_device(&model.device)?)
}

/// Features the trained part reads (`Architecture::train_features`).
fn image_features(model: &TrainModel, pixels: &Tensor) -> Result<Tensor> {
    Ok(model.network.train_features(pixels)?)
}

/// The features of `images` as one batch: through the encoder when it trains (the graph is
/// kept), else from the cache (filled on a miss).
pub fn batch_features(model: &TrainModel, data: &Dataset, images: &[usize], cache: &mut FeatureCache, train_encoder: bool) -> Result<Tensor> {
    if train_encoder {
        let pixels = images.iter().map(|&i| pixel_values(model, data, i)).collect::<Result<Vec<_>>>()?;
        return image_features(model, &Tensor::cat(&pixels, 0)?);
    }
    if !model.device.is_cpu() {
        // On the GPU the encoder runs once for all the images the cache lacks (the CPU path
        // encodes one at a time, as it always has: same bits as before).
        let mut missing: Vec<usize> = images.iter().copied().filter(|i| !cache.features.contains_key(i)).collect();
        missing.dedup();
        if !missing.is_empty() {
            let pixels = missing.iter().map(|&i| pixel_values(model, data, i)).collect::<Result<Vec<_>>>()?;
            let encoded = image_features(model, &Tensor::cat(&pixels, 0)?)?.detach();
            for (row, &i) in missing.iter().enumerate() {
                if !cache.features.contains_key(&i) {
                    cache.insert(i, encoded.narrow(0, row, 1)?);
                }
            }
        }
    }
    let mut rows = Vec::with_capacity(images.len());
    for &i in images {
        let f = match cache.get(i) {
            Some(f) => f,
            None => {
                let f = image_features(model, &pixel_values(model, data, i)?)?.detach();
                cache.insert(i, f.clone());
                f
            }
        };
        rows.push(f);
    }
    Ok(Tensor::cat(&rows, 0)?)
}
