//! Where a training run computes (`--device cpu|cuda[:N]`, `--gpus N`) and in which precision
//! (`--dtype f32|bf16`, TF32). The CPU build knows the same flags and says what to rebuild with
//! when one asks for the GPU.
//!
//! Mixed precision (`--dtype bf16`, GPU only) is kept in f32 "master" weights: the model's tensors
//! — frozen ones and the working copy of the trainable ones — are bf16, so matrix products,
//! activations and their gradients are bf16; the optimizer updates an f32 master of every trainable
//! tensor with f32 moments and writes it back rounded (`optim::Param::master`). Where bf16 loses
//! too much, the models compute in f32 as PyTorch's autocast does: layer and RMS norms
//! (candle's `*_slow` ops upcast), attention's softmax (`models::attention`), and the loss.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// `--device`: `auto` (the default) takes GPU 0 when the binary has CUDA and a GPU answers,
/// else the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("`{other}`: expected cpu, cuda or cuda:N (N = the GPU's index)")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--dtype`: what the model computes in (weights, activations, gradients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 compute with f32 master weights and optimizer state (GPU only).
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Whether this binary was built with `--features cuda`.
pub const HAS_CUDA: bool = cfg!(feature = "cuda");
/// Whether this binary was built with `--features nccl` (data-parallel `--gpus N`).
pub const HAS_NCCL: bool = cfg!(feature = "nccl");

fn rebuild_hint(what: &str) -> Error {
    Error::config(
        "--device",
        format!(
            "{what} needs a binary built with CUDA: `cargo build --release --features cuda --bin train` (see bench/TRAINING.md); this one is CPU-only, use --device cpu"
        ),
    )
}

/// The device `spec` names, opened. `auto` falls back to the CPU (saying so) when no GPU answers.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) if !HAS_CUDA => Err(rebuild_hint(&format!("--device cuda:{n}"))),
        DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            Error::config("--device", format!("could not open GPU {n} ({e}); check `nvidia-smi`, pick another index or use --device cpu"))
        }),
        DeviceSpec::Auto if !HAS_CUDA => Ok(Device::Cpu),
        DeviceSpec::Auto => match Device::new_cuda(0) {
            Ok(d) => Ok(d),
            Err(e) => {
                eprintln!("no usable GPU ({e}); training on the CPU");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Checks the precision against the device, and sets candle's TF32 switch for f32 matrix
/// products on the GPU (cuBLAS may then round inputs to TF32: ~3 decimal digits, 10-bit mantissa).
pub fn configure(device: &Device, precision: Precision, tf32: bool) -> Result<()> {
    if device.is_cpu() && precision == Precision::Bf16 {
        return Err(Error::config("--dtype", "bf16 is for the GPU (--device cuda); on the CPU train in f32"));
    }
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(tf32 && !device.is_cpu());
        if let Ok(cuda) = device.as_cuda_device() {
            // candle allocates from the device's stream-ordered pool (cuMemAllocAsync). By default
            // the pool hands freed memory back to the driver at every synchronisation — and the
            // trainer synchronises every step (the loss is read) — so each step would map its
            // memory afresh. Keep it in the pool, as PyTorch's caching allocator does
            // (WASMCAP_POOL_RELEASE=1: the driver's default, for comparison).
            let keep = std::env::var("WASMCAP_POOL_RELEASE").map_or(true, |v| v != "1");
            let threshold: u64 = if keep { u64::MAX } else { 0 };
            pool_attribute(cuda, 4, Some(threshold)).map_err(|e| Error::Compute(format!("setting the GPU memory pool's release threshold: {e}")))?;
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = tf32;
    Ok(())
}

/// Reads (and with `set`, first writes) a `u64` attribute of the device's default memory pool:
/// 4 release threshold, 6 reserved high-water mark, 8 used high-water mark (CUmemPool_attribute).
#[cfg(feature = "cuda")]
fn pool_attribute(cuda: &candle_core::CudaDevice, attribute: u32, set: Option<u64>) -> std::result::Result<u64, String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let context = cuda.cuda_stream().context().clone();
    context.bind_to_thread().map_err(|e| e.to_string())?;
    // SAFETY: the attribute values used here are the u64 ones of the CUDA 12/13 enum (same
    // numbering in both); the pool is the device's default one, alive as long as the context.
    unsafe {
        let attr: sys::CUmemPool_attribute = std::mem::transmute(attribute);
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()).result().map_err(|e| e.to_string())?;
        let mut value: u64 = set.unwrap_or(0);
        if set.is_some() {
            sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void).result().map_err(|e| e.to_string())?;
        }
        sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void).result().map_err(|e| e.to_string())?;
        Ok(value)
    }
}

/// The most GPU memory the run's tensors ever held at once (the pool's used high-water mark, MiB),
/// or `None` on the CPU.
pub fn gpu_peak_tensor_mib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return pool_attribute(cuda, 8, None).ok().map(|b| b as f64 / (1024.0 * 1024.0));
    }
    let _ = device;
    None
}

/// A short name for logs and the summary: `cpu`, `cuda:0`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes of GPU memory in use on the current device (total − free, as `nvidia-smi` counts it:
/// this process's pool, the CUDA context, and any other process), or `None` on the CPU.
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        use candle_core::cuda_backend::cudarc::driver::result;
        // mem_get_info reads the context bound to this thread; bind the device's first.
        let _ = cuda.cuda_stream().context().bind_to_thread();
        return result::mem_get_info().ok().map(|(free, total)| (total - free) as u64);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn the_cpu_build_says_how_to_get_the_gpu() {
        if HAS_CUDA {
            return;
        }
        let e = open(DeviceSpec::Cuda(0)).expect_err("a CPU build has no GPU");
        assert!(e.to_string().contains("--features cuda"), "{e}");
        assert!(open(DeviceSpec::Auto).expect("auto").is_cpu());
        assert!(configure(&Device::Cpu, Precision::Bf16, true).is_err());
    }
}
