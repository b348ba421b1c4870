//! Pure model maths: no I/O, no JS, no CLI. One file per model; module prefixes spell the
//! tensor names of `model.safetensors`.

pub mod activation;
pub mod attention;
pub mod backend;
pub mod blip;
pub mod embedding;
pub mod encoder_layer;
pub mod gpt2;
pub mod half;
pub mod idefics3;
pub mod int8;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod norm;
pub mod packed;
pub mod q8;
pub mod rope;
mod relaxed;
pub mod siglip;
pub mod vision_encoder_decoder;
pub mod vit;

/// (min(0, x), max(0, x)): comparisons (`f32::min`/`max` are library calls per value in WASM)
/// in eight independent lanes so that it vectorizes — the same values as one running
/// comparison, since min and max are exact; NaN never wins.
pub(crate) fn range(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([0f32; 8], [0f32; 8]);
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for ((lo, hi), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(c) {
            *lo = if v < *lo { v } else { *lo };
            *hi = if v > *hi { v } else { *hi };
        }
    }
    lo.iter()
        .zip(&hi)
        .map(|(&l, &h)| (l, h))
        .chain(rest.iter().map(|&v| (v, v)))
        .fold((0f32, 0f32), |(lo, hi), (l, h)| (if l < lo { l } else { lo }, if h > hi { h } else { hi }))
}

/// max |x| (0 for none; NaN never wins), from [`range`]: negation is exact.
pub(crate) fn max_abs(x: &[f32]) -> f32 {
    let (lo, hi) = range(x);
    if -lo > hi {
        -lo
    } else {
        hi
    }
}

/// True when autograd records operations on any of `ts` (training). candle's fused CPU kernels
/// (softmax, norms, RoPE) and our matrix–vector path have no backward pass, so models take the
/// composed tensor ops then.
pub(crate) fn tracks_grad(ts: &[&candle_core::Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

#[cfg(test)]
mod tests {
    /// The lane folds give what one running comparison gives: lengths off the lanes, a NaN,
    /// negative zero, the extreme in the remainder.
    #[test]
    fn range_and_max_abs_are_their_definitions() {
        for len in [0, 1, 7, 8, 9, 37, 64] {
            let mut x: Vec<f32> = (0..len).map(|i| ((i * 7919 % 23) as f32 - 11.0) * 0.25).collect();
            if len > 3 {
                x[2] = f32::NAN;
                x[3] = -0.0;
                x[len - 1] = -40.0;
            }
            let lo = x.iter().fold(0f32, |m, &v| if v < m { v } else { m });
            let hi = x.iter().fold(0f32, |m, &v| if v > m { v } else { m });
            let amax = x.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
            let (got_lo, got_hi) = super::range(&x);
            assert_eq!((got_lo.to_bits(), got_hi.to_bits()), (lo.to_bits(), hi.to_bits()), "{len}");
            assert_eq!(super::max_abs(&x).to_bits(), amax.to_bits(), "{len}");
        }
    }
}
