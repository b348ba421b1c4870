//! The kernels with relaxed SIMD, where the browser has it: fused multiply-add for the packed
//! GEMM (`packed.rs`) and the i8 dot product for the 8-bit encoder GEMM (`int8.rs`) and the
//! q8_0 decode kernel (`q8.rs`). They live in a WASM
//! module of their own (`relaxed_module.rs`, built by `build.rs`, ~3 KB), because a module that
//! uses one relaxed instruction fails to compile as a whole where relaxed SIMD is missing. It
//! shares this module's memory; each thread instantiates it once (`js/relaxed-kernel.js`).
//! Only WASM builds with simd128 have it.
#![cfg(all(target_arch = "wasm32", target_feature = "simd128"))]

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use wasm_bindgen::prelude::*;

#[wasm_bindgen(module = "/js/relaxed-kernel.js")]
extern "C" {
    fn wasmcap_relaxed_kernel_init(memory: JsValue, bytes: &[u8]) -> bool;
    fn wasmcap_relaxed_kernel_gemm(a: u32, rows: u32, in_dim: u32, lda: u32, panels: u32, n_panels: u32, bias: u32, c: u32, ldc: u32);
    fn wasmcap_relaxed_kernel_int8_gemm(fused: u32, a: u32, rows: u32, in_dim: u32, lda: u32, panels: u32, n_panels: u32, c: u32, ldc: u32);
    fn wasmcap_relaxed_kernel_q8_groups(qs: u32, scales: u32, x: u32, blocks: u32, groups: u32, out: u32);
}

static MODULE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/relaxed_module.wasm"));
pub static ALLOWED: AtomicBool = AtomicBool::new(true);

thread_local! {
    static READY: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the side module runs on this thread (instantiated on first ask).
pub fn ready() -> bool {
    ALLOWED.load(Ordering::Relaxed)
        && READY.with(|r| {
            let ready = r.get().unwrap_or_else(|| wasmcap_relaxed_kernel_init(wasm_bindgen::memory(), MODULE));
            r.set(Some(ready));
            ready
        })
}

/// SAFETY: as `packed_kernel.rs`' `gemm`; wasm32 pointers and sizes fit u32.
pub unsafe fn gemm(
    (a, rows, in_dim, lda, panels, n_panels, bias, c, ldc): (*const f32, usize, usize, usize, *const f32, usize, *const f32, *mut f32, usize),
) {
    wasmcap_relaxed_kernel_gemm(a as u32, rows as u32, in_dim as u32, lda as u32, panels as u32, n_panels as u32, bias as u32, c as u32, ldc as u32)
}

/// SAFETY: as `int8_kernel.rs`' `gemm`; wasm32 pointers and sizes fit u32.
pub unsafe fn int8_gemm(args: (*const u8, usize, usize, usize, *const i8, usize, *mut i32, usize)) {
    int8_gemm_as(fused_dot(), args)
}

/// SAFETY: as `int8_gemm`.
unsafe fn int8_gemm_as(
    fused: bool,
    (a, rows, in_dim, lda, panels, n_panels, c, ldc): (*const u8, usize, usize, usize, *const i8, usize, *mut i32, usize),
) {
    wasmcap_relaxed_kernel_int8_gemm(
        fused as u32,
        a as u32,
        rows as u32,
        in_dim as u32,
        lda as u32,
        panels as u32,
        n_panels as u32,
        c as u32,
        ldc as u32,
    )
}

/// SAFETY: as `relaxed_module.rs`' `q8_groups`; wasm32 pointers and sizes fit u32.
pub unsafe fn q8_groups(qs: *const i8, scales: *const f32, x: *const u8, blocks: usize, groups: usize, out: *mut f32) {
    wasmcap_relaxed_kernel_q8_groups(qs as u32, scales as u32, x as u32, blocks as u32, groups as u32, out as u32)
}

/// 0: not measured yet; 1: the i16 dot then a dot with ones; 2: the fused i8 dot.
static INT8_DOT: AtomicU8 = AtomicU8::new(0);

/// Whether the int8 GEMM takes `relaxed_dot_i8x16_i7x16_add` (one instruction with AVX-VNNI,
/// 5 without) rather than its two-dot spelling (3): WASM cannot ask the CPU, so the first call
/// times both on a small GEMM (~2 ms, once). Both give the same exact sums, so the choice
/// changes speed only.
pub fn fused_dot() -> bool {
    match INT8_DOT.load(Ordering::Relaxed) {
        0 => {
            let fused = fused_is_faster();
            INT8_DOT.store(if fused { 2 } else { 1 }, Ordering::Relaxed);
            fused
        }
        v => v == 2,
    }
}

/// See `packed::choose_int8_dot`.
pub fn choose_int8_dot(fused: Option<bool>) {
    INT8_DOT.store(fused.map_or(0, |f| if f { 2 } else { 1 }), Ordering::Relaxed);
}

/// The faster dot product on a GEMM of ~38 M products (a fraction of a ms to ~1 ms each),
/// each timed three times, alternating, the best of each kept.
fn fused_is_faster() -> bool {
    let (rows, in_dim, n_panels) = (96, 1024, 32);
    let a = vec![1u8; rows * in_dim];
    let panels = vec![1i8; n_panels * 12 * in_dim];
    let mut c = vec![0i32; rows * n_panels * 12];
    let mut best = [f64::INFINITY; 2];
    for _ in 0..3 {
        for (fused, best) in [false, true].into_iter().zip(best.iter_mut()) {
            let start = crate::captioner::now_ms();
            // SAFETY: a holds rows × in_dim bytes (≤ 127), panels n_panels × in_dim × 12, c rows × ldc.
            unsafe { int8_gemm_as(fused, (a.as_ptr(), rows, in_dim, in_dim, panels.as_ptr(), n_panels, c.as_mut_ptr(), n_panels * 12)) };
            *best = best.min(crate::captioner::now_ms() - start);
        }
    }
    best[1] < best[0]
}
