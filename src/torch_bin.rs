//! `pytorch_model.bin` (what `torch.save` writes since torch 1.6: a zip of `data.pkl` and one
//! `data/KEY` entry per storage), read without executing anything. The pickle is interpreted by a
//! data-only machine: it knows the calls a state dict is rebuilt with (`OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the `torch.*Storage` types) and
//! refuses every other global by name before anything could be called. Works on bytes read by
//! range (`ByteSource`), so WASM reads it from the JS buffer it was downloaded into.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::loading::ByteSource;

/// Whether `src` starts like a zip archive (a torch checkpoint; safetensors starts with a length).
pub fn is_zip(src: &dyn ByteSource) -> bool {
    if src.len() < 4 {
        return false;
    }
    let mut magic = [0u8; 4];
    src.read(0, &mut magic);
    magic == *b"PK\x03\x04"
}

/// Every tensor of a torch zip checkpoint on the CPU, keyed by `rename(name)`: f32, f16 and bf16
/// as stored (f64 narrowed to f32; integer and bool buffers such as GPT-2's `attn.bias` mask keep
/// their type).
pub fn load(file: &str, src: &dyn ByteSource, rename: impl Fn(&str) -> String) -> Result<HashMap<String, Tensor>> {
    let err = |reason: String| Error::TorchCheckpoint { file: file.to_string(), reason };
    let mut archive = zip::ZipArchive::new(Reader { src, pos: 0 }).map_err(|e| err(format!("not a torch zip checkpoint: {e}")))?;
    // Entries by name → (offset of the data, size); torch writes them uncompressed.
    let mut entries = HashMap::new();
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| err(format!("zip entry {i}: {e}")))?;
        let name = String::from_utf8_lossy(entry.name_raw()).to_string();
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(err(format!("`{name}` is compressed ({:?}); torch.save stores entries uncompressed", entry.compression())));
        }
        let start = entry.data_start().ok_or_else(|| err(format!("`{name}`: no data offset")))?;
        entries.insert(name, (start, entry.size()));
    }
    let pickle_name = entries
        .keys()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .cloned()
        .ok_or_else(|| err("no `data.pkl`: not a checkpoint of torch.save (torch ≥ 1.6)".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Some(&(start, size)) = entries.get(&format!("{prefix}byteorder")) {
        let order = read_entry(src, start, size, "byteorder").map_err(err)?;
        if order != b"little" {
            return Err(err(format!("byte order {:?}; only little-endian checkpoints are read", String::from_utf8_lossy(&order))));
        }
    }
    let &(start, size) = entries.get(&pickle_name).ok_or_else(|| err("no data.pkl".into()))?;
    let pickle = read_entry(src, start, size, &pickle_name).map_err(err)?;
    let state = Machine::default().run(&pickle).map_err(|e| err(format!("data.pkl: {e}")))?;
    let items = match state {
        Value::Dict(items) => items,
        other => return Err(err(format!("data.pkl holds {}, not a state dict", other.kind()))),
    };
    let mut tensors = HashMap::new();
    for (key, value) in items {
        let Value::Str(name) = key else { return Err(err(format!("a state dict key is {}, not a name", key.kind()))) };
        let Value::Tensor(t) = value else { continue };
        let &(start, size) = entries
            .get(&format!("{prefix}data/{}", t.storage.key))
            .ok_or_else(|| err(format!("tensor `{name}`: storage `data/{}` is not in the archive", t.storage.key)))?;
        let tensor = t.read(src, start, size).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        tensors.insert(rename(&name), tensor);
    }
    Ok(tensors)
}

fn read_entry(src: &dyn ByteSource, start: u64, size: u64, name: &str) -> std::result::Result<Vec<u8>, String> {
    let end = start.checked_add(size).filter(|&e| e <= src.len() as u64).ok_or_else(|| format!("`{name}` runs past the end of the file"))?;
    let mut bytes = crate::loading::zeroed::<u8>((end - start) as usize)?;
    src.read(start as usize, &mut bytes);
    Ok(bytes)
}

/// `Read + Seek` over a [`ByteSource`], for the zip directory.
struct Reader<'a> {
    src: &'a dyn ByteSource,
    pos: u64,
}

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = self.src.len() as u64;
        let n = (len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n > 0 {
            self.src.read(self.pos as usize, &mut buf[..n]);
            self.pos += n as u64;
        }
        Ok(n)
    }
}

impl Seek for Reader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let len = self.src.len() as i128;
        let pos = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if pos < 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = pos as u64;
        Ok(self.pos)
    }
}

/// A storage as the pickle names it: `('storage', torch.FloatStorage, KEY, LOCATION, NUMEL)`.
#[derive(Debug, Clone)]
struct Storage {
    dtype: DType,
    key: String,
    numel: usize,
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, …)`: a strided view of a storage.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// The view's values, read from the storage's entry (`start`, `size` bytes), checked against
    /// it before anything is allocated.
    fn read(&self, src: &dyn ByteSource, start: u64, size: u64) -> std::result::Result<Tensor, String> {
        let elem = self.storage.dtype.size_in_bytes();
        let storage_bytes = self.storage.numel.checked_mul(elem).ok_or("storage size overflows")?;
        if storage_bytes as u64 > size {
            return Err(format!("storage of {} elements needs {storage_bytes} bytes, its entry has {size}", self.storage.numel));
        }
        if start.checked_add(size).is_none_or(|end| end > src.len() as u64) {
            return Err(format!("its storage entry ({size} bytes at {start}) runs past the end of the file ({} bytes)", src.len()));
        }
        let count = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
        // Every element read is one of the storage's, so a view may not be larger than it (torch
        // saves an expanded, stride-0 tensor this way; no checkpoint of weights does).
        if count > self.storage.numel {
            return Err(format!("a view of {count} elements (shape {:?}) over a storage of {}", self.shape, self.storage.numel));
        }
        if self.stride.len() != self.shape.len() {
            return Err(format!("shape {:?} with stride {:?}", self.shape, self.stride));
        }
        // The last element the view touches must lie in the storage.
        let span = self.shape.iter().zip(&self.stride).try_fold(0usize, |a, (&d, &s)| a.checked_add(d.saturating_sub(1).checked_mul(s)?));
        let last = span.and_then(|s| s.checked_add(self.offset));
        if count > 0 && last.is_none_or(|l| l >= self.storage.numel) {
            return Err(format!(
                "view (offset {}, shape {:?}, stride {:?}) runs past its storage of {}",
                self.offset, self.shape, self.stride, self.storage.numel
            ));
        }
        let contiguous = {
            let mut expected = 1;
            let mut ok = true;
            for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
                ok &= d == 1 || s == expected;
                expected *= d;
            }
            ok
        };
        let at = start as usize + self.offset * elem;
        if contiguous {
            if let Some(tensor) = crate::loading::read_float_tensor(src, at, count, self.storage.dtype, &self.shape) {
                return tensor;
            }
        }
        let bytes = if contiguous {
            let mut bytes = crate::loading::zeroed::<u8>(count * elem)?;
            src.read(at, &mut bytes);
            bytes
        } else {
            // Rare (a transposed tensor saved as such): gather element by element.
            let mut bytes = Vec::with_capacity(count * elem);
            let mut index = vec![0usize; self.shape.len()];
            let mut one = vec![0u8; elem];
            for _ in 0..count {
                let at = self.offset + index.iter().zip(&self.stride).map(|(i, s)| i * s).sum::<usize>();
                src.read(start as usize + at * elem, &mut one);
                bytes.extend_from_slice(&one);
                for axis in (0..index.len()).rev() {
                    index[axis] += 1;
                    if index[axis] < self.shape[axis] {
                        break;
                    }
                    index[axis] = 0;
                }
            }
            bytes
        };
        let tensor = Tensor::from_raw_buffer(&bytes, self.storage.dtype, &self.shape, &Device::Cpu).map_err(|e| e.to_string())?;
        match self.storage.dtype {
            DType::F64 => tensor.to_dtype(DType::F32).map_err(|e| e.to_string()),
            _ => Ok(tensor),
        }
    }
}

/// What the machine's stack holds.
#[derive(Debug, Clone)]
enum Value {
    None,
    /// Bools, floats and bytes appear only where a state dict needs no value of them (a
    /// tensor's `requires_grad`, metadata).
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global the machine knows (every other is refused when named).
    Global(Known),
    Storage(Storage),
    Tensor(TensorRef),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Known {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(DType),
}

fn known_global(module: &str, name: &str) -> std::result::Result<Known, String> {
    let storage = |dtype| Ok(Known::StorageType(dtype));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Known::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Known::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Ok(Known::RebuildParameter),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::U32),
        ("torch", "ByteStorage") | ("torch", "BoolStorage") => storage(DType::U8),
        _ => Err(format!("refuses the global `{module}.{name}`: a checkpoint holds tensors, and only torch's tensor-rebuild calls are allowed")),
    }
}

/// The pickle virtual machine, data only.
#[derive(Default)]
struct Machine {
    stack: Vec<Value>,
    /// Positions in `stack` of the open marks.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

/// Bytes read from the pickle stream.
struct Stream<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Stream<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("the pickle ends early")?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<usize, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("a line without its end")?;
        let line = String::from_utf8_lossy(&rest[..n]).to_string();
        self.pos += n + 1;
        Ok(line)
    }
    fn utf8(&mut self, n: usize) -> std::result::Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| format!("a string that is not UTF-8: {e}"))
    }
}

impl Machine {
    fn pop(&mut self) -> std::result::Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pops past a mark".into());
        }
        self.stack.pop().ok_or_else(|| "pops an empty stack".into())
    }

    fn top(&mut self) -> std::result::Result<&mut Value, String> {
        self.stack.last_mut().ok_or_else(|| "an empty stack".into())
    }

    /// The values pushed since the last mark (which is removed).
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let at = self.marks.pop().ok_or("no mark")?;
        if at > self.stack.len() {
            return Err("a mark past the stack".into());
        }
        Ok(self.stack.split_off(at))
    }

    fn run(mut self, bytes: &[u8]) -> std::result::Result<Value, String> {
        let mut s = Stream { bytes, pos: 0 };
        loop {
            let op = s.u8()?;
            match op {
                0x80 => {
                    s.u8()?; // PROTO
                }
                0x95 => {
                    s.u64()?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(vec![])),
                b']' => self.stack.push(Value::List(vec![])),
                b')' => self.stack.push(Value::Tuple(vec![])),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = s.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let v = s.u16()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'J' => {
                    let v = s.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = s.u8()? as usize;
                    let b = s.take(n)?;
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes"));
                    }
                    let mut v: i64 = if b.last().is_some_and(|&x| x & 0x80 != 0) { -1 } else { 0 };
                    for &x in b.iter().rev() {
                        v = (v << 8) | x as i64;
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    s.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = s.u32()? as usize;
                    let v = s.utf8(n)?;
                    self.stack.push(Value::Str(v));
                }
                0x8c => {
                    let n = s.u8()? as usize;
                    let v = s.utf8(n)?;
                    self.stack.push(Value::Str(v));
                }
                0x8d => {
                    let n = usize::try_from(s.u64()?).map_err(|_| "a string too long")?;
                    let v = s.utf8(n)?;
                    self.stack.push(Value::Str(v));
                }
                b'B' => {
                    let n = s.u32()? as usize;
                    s.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'C' => {
                    let n = s.u8()? as usize;
                    s.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'c' => {
                    let (module, name) = (s.line()?, s.line()?);
                    self.stack.push(Value::Global(known_global(&module, &name)?));
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(known_global(&m, &n)?)),
                        _ => return Err("STACK_GLOBAL without two names".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<std::result::Result<Vec<_>, _>>()?;
                    items.reverse();
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(pairs(items)?));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        other => return Err(format!("APPEND to {}", other.kind())),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        other => return Err(format!("APPENDS to {}", other.kind())),
                    }
                }
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        other => return Err(format!("SETITEM on {}", other.kind())),
                    }
                }
                b'u' => {
                    let items = pairs(self.pop_mark()?)?;
                    match self.top()? {
                        Value::Dict(d) => d.extend(items),
                        other => return Err(format!("SETITEMS on {}", other.kind())),
                    }
                }
                b'q' => {
                    let i = s.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = s.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { s.u8()? as u32 } else { s.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| format!("memo {i} was never stored"))?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent(pid)?);
                }
                b'R' | 0x81 => {
                    let (args, callable) = (self.pop()?, self.pop()?);
                    let Value::Tuple(args) = args else { return Err(format!("a call whose arguments are {}", args.kind())) };
                    let Value::Global(f) = callable else { return Err(format!("calls {}", callable.kind())) };
                    self.stack.push(call(f, args)?);
                }
                b'b' => {
                    // BUILD sets an object's state (a state dict's `_metadata`): not needed.
                    self.pop()?;
                }
                other => return Err(format!("opcode 0x{other:02x} at byte {} is not one a checkpoint needs", s.pos - 1)),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> std::result::Result<Vec<(Value, Value)>, String> {
    if items.len() % 2 != 0 {
        return Err("a dict with an odd number of items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn int(v: &Value, what: &str) -> std::result::Result<usize, String> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i}")),
        other => Err(format!("{what} is {}", other.kind())),
    }
}

fn ints(v: &Value, what: &str) -> std::result::Result<Vec<usize>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|i| int(i, what)).collect(),
        other => Err(format!("{what} is {}", other.kind())),
    }
}

/// `('storage', storage type, key, location, numel)`.
fn persistent(pid: Value) -> std::result::Result<Value, String> {
    let Value::Tuple(t) = pid else { return Err(format!("a persistent id that is {}", pid.kind())) };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Known::StorageType(dtype)), Value::Str(key), _, numel] if tag == "storage" => {
            Ok(Value::Storage(Storage { dtype: *dtype, key: key.clone(), numel: int(numel, "storage size")? }))
        }
        _ => Err("a persistent id that is not a storage".into()),
    }
}

fn call(f: Known, args: Vec<Value>) -> std::result::Result<Value, String> {
    match f {
        Known::OrderedDict => match args.as_slice() {
            [] => Ok(Value::Dict(vec![])),
            _ => Err("OrderedDict with arguments".into()),
        },
        Known::RebuildTensor => match args.as_slice() {
            [Value::Storage(storage), offset, shape, stride, ..] => Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: int(offset, "storage offset")?,
                shape: ints(shape, "size")?,
                stride: ints(stride, "stride")?,
            })),
            _ => Err("_rebuild_tensor_v2 without a storage, offset, size and stride".into()),
        },
        Known::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        Known::StorageType(_) => Err("a storage type called directly".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::Machine;

    #[test]
    fn refuses_globals_outside_the_tensor_rebuild_calls() {
        // pickle.dumps of a class whose __reduce__ returns (os.system, ('echo hi',)), protocol 2.
        let evil = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let e = Machine::default().run(evil).unwrap_err();
        assert!(e.contains("`posix.system`"), "{e}");
        let eval = b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x031+1\x94\x85\x94R\x94.";
        let e = Machine::default().run(eval).unwrap_err();
        assert!(e.contains("`builtins.eval`"), "{e}");
    }

    #[test]
    fn truncated_and_unknown_input_is_an_error() {
        assert!(Machine::default().run(b"\x80\x02}q\x00(X\x05\x00\x00").is_err());
        assert!(Machine::default().run(b"\x80\x02\xff").unwrap_err().contains("0xff"));
        assert!(Machine::default().run(b"").is_err());
        // A pop through a mark or an empty stack.
        assert!(Machine::default().run(b"(0.").is_err());
        assert!(Machine::default().run(b"h\x05.").unwrap_err().contains("memo 5"));
    }
}
