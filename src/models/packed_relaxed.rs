//! The relaxed-SIMD side module of `packed.rs`: not part of the crate, but compiled by
//! `build.rs` on its own (no_std, `+relaxed-simd`, importing the main module's memory) into a
//! ~2 KB WASM module that the browser compiles only where it validates. It holds the very loops
//! of `packed_kernel.rs`, with a fused multiply-add. It must not use a stack: it has none of
//! its own (`-z stack-size=0` makes any use trap instead of writing over the main module).
#![no_std]

use core::arch::wasm32::*;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    unreachable()
}

type V = v128;

#[inline(always)]
fn zero() -> V {
    f32x4_splat(0.0)
}

#[inline(always)]
unsafe fn load(p: *const f32) -> V {
    v128_load(p as *const v128)
}

#[inline(always)]
unsafe fn store(p: *mut f32, v: V) {
    v128_store(p as *mut v128, v)
}

#[inline(always)]
unsafe fn splat(p: *const f32) -> V {
    v128_load32_splat(p as *const u32)
}

#[inline(always)]
fn madd(a: V, b: V, c: V) -> V {
    f32x4_relaxed_madd(a, b, c)
}

mod kernel {
    use super::*;
    include!("packed_kernel.rs");
}

/// `packed_kernel.rs`' `gemm`, exported. SAFETY: as there.
#[no_mangle]
pub unsafe extern "C" fn gemm(a: *const f32, rows: usize, in_dim: usize, panels: *const f32, n_panels: usize, bias: *const f32, c: *mut f32) {
    kernel::gemm(a, rows, in_dim, panels, n_panels, bias, c)
}
