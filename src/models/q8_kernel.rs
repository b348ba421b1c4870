// The part of q8_0 decoding that `q8.rs` (simd128) and the relaxed-SIMD side module
// (`relaxed_module.rs`) share, included into both with `core::arch::wasm32::*` in scope: how
// four rows' block sums become their results. The two differ only in how they get a block's
// exact integer sums, so they give the same bits.

/// [Σ a, Σ b, Σ c, Σ d] of four i32x4 vectors.
#[inline(always)]
fn horizontal_sums([a, b, c, d]: [v128; 4]) -> v128 {
    let ab = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(a, b), i32x4_shuffle::<2, 6, 3, 7>(a, b));
    let cd = i32x4_add(i32x4_shuffle::<0, 4, 1, 5>(c, d), i32x4_shuffle::<2, 6, 3, 7>(c, d));
    i32x4_add(i64x2_shuffle::<0, 2>(ab, cd), i64x2_shuffle::<1, 3>(ab, cd))
}

/// The four rows of a group: Σ over blocks b, in order, of f32(`sums(b)`) · scales[4b..4b + 4],
/// `sums(b)` being each row's exact Σ q·x over block b. SAFETY: scales[..4 · blocks] in bounds.
#[inline(always)]
unsafe fn group_results(blocks: usize, scales: *const f32, sums: impl Fn(usize) -> v128) -> v128 {
    let mut acc = f32x4_splat(0.0);
    for b in 0..blocks {
        acc = f32x4_add(acc, f32x4_mul(f32x4_convert_i32x4(sums(b)), v128_load(scales.add(4 * b) as *const v128)));
    }
    acc
}

/// The `i`-th group to compute of `groups`: the first and the second half alternate (0, h, 1,
/// h + 1, …). Two streams from memory overlap with the arithmetic better than one: a SmolLM
/// token's matrices took 17.1 ms instead of 20.0 in a microbenchmark (Chromium, this machine;
/// four streams gained nothing more).
#[inline(always)]
pub fn stream_order(i: usize, groups: usize) -> usize {
    let half = groups.div_ceil(2);
    if i % 2 == 0 {
        i / 2
    } else {
        half + i / 2
    }
}
