//! Turning the files of a 🤗 model folder into a model: `config.json`, `model.safetensors`,
//! `tokenizer.json`, `preprocessor_config.json` and, when present, `generation_config.json`.
//! The same bytes come from disk natively and from `fetch` in the browser.

use std::collections::HashMap;
use std::mem::MaybeUninit;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{from_candle_weights, Error, Result};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const BIN_WEIGHTS: &str = "pytorch_model.bin";
pub const BIN_WEIGHTS_INDEX: &str = "pytorch_model.bin.index.json";
/// The weight files transformers looks for, in its order of preference.
pub const WEIGHT_FILES: [&str; 4] = [WEIGHTS, WEIGHTS_INDEX, BIN_WEIGHTS, BIN_WEIGHTS_INDEX];
pub const TOKENIZER: &str = "tokenizer.json";
pub const PREPROCESSOR: &str = "preprocessor_config.json";
pub const GENERATION: &str = "generation_config.json";
/// A GPT-2 tokenizer's files where a folder has no `tokenizer.json`.
pub const GPT2_VOCAB: &str = "vocab.json";
pub const GPT2_MERGES: &str = "merges.txt";
/// A BERT tokenizer's vocabulary where a folder has no `tokenizer.json` (BLIP's older folders).
pub const BERT_VOCAB: &str = "vocab.txt";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
/// Where a processor's chat template lives, in transformers' order.
pub const CHAT_TEMPLATE_FILES: [&str; 2] = [crate::chat::CHAT_TEMPLATE_JINJA, crate::chat::CHAT_TEMPLATE_JSON];

/// The files of a model folder, borrowed: the caller owns the bytes (a `Vec` read from disk, or
/// memory handed over by JS), so nothing is copied before parsing.
#[derive(Debug, Clone, Copy)]
pub struct ModelFiles<'a> {
    pub config: &'a [u8],
    /// The weights: one checkpoint file (safetensors or a torch zip, told apart by their bytes),
    /// or, when `weights_name` ends in `.index.json`, the index of `shards`.
    pub weights: &'a [u8],
    /// Which of [`WEIGHT_FILES`] `weights` is (errors name it).
    pub weights_name: &'a str,
    /// A sharded checkpoint's shards, by the file names its index uses.
    pub shards: &'a [(String, Vec<u8>)],
    pub tokenizer: &'a [u8],
    pub preprocessor: &'a [u8],
    pub generation: Option<&'a [u8]>,
    /// The processor's chat template: the file it came from (one of [`CHAT_TEMPLATE_FILES`]) and
    /// its bytes.
    pub chat_template: Option<(&'static str, &'a [u8])>,
    /// A PEFT LoRA adapter to merge into the weights at load time.
    pub adapter: Option<crate::lora::AdapterFiles<'a>>,
}

/// The same files, owned: what a folder on disk gives.
#[derive(Debug, Clone)]
pub struct OwnedModelFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
    pub weights_name: String,
    pub shards: Vec<(String, Vec<u8>)>,
    pub tokenizer: Vec<u8>,
    pub preprocessor: Vec<u8>,
    pub generation: Option<Vec<u8>>,
    pub chat_template: Option<(&'static str, Vec<u8>)>,
    /// `adapter_config.json` and `adapter_model.safetensors`.
    pub adapter: Option<(Vec<u8>, Vec<u8>)>,
}

/// A file's bytes; a missing file is `MissingFile` (named), any other failure `Io`.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_path(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile(path.display().to_string()),
        _ => Error::Io { path: path.display().to_string(), source },
    })
}

#[cfg(not(target_arch = "wasm32"))]
fn read_file(dir: &std::path::Path, name: &str) -> Result<Vec<u8>> {
    read_path(&dir.join(name))
}

/// A file's bytes, `None` when it is missing.
#[cfg(not(target_arch = "wasm32"))]
fn read_optional(dir: &std::path::Path, name: &str) -> Result<Option<Vec<u8>>> {
    match read_file(dir, name) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(Error::MissingFile(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The folder's `tokenizer.json`; without one, the one GPT-2's own files (as older folders ship
/// them) make.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_tokenizer(dir: &std::path::Path) -> Result<Vec<u8>> {
    let optional = |name: &str| read_optional(dir, name);
    if let Some(bytes) = optional(TOKENIZER)? {
        return Ok(bytes);
    }
    let (config, special) = (optional(TOKENIZER_CONFIG)?, optional(SPECIAL_TOKENS_MAP)?);
    match (optional(GPT2_VOCAB)?, optional(GPT2_MERGES)?) {
        (Some(vocab), Some(merges)) => crate::tokenizer::gpt2_tokenizer_json(&vocab, &merges, config.as_deref(), special.as_deref()),
        _ => match optional(BERT_VOCAB)? {
            Some(vocab) => crate::tokenizer::bert_tokenizer_json(&vocab, config.as_deref(), special.as_deref()),
            None => Err(Error::MissingFile(format!(
                "{} (or GPT-2's {GPT2_VOCAB} and {GPT2_MERGES}, or BERT's {BERT_VOCAB})",
                dir.join(TOKENIZER).display()
            ))),
        },
    }
}

/// A folder's weights as transformers picks them: the first of [`WEIGHT_FILES`] it has (its
/// name and bytes), and, for an index, the shards it names.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::type_complexity)]
pub fn read_weights(dir: &std::path::Path) -> Result<(&'static str, Vec<u8>, Vec<(String, Vec<u8>)>)> {
    for name in WEIGHT_FILES {
        let Some(bytes) = read_optional(dir, name)? else { continue };
        let shards = if name.ends_with(".index.json") {
            shard_names(name, &bytes)?.into_iter().map(|shard| Ok((shard.clone(), read_file(dir, &shard)?))).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        return Ok((name, bytes, shards));
    }
    Err(Error::MissingFile(format!("{} (or {})", dir.join(WEIGHTS).display(), WEIGHT_FILES[1..].join(", "))))
}

/// Every tensor of a folder's weights ([`read_weights`]), keyed by `rename(name)`.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dir_tensors(dir: &std::path::Path, rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
    let (name, weights, shards) = read_weights(dir)?;
    load_weights(name, &weights, &shards, rename)
}

/// The tensors of weights held in memory: the file `weights_name` (`weights`), or, for an index,
/// the shards it names (`shards`, by file name).
pub fn load_weights(
    weights_name: &str,
    weights: &[u8],
    shards: &[(String, Vec<u8>)],
    rename: impl Fn(&str) -> String,
) -> Result<HashMap<String, Tensor>> {
    if !weights_name.ends_with(".index.json") {
        return load_checkpoint_file(weights_name, &weights, rename);
    }
    let owned: Vec<(&str, &[u8])> = shards.iter().map(|(name, bytes)| (name.as_str(), bytes.as_slice())).collect();
    let sources: Vec<(&str, &dyn ByteSource)> = owned.iter().map(|(name, bytes)| (*name, bytes as &dyn ByteSource)).collect();
    load_sharded(weights_name, weights, &sources, rename)
}

impl ModelFiles<'_> {
    /// The model's tensors, keyed by `rename(name)`: the weight file, or the shards of the index.
    pub fn tensors(&self, rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
        load_weights(self.weights_name, self.weights, self.shards, rename)
    }
}

impl OwnedModelFiles {
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_dir(dir: &std::path::Path) -> Result<Self> {
        let read = |name: &str| read_file(dir, name);
        let config = read(CONFIG)?;
        let (weights_name, weights, shards) = read_weights(dir)?;
        let generation = read_optional(dir, GENERATION)?;
        let mut chat_template = None;
        for name in CHAT_TEMPLATE_FILES {
            if let Some(bytes) = read_optional(dir, name)? {
                chat_template = Some((name, bytes));
                break;
            }
        }
        Ok(Self {
            config,
            weights,
            weights_name: weights_name.to_string(),
            shards,
            tokenizer: read_tokenizer(dir)?,
            preprocessor: read(PREPROCESSOR)?,
            generation,
            chat_template,
            adapter: None,
        })
    }

    /// Adds a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_adapter_dir(mut self, dir: &std::path::Path) -> Result<Self> {
        let read = |name: &str| read_file(dir, name);
        self.adapter = Some((read(crate::lora::ADAPTER_CONFIG)?, read(crate::lora::ADAPTER_WEIGHTS)?));
        Ok(self)
    }

    pub fn borrow(&self) -> ModelFiles<'_> {
        ModelFiles {
            config: &self.config,
            weights: &self.weights,
            weights_name: &self.weights_name,
            shards: &self.shards,
            tokenizer: &self.tokenizer,
            preprocessor: &self.preprocessor,
            generation: self.generation.as_deref(),
            chat_template: self.chat_template.as_ref().map(|(name, bytes)| (*name, bytes.as_slice())),
            adapter: self.adapter.as_ref().map(|(config, weights)| crate::lora::AdapterFiles { config, weights }),
        }
    }
}

pub fn parse_json(file: &str, bytes: &[u8]) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::config(file, format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::config(file, "expected a JSON object"));
    }
    Ok(value)
}

/// The bytes of a safetensors file, read by range: a slice in memory, or (WASM) the JS buffer the
/// file was downloaded into, so that the whole file is never copied into WASM memory next to the
/// tensors made from it.
pub trait ByteSource {
    fn len(&self) -> usize;
    /// Fills `out` with the bytes from `start` (the caller keeps the range within `len`).
    fn read(&self, start: usize, out: &mut [u8]);
}

impl ByteSource for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read(&self, start: usize, out: &mut [u8]) {
        out.copy_from_slice(&self[start..start + out.len()]);
    }
}

/// Every tensor of a safetensors buffer on the CPU, keyed by `rename(name)`, f16 and bf16
/// widened to f32 (references, adapters, training state: what is computed with as it is). I8
/// tensors (the q8_0 matrices `crate::quantize` writes) keep their bytes, as U8: candle has no i8.
pub fn load_safetensors(file: &str, bytes: &[u8], rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
    let mut tensors = load_safetensors_from(file, &bytes, rename)?;
    for t in tensors.values_mut() {
        if crate::models::half::Half::of(t.dtype()).is_some() {
            *t = t.to_dtype(DType::F32).map_err(|e| Error::Safetensors { file: file.to_string(), reason: e.to_string() })?;
        }
    }
    Ok(tensors)
}

/// The tensors of a safetensors file from any [`ByteSource`] (a model's checkpoint): the header
/// first, then one tensor at a time, each read straight into its storage. f16 and bf16 stay as
/// stored (a model keeps its 16-bit matrices 16-bit and widens the rest as it builds, see
/// [`build_model`]).
pub fn load_safetensors_from(file: &str, src: &dyn ByteSource, rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
    let mut stream = SafetensorsStream::new(file, Some(src.len()));
    while let Some((at, into)) = stream.next_span()? {
        if at + into.len() > src.len() {
            // Only the 8 bytes of the header's length are asked for unchecked: `finish` says so.
            break;
        }
        let n = into.len();
        src.read(at, zero_filled(into));
        stream.filled(n)?;
    }
    Ok(stream.finish()?.into_iter().map(|(name, t)| (rename(&name), t)).collect())
}

/// A safetensors file read front to back as its bytes arrive (in WASM, `fetch`'s chunks): the
/// header, then each tensor straight into its own storage, made when its first byte arrives —
/// never a buffer of the file, so loading needs the model's memory and no more.
pub struct SafetensorsStream {
    file: String,
    /// The file's length when known beforehand (a `Content-Length`): ranges past it are refused
    /// before anything is allocated for them.
    len: Option<usize>,
    /// Bytes taken so far.
    at: usize,
    /// The 8-byte header length, then the header; `head_filled` of it taken.
    head: Vec<u8>,
    head_filled: usize,
    parsed: bool,
    /// Tensors not begun, the next one (lowest offset) last.
    pending: Vec<Entry>,
    filling: Option<(Entry, Storage, usize)>,
    done: HashMap<String, Tensor>,
}

struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// File offsets.
    start: usize,
    end: usize,
}

/// A tensor's storage as its bytes are written into it: allocated, not zeroed (a pass over the
/// whole model for nothing; in WASM ~15 % of streaming it in), and made a tensor once every
/// byte is written.
enum Storage {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
    Bytes(Vec<u8>),
}

/// Room for `n` values, uninitialised; an error when memory runs out (see [`zeroed`]).
fn room<T>(n: usize) -> std::result::Result<Vec<T>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| format!("out of memory: {n} values of {} bytes do not fit", std::mem::size_of::<T>()))?;
    Ok(v)
}

impl Storage {
    fn new(dtype: DType, bytes: usize) -> std::result::Result<Storage, String> {
        // Little-endian targets read the file's values in place; others go through bytes.
        Ok(match dtype {
            DType::F32 if cfg!(target_endian = "little") => Storage::F32(room(bytes / 4)?),
            DType::F16 if cfg!(target_endian = "little") => Storage::F16(room(bytes / 2)?),
            DType::BF16 if cfg!(target_endian = "little") => Storage::Bf16(room(bytes / 2)?),
            _ => Storage::Bytes(room(bytes)?),
        })
    }

    /// All of its memory, as bytes to write.
    fn bytes_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        fn view<T>(v: &mut Vec<T>) -> &mut [MaybeUninit<u8>] {
            let spare = v.spare_capacity_mut();
            // SAFETY: the same memory as bytes; MaybeUninit<u8> asks nothing of what it holds.
            unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut MaybeUninit<u8>, std::mem::size_of_val(spare)) }
        }
        match self {
            Storage::F32(v) => view(v),
            Storage::F16(v) => view(v),
            Storage::Bf16(v) => view(v),
            Storage::Bytes(v) => view(v),
        }
    }

    /// The tensor, once the first `bytes` of [`Self::bytes_mut`] (all it was made for) are written.
    fn into_tensor(self, bytes: usize, dtype: DType, shape: &[usize]) -> candle_core::Result<Tensor> {
        fn full<T: PlainValue>(mut v: Vec<T>, bytes: usize) -> Vec<T> {
            let n = (bytes / std::mem::size_of::<T>()).min(v.capacity());
            // SAFETY: the first `bytes` were written (the caller counts them), within the
            // capacity, and any bit pattern is a valid T.
            unsafe { v.set_len(n) };
            v
        }
        match self {
            Storage::F32(v) => Tensor::from_vec(full(v, bytes), shape, &Device::Cpu),
            Storage::F16(v) => Tensor::from_vec(full(v, bytes), shape, &Device::Cpu),
            Storage::Bf16(v) => Tensor::from_vec(full(v, bytes), shape, &Device::Cpu),
            // Bytes are U8 as they are (q8_0 matrices, masks): no copy. Wider integers, rare,
            // are read from the bytes.
            Storage::Bytes(v) if dtype == DType::U8 => Tensor::from_vec(full(v, bytes), shape, &Device::Cpu),
            Storage::Bytes(v) => Tensor::from_raw_buffer(&full(v, bytes), dtype, shape, &Device::Cpu),
        }
    }
}

/// `from` (as long as `into`) written into `into`: the bytes, now initialised.
pub fn write_bytes<'a>(into: &'a mut [MaybeUninit<u8>], from: &[u8]) -> &'a mut [u8] {
    for (i, b) in into.iter_mut().zip(from) {
        i.write(*b);
    }
    let n = into.len().min(from.len());
    // SAFETY: the first n bytes were just written.
    unsafe { std::slice::from_raw_parts_mut(into.as_mut_ptr() as *mut u8, n) }
}

/// `into` zeroed: bytes for a reader that fills a `&mut [u8]`.
fn zero_filled(into: &mut [MaybeUninit<u8>]) -> &mut [u8] {
    into.fill(MaybeUninit::new(0));
    // SAFETY: every byte was just written.
    unsafe { std::slice::from_raw_parts_mut(into.as_mut_ptr() as *mut u8, into.len()) }
}

impl SafetensorsStream {
    /// `len`: the file's length, if known.
    pub fn new(file: &str, len: Option<usize>) -> Self {
        SafetensorsStream {
            file: file.to_string(),
            len,
            at: 0,
            head: vec![0; 8],
            head_filled: 0,
            parsed: false,
            pending: Vec::new(),
            filling: None,
            done: HashMap::new(),
        }
    }

    fn err(&self, reason: String) -> Error {
        Error::Safetensors { file: self.file.clone(), reason }
    }

    fn truncated(&self, what: &str) -> Error {
        let len = match self.len {
            Some(len) => format!("{len} bytes"),
            None => format!("{} bytes so far", self.at),
        };
        self.err(format!("the file is truncated or not safetensors ({len}): {what}"))
    }

    /// Takes the next bytes of the file: `copy(from, into)` writes the chunk's bytes from `from`
    /// on into all of `into` and returns it, written (the chunk holds `len` bytes). Bytes past
    /// the last tensor are ignored.
    pub fn push(&mut self, len: usize, mut copy: impl for<'a> FnMut(usize, &'a mut [MaybeUninit<u8>]) -> &'a mut [u8]) -> Result<()> {
        let mut from = 0;
        while from < len {
            let here = self.at;
            let Some((at, into)) = self.next_span()? else {
                self.at += len - from;
                return Ok(());
            };
            if at > here {
                // Between tensors.
                let skip = (at - here).min(len - from);
                self.at += skip;
                from += skip;
                continue;
            }
            let n = into.len().min(len - from);
            let into = &mut into[..n];
            let at = into.as_ptr() as usize;
            let written = copy(from, into);
            if written.as_ptr() as usize != at || written.len() != n {
                return Err(self.err("a chunk was not copied where it was asked for".into()));
            }
            from += n;
            self.filled(n)?;
        }
        Ok(())
    }

    /// Where the next wanted bytes go: their file offset and the memory they fill (the header,
    /// or the rest of the tensor being read); `None` once every tensor is complete.
    fn next_span(&mut self) -> Result<Option<(usize, &mut [MaybeUninit<u8>])>> {
        if !self.parsed {
            let head = &mut self.head[self.head_filled..];
            // SAFETY: initialised bytes seen as bytes to write; only bytes are written there.
            let head = unsafe { std::slice::from_raw_parts_mut(head.as_mut_ptr() as *mut MaybeUninit<u8>, head.len()) };
            return Ok(Some((self.head_filled, head)));
        }
        if self.filling.is_none() {
            let Some(entry) = self.pending.pop() else { return Ok(None) };
            let storage = Storage::new(entry.dtype, entry.end - entry.start).map_err(|e| self.err(format!("tensor `{}`: {e}", entry.name)))?;
            self.filling = Some((entry, storage, 0));
        }
        let Some((entry, storage, filled)) = self.filling.as_mut() else { return Ok(None) };
        Ok(Some((entry.start + *filled, &mut storage.bytes_mut()[*filled..entry.end - entry.start])))
    }

    /// The first `n` bytes of [`Self::next_span`]'s memory are written.
    fn filled(&mut self, n: usize) -> Result<()> {
        if !self.parsed {
            self.head_filled += n;
            self.at = self.head_filled;
            if self.head_filled == 8 {
                let header_len = u64::from_le_bytes([
                    self.head[0],
                    self.head[1],
                    self.head[2],
                    self.head[3],
                    self.head[4],
                    self.head[5],
                    self.head[6],
                    self.head[7],
                ]);
                // safetensors' own limit on the header (100 MB).
                let room = self.len.map_or(u64::MAX, |len| len.saturating_sub(8) as u64);
                if header_len > 100_000_000 || header_len > room {
                    return Err(self.truncated(&format!("a header of {header_len} bytes")));
                }
                self.head.resize(8 + header_len as usize, 0);
            }
            if self.head_filled == self.head.len() && self.head_filled >= 8 {
                self.parse_header()?;
            }
            return Ok(());
        }
        if let Some((entry, _, filled)) = self.filling.as_mut() {
            *filled += n;
            self.at = entry.start + *filled;
            self.complete_tensor()?;
        }
        Ok(())
    }

    /// Makes the tensor being read once all its bytes are in.
    fn complete_tensor(&mut self) -> Result<()> {
        let complete = matches!(&self.filling, Some((entry, _, filled)) if entry.start + filled == entry.end);
        if let Some((entry, storage, _)) = self.filling.take_if(|_| complete) {
            self.make(entry, storage)?;
        }
        Ok(())
    }

    /// `entry`'s tensor from its written storage, kept by name.
    fn make(&mut self, entry: Entry, storage: Storage) -> Result<()> {
        let tensor =
            storage.into_tensor(entry.end - entry.start, entry.dtype, &entry.shape).map_err(|e| self.err(format!("tensor `{}`: {e}", entry.name)))?;
        self.done.insert(entry.name, tensor);
        Ok(())
    }

    fn parse_header(&mut self) -> Result<()> {
        let header = std::str::from_utf8(&self.head[8..]).map_err(|e| self.err(format!("the header is not UTF-8: {e}")))?;
        let metadata: safetensors::tensor::Metadata = serde_json::from_str(header).map_err(|e| self.err(format!("invalid header: {e}")))?;
        let data_start = self.head.len();
        let data_len = self.len.map(|len| len - data_start);
        let mut entries = Vec::new();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::I8 if name.ends_with(crate::models::linear::Q8_0_SUFFIX) => DType::U8,
                other => {
                    return Err(
                        self.err(format!("tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 weights (and I8 q8_0 blocks) are supported"))
                    );
                }
            };
            let (start, end) = info.data_offsets;
            let count = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if !count.is_some_and(|c| start <= end && c.checked_mul(dtype.size_in_bytes()) == Some(end - start)) {
                return Err(self.err(format!("tensor `{name}`: offsets {start}..{end} do not hold shape {:?} of {:?}", info.shape, info.dtype)));
            }
            if let (Some(data_len), Some(len)) = (data_len, self.len) {
                if end > data_len {
                    return Err(self.truncated(&format!("tensor `{name}` ends at byte {} of {len}", data_start + end)));
                }
            }
            let (Some(start), Some(end)) = (data_start.checked_add(start), data_start.checked_add(end)) else {
                return Err(self.truncated(&format!("tensor `{name}`: offsets past what this platform can address")));
            };
            let entry = Entry { name, dtype, shape: info.shape.clone(), start, end };
            if start == end {
                // No byte to wait for.
                let empty = Storage::new(dtype, 0).map_err(|e| self.err(e))?;
                self.make(entry, empty)?;
            } else {
                entries.push(entry);
            }
        }
        // Read front to back: by offset (the header's validation saw that they tile the data).
        entries.sort_by_key(|e| std::cmp::Reverse(e.start));
        self.pending = entries;
        self.parsed = true;
        Ok(())
    }

    /// Every tensor, by its name in the file, once the file has ended; a file that ended early is
    /// an error naming what is missing.
    pub fn finish(self) -> Result<HashMap<String, Tensor>> {
        if !self.parsed {
            return Err(if self.head_filled < 8 {
                self.truncated("no header length")
            } else {
                self.truncated(&format!("a header of {} bytes", self.head.len() - 8))
            });
        }
        let unread = self.filling.as_ref().map(|(e, _, _)| e).or(self.pending.last());
        if let Some(entry) = unread {
            let len = self.len.map_or(String::new(), |len| format!(" of {len}"));
            return Err(self.truncated(&format!("tensor `{}` ends at byte {}{len}", entry.name, entry.end)));
        }
        Ok(self.done)
    }
}

/// A chunk of a file as it arrives: bytes in memory natively, a JS `Uint8Array` in WASM (copied
/// into WASM memory only where a tensor's bytes go).
pub trait Chunk {
    fn len(&self) -> usize;
    /// Writes the chunk's bytes from `from` on into all of `into` and returns them, written.
    fn copy_to<'a>(&self, from: usize, into: &'a mut [MaybeUninit<u8>]) -> &'a mut [u8];
}

impl Chunk for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn copy_to<'a>(&self, from: usize, into: &'a mut [MaybeUninit<u8>]) -> &'a mut [u8] {
        write_bytes(into, &self[from..from + into.len()])
    }
}

/// A file kept as the chunks it came in, read by range once complete: a torch zip (its directory
/// is at the end) or an index. In WASM the chunks stay in JS memory.
pub trait KeptChunks: ByteSource + Default {
    type Chunk: Chunk + ?Sized;
    /// Keeps a copy of `chunk` after the ones before (the caller reuses the chunk); false when
    /// the file would be longer than this platform addresses.
    fn keep(&mut self, chunk: &Self::Chunk) -> bool;
}

impl KeptChunks for Vec<u8> {
    type Chunk = [u8];

    fn keep(&mut self, chunk: &[u8]) -> bool {
        if self.try_reserve(chunk.len()).is_err() {
            return false;
        }
        self.extend_from_slice(chunk);
        true
    }
}

impl ByteSource for Vec<u8> {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read(&self, start: usize, out: &mut [u8]) {
        self.as_slice().read(start, out)
    }
}

/// All of `src`'s bytes (a small file kept as chunks: an index, a header's first bytes).
fn read_all(src: &dyn ByteSource) -> Vec<u8> {
    let mut bytes = vec![0; src.len()];
    src.read(0, &mut bytes);
    bytes
}

/// A checkpoint taken in as its files arrive (`open`, then `push` each chunk; the chunks of
/// several files may interleave): the weight file, or an index and its shards. A safetensors
/// file becomes tensors as its bytes arrive ([`SafetensorsStream`]), so neither the file nor a
/// copy of it is ever held; a torch zip and an index are kept as their chunks ([`KeptChunks`]).
/// The first refused chunk fails the whole checkpoint.
pub struct StreamedCheckpoint<K: KeptChunks> {
    name: &'static str,
    files: Vec<(String, Incoming<K>)>,
    /// What the first refused chunk was told: every later call is refused with it.
    failed: Option<String>,
}

enum Incoming<K> {
    /// Under 4 bytes so far (whether it is a zip is not known yet), and the file's length if known.
    Start(K, Option<usize>),
    Stream(SafetensorsStream),
    Kept(K),
}

impl<K: KeptChunks> StreamedCheckpoint<K> {
    /// The checkpoint whose weights are `weights_name` (one of [`WEIGHT_FILES`]; default
    /// `model.safetensors`).
    pub fn new(weights_name: Option<&str>) -> Result<Self> {
        let name = weights_name.unwrap_or(WEIGHTS);
        let known = WEIGHT_FILES.iter().find(|&&n| n == name).copied();
        let name = known
            .ok_or_else(|| Error::Stream { file: name.to_string(), reason: format!("not a weights file: one of {}", WEIGHT_FILES.join(", ")) })?;
        Ok(StreamedCheckpoint { name, files: Vec::new(), failed: None })
    }

    /// Which of [`WEIGHT_FILES`] the weights are.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Starts a file: the weights file, or a shard by the name its index gives it; `size`, its
    /// length when known beforehand, against which a header's ranges are checked.
    pub fn open(&mut self, file: &str, size: Option<usize>) -> Result<()> {
        if self.files.iter().any(|(name, _)| name == file) {
            return Err(Error::Stream { file: file.to_string(), reason: "opened twice".into() });
        }
        // An index is small JSON, and a `.bin` that is not a zip gets the error that says so.
        let incoming =
            if file.ends_with(".json") || file.ends_with(".bin") { Incoming::Kept(K::default()) } else { Incoming::Start(K::default(), size) };
        self.files.push((file.to_string(), incoming));
        Ok(())
    }

    /// The next chunk of `file` (opened): each file's chunks in order.
    pub fn push(&mut self, file: &str, chunk: &K::Chunk) -> Result<()> {
        self.refused_earlier(file)?;
        self.take(file, chunk).inspect_err(|e| self.failed = Some(e.to_string()))
    }

    fn refused_earlier(&self, file: &str) -> Result<()> {
        match &self.failed {
            Some(failed) => Err(Error::Stream { file: file.to_string(), reason: format!("an earlier chunk was refused: {failed}") }),
            None => Ok(()),
        }
    }

    fn take(&mut self, file: &str, chunk: &K::Chunk) -> Result<()> {
        let too_long = || Error::Stream { file: file.to_string(), reason: "larger than this platform can address".into() };
        let Some((_, incoming)) = self.files.iter_mut().find(|(name, _)| name == file) else {
            return Err(Error::Stream { file: file.to_string(), reason: "a chunk of a file not opened".into() });
        };
        match incoming {
            Incoming::Start(kept, size) => {
                if !kept.keep(chunk) {
                    return Err(too_long());
                }
                if kept.len() < 4 {
                    return Ok(());
                }
                let kept = std::mem::take(kept);
                *incoming = if crate::torch_bin::is_zip(&kept) {
                    Incoming::Kept(kept)
                } else {
                    // The chunks kept are read back: the bytes of the first few chunks.
                    let mut stream = SafetensorsStream::new(file, *size);
                    let bytes = read_all(&kept);
                    stream.push(bytes.len(), |from, into| bytes.as_slice().copy_to(from, into))?;
                    Incoming::Stream(stream)
                };
                Ok(())
            }
            Incoming::Stream(stream) => stream.push(chunk.len(), |from, into| chunk.copy_to(from, into)),
            Incoming::Kept(kept) => kept.keep(chunk).then_some(()).ok_or_else(too_long),
        }
    }

    /// The tensors of the whole checkpoint, keyed by `rename(name)`, once every file has ended.
    pub fn tensors(mut self, rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
        let name = self.name;
        self.refused_earlier(name)?;
        if name.ends_with(".index.json") {
            let index = match self.remove(name) {
                Some(Incoming::Kept(kept)) => kept,
                _ => return Err(Error::MissingFile(name.to_string())),
            };
            return load_sharded_with(name, &read_all(&index), |shard| self.remove(shard).map(|f| f.tensors(shard)).transpose(), rename);
        }
        let file = self.remove(name).ok_or_else(|| Error::MissingFile(name.to_string()))?;
        Ok(file.tensors(name)?.into_iter().map(|(n, t)| (rename(&n), t)).collect())
    }

    fn remove(&mut self, file: &str) -> Option<Incoming<K>> {
        let at = self.files.iter().position(|(name, _)| name == file)?;
        Some(self.files.swap_remove(at).1)
    }
}

impl<K: KeptChunks> Incoming<K> {
    /// The file's tensors by their stored names, once it has ended.
    fn tensors(self, name: &str) -> Result<HashMap<String, Tensor>> {
        match self {
            Incoming::Start(kept, _) | Incoming::Kept(kept) => load_checkpoint_file(name, &kept, |n| n.to_string()),
            Incoming::Stream(stream) => stream.finish(),
        }
    }
}

/// A tensor of `count` little-endian f32, f16 or bf16 values (`dtype`) at `start` of `src`, read
/// straight into its storage (no second buffer the size of the tensor); `None` for another
/// dtype, or on a big-endian target, which read through a buffer of bytes.
pub(crate) fn read_float_tensor(
    src: &dyn ByteSource,
    start: usize,
    count: usize,
    dtype: DType,
    shape: &[usize],
) -> Option<std::result::Result<Tensor, String>> {
    if !cfg!(target_endian = "little") || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return None;
    }
    let bytes = count.checked_mul(dtype.size_in_bytes())?;
    Some(Storage::new(dtype, bytes).and_then(|mut storage| {
        src.read(start, zero_filled(&mut storage.bytes_mut()[..bytes]));
        storage.into_tensor(bytes, dtype, shape).map_err(|e| e.to_string())
    }))
}

/// Values for which every bit pattern is a value: their bytes can be written straight into a
/// tensor's storage.
trait PlainValue {}
impl PlainValue for f32 {}
impl PlainValue for half::f16 {}
impl PlainValue for half::bf16 {}
impl PlainValue for u8 {}

/// `n` zeroed values, or an error when memory runs out (in WASM a failed allocation would trap the
/// instance: a model too large for its 4 GiB is an error that says so instead).
pub fn zeroed<T: Clone + Default>(n: usize) -> std::result::Result<Vec<T>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| format!("out of memory: {n} values of {} bytes do not fit", std::mem::size_of::<T>()))?;
    v.resize(n, T::default());
    Ok(v)
}

/// The shard files a checkpoint index (`weight_map`: tensor → file) names, each once, in order.
/// A name that is not a plain file name (a path, `..`) is refused.
pub fn shard_names(index_file: &str, index: &[u8]) -> Result<Vec<String>> {
    Ok(unique_shards(&weight_map(index_file, index)?))
}

fn unique_shards(map: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, shard) in map {
        if !names.contains(shard) {
            names.push(shard.clone());
        }
    }
    names
}

/// An index's `weight_map` as (tensor, shard file) pairs.
fn weight_map(index_file: &str, index: &[u8]) -> Result<Vec<(String, String)>> {
    let value = parse_json(index_file, index)?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::config(index_file, "no `weight_map` object"))?;
    map.iter()
        .map(|(tensor, shard)| {
            let shard = shard.as_str().ok_or_else(|| Error::config(index_file, format!("`{tensor}` maps to {shard}, not a file name")))?;
            let plain = !shard.is_empty() && !shard.contains(['/', '\\']) && shard != "." && shard != "..";
            if !plain {
                return Err(Error::config(index_file, format!("`{tensor}` maps to {shard:?}, not a file name in the model folder")));
            }
            Ok((tensor.clone(), shard.to_string()))
        })
        .collect()
}

/// One checkpoint file, safetensors or a torch zip (`pytorch_model.bin`), told apart by its bytes.
pub fn load_checkpoint_file(file: &str, src: &dyn ByteSource, rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
    if crate::torch_bin::is_zip(src) {
        crate::torch_bin::load(if file == WEIGHTS { BIN_WEIGHTS } else { file }, src, rename)
    } else if file.ends_with(".bin") {
        Err(Error::TorchCheckpoint {
            file: file.to_string(),
            reason:
                "not a zip archive: torch.save's format before torch 1.6 is not read (load and save it again with a newer torch, or as safetensors)"
                    .into(),
        })
    } else {
        load_safetensors_from(file, src, rename)
    }
}

/// A sharded checkpoint: its index and the shards by the file names the index uses. Every shard
/// the index names must be there and hold the tensors the index puts in it.
pub fn load_sharded(
    index_file: &str,
    index: &[u8],
    shards: &[(&str, &dyn ByteSource)],
    rename: impl Fn(&str) -> String,
) -> Result<HashMap<String, Tensor>> {
    let load = |shard: &str| {
        let src = shards.iter().find(|(name, _)| *name == shard).map(|(_, src)| *src);
        src.map(|src| load_checkpoint_file(shard, src, |n| n.to_string())).transpose()
    };
    load_sharded_with(index_file, index, load, rename)
}

/// [`load_sharded`] with each shard's tensors (by their stored names) from `load`, `None` for a
/// shard that is not there.
pub fn load_sharded_with(
    index_file: &str,
    index: &[u8],
    mut load: impl FnMut(&str) -> Result<Option<HashMap<String, Tensor>>>,
    rename: impl Fn(&str) -> String,
) -> Result<HashMap<String, Tensor>> {
    let map = weight_map(index_file, index)?;
    let mut out = HashMap::new();
    for shard in unique_shards(&map) {
        let expected: Vec<&String> = map.iter().filter(|(_, s)| *s == shard).map(|(t, _)| t).collect();
        let first = expected.first().map(|t| t.as_str()).unwrap_or_default();
        let mut tensors = load(&shard)?.ok_or_else(|| Error::MissingFile(format!("{shard} (the shard {index_file} names for `{first}`)")))?;
        for tensor in expected {
            if !tensors.contains_key(tensor.as_str()) {
                return Err(Error::MissingTensor { file: format!("{shard} (as {index_file} says)"), name: tensor.clone() });
            }
        }
        out.extend(tensors.drain().map(|(name, t)| (rename(&name), t)));
    }
    Ok(out)
}

/// transformers 4.x saves a SigLIP vision tower inside a VisionEncoderDecoder as
/// `encoder.vision_model.*`; 5.x saves it as `encoder.*`. We name tensors the 5.x way.
pub fn vision_encoder_decoder_key(name: &str) -> String {
    match name.strip_prefix("encoder.vision_model.") {
        Some(rest) => format!("encoder.{rest}"),
        None => name.to_string(),
    }
}

/// Llava checkpoints are written in the legacy layout (`vision_tower.*`, `multi_modal_projector.*`,
/// `language_model.model.*`, `language_model.lm_head.*`; transformers 4.x adds `vision_model.`
/// under the tower), while transformers and PEFT name the modules `model.vision_tower.*`,
/// `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`. We use the latter.
pub fn llava_key(name: &str) -> String {
    let name = name.strip_prefix("model.").unwrap_or(name);
    let canonical = if let Some(rest) = name.strip_prefix("vision_tower.") {
        format!("model.vision_tower.{}", rest.strip_prefix("vision_model.").unwrap_or(rest))
    } else if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{rest}")
    } else if let Some(rest) = name.strip_prefix("language_model.") {
        format!("model.language_model.{}", rest.strip_prefix("model.").unwrap_or(rest))
    } else if name.starts_with("multi_modal_projector.") {
        format!("model.{name}")
    } else {
        name.to_string()
    };
    canonical
}

/// Builds a model from loaded tensors, reporting a missing tensor or a wrong shape by name.
/// Tensors come out f32, widened from 16 bits where stored so, but for the matrices a model
/// asks for as stored (`models::linear::STORED_16BIT`): those stay f16 / bf16.
pub fn build_model<M>(file: &str, tensors: HashMap<String, Tensor>, build: impl FnOnce(VarBuilder) -> candle_core::Result<M>) -> Result<M> {
    let vb = VarBuilder::from_backend(Box::new(Checkpoint(tensors)), DType::F32, Device::Cpu);
    build(vb).map_err(|e| from_candle_weights(file, e))
}

/// A loaded checkpoint as a `VarBuilder` backend: `name` in the dtype asked for; `name` +
/// `STORED_16BIT` as the file has it, for a tensor stored in 16 bits (and only then: it is not
/// there otherwise).
struct Checkpoint(HashMap<String, Tensor>);

impl Checkpoint {
    fn find(&self, name: &str) -> candle_core::Result<Tensor> {
        let stored = |base: &str| self.0.get(base).filter(|t| crate::models::half::Half::of(t.dtype()).is_some());
        let tensor = match name.strip_suffix(crate::models::linear::STORED_16BIT) {
            Some(base) => stored(base).cloned(),
            None => self.0.get(name).cloned(),
        };
        tensor.ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
    }
}

impl candle_nn::var_builder::SimpleBackend for Checkpoint {
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            let name = name.strip_suffix(crate::models::linear::STORED_16BIT).unwrap_or(name);
            return Err(
                candle_core::Error::UnexpectedShape { msg: format!("shape mismatch for {name}"), expected: s, got: tensor.shape().clone() }.bt()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.find(name)?.to_device(dev)?;
        if name.ends_with(crate::models::linear::STORED_16BIT) {
            return Ok(tensor);
        }
        tensor.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }
}

/// `generation_config.json` fields we honour, with the fallbacks transformers applies when the
/// file (or a field) is missing: the model's `config.json`, then its decoder section.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    /// First decoder input of an encoder-decoder (`decoder_start_token_id`, else `bos_token_id`).
    pub decoder_start_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub max_new_tokens: Option<usize>,
    /// Total length (prompt included) when `max_new_tokens` is not given.
    pub max_length: Option<usize>,
    /// `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
    /// `no_repeat_ngram_size`, `min_new_tokens`, `bad_words_ids` (no seed: the files have none).
    pub sampling: crate::sampling::SamplingOptions,
    /// `num_beams` (1 when absent: no beam search), `length_penalty`, `early_stopping`,
    /// `num_return_sequences`.
    pub beams: crate::captioner::BeamOptions,
}

impl GenerationDefaults {
    pub fn resolve(generation: Option<&serde_json::Value>, config: &serde_json::Value, decoder_section: &str) -> Result<Self> {
        let decoder = config.get(decoder_section);
        let lookup = |key: &str| -> Option<&serde_json::Value> {
            [generation, Some(config), decoder].into_iter().flatten().filter_map(|section| section.get(key)).find(|v| !v.is_null())
        };
        let as_id = |v: &serde_json::Value, key: &str| -> Result<u32> {
            v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| Error::config(GENERATION, format!("{key} must be a token id, found {v}")))
        };
        let as_len = |key: &str| -> Result<Option<usize>> {
            match generation.and_then(|g| g.get(key)).filter(|v| !v.is_null()) {
                Some(v) => {
                    v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| Error::config(GENERATION, format!("{key} must be an integer, found {v}")))
                }
                None => Ok(None),
            }
        };
        let decoder_start_token_id = match lookup("decoder_start_token_id").or_else(|| lookup("bos_token_id")) {
            Some(v) => Some(as_id(v, "decoder_start_token_id")?),
            None => None,
        };
        let eos_token_ids = match lookup("eos_token_id") {
            Some(serde_json::Value::Array(ids)) => ids.iter().map(|v| as_id(v, "eos_token_id")).collect::<Result<Vec<_>>>()?,
            Some(v) => vec![as_id(v, "eos_token_id")?],
            None => vec![],
        };
        // Generation parameters as transformers takes them: generation_config.json alone when it
        // exists (absent keys take GenerationConfig's defaults), else config.json's (older files).
        let lookup = |key: &str| -> Option<&serde_json::Value> {
            match generation {
                Some(g) => g.get(key).filter(|v| !v.is_null()),
                None => [Some(config), decoder].into_iter().flatten().filter_map(|section| section.get(key)).find(|v| !v.is_null()),
            }
        };
        let wrong = |key: &str, what: &str, v: &serde_json::Value| Error::config(GENERATION, format!("{key} must be {what}, found {v}"));
        let float = |key: &str| -> Result<Option<f32>> {
            lookup(key).map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| wrong(key, "a number", v))).transpose()
        };
        let count = |key: &str| -> Result<Option<usize>> {
            lookup(key).map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| wrong(key, "a non-negative integer", v))).transpose()
        };
        let bad_words_ids = match lookup("bad_words_ids") {
            Some(v) => serde_json::from_value::<Vec<Vec<u32>>>(v.clone()).map_err(|_| wrong("bad_words_ids", "a list of token id lists", v))?,
            None => vec![],
        };
        let sampling = crate::sampling::SamplingOptions {
            do_sample: match lookup("do_sample") {
                Some(v) => v.as_bool().ok_or_else(|| wrong("do_sample", "true or false", v))?,
                None => false,
            },
            temperature: float("temperature")?,
            top_k: count("top_k")?,
            top_p: float("top_p")?,
            repetition_penalty: float("repetition_penalty")?,
            // 0 is how older configs wrote "off".
            no_repeat_ngram_size: count("no_repeat_ngram_size")?.filter(|&n| n > 0),
            min_new_tokens: count("min_new_tokens")?.filter(|&n| n > 0),
            bad_words_ids,
            seed: None,
        };
        let beams = crate::captioner::BeamOptions {
            num_beams: count("num_beams")?.unwrap_or(1).max(1),
            length_penalty: float("length_penalty")?.unwrap_or(1.0),
            early_stopping: match lookup("early_stopping") {
                None => crate::beam::EarlyStopping::Heuristic,
                Some(v) => crate::beam::EarlyStopping::from_json(v).ok_or_else(|| wrong("early_stopping", "true, false or \"never\"", v))?,
            },
            num_return_sequences: count("num_return_sequences")?.unwrap_or(1).max(1),
        };
        Ok(Self {
            decoder_start_token_id,
            eos_token_ids,
            max_new_tokens: as_len("max_new_tokens")?,
            max_length: as_len("max_length")?,
            sampling,
            beams,
        })
    }

    /// New tokens to generate after a prompt of `prompt_len` positions when the caller gave
    /// no limit; `fallback` applies when the files say nothing either.
    pub fn max_new_tokens_after(&self, prompt_len: usize, fallback: usize) -> usize {
        self.max_new_tokens.or_else(|| self.max_length.map(|total| total.saturating_sub(prompt_len))).unwrap_or(fallback)
    }
}
