//! Our own split of inference work over threads. candle's CPU kernels use every core natively,
//! but in WASM they run on one thread (candle's `get_num_threads()` is 1 there), so a threaded
//! WASM build is only faster where our code splits the work: the encoder's layers by token rows,
//! the GEMMs by rows, the decoders' matrix–vector products by output features.
//!
//! The count starts at 1 everywhere (natively candle already parallelises); the threaded WASM
//! build raises it after `initThreadPool`; [`with_threads`] sets it for one call on this thread
//! (tests). Work already running on a pool thread is not split again.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Result, Tensor};

static THREADS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static SCOPED: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Whether this build can run work on more than one thread.
pub const AVAILABLE: bool = cfg!(any(not(target_arch = "wasm32"), feature = "threads"));

/// How many parts [`map`] splits work into from here (1 on a pool thread).
pub fn threads() -> usize {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if rayon::current_thread_index().is_some() {
        return 1;
    }
    SCOPED.with(|s| s.get()).unwrap_or_else(|| THREADS.load(Ordering::Relaxed))
}

/// `f()` with `n` parts on this thread, and no minimum part size, so that the tiny test models
/// split too (tests compare 1 with 2 without touching the process-wide count other tests read).
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let before = SCOPED.with(|s| s.replace(Some(n.max(1))));
    let out = f();
    SCOPED.with(|s| s.set(before));
    out
}

/// Sets the number of parts; more than 1 needs a build with threads (and, in WASM, the pool
/// started by `initThreadPool`). Returns the number now in effect.
pub fn set_threads(n: usize) -> std::result::Result<usize, String> {
    if n > 1 && !AVAILABLE {
        return Err(format!("{n} threads asked of a single-threaded build (load the threaded build, on a crossOriginIsolated page)"));
    }
    THREADS.store(n.max(1), Ordering::Relaxed);
    Ok(n.max(1))
}

/// `f(0), …, f(n - 1)` in order, on the pool when there is more than one part.
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if n > 1 && threads() > 1 {
        use rayon::prelude::*;
        return (0..n).into_par_iter().map(f).collect();
    }
    (0..n).map(f).collect()
}

/// `0..len` in at most `parts` contiguous ranges of nearly equal size, each at least `min`
/// long (fewer ranges when `len` is small); every range is a multiple of `align` except the last.
pub fn ranges(len: usize, parts: usize, min: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let min = if SCOPED.with(|s| s.get()).is_some() { 1 } else { min };
    let parts = parts.min(len / min.max(1)).max(1);
    let step = len.div_ceil(parts).div_ceil(align) * align;
    (0..len).step_by(step.max(1)).map(|start| start..(start + step).min(len)).collect()
}

/// `f` on consecutive slices of `xs` along `dim` (at least `min` long), concatenated back along
/// `dim`: for work where every index of `dim` is independent (rows of a GEMM, tokens of the
/// encoder's row-wise blocks). One part, when there are no threads, is `f(xs)` itself.
pub fn split_along(xs: &Tensor, dim: usize, min: usize, f: impl Fn(&Tensor) -> Result<Tensor> + Sync + Send) -> Result<Tensor> {
    let len = xs.dim(dim)?;
    concat_parts(len, dim, min, |r| if r.len() == len { f(xs) } else { f(&xs.narrow(dim, r.start, r.len())?) })
}

/// `f(range)` for consecutive ranges of `0..len` (at least `min` long), concatenated along
/// `dim`; one part, when there are no threads, is `f(0..len)`.
pub fn concat_parts(len: usize, dim: usize, min: usize, f: impl Fn(Range<usize>) -> Result<Tensor> + Sync + Send) -> Result<Tensor> {
    cat(map_parts(len, min, f)?, dim)
}

/// `f(range)` for consecutive ranges of `0..len` (at least `min` long), in order; one part,
/// `f(0..len)`, when there are no threads.
pub fn map_parts<T: Send>(len: usize, min: usize, f: impl Fn(Range<usize>) -> Result<T> + Sync + Send) -> Result<Vec<T>> {
    let parts = ranges(len, threads(), min, 1);
    if parts.len() < 2 {
        return Ok(vec![f(0..len)?]);
    }
    map(parts.len(), |i| f(parts[i].clone())).into_iter().collect()
}

/// The parts concatenated along `dim` (one part: itself, no copy).
pub fn cat(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        if let Some(one) = parts.pop() {
            return Ok(one);
        }
    }
    Tensor::cat(&parts, dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once() {
        for (len, parts, min, align) in [(196, 2, 16, 1), (7, 4, 16, 1), (3072, 3, 1, 4), (10, 4, 1, 4), (0, 2, 1, 1)] {
            let r = ranges(len, parts, min, align);
            assert!(r.len() <= parts.max(1), "{r:?}");
            assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), len, "{r:?}");
            assert!(r.windows(2).all(|w| w[0].end == w[1].start && w[0].len() % align == 0), "{r:?}");
        }
    }
}
