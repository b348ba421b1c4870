//! The kernels with relaxed SIMD, where the browser has it: fused multiply-add for the packed
//! GEMM (`packed.rs`) and the i8 dot product for the 8-bit encoder GEMM (`int8.rs`). They live in a WASM
//! module of their own (`relaxed_module.rs`, built by `build.rs`, ~3 KB), because a module that
//! uses one relaxed instruction fails to compile as a whole where relaxed SIMD is missing. It
//! shares this module's memory; each thread instantiates it once (`js/relaxed-kernel.js`).
//! Only WASM builds with simd128 have it.
#![cfg(all(target_arch = "wasm32", target_feature = "simd128"))]

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use wasm_bindgen::prelude::*;

#[wasm_bindgen(module = "/js/relaxed-kernel.js")]
extern "C" {
    fn wasmcap_relaxed_kernel_init(memory: JsValue, bytes: &[u8]) -> bool;
    fn wasmcap_relaxed_kernel_gemm(a: u32, rows: u32, in_dim: u32, lda: u32, panels: u32, n_panels: u32, bias: u32, c: u32, ldc: u32);
    fn wasmcap_relaxed_kernel_int8_gemm(a: u32, rows: u32, in_dim: u32, lda: u32, panels: u32, n_panels: u32, c: u32, ldc: u32);
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
pub unsafe fn int8_gemm((a, rows, in_dim, lda, panels, n_panels, c, ldc): (*const u8, usize, usize, usize, *const i8, usize, *mut i32, usize)) {
    wasmcap_relaxed_kernel_int8_gemm(a as u32, rows as u32, in_dim as u32, lda as u32, panels as u32, n_panels as u32, c as u32, ldc as u32)
}
