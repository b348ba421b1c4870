//! The GPU backend's device layer, on `wgpu`: WebGPU in the browser, Vulkan / Metal / DX12
//! natively (the same WGSL kernels on both). A [`Gpu`] holds the device and the compiled
//! kernels; [`GpuTensor`]s live in its memory, uploaded once, and only what generation needs is
//! read back. The first kernel is the one the encoders spend ~90 % of their time in, `Linear`'s
//! product; the models' other operations follow it here.
//!
//! Every failure is an [`Error::Gpu`]: no adapter, a buffer past the device's limits, shapes
//! that do not fit, a validation error or a lost device (reported by the next read, never a
//! panic: wgpu's default handler for those panics).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_nn::Activation;

use crate::error::{Error, Result};

mod backend;
pub use backend::{GpuKvCache, GpuLayerNorm, GpuLinear, GpuRmsNorm, GpuRope};

fn gpu_error(message: impl Into<String>) -> Error {
    Error::Gpu(message.into())
}

/// How a tensor's values are stored in GPU memory. Kernels compute in f32 and write f32; a
/// model's matrices (its `Linear`s and embedding tables, what decoding streams every step) may
/// be stored as f16 where the device has `shader-f16`: half the memory and the bytes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuDtype {
    F32,
    F16,
}

impl GpuDtype {
    fn bytes(self) -> usize {
        match self {
            GpuDtype::F32 => 4,
            GpuDtype::F16 => 2,
        }
    }
}

/// The kernels that read a weight matrix, compiled for one storage type of it (WGSL's `W`).
struct WeightKernels {
    linear: wgpu::ComputePipeline,
    /// `linear` for k a multiple of 4 (vec4 loads).
    linear_vec4: wgpu::ComputePipeline,
    /// `linear` for a few rows (decoding steps), k a multiple of 4.
    linear_rows: wgpu::ComputePipeline,
    linear_narrow: wgpu::ComputePipeline,
    /// Rows of a table by index (embeddings), or of an activation (f32).
    gather: wgpu::ComputePipeline,
}

/// A device, its queue and the compiled kernels.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    f32: WeightKernels,
    /// Where the device has `shader-f16`.
    f16: Option<WeightKernels>,
    /// How `Backend::linear_from` and `embedding_from` store a model's matrices.
    weights: GpuDtype,
    norm: wgpu::ComputePipeline,
    add: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    columns: wgpu::ComputePipeline,
    rope: wgpu::ComputePipeline,
    /// Bound where a kernel's optional input is absent (WebGPU binds every slot).
    empty: wgpu::Buffer,
    /// The queued kernels' parameters, a slot each (`PARAMS_SLOT`): one buffer written once a
    /// batch, where a buffer made per kernel cost more than small kernels themselves.
    params: wgpu::Buffer,
    /// The first uncaptured error or device loss, reported by the next read.
    failure: Arc<Mutex<Option<String>>>,
    /// Kernels queued since the last submit.
    pending: Mutex<Option<Pending>>,
    /// Kernels' output buffers no tensor holds any more.
    pool: Arc<Mutex<Pool>>,
    /// Kernels queued so far.
    dispatched: std::sync::atomic::AtomicU64,
}

/// One command encoder for every kernel between two reads: a submit (and a compute pass) per
/// kernel cost more than the products themselves on a fast GPU.
struct Pending {
    /// Declared first: dropped (ending the pass) before the encoder it records into.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: wgpu::CommandEncoder,
    dispatches: usize,
    /// The kernels' parameters, a `PARAMS_SLOT` each, in dispatch order.
    params: Vec<u8>,
}

/// Bytes of the parameters buffer each kernel of a batch binds (WebGPU's largest uniform
/// offset alignment, so a multiple of every device's).
const PARAMS_SLOT: usize = 256;

/// Rows up to which a product streams the weight (linear_rows.wgsl's ROWS).
const LINEAR_ROWS: usize = 4;

/// Invocations that share a column in linear_rows.wgsl (its LANES).
const LINEAR_LANES: usize = 32;

/// Submitted every this many kernels, so that the GPU starts on a long forward while the rest
/// is recorded; also the slots of the parameters buffer.
const DISPATCHES_PER_SUBMIT: usize = 48;

/// Output buffers by size class, reused instead of allocated (and zero-filled by wgpu) per
/// kernel. The queue runs in order, so a kernel handed a buffer back writes it only after every
/// kernel queued to read its old contents.
#[derive(Debug, Default)]
struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    idle_bytes: u64,
}

/// Idle buffers past this many bytes are freed, not kept.
const POOL_IDLE_BYTES: u64 = 256 << 20;

impl Pool {
    fn take(&mut self, bytes: u64) -> Option<wgpu::Buffer> {
        let buffer = self.free.get_mut(&bytes)?.pop()?;
        self.idle_bytes -= bytes;
        Some(buffer)
    }

    fn give(&mut self, buffer: wgpu::Buffer) {
        let bytes = buffer.size();
        if self.idle_bytes + bytes <= POOL_IDLE_BYTES {
            self.idle_bytes += bytes;
            self.free.entry(bytes).or_default().push(buffer);
        }
    }
}

/// Buffer sizes in steps of an eighth of their power of two: a decoder's caches grow a token at
/// a time, and each length would otherwise be a size of its own. At most 12.5 % more.
fn size_class(bytes: u64) -> u64 {
    let step = ((1u64 << (63 - bytes.max(1).leading_zeros())) / 8).max(256);
    bytes.div_ceil(step) * step
}

/// A tensor's buffer; a kernel's output goes back to its pool when the last tensor sharing it
/// is dropped.
#[derive(Debug)]
struct Storage {
    buffer: wgpu::Buffer,
    pool: Option<Arc<Mutex<Pool>>>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(mut pool) = self.pool.as_ref().and_then(|p| p.lock().ok()) {
            pool.give(self.buffer.clone());
        }
    }
}

/// Values in GPU memory, row-major with this shape (a handle: clones share the buffer); f32
/// unless a weight stored as f16.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: GpuDtype,
}

impl GpuTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> GpuDtype {
        self.dtype
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    fn buffer(&self) -> &wgpu::Buffer {
        &self.storage.buffer
    }

    /// The same values (the same buffer) as `shape`, of as many values.
    pub fn reshape(&self, shape: &[usize]) -> Result<GpuTensor> {
        if elements(shape, "reshape")? != self.len() {
            return Err(gpu_error(format!("reshape: {:?} into {shape:?}", self.shape)));
        }
        Ok(GpuTensor { storage: self.storage.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
}

/// A model's encoder side uploaded to a GPU (`Architecture::gpu_encoder`): pixel values [B, C,
/// H, W] on the CPU → what the family's `Architecture::encode` gives, queued on the GPU.
pub type GpuEncoder = Box<dyn Fn(&Gpu, &candle_core::Tensor) -> Result<GpuTensor> + Send + Sync>;

impl Gpu {
    /// The adapter the platform prefers for performance (WebGPU's `navigator.gpu` in a
    /// browser), with every limit it has: a model's largest matrix (GPT-2's 154 MB token
    /// embeddings) is past WebGPU's default 128 MiB binding.
    pub async fn new() -> Result<Self> {
        // wgpu panics (a trap in WASM) making a WebGPU instance where the global scope is
        // neither a window nor a dedicated worker, e.g. Node's worker_threads.
        #[cfg(target_arch = "wasm32")]
        if !wgpu::util::is_browser_webgpu_supported().await {
            return Err(gpu_error("no WebGPU here (no navigator.gpu in this context, or it gives no adapter)"));
        }
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
        descriptor.backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(descriptor);
        let options = wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() };
        let adapter = instance.request_adapter(&options).await.map_err(|e| gpu_error(format!("no GPU adapter ({e})")))?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let required_features = adapter.features() & wgpu::Features::SHADER_F16;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wasmcap"),
                required_features,
                required_limits: limits,
                memory_hints: wgpu::MemoryHints::Performance,
                ..Default::default()
            })
            .await
            .map_err(|e| gpu_error(format!("{}: no device ({e})", info.name)))?;
        let failure = Arc::new(Mutex::new(None::<String>));
        let record = {
            let failure = failure.clone();
            move |message: String| {
                if let Ok(mut slot) = failure.lock() {
                    slot.get_or_insert(message);
                }
            }
        };
        let on_error = record.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| on_error(e.to_string())));
        device.set_device_lost_callback(move |reason, message| record(format!("device lost ({reason:?}): {message}")));
        let kernel = |label: &str, source: &str| {
            let module =
                device.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(source.into()) });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let activation = include_str!("activation.wgsl");
        // `W`, the weight's storage type, declared first: WGSL's `enable` precedes everything.
        let weight_kernels = |dtype: GpuDtype| {
            let w = match dtype {
                GpuDtype::F32 => "alias W = f32;",
                GpuDtype::F16 => "enable f16;\nalias W = f16;",
            };
            let linear_with = |loads: &str| format!("{w}\n{activation}\n{}\n{loads}", include_str!("linear.wgsl"));
            let few_rows_with = |kernel: &str| format!("{w}\n{activation}\n{}\n{kernel}", include_str!("linear_few_rows.wgsl"));
            WeightKernels {
                linear: kernel("linear", &linear_with(include_str!("linear_loads.wgsl"))),
                linear_vec4: kernel("linear_vec4", &linear_with(include_str!("linear_loads_vec4.wgsl"))),
                linear_rows: kernel("linear_rows", &few_rows_with(include_str!("linear_rows.wgsl"))),
                linear_narrow: kernel("linear_narrow", &few_rows_with(include_str!("linear_narrow.wgsl"))),
                gather: kernel("gather", &format!("{w}\n{}", include_str!("gather.wgsl"))),
            }
        };
        let f32 = weight_kernels(GpuDtype::F32);
        let f16 = device.features().contains(wgpu::Features::SHADER_F16).then(|| weight_kernels(GpuDtype::F16));
        let norm = kernel("norm", include_str!("norm.wgsl"));
        let add = kernel("add", include_str!("add.wgsl"));
        let attention = kernel("attention", include_str!("attention.wgsl"));
        let columns = kernel("columns", include_str!("columns.wgsl"));
        let rope = kernel("rope", include_str!("rope.wgsl"));
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: (DISPATCHES_PER_SUBMIT * PARAMS_SLOT) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let empty = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("empty"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            device,
            queue,
            info,
            f32,
            f16,
            weights: GpuDtype::F32,
            norm,
            add,
            attention,
            columns,
            rope,
            empty,
            params,
            failure,
            pending: Mutex::new(None),
            pool: Arc::new(Mutex::new(Pool::default())),
            dispatched: Default::default(),
        })
    }

    /// Releases the device and its memory now, as a lost device would be: later work is an
    /// error at the next read, never a hang.
    pub fn destroy(&self) {
        self.device.destroy();
    }

    /// Kernels queued since the device was opened (what shows that work ran here).
    pub fn kernels_queued(&self) -> u64 {
        self.dispatched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The adapter's name, kind and backend, e.g. "NVIDIA H100 (DiscreteGpu, Vulkan)" (browsers
    /// may keep the name to themselves).
    pub fn adapter(&self) -> String {
        let name = if self.info.name.is_empty() { "unnamed adapter" } else { &self.info.name };
        format!("{name} ({:?}, {:?})", self.info.device_type, self.info.backend)
    }

    /// `data` (row-major, `shape`) copied into GPU memory.
    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_as(data, shape, GpuDtype::F32)
    }

    /// `data` copied into GPU memory, stored as `dtype` (f16: rounded to nearest, where the
    /// device has `shader-f16`; only the kernels that read a weight take it).
    pub fn upload_as(&self, data: &[f32], shape: &[usize], dtype: GpuDtype) -> Result<GpuTensor> {
        let len = elements(shape, "upload")?;
        if len != data.len() {
            return Err(gpu_error(format!("upload: {} values for shape {shape:?} ({len})", data.len())));
        }
        self.weight_kernels(dtype, "upload")?;
        // check_size counts 4-byte words.
        self.check_size(len.div_ceil(4 / dtype.bytes()), "upload")?;
        let halves: Vec<half::f16>;
        let bytes: &[u8] = match dtype {
            GpuDtype::F32 => bytemuck::cast_slice(data),
            GpuDtype::F16 => {
                halves = data.iter().map(|&v| half::f16::from_f32(v)).collect();
                bytemuck::cast_slice(&halves)
            }
        };
        // buffer_with pads: WebGPU has no empty buffers, a tensor of no values keeps 4 bytes.
        let buffer = self.buffer_with("upload", bytes, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST)?;
        Ok(GpuTensor { storage: Arc::new(Storage { buffer, pool: None }), shape: shape.to_vec(), dtype })
    }

    /// Whether the device can store weights as f16 (`shader-f16`).
    pub fn has_f16(&self) -> bool {
        self.f16.is_some()
    }

    /// How a model's matrices are stored from now on when uploaded (`Backend::linear_from`,
    /// `embedding_from`); f16 where the device has no `shader-f16` is an error.
    pub fn store_weights_as(&mut self, dtype: GpuDtype) -> Result<()> {
        self.weight_kernels(dtype, "weights")?;
        self.weights = dtype;
        Ok(())
    }

    /// How a model's matrices are stored when uploaded.
    pub fn weights_dtype(&self) -> GpuDtype {
        self.weights
    }

    fn weight_kernels(&self, dtype: GpuDtype, what: &str) -> Result<&WeightKernels> {
        match dtype {
            GpuDtype::F32 => Ok(&self.f32),
            GpuDtype::F16 => self.f16.as_ref().ok_or_else(|| gpu_error(format!("{what}: f16 storage, but {} has no shader-f16", self.adapter()))),
        }
    }

    /// y = x·wᵀ + b over x's last dimension: x [.., k], w [n, k], b [n] → y [.., n].
    pub fn linear(&self, x: &GpuTensor, w: &GpuTensor, b: Option<&GpuTensor>) -> Result<GpuTensor> {
        self.linear_activated(x, w, b, None)
    }

    /// `act` of `linear(x, w, b)`, applied as the product is written.
    pub fn linear_activated(&self, x: &GpuTensor, w: &GpuTensor, b: Option<&GpuTensor>, act: Option<&Activation>) -> Result<GpuTensor> {
        let (Some((&k, batch)), [n, wk]) = (x.shape.split_last(), w.shape.as_slice()) else {
            return Err(gpu_error(format!("linear: x {:?}, weight {:?} (expected [.., k] and [n, k])", x.shape, w.shape)));
        };
        let n = *n;
        if *wk != k || b.is_some_and(|b| b.shape != [n]) {
            return Err(gpu_error(format!("linear: x {:?}, weight {:?}, bias {:?}", x.shape, w.shape, b.map(|b| b.shape.clone()))));
        }
        let act = activation_code(act)?;
        only_f32(&[Some(x), b], "linear")?;
        let kernels = self.weight_kernels(w.dtype, "linear")?;
        let m: usize = batch.iter().product();
        let shape: Vec<usize> = batch.iter().copied().chain([n]).collect();
        let y = self.output(shape, "linear")?;
        if m == 0 || n == 0 {
            return Ok(y);
        }
        let bindings = [x.buffer(), w.buffer(), b.map_or(&self.empty, |b| b.buffer()), y.buffer()];
        if m <= LINEAR_ROWS && k.is_multiple_of(4) {
            // linear_rows.wgsl: 8 columns a workgroup, 32 lanes each; linear_narrow.wgsl: 64
            // columns a workgroup, one invocation each, where k has fewer vec4s than lanes.
            let (pipeline, columns) = if k < 4 * LINEAR_LANES { (&kernels.linear_narrow, 64) } else { (&kernels.linear_rows, 8) };
            let [gx, gy] = self.grid(n.div_ceil(columns), "linear")?;
            let params = [m, n, k, b.is_some() as usize, act as usize, gx as usize].map(|v| v as u32);
            self.dispatch(pipeline, &bindings, &params, [gx, gy])?;
            return Ok(y);
        }
        // linear.wgsl's tile: 32 × 32 outputs a workgroup.
        let groups = (n.div_ceil(32), m.div_ceil(32));
        let max = self.device.limits().max_compute_workgroups_per_dimension as usize;
        if groups.0 > max || groups.1 > max {
            return Err(gpu_error(format!("linear: {m} × {n} outputs need {groups:?} workgroups, the device allows {max} a dimension")));
        }
        let params = [m, n, k, b.is_some() as usize, act as usize].map(|v| v as u32);
        self.dispatch(
            if k.is_multiple_of(4) { &kernels.linear_vec4 } else { &kernels.linear },
            &bindings,
            &params,
            [groups.0 as u32, groups.1 as u32],
        )?;
        Ok(y)
    }

    /// LayerNorm over the last dimension: (x − mean) / √(var + eps) · weight + bias.
    pub fn layer_norm(&self, x: &GpuTensor, weight: &GpuTensor, bias: &GpuTensor, eps: f32) -> Result<GpuTensor> {
        self.norm(x, weight, Some(bias), eps)
    }

    /// RMSNorm over the last dimension: x / √(mean(x²) + eps) · weight.
    pub fn rms_norm(&self, x: &GpuTensor, weight: &GpuTensor, eps: f32) -> Result<GpuTensor> {
        self.norm(x, weight, None, eps)
    }

    fn norm(&self, x: &GpuTensor, weight: &GpuTensor, bias: Option<&GpuTensor>, eps: f32) -> Result<GpuTensor> {
        only_f32(&[Some(x), Some(weight), bias], "norm")?;
        let n = x.shape.last().copied().unwrap_or(0);
        if n == 0 || weight.shape != [n] || bias.is_some_and(|b| b.shape != [n]) {
            return Err(gpu_error(format!("norm: x {:?}, weight {:?}, bias {:?}", x.shape, weight.shape, bias.map(|b| b.shape.clone()))));
        }
        let rows = x.len() / n;
        let y = self.output(x.shape.clone(), "norm")?;
        let [gx, gy] = self.grid(rows, "norm")?;
        let params = [rows as u32, n as u32, eps.to_bits(), bias.is_none() as u32, gx];
        self.dispatch(&self.norm, &[x.buffer(), weight.buffer(), bias.map_or(&self.empty, |b| b.buffer()), y.buffer()], &params, [gx, gy])?;
        Ok(y)
    }

    /// a + b, b repeated over a's leading dimensions: b's shape is a trailing part of a's
    /// (a residual: the same shape; position embeddings [T, D] for images [B, T, D]).
    pub fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.elementwise(a, b, 0, "add")
    }

    /// a · b, b repeated as in [`Gpu::add`].
    pub fn mul(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.elementwise(a, b, 1, "mul")
    }

    fn elementwise(&self, a: &GpuTensor, b: &GpuTensor, op: u32, what: &str) -> Result<GpuTensor> {
        only_f32(&[Some(a), Some(b)], what)?;
        // Leading 1s broadcast too: [1, T, D] over [B, T, D].
        let b_shape = &b.shape[b.shape.iter().take_while(|&&d| d == 1).count()..];
        if b_shape.len() > a.shape.len() || !a.shape.ends_with(b_shape) {
            return Err(gpu_error(format!("{what}: {:?} and {:?} (the second must be a trailing part of the first)", a.shape, b.shape)));
        }
        let y = self.output(a.shape.clone(), what)?;
        if a.len() == 0 {
            return Ok(y);
        }
        let [gx, gy] = self.grid(a.len().div_ceil(256), what)?;
        self.dispatch(&self.add, &[a.buffer(), b.buffer(), y.buffer()], &[a.len() as u32, b.len().max(1) as u32, gx * 256, op], [gx, gy])?;
        Ok(y)
    }

    /// Columns `start..start + width` of x [.., x_width] → [.., width].
    pub fn columns(&self, x: &GpuTensor, start: usize, width: usize) -> Result<GpuTensor> {
        only_f32(&[Some(x)], "columns")?;
        let x_width = x.shape.last().copied().unwrap_or(0);
        if start + width > x_width {
            return Err(gpu_error(format!("columns: {start}..{} of {:?}", start + width, x.shape)));
        }
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = width;
        }
        let y = self.output(shape, "columns")?;
        let len = y.len();
        if len == 0 {
            return Ok(y);
        }
        let [gx, gy] = self.grid(len.div_ceil(256), "columns")?;
        let params = [len, width, x_width, start, gx as usize * 256].map(|v| v as u32);
        self.dispatch(&self.columns, &[x.buffer(), y.buffer()], &params, [gx, gy])?;
        Ok(y)
    }

    /// x [B, T, H·d] rotated (rotate-half) by rows `first..first + T` of the tables cos and
    /// sin [positions, d / 2].
    pub fn rope(&self, x: &GpuTensor, heads: usize, cos: &GpuTensor, sin: &GpuTensor, first: usize) -> Result<GpuTensor> {
        only_f32(&[Some(x), Some(cos), Some(sin)], "rope")?;
        let bad = || gpu_error(format!("rope: x {:?} with {heads} heads, tables {:?} from row {first}", x.shape, cos.shape));
        let (&[_, t, hd], &[positions, half]) = (x.shape.as_slice(), cos.shape.as_slice()) else { return Err(bad()) };
        if heads == 0 || hd != heads * 2 * half || sin.shape != cos.shape || first + t > positions {
            return Err(bad());
        }
        let y = self.output(x.shape.clone(), "rope")?;
        let pairs = x.len() / 2;
        if pairs == 0 {
            return Ok(y);
        }
        let [gx, gy] = self.grid(pairs.div_ceil(256), "rope")?;
        let params = [pairs, t, heads, half, first, gx as usize * 256].map(|v| v as u32);
        self.dispatch(&self.rope, &[x.buffer(), cos.buffer(), sin.buffer(), y.buffer()], &params, [gx, gy])?;
        Ok(y)
    }

    /// The first `t` rows of each batch of x [B, ≥ t, W] written into `into` [B, rows, W] from
    /// row `at` of each batch (new positions into a cache; a cache's positions into a larger one).
    pub fn write_rows(&self, x: &GpuTensor, t: usize, into: &GpuTensor, at: usize) -> Result<()> {
        only_f32(&[Some(x), Some(into)], "write_rows")?;
        let (&[b, x_rows, w], &[ib, rows, iw]) = (x.shape.as_slice(), into.shape.as_slice()) else {
            return Err(gpu_error(format!("write_rows: {:?} into {:?}", x.shape, into.shape)));
        };
        if b != ib || w != iw || t > x_rows || at + t > rows {
            return Err(gpu_error(format!("write_rows: {t} rows of {:?} into {:?} from row {at}", x.shape, into.shape)));
        }
        if t * w == 0 {
            return Ok(());
        }
        self.record(|p| {
            // Copies are recorded outside compute passes.
            p.pass = None;
            for bi in 0..b {
                let (from, to) = (bi * x_rows * w, (bi * rows + at) * w);
                p.encoder.copy_buffer_to_buffer(x.buffer(), 4 * from as u64, into.buffer(), 4 * to as u64, 4 * (t * w) as u64);
            }
        })
    }

    /// A tensor of `shape` whose values are yet to be written (a cache's rows).
    pub fn uninit(&self, shape: &[usize]) -> Result<GpuTensor> {
        self.output(shape.to_vec(), "uninit")
    }

    /// Parts [1 or B, Tᵢ, D] joined along dimension 1 → [B, ΣTᵢ, D], a part of one row
    /// repeated for every row of the batch (a class token before each image's patches).
    pub fn cat_tokens(&self, parts: &[&GpuTensor]) -> Result<GpuTensor> {
        only_f32(&parts.iter().map(|&p| Some(p)).collect::<Vec<_>>(), "cat_tokens")?;
        let bad =
            || gpu_error(format!("cat_tokens: {:?} (expected [1 or B, T, D] of one D)", parts.iter().map(|p| p.shape.clone()).collect::<Vec<_>>()));
        let dims = parts.iter().map(|p| match p.shape.as_slice() {
            &[b, t, d] => Some((b, t, d)),
            _ => None,
        });
        let dims = dims.collect::<Option<Vec<_>>>().ok_or_else(bad)?;
        let batch = dims.iter().map(|p| p.0).max().unwrap_or(1);
        let d = dims.first().map_or(0, |p| p.2);
        if dims.iter().any(|&(b, _, pd)| (b != 1 && b != batch) || pd != d) {
            return Err(bad());
        }
        let tokens: usize = dims.iter().map(|p| p.1).sum();
        let y = self.output(vec![batch, tokens, d], "cat_tokens")?;
        self.record(|p| {
            // Copies are recorded outside compute passes.
            p.pass = None;
            for bi in 0..batch {
                let mut at = bi * tokens * d;
                for (part, &(b, t, _)) in parts.iter().zip(&dims) {
                    let from = if b == 1 { 0 } else { bi * t * d };
                    if t * d > 0 {
                        p.encoder.copy_buffer_to_buffer(part.buffer(), 4 * from as u64, y.buffer(), 4 * at as u64, 4 * (t * d) as u64);
                    }
                    at += t * d;
                }
            }
        })?;
        Ok(y)
    }

    /// softmax(q·kᵀ·scale)·v per head: q [B, Tq, H·d], k and v [B, Tk, KV·d] (projections'
    /// outputs, heads side by side; query head h reads key/value head h / (H / KV)) → [B, Tq,
    /// H·d]. With `causal_past` = Some(p), query i sees keys 0..=p + i (p positions cached
    /// before these queries).
    pub fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        heads: (usize, usize),
        scale: f32,
        causal_past: Option<usize>,
    ) -> Result<GpuTensor> {
        self.attention_first(q, k, v, k.shape.get(1).copied().unwrap_or(0), heads, scale, causal_past)
    }

    /// [`Gpu::attention`] over the first `tk` positions of k and v (a cache's).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_first(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        tk: usize,
        heads: (usize, usize),
        scale: f32,
        causal_past: Option<usize>,
    ) -> Result<GpuTensor> {
        only_f32(&[Some(q), Some(k), Some(v)], "attention")?;
        let (h, kv) = heads;
        let bad = || {
            gpu_error(format!(
                "attention: q {:?}, k {:?}, v {:?} ({tk} positions) with {h} query and {kv} key/value heads",
                q.shape, k.shape, v.shape
            ))
        };
        let (&[b, tq, hd], &[kb, kv_rows, kvd]) = (q.shape.as_slice(), k.shape.as_slice()) else { return Err(bad()) };
        if h == 0 || kv == 0 || h % kv != 0 || hd % h != 0 || kb != b || v.shape != k.shape || kvd != hd / h * kv || tk == 0 || tk > kv_rows {
            return Err(bad());
        }
        let d = hd / h;
        if d > 256 {
            return Err(gpu_error(format!("attention: heads of {d} values, the kernel holds 256")));
        }
        let y = self.output(q.shape.clone(), "attention")?;
        if b * tq == 0 {
            return Ok(y);
        }
        // attention.wgsl: a workgroup per (batch, query, head).
        let [gx, gy] = self.grid(b * tq * h, "attention")?;
        let params = [b, tq, tk, h, kv, d].map(|v| v as u32);
        let params = [&params[..], &[scale.to_bits(), causal_past.is_some() as u32, causal_past.unwrap_or(0) as u32, gx, kv_rows as u32]].concat();
        self.dispatch(&self.attention, &[q.buffer(), k.buffer(), v.buffer(), y.buffer()], &params, [gx, gy])?;
        Ok(y)
    }

    /// The rows of `x` (its last dimension a row) in the order `rows` gives → [rows.len(),
    /// width].
    pub fn gather_rows(&self, x: &GpuTensor, rows: &[u32]) -> Result<GpuTensor> {
        let width = x.shape.last().copied().unwrap_or(0);
        let available = x.len().checked_div(width).unwrap_or(0);
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= available) {
            return Err(gpu_error(format!("gather_rows: row {bad} of {:?} ({available} rows)", x.shape)));
        }
        let y = self.output(vec![rows.len(), width], "gather_rows")?;
        if rows.is_empty() || width == 0 {
            return Ok(y);
        }
        let index = self.buffer_with("gather_rows", bytemuck::cast_slice(rows), wgpu::BufferUsages::STORAGE)?;
        let [gx, gy] = self.grid(rows.len(), "gather_rows")?;
        self.dispatch(
            &self.weight_kernels(x.dtype, "gather_rows")?.gather,
            &[x.buffer(), &index, y.buffer()],
            &[rows.len() as u32, width as u32, gx],
            [gx, gy],
        )?;
        Ok(y)
    }

    /// A tensor's values, read back as a CPU tensor of its shape.
    pub async fn read_tensor(&self, t: &GpuTensor) -> Result<candle_core::Tensor> {
        let values = self.read(t).await?;
        Ok(candle_core::Tensor::from_vec(values, t.shape.as_slice(), &candle_core::Device::Cpu)?)
    }

    /// [`Gpu::read_tensor`], waited for: natively the read completes within its poll of the
    /// device (a browser's completes from its event loop: there, await `read_tensor`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_tensor_now(&self, t: &GpuTensor) -> Result<candle_core::Tensor> {
        use std::future::Future;
        let mut read = std::pin::pin!(self.read_tensor(t));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(values) = read.as_mut().poll(&mut cx) {
                return values;
            }
            std::thread::yield_now();
        }
    }

    /// A tensor of `shape` for a kernel to write (its old contents, if any, are garbage).
    fn output(&self, shape: Vec<usize>, what: &str) -> Result<GpuTensor> {
        let len = elements(&shape, what)?;
        let bytes = self.check_size(len, what)?;
        let class = size_class(bytes);
        let bytes = if self.fits(class) { class } else { bytes };
        let reused = self.pool.lock().ok().and_then(|mut pool| pool.take(bytes));
        let buffer = reused.unwrap_or_else(|| self.storage(bytes));
        Ok(GpuTensor { storage: Arc::new(Storage { buffer, pool: Some(self.pool.clone()) }), shape, dtype: GpuDtype::F32 })
    }

    /// `f` of the command encoder the kernels are queued in.
    fn record<R>(&self, f: impl FnOnce(&mut Pending) -> R) -> Result<R> {
        Ok(f(self.pending()?.get_or_insert_with(|| self.new_pending())))
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Option<Pending>>> {
        self.pending.lock().map_err(|_| gpu_error("a thread panicked while queueing GPU work"))
    }

    fn new_pending(&self) -> Pending {
        Pending { pass: None, encoder: self.device.create_command_encoder(&Default::default()), dispatches: 0, params: Vec::new() }
    }

    /// Hands the queued kernels to the GPU, with `last` recorded after them. Their parameters
    /// go first, in one write: the queue runs it after the batches before (which read the
    /// buffer's old contents) and before this one.
    fn submit(&self, last: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let taken = self.pending()?.take();
        let mut p = taken.unwrap_or_else(|| self.new_pending());
        p.pass = None;
        last(&mut p.encoder);
        if !p.params.is_empty() {
            self.queue.write_buffer(&self.params, 0, &p.params);
        }
        self.queue.submit([p.encoder.finish()]);
        Ok(())
    }

    /// `groups` workgroups as a grid: the first dimension up to the device's limit, rows of it
    /// in the second.
    fn grid(&self, groups: usize, what: &str) -> Result<[u32; 2]> {
        let max = self.device.limits().max_compute_workgroups_per_dimension as usize;
        let x = groups.clamp(1, max.max(1));
        let y = groups.div_ceil(x);
        if y > max {
            return Err(gpu_error(format!("{what}: {groups} workgroups, past the device's {max} × {max}")));
        }
        Ok([x as u32, y.max(1) as u32])
    }

    /// Queues `pipeline` over `groups` with `buffers` bound in order and `params` (u32s, f32s
    /// as their bits) as the uniform after them.
    fn dispatch(&self, pipeline: &wgpu::ComputePipeline, buffers: &[&wgpu::Buffer], params: &[u32], groups: [u32; 2]) -> Result<()> {
        // Uniform buffers are read in 16-byte rows.
        let mut padded = params.to_vec();
        padded.resize(params.len().div_ceil(4).max(1) * 4, 0);
        let bytes: &[u8] = bytemuck::cast_slice(&padded);
        if bytes.len() > PARAMS_SLOT {
            return Err(gpu_error(format!("a kernel's {} bytes of parameters, past a slot's {PARAMS_SLOT}", bytes.len())));
        }
        let queued = self.record(|p| {
            // This kernel's slot of the batch's parameters, written before the batch is submitted.
            let offset = p.params.len();
            p.params.extend_from_slice(bytes);
            p.params.resize(offset + PARAMS_SLOT, 0);
            let uniform = wgpu::BufferBinding { buffer: &self.params, offset: offset as u64, size: std::num::NonZeroU64::new(bytes.len() as u64) };
            let entries: Vec<wgpu::BindGroupEntry> = buffers
                .iter()
                .enumerate()
                .map(|(i, buffer)| wgpu::BindGroupEntry { binding: i as u32, resource: buffer.as_entire_binding() })
                .chain([wgpu::BindGroupEntry { binding: buffers.len() as u32, resource: wgpu::BindingResource::Buffer(uniform) }])
                .collect();
            let layout = pipeline.get_bind_group_layout(0);
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries });
            let pass = p.pass.get_or_insert_with(|| p.encoder.begin_compute_pass(&Default::default()).forget_lifetime());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], 1);
            p.dispatches += 1;
            p.dispatches
        })?;
        self.dispatched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if queued >= DISPATCHES_PER_SUBMIT {
            self.submit(|_| ())?;
        }
        Ok(())
    }

    /// A tensor's values, read back: waits for the work queued before it.
    pub async fn read(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        // A pooled buffer may be longer than its tensor; copies are of whole 4-byte words.
        let bytes = (t.dtype.bytes() * t.len()).div_ceil(4).max(1) as u64 * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.submit(|encoder| encoder.copy_buffer_to_buffer(t.buffer(), 0, &staging, 0, bytes))?;
        let (sender, receiver) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |mapped| {
            let _ = sender.send(mapped);
        });
        // Natively the callback runs from a poll; in the browser, from its event loop.
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| gpu_error(format!("read: {e}")))?;
        let mapped = receiver.await.map_err(|_| gpu_error("read: the device dropped the request"));
        if let Some(failure) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return Err(gpu_error(failure));
        }
        mapped?.map_err(|e| gpu_error(format!("read: {e}")))?;
        let view = staging.slice(..).get_mapped_range().map_err(|e| gpu_error(format!("read: {e}")))?;
        let values = match t.dtype {
            GpuDtype::F32 => view.chunks_exact(4).take(t.len()).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            GpuDtype::F16 => view.chunks_exact(2).take(t.len()).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        Ok(values)
    }

    /// Bytes of `len` f32 values (at least 4: WebGPU has no empty buffers), if the device can
    /// hold and bind them.
    fn check_size(&self, len: usize, what: &str) -> Result<u64> {
        let limits = self.device.limits();
        match len.checked_mul(4).map(|b| b.max(4) as u64) {
            Some(b) if self.fits(b) => Ok(b),
            _ => Err(gpu_error(format!(
                "{what}: {len} values are past the device's buffers ({} bytes, {} a binding)",
                limits.max_buffer_size, limits.max_storage_buffer_binding_size
            ))),
        }
    }

    /// Whether a buffer of `bytes` can be made and bound whole.
    fn fits(&self, bytes: u64) -> bool {
        let limits = self.device.limits();
        bytes <= limits.max_buffer_size && bytes <= limits.max_storage_buffer_binding_size as u64
    }

    /// A buffer holding `contents` (padded to 4 bytes). wgpu's `create_buffer_init` panics
    /// where the device is lost; this is an error.
    fn buffer_with(&self, what: &str, contents: &[u8], usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let size = (contents.len() as u64).div_ceil(4).max(1) * 4;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(what), size, usage, mapped_at_creation: true });
        {
            let mut view =
                buffer.get_mapped_range_mut(..).map_err(|e| gpu_error(format!("{what}: no buffer from the device (lost, or out of memory): {e}")))?;
            view.slice(..contents.len()).copy_from_slice(contents);
        }
        buffer.unmap();
        Ok(buffer)
    }

    fn storage(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }
}

// SAFETY: only in the threaded WASM build (atomics), where wgpu's WebGPU handles are JS objects
// of the worker that made them and so neither `Send` nor `Sync` (wgpu's
// `fragile-send-sync-non-atomic-wasm` asserts the same for the single-threaded build). A `Gpu`
// and everything made on it stay on the captioner's worker: the rayon pool's workers run only
// the CPU backend's `by_tokens` parts, the GPU's `by_tokens` runs inline, and no GPU tensor,
// buffer or encoder is handed to another thread. The bounds are the `Backend` trait's, which
// the CPU backend needs for its threads.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
mod thread_bound {
    unsafe impl Send for super::Gpu {}
    unsafe impl Sync for super::Gpu {}
    unsafe impl Send for super::Storage {}
    unsafe impl Sync for super::Storage {}
    unsafe impl Send for super::Pool {}
    unsafe impl Send for super::Pending {}
}

/// An error unless every tensor given is f32: f16 is a weight's storage, which only the
/// products and the row gather read.
fn only_f32(tensors: &[Option<&GpuTensor>], what: &str) -> Result<()> {
    match tensors.iter().flatten().find(|t| t.dtype != GpuDtype::F32) {
        Some(t) => Err(gpu_error(format!("{what}: a {:?} tensor {:?} where f32 values are read", t.dtype, t.shape))),
        None => Ok(()),
    }
}

/// Values a tensor of `shape` holds, unless the product overflows.
fn elements(shape: &[usize], what: &str) -> Result<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| gpu_error(format!("{what}: shape {shape:?} overflows")))
}

/// The code activation.wgsl's `activate` takes for `act`.
fn activation_code(act: Option<&Activation>) -> Result<u32> {
    Ok(match act {
        None => 0,
        Some(Activation::GeluPytorchTanh | Activation::NewGelu) => 1,
        Some(Activation::Gelu) => 2,
        Some(Activation::Silu | Activation::Swish) => 3,
        Some(Activation::Relu) => 4,
        Some(Activation::Sigmoid) => 5,
        Some(other) => return Err(gpu_error(format!("activation {other:?} has no GPU kernel yet"))),
    })
}
