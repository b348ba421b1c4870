//! The relaxed-SIMD side module (`relaxed.rs`): not part of the crate, but compiled by
//! `build.rs` on its own (no_std, `+relaxed-simd`, importing the main module's memory) into a
//! ~3 KB WASM module that the browser compiles only where it validates. It holds the very loops
//! of `packed_kernel.rs`, with a fused multiply-add, q8_0 decoding's with the i8 dot product
//! (sharing `q8_kernel.rs` with `q8.rs`) and the 8-bit encoder GEMM's (`int8_kernel.rs`). It
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

mod int8 {
    use super::*;
    type W = V;

    #[inline(always)]
    unsafe fn load_i32(p: *const i32) -> V {
        v128_load(p as *const v128)
    }

    #[inline(always)]
    unsafe fn store_i32(p: *mut i32, v: V) {
        v128_store(p as *mut v128, v)
    }

    #[inline(always)]
    unsafe fn weights(p: *const i8) -> W {
        v128_load(p as *const v128)
    }

    /// The 4 input bytes at `p` in every lane.
    #[inline(always)]
    unsafe fn inputs(p: *const u8) -> V {
        v128_load32_splat(p as *const u32)
    }

    /// Each lane: its 4 weight bytes times the 4 inputs (0..=127, the i7 operand), summed.
    /// Spelled as the i16 dot then a dot with ones, not as `relaxed_dot_i8x16_i7x16_add`: on
    /// x64 without AVX-VNNI, V8 lowers the latter to the same two multiplies but rebuilds the
    /// ones vector for every one (5 instructions instead of 3; seen in `--print-wasm-code`).
    #[inline(always)]
    fn dot(w: W, x: V, acc: V) -> V {
        i32x4_add(acc, i32x4_dot_i16x8(i16x8_relaxed_dot_i8x16_i7x16(w, x), i16x8_splat(1)))
    }

    include!("int8_kernel.rs");
}

/// `int8_kernel.rs`' `gemm`, exported. SAFETY: as there.
#[no_mangle]
pub unsafe extern "C" fn int8_gemm(a: *const u8, rows: usize, in_dim: usize, lda: usize, panels: *const i8, n_panels: usize, c: *mut i32, ldc: usize) {
    int8::gemm(a, rows, in_dim, lda, panels, n_panels, c, ldc)
}

mod q8 {
    use super::*;
    include!("q8_kernel.rs");

    /// `q8.rs`' grouped q8_0 rows against one input row, with the i8 dot product: the input
    /// (14 bits, plus 8192 so it is never negative) split into a high and a low 7-bit half,
    /// both within the i7 operand's range, and the offset taken back off with each row's
    /// Σ q per block (`sums`). Writes four f32 per group to `out`. SAFETY: `qs`
    /// groups × blocks × 128 long, `scales` and `sums` groups × blocks × 4, `x` blocks × 64
    /// (per block 32 high then 32 low halves), `out` groups × 4.
    #[inline(always)]
    pub unsafe fn matvec(qs: *const i8, scales: *const f32, sums: *const i16, x: *const u8, blocks: usize, groups: usize, out: *mut f32) {
        for g in (0..groups).map(|i| stream_order(i, groups)) {
            let (qs, scales, sums) = (qs.add(g * blocks * 128), scales.add(g * blocks * 4), sums.add(g * blocks * 4));
            let results = group_results(blocks, scales, |b| {
                let xb = x.add(64 * b);
                let [h0, h1, l0, l1] = [0, 16, 32, 48].map(|o| v128_load(xb.add(o) as *const v128));
                let qb = qs.add(128 * b);
                let rows = [0, 32, 64, 96].map(|o| {
                    let (q0, q1) = (v128_load(qb.add(o) as *const v128), v128_load(qb.add(o + 16) as *const v128));
                    let high = i32x4_relaxed_dot_i8x16_i7x16_add(q1, h1, i32x4_relaxed_dot_i8x16_i7x16_add(q0, h0, i32x4_splat(0)));
                    let low = i32x4_relaxed_dot_i8x16_i7x16_add(q1, l1, i32x4_relaxed_dot_i8x16_i7x16_add(q0, l0, i32x4_splat(0)));
                    i32x4_add(i32x4_shl(high, 7), low)
                });
                let offset = i32x4_shl(i32x4_extend_low_i16x8(v128_load64_zero(sums.add(4 * b) as *const u64)), 13);
                i32x4_sub(horizontal_sums(rows), offset)
            });
            v128_store(out.add(4 * g) as *mut v128, results);
        }
    }
}

/// `q8::matvec`, exported. SAFETY: as there.
#[no_mangle]
pub unsafe extern "C" fn q8_matvec(qs: *const i8, scales: *const f32, sums: *const i16, x: *const u8, blocks: usize, groups: usize, out: *mut f32) {
    q8::matvec(qs, scales, sums, x, blocks, groups, out)
}
