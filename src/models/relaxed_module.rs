//! The relaxed-SIMD side module (`relaxed.rs`): not part of the crate, but compiled by
//! `build.rs` on its own (no_std, `+relaxed-simd`, importing the main module's memory) into a
//! ~3 KB WASM module that the browser compiles only where it validates. It holds the very loops
//! of `packed_kernel.rs`, with a fused multiply-add, the 8-bit encoder GEMM's
//! (`int8_kernel.rs`) with the i8 dot product, and the q8_0 decode kernel with it. It
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

/// Groups `q8_groups` takes side by side.
const WAYS: usize = 8;

/// The decoder's q8_0 matrix–vector product (`q8.rs`) with the fused i8 dot: for each of
/// `groups` groups of four rows, out[4g..4g + 4] = Σ over blocks b, in order, of
/// f32(block sum) · scales[4b..4b + 4]. The input comes as 7-bit halves of x + 8192 (x the
/// 14-bit input): per block 32 high then 32 low bytes, so a block's sum is
/// 128 · (Σ w·hi − 64 · Σ w) + Σ w·lo = Σ w·x exactly, the sum the simd128 kernel takes: the
/// same bits. Six dot products a row and block (the 64s give 64 · Σ w) against the simd128
/// kernel's four dot products, six shifts and three adds. [`WAYS`] groups, one from each of as
/// many stripes of the range, go block by block side by side, so that as many streams from
/// memory have loads in flight together. Chromium, one thread, alternated builds, SmolLM-135M
/// q8_0 steps begun with the caches emptied (the bench's cold pass): two side by side
/// 14.8–15.3 ms, eight 13.5–14.1 (in an earlier sitting with a lighter emptying: four
/// 13.3–14.0, six 13.1–13.4, eight 13.0–13.3). Alternating whole groups, as the simd128 kernel
/// does, was 18–19 ms a warm step where two side by side took 15.0–15.6.
/// SAFETY: qs holds groups × blocks × 128 bytes, scales groups × blocks × 4, x blocks × 64,
/// out groups × 4.
#[no_mangle]
pub unsafe extern "C" fn q8_groups(qs: *const i8, scales: *const f32, x: *const u8, blocks: usize, groups: usize, out: *mut f32) {
    let sixty_fours = i8x16_splat(64);
    // Block b of the group at qg / sg against the input: the four rows' f32 contributions.
    let block = |qg: *const i8, sg: *const f32, b: usize| {
        let xb = x.add(64 * b);
        let (hi0, hi1) = (v128_load(xb as *const v128), v128_load(xb.add(16) as *const v128));
        let (lo0, lo1) = (v128_load(xb.add(32) as *const v128), v128_load(xb.add(48) as *const v128));
        let qb = qg.add(128 * b);
        let row = |k: usize| {
            let (w0, w1) = (v128_load(qb.add(32 * k) as *const v128), v128_load(qb.add(32 * k + 16) as *const v128));
            let zero = i32x4_splat(0);
            let high = i32x4_relaxed_dot_i8x16_i7x16_add(w1, hi1, i32x4_relaxed_dot_i8x16_i7x16_add(w0, hi0, zero));
            let offset = i32x4_relaxed_dot_i8x16_i7x16_add(w1, sixty_fours, i32x4_relaxed_dot_i8x16_i7x16_add(w0, sixty_fours, zero));
            let low = i32x4_relaxed_dot_i8x16_i7x16_add(w1, lo1, i32x4_relaxed_dot_i8x16_i7x16_add(w0, lo0, zero));
            i32x4_add(i32x4_shl(i32x4_sub(high, offset), 7), low)
        };
        let (a, c, d, e) = (row(0), row(1), row(2), row(3));
        // [Σ a, Σ c, Σ d, Σ e]
        let ac = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(a, c), i32x4_shuffle::<2, 6, 3, 7>(a, c));
        let de = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(d, e), i32x4_shuffle::<2, 6, 3, 7>(d, e));
        let sums = i32x4_add(i64x2_shuffle::<0, 2>(ac, de), i64x2_shuffle::<1, 3>(ac, de));
        f32x4_mul(f32x4_convert_i32x4(sums), v128_load(sg.add(4 * b) as *const v128))
    };
    let at = |g: usize| (qs.add(g * blocks * 128), scales.add(g * blocks * 4));
    // Stripe k of the first WAYS · part groups is k · part .. (k + 1) · part; the groups past
    // them go alone.
    let part = groups / WAYS;
    macro_rules! side_by_side {
        ($first:ident, $blocks:ident: $($k:literal $acc:ident),*) => {
            $(let mut $acc = zero();)*
            for b in 0..$blocks {
                $(let (q, s) = at($first + $k * part); $acc = f32x4_add($acc, block(q, s, b));)*
            }
            $(v128_store(out.add(4 * ($first + $k * part)) as *mut v128, $acc);)*
        };
    }
    for first in 0..part {
        side_by_side!(first, blocks: 0 a0, 1 a1, 2 a2, 3 a3, 4 a4, 5 a5, 6 a6, 7 a7);
    }
    for g in WAYS * part..groups {
        let (q1, s1) = at(g);
        let mut acc = zero();
        for b in 0..blocks {
            acc = f32x4_add(acc, block(q1, s1, b));
        }
        v128_store(out.add(4 * g) as *mut v128, acc);
    }
}
