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

/// `f()` with our own splits over every core natively, where the count otherwise stays 1 (candle
/// spreads its own kernels, not ours): for a kernel of ours that stands in for one of candle's
/// (the int8 GEMM). Elsewhere, on a pool thread or under [`with_threads`], `f()` as it is. As
/// `with_threads`, no minimum part size.
pub fn on_all_cores<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(not(target_arch = "wasm32"))]
    if SCOPED.with(|s| s.get()).is_none() && rayon::current_thread_index().is_none() {
        return with_threads(rayon::current_num_threads(), f);
    }
    f()
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

/// `f(0), …, f(n - 1)` in order, on the pool when there is more than one part (on the crew
/// of [`with_crew`] when one is awake on this thread).
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if n > 1 && threads() > 1 {
        if let Some(out) = crew::map(n, &f) {
            return out;
        }
        use rayon::prelude::*;
        return (0..n).into_par_iter().map(f).collect();
    }
    (0..n).map(f).collect()
}

/// `f()` with [`threads`]` - 1` helpers kept awake on the pool until it returns, spinning for
/// work: [`map`] hands them parts in about a microsecond, where waking the pool costs
/// ~0.1–0.2 ms in a browser (Atomics.wait / notify) — more than a decoder's projection takes,
/// so without a crew a decoding step could only split its largest matrix. For work made of many
/// small parallel parts (a decoding step); the helpers burn their cores while it runs.
pub fn with_crew<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if threads() > 1 {
        return crew::with_crew(threads() - 1, f);
    }
    f()
}

/// Whether a crew is awake on this thread: parts far smaller than a pool wake-up pays for are
/// worth splitting.
pub fn crew_awake() -> bool {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if threads() > 1 {
        return crew::awake();
    }
    false
}

#[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
mod crew {
    use std::cell::{Cell, UnsafeCell};
    use std::hint::spin_loop;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
    use std::sync::{Arc, Mutex};

    /// Part `i` of the job being shared out.
    type Job = *const (dyn Fn(usize) + Sync + 'static);

    /// One caller's helpers and the job they share. A job is published as a new `state`
    /// (ticket, parts, next part to claim); whoever claims a part with a CAS runs it and counts
    /// it in `done`; the caller claims parts too, then waits for `done` to reach `parts`, so the
    /// job (on its stack) outlives every claimed part.
    pub(super) struct Crew {
        stop: AtomicBool,
        /// ticket << 32 | parts << 16 | next
        state: AtomicU64,
        done: AtomicUsize,
        /// The caller is inside `run` (read by the caller only: a part it runs may split again).
        running: AtomicBool,
        /// Written by the caller only while no part of a job is claimed or running.
        job: UnsafeCell<Option<Job>>,
        panicked: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    // SAFETY: `job` is written only between jobs (see `run`) and read only by the holder of a
    // claimed part of the current job, which the CAS on `state` orders after the write.
    unsafe impl Sync for Crew {}
    unsafe impl Send for Crew {}

    const MAX_PARTS: usize = 0xffff;

    thread_local! {
        static AWAKE: Cell<Option<*const Crew>> = const { Cell::new(None) };
    }

    pub(super) fn awake() -> bool {
        AWAKE.with(|a| a.get().is_some())
    }

    pub(super) fn with_crew<R>(helpers: usize, f: impl FnOnce() -> R) -> R {
        // A crew inside a crew is the outer one (`threads` is 1 on the pool's threads).
        if awake() {
            return f();
        }
        let crew = Arc::new(Crew {
            stop: AtomicBool::new(false),
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            running: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            panicked: Mutex::new(None),
        });
        for _ in 0..helpers {
            let crew = Arc::clone(&crew);
            rayon::spawn(move || crew.help());
        }
        /// Sends the helpers back to the pool however `f` ends.
        struct Dismiss<'a>(&'a Crew);
        impl Drop for Dismiss<'_> {
            fn drop(&mut self) {
                self.0.stop.store(true, Release);
                AWAKE.with(|a| a.set(None));
            }
        }
        AWAKE.with(|a| a.set(Some(Arc::as_ptr(&crew))));
        let _dismiss = Dismiss(&crew);
        f()
    }

    /// `f(0..n)` in order on this thread's crew; None when none is awake here.
    pub(super) fn map<T: Send>(n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> Option<Vec<T>> {
        let crew = AWAKE.with(|a| a.get())?;
        if n > MAX_PARTS {
            return None;
        }
        // SAFETY: the pointer is set only while `with_crew`'s Arc lives on this thread's stack.
        let crew = unsafe { &*crew };
        // A part of a job that splits again (a GEMM inside a split over rows) runs its parts
        // itself: the crew holds one job at a time, and the outer split already feeds it.
        if crew.running.load(Relaxed) {
            return Some((0..n).map(f).collect());
        }
        let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
        crew.run(n, &|i| {
            let out = f(i);
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
        });
        if let Some(payload) = crew.panicked.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(payload);
        }
        slots.into_iter().map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner())).collect()
    }

    impl Crew {
        fn run(&self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
            self.running.store(true, Relaxed);
            // SAFETY: only the lifetime is erased; `run` returns after every part is done, and
            // the pointer is dereferenced only by holders of a claimed part.
            let job: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(job) };
            // SAFETY: no part is claimed or running between jobs (the last `run` waited for all).
            unsafe { *self.job.get() = Some(job as Job) };
            self.done.store(0, Relaxed);
            let ticket = (self.state.load(Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
            self.state.store(ticket << 32 | (parts as u64) << 16, Release);
            self.work();
            while self.done.load(Acquire) < parts {
                spin_loop();
            }
            self.running.store(false, Relaxed);
        }

        /// The next unclaimed part of the current job, claimed.
        fn claim(&self) -> Option<usize> {
            let mut s = self.state.load(Acquire);
            loop {
                let (parts, next) = ((s >> 16) & 0xffff, s & 0xffff);
                if next >= parts {
                    return None;
                }
                match self.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                    Ok(_) => return Some(next as usize),
                    Err(now) => s = now,
                }
            }
        }

        /// Runs parts of the current job while there are unclaimed ones; whether it ran any.
        fn work(&self) -> bool {
            let mut any = false;
            while let Some(i) = self.claim() {
                // SAFETY: a claimed part keeps its job alive (`run` waits for it to be counted).
                let job = unsafe { (*self.job.get()).map(|j| &*j) };
                if let Some(job) = job {
                    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(i))) {
                        *self.panicked.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
                    }
                }
                self.done.fetch_add(1, Release);
                any = true;
            }
            any
        }

        /// A helper's loop: parts as they come; between them, whatever else the pool has queued
        /// (so that a crew never starves work that waits on the pool), else a spin.
        fn help(&self) {
            while !self.stop.load(Acquire) {
                if !self.work() && rayon::yield_now() != Some(rayon::Yield::Executed) {
                    spin_loop();
                }
            }
        }
    }
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

    /// Many small jobs in a row, as a decoding step hands out: each part once, in order, and
    /// work the caller queues on the pool meanwhile still runs while every pool thread helps.
    #[test]
    #[cfg(not(target_arch = "wasm32"))]
    fn a_crew_runs_every_part_once_and_leaves_the_pool_usable() {
        use rayon::prelude::*;
        let pool = rayon::current_num_threads();
        for helpers in [1, pool, pool + 1] {
            with_threads(helpers + 1, || {
                assert!(!crew_awake());
                with_crew(|| {
                    assert!(crew_awake());
                    for round in 0..2000usize {
                        let n = 1 + round % 7;
                        assert_eq!(map(n, |i| i * round), (0..n).map(|i| i * round).collect::<Vec<_>>());
                        if round % 500 == 0 {
                            assert_eq!((0..1000u64).into_par_iter().sum::<u64>(), 499500);
                        }
                    }
                    // Nested: a crew inside a crew is the outer one, and a part that splits
                    // again runs its own parts.
                    with_crew(|| assert_eq!(map(3, |i| i), vec![0, 1, 2]));
                    for _ in 0..200 {
                        let nested = map(4, |i| map(5, |j| 10 * i + j));
                        assert_eq!(nested, (0..4).map(|i| (0..5).map(|j| 10 * i + j).collect::<Vec<_>>()).collect::<Vec<_>>());
                    }
                });
                assert!(!crew_awake());
            });
        }
    }

    #[test]
    #[cfg(not(target_arch = "wasm32"))]
    fn a_part_that_panics_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| with_threads(2, || with_crew(|| map(4, |i| if i == 3 { panic!("part {i}") } else { i }))));
        assert!(caught.is_err());
        assert_eq!(with_threads(2, || with_crew(|| map(2, |i| i + 1))), vec![1, 2]);
    }
}
