// The GEMM loops of `packed.rs`, included twice: into the crate (`packed::kernel`) and into the
// relaxed-SIMD side module (`relaxed_module.rs`), each with its own `V`, `zero`, `load`, `store`,
// `splat` and `madd` in scope. One source, so the two kernels cannot drift apart.

/// Output features per panel: three 4-lane vectors.
pub const NR: usize = 12;
/// Rows per micro-tile.
const MR: usize = 3;
/// Input features per pass over a panel: 768 × 12 floats (36 KiB) stay in L1 (48 KiB on x86
/// since Ice Lake and Zen 5) while the rows pass. Passes beyond the first read back the output
/// the one before wrote: at 512, SigLIP-B's fc1 (768 inputs) took two, and its 196 × 3072
/// output, more than L2 holds, went to L3 and back (fc1 226 → 211 ms per encode at 768).
pub const KC: usize = 768;

/// `M` rows × 12 features of the output, over `kc` input features. The accumulators start at
/// `bias[0..12]`, or, when `bias` is null, at what an earlier pass left in the output.
///
/// SAFETY: `a + r·lda + k` for r < M, k < kc; `b + k·12 + j` for k < kc, j < 12; `c + r·ldc + j`
/// for r < M, j < 12; and `bias + j` for j < 12 unless null — all in bounds.
#[inline(always)]
unsafe fn tile<const M: usize>(kc: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, bias: *const f32) {
    let mut acc = [[zero(); 3]; M];
    let mut r = 0;
    while r < M {
        let from = if bias.is_null() { c.add(r * ldc) as *const f32 } else { bias };
        acc[r] = [load(from), load(from.add(4)), load(from.add(8))];
        r += 1;
    }
    let mut k = 0;
    while k < kc {
        let w = [load(b.add(k * NR)), load(b.add(k * NR + 4)), load(b.add(k * NR + 8))];
        let mut r = 0;
        while r < M {
            let x = splat(a.add(r * lda + k));
            acc[r] = [madd(x, w[0], acc[r][0]), madd(x, w[1], acc[r][1]), madd(x, w[2], acc[r][2])];
            r += 1;
        }
        k += 1;
    }
    let mut r = 0;
    while r < M {
        store(c.add(r * ldc), acc[r][0]);
        store(c.add(r * ldc + 4), acc[r][1]);
        store(c.add(r * ldc + 8), acc[r][2]);
        r += 1;
    }
}

/// y = x·Wᵀ + b: `a` is x, `rows` rows of `in_dim` floats, `lda` apart; `panels` W packed
/// (`n_panels` panels of `[in_dim][12]`), `bias` `n_panels · 12` floats, `c` y: `rows` rows of
/// `n_panels · 12` floats, `ldc` apart.
///
/// SAFETY: every pointer holds the floats just listed.
pub unsafe fn gemm(a: *const f32, rows: usize, in_dim: usize, lda: usize, panels: *const f32, n_panels: usize, bias: *const f32, c: *mut f32, ldc: usize) {
    let mut k0 = 0;
    while k0 < in_dim {
        let kc = if in_dim - k0 < KC { in_dim - k0 } else { KC };
        let mut p = 0;
        while p < n_panels {
            let from = if k0 == 0 { bias.add(p * NR) } else { core::ptr::null() };
            let b = panels.add((p * in_dim + k0) * NR);
            let mut i = 0;
            while i + MR <= rows {
                tile::<MR>(kc, a.add(i * lda + k0), lda, b, c.add(i * ldc + p * NR), ldc, from);
                i += MR;
            }
            let (a, c) = (a.add(i * lda + k0), c.add(i * ldc + p * NR));
            match rows - i {
                2 => tile::<2>(kc, a, lda, b, c, ldc, from),
                1 => tile::<1>(kc, a, lda, b, c, ldc, from),
                _ => {}
            }
            p += 1;
        }
        k0 += kc;
    }
}
