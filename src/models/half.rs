//! 16-bit weights kept as the checkpoint stores them (f16 or bf16: 2 bytes a weight in memory)
//! and widened to f32 inside the kernels, a block at a time: the maths is f32 on exactly the
//! values the file holds, as transformers computes with a 16-bit checkpoint loaded in f32.

use candle_core::{DType, Result, Storage, Tensor};

/// Which 16-bit float a weight's bits are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    F16,
    Bf16,
}

impl Half {
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F16 => Some(Half::F16),
            DType::BF16 => Some(Half::Bf16),
            _ => None,
        }
    }

    /// `src` widened into `dst` (the first `src.len()` floats). Branch-free per value, so LLVM
    /// vectorises it (simd128 in WASM, where nothing converts f16 in hardware).
    #[inline]
    pub fn widen(self, src: &[u16], dst: &mut [f32]) {
        match self {
            Half::Bf16 => dst.iter_mut().zip(src).for_each(|(d, &h)| *d = f32::from_bits((h as u32) << 16)),
            Half::F16 => dst.iter_mut().zip(src).for_each(|(d, &h)| *d = f16_to_f32(h)),
        }
    }
}

/// IEEE binary16 → f32, exactly: the exponent and mantissa moved into f32's places and scaled
/// by 2^112 (exact, and right for subnormals too: the product renormalises them); infinities and
/// NaNs (exponent 31) get f32's all-ones exponent.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let magnitude = h & 0x7fff;
    let scaled = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000);
    let bits = if magnitude >= 0x7c00 { 0x7f80_0000 | ((magnitude & 0x3ff) << 13) } else { scaled.to_bits() };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// Runs `f` on the bits of a contiguous 16-bit CPU tensor without copying them.
pub fn with_bits<R>(t: &Tensor, f: impl FnOnce(&[u16], Half) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("our 16-bit kernels need a contiguous tensor");
    };
    use half::slice::HalfFloatSliceExt;
    match &*storage {
        Storage::Cpu(cpu) => match t.dtype() {
            DType::F16 => Ok(f(cpu.as_slice::<half::f16>()?[start..end].reinterpret_cast(), Half::F16)),
            DType::BF16 => Ok(f(cpu.as_slice::<half::bf16>()?[start..end].reinterpret_cast(), Half::Bf16)),
            other => candle_core::bail!("a 16-bit weight expected, got {other:?}"),
        },
        _ => candle_core::bail!("our 16-bit kernels run on the CPU only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f16_and_bf16_widens_as_the_half_crate_does() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut got = vec![0f32; all.len()];
        for kind in [Half::F16, Half::Bf16] {
            kind.widen(&all, &mut got);
            for (&h, &g) in all.iter().zip(&got) {
                let want = match kind {
                    Half::F16 => half::f16::from_bits(h).to_f32(),
                    Half::Bf16 => half::bf16::from_bits(h).to_f32(),
                };
                if want.is_nan() {
                    assert!(g.is_nan(), "{kind:?} {h:#06x}: {g}");
                } else {
                    assert_eq!(g.to_bits(), want.to_bits(), "{kind:?} {h:#06x}: {g} vs {want}");
                }
            }
        }
    }
}
