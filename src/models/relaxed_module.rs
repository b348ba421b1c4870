//! The relaxed-SIMD side module (`relaxed.rs`): not part of the crate, but compiled by
//! `build.rs` on its own (no_std, `+relaxed-simd`, importing the main module's memory) into a
//! ~3 KB WASM module that the browser compiles only where it validates. It holds the very loops
//! of `packed_kernel.rs`, with a fused multiply-add, and the 8-bit encoder GEMM's
//! (`int8_kernel.rs`) with the i8 dot product. It
//! must not use a stack: it has none of its own (`-z stack-size=0` makes any use trap instead of
//! writing over the main module).
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
pub unsafe extern "C" fn gemm(a: *const f32, rows: usize, in_dim: usize, lda: usize, panels: *const f32, n_panels: usize, bias: *const f32, c: *mut f32, ldc: usize) {
    kernel::gemm(a, rows, in_dim, lda, panels, n_panels, bias, c, ldc)
}

/// What both spellings of the int8 kernel load and store with.
mod int8_io {
    use super::*;
    pub type W = V;

    #[inline(always)]
    pub unsafe fn load_i32(p: *const i32) -> V {
        v128_load(p as *const v128)
    }

    #[inline(always)]
    pub unsafe fn store_i32(p: *mut i32, v: V) {
        v128_store(p as *mut v128, v)
    }

    #[inline(always)]
    pub unsafe fn weights(p: *const i8) -> W {
        v128_load(p as *const v128)
    }

    /// The 4 input bytes at `p` in every lane.
    #[inline(always)]
    pub unsafe fn inputs(p: *const u8) -> V {
        v128_load32_splat(p as *const u32)
    }
}

mod int8 {
    use super::int8_io::*;
    use super::*;

    /// Each lane: its 4 weight bytes times the 4 inputs (0..=127, the i7 operand), summed.
    /// Spelled as the i16 dot then a dot with ones, not as `relaxed_dot_i8x16_i7x16_add`: on
    /// x64 without AVX-VNNI, V8 lowers the latter to the same two multiplies but rebuilds the
    /// ones vector for every one (5 instructions instead of 3; seen in `--print-wasm-code`).
    #[inline(always)]
    fn dot(w: W, x: V, acc: V) -> V {
        i32x4_add(acc, i32x4_dot_i16x8(i16x8_relaxed_dot_i8x16_i7x16(w, x), i16x8_splat(1)))
    }

    /// 6 sums + 3 weight vectors + 2 inputs + a product + the ones vector stay within x64's 16
    /// registers (3 rows spilled two sums a step).
    const MR: usize = 2;
    include!("int8_kernel.rs");
}

/// The same loops with `relaxed_dot_i8x16_i7x16_add`: one `vpdpbusd` where the CPU has
/// AVX-VNNI (V8 emits it only for the VEX form), 5 instructions where it has not.
mod int8_fused {
    use super::int8_io::*;
    use super::*;

    #[inline(always)]
    fn dot(w: W, x: V, acc: V) -> V {
        i32x4_relaxed_dot_i8x16_i7x16_add(w, x, acc)
    }

    /// No temporaries: 9 sums + 3 weight vectors + an input within V8's 15 free registers, and
    /// 6 loads a step for 9 dot products instead of 5 for 6.
    const MR: usize = 3;
    include!("int8_kernel.rs");
}

/// `int8_kernel.rs`' `gemm`, exported: `fused` picks the one-instruction dot product. SAFETY:
/// as there.
#[no_mangle]
pub unsafe extern "C" fn int8_gemm(
    fused: u32,
    a: *const u8,
    rows: usize,
    in_dim: usize,
    lda: usize,
    panels: *const i8,
    n_panels: usize,
    c: *mut i32,
    ldc: usize,
) {
    if fused != 0 {
        int8_fused::gemm(a, rows, in_dim, lda, panels, n_panels, c, ldc)
    } else {
        int8::gemm(a, rows, in_dim, lda, panels, n_panels, c, ldc)
    }
}
