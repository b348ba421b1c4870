// The int8 GEMM loops of `int8.rs`, included into the crate (`int8::kernel`: simd128 in WASM,
// SSE2 on x86-64, plain integers elsewhere) and into the relaxed-SIMD side module (`relaxed_module.rs`), each
// with its own `V` (four i32 sums), `W` (16 weight bytes made ready for `dot`), `X` (4 input
// bytes made ready), `zero`, `load_i32`, `store_i32`, `weights`, `inputs`, `dot` and `MR` (rows
// per micro-tile, at most 4: the tail's rows take the smaller tiles) in scope.
// Every sum is an exact integer, so all of them give the same bits.

/// Output features per panel: three vectors of four.
pub const NR: usize = 12;
/// Input features per pass over a panel (a multiple of 4): 1024 × 12 bytes stay in L1 while
/// the rows pass. |Σ| ≤ 127 · 127 · in_dim never leaves i32 for in_dim < 133 000.
const KC: usize = 1024;

/// `M` rows × 12 sums over `kc` inputs (a multiple of 4), added to what `c` holds when `add`.
///
/// SAFETY: `a + r·lda + k` for r < M, k < kc; `b + k·12 + j` for k < kc, j < 12 (per 4 inputs,
/// 48 bytes: each output's 4 weights in turn); `c + r·ldc + j` for r < M, j < 12 — in bounds.
#[inline(always)]
unsafe fn tile<const M: usize>(kc: usize, a: *const u8, lda: usize, b: *const i8, c: *mut i32, ldc: usize, add: bool) {
    let mut acc = [[zero(); 3]; M];
    if add {
        let mut r = 0;
        while r < M {
            let from = c.add(r * ldc);
            acc[r] = [load_i32(from), load_i32(from.add(4)), load_i32(from.add(8))];
            r += 1;
        }
    }
    let mut k = 0;
    while k < kc {
        let w = [weights(b.add(k * NR)), weights(b.add(k * NR + 16)), weights(b.add(k * NR + 32))];
        let mut r = 0;
        while r < M {
            let x = inputs(a.add(r * lda + k));
            acc[r] = [dot(w[0], x, acc[r][0]), dot(w[1], x, acc[r][1]), dot(w[2], x, acc[r][2])];
            r += 1;
        }
        k += 4;
    }
    let mut r = 0;
    while r < M {
        store_i32(c.add(r * ldc), acc[r][0]);
        store_i32(c.add(r * ldc + 4), acc[r][1]);
        store_i32(c.add(r * ldc + 8), acc[r][2]);
        r += 1;
    }
}

/// C = A·Bᵀ in exact integers: `a` is `rows` rows of `in_dim` bytes (a multiple of 4; each
/// 0..=127), `lda` apart; `panels` B (`n_panels` panels of `[in_dim / 4][12][4]` i8); `c`
/// `rows` rows of `n_panels · 12` i32, `ldc` apart, all written.
///
/// SAFETY: every pointer holds what is just listed.
pub unsafe fn gemm(a: *const u8, rows: usize, in_dim: usize, lda: usize, panels: *const i8, n_panels: usize, c: *mut i32, ldc: usize) {
    let mut k0 = 0;
    while k0 < in_dim {
        let kc = if in_dim - k0 < KC { in_dim - k0 } else { KC };
        let mut p = 0;
        while p < n_panels {
            let b = panels.add((p * in_dim + k0) * NR);
            let mut i = 0;
            while i + MR <= rows {
                tile::<MR>(kc, a.add(i * lda + k0), lda, b, c.add(i * ldc + p * NR), ldc, k0 > 0);
                i += MR;
            }
            let (a, c) = (a.add(i * lda + k0), c.add(i * ldc + p * NR));
            match rows - i {
                3 => tile::<3>(kc, a, lda, b, c, ldc, k0 > 0),
                2 => tile::<2>(kc, a, lda, b, c, ldc, k0 > 0),
                1 => tile::<1>(kc, a, lda, b, c, ldc, k0 > 0),
                _ => {}
            }
            p += 1;
        }
        k0 += kc;
    }
}
