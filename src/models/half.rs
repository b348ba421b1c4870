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
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        let (src, dst) = {
            let done = simd::widen(self, src, dst);
            (&src[done..], &mut dst[done..])
        };
        match self {
            Half::Bf16 => dst.iter_mut().zip(src).for_each(|(d, &h)| *d = f32::from_bits((h as u32) << 16)),
            // Natively the half crate's conversion, F16C where the CPU has it (checked at run time).
            #[cfg(not(target_arch = "wasm32"))]
            Half::F16 => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let n = src.len().min(dst.len());
                let src: &[half::f16] = src[..n].reinterpret_cast();
                src.convert_to_f32_slice(&mut dst[..n]);
            }
            #[cfg(target_arch = "wasm32")]
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

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub use simd::Widen;

/// The same widening, 8 values at a time in simd128 (LLVM leaves the scalar loops above mostly
/// scalar in WASM).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use super::Half;
    use core::arch::wasm32::*;

    /// Widens the first multiple of 8 of `src` into `dst`; returns how many.
    #[inline]
    pub fn widen(kind: Half, src: &[u16], dst: &mut [f32]) -> usize {
        let n = src.len().min(dst.len()) / 8 * 8;
        let c = F16Constants::new();
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= both lengths; wasm loads and stores need no alignment.
            unsafe {
                let h = v128_load(src.as_ptr().add(i) as *const v128);
                let (lo, hi) = match kind {
                    Half::Bf16 => (i32x4_shl(u32x4_extend_low_u16x8(h), 16), i32x4_shl(u32x4_extend_high_u16x8(h), 16)),
                    Half::F16 => (f16x4(u32x4_extend_low_u16x8(h), &c), f16x4(u32x4_extend_high_u16x8(h), &c)),
                };
                v128_store(dst.as_mut_ptr().add(i) as *mut v128, lo);
                v128_store(dst.as_mut_ptr().add(i + 4) as *mut v128, hi);
            }
            i += 8;
        }
        n
    }

    /// Widens 4 values at a time in registers (the matrix–vector kernels' loads).
    pub struct Widen {
        kind: Half,
        c: F16Constants,
    }

    impl Widen {
        pub fn new(kind: Half) -> Self {
            Self { kind, c: F16Constants::new() }
        }
    }

    impl crate::models::linear::Lanes<u16> for Widen {
        #[inline(always)]
        unsafe fn four(&self, p: *const u16) -> v128 {
            // SAFETY: `p..p + 4` in bounds, as the caller promises; wasm needs no alignment.
            let h = u32x4_extend_low_u16x8(unsafe { v128_load64_zero(p as *const u64) });
            match self.kind {
                Half::Bf16 => i32x4_shl(h, 16),
                Half::F16 => f16x4(h, &self.c),
            }
        }

        #[inline(always)]
        fn one(&self, h: u16) -> f32 {
            match self.kind {
                Half::Bf16 => f32::from_bits((h as u32) << 16),
                Half::F16 => super::f16_to_f32(h),
            }
        }
    }

    struct F16Constants {
        sign: v128,
        scale: v128,
        special: v128,
        all_ones: v128,
    }

    impl F16Constants {
        // Through `black_box`, so that they are values in registers: V8 builds a constant vector
        // again at each use, inside the loop.
        #[inline(always)]
        fn new() -> Self {
            Self {
                sign: u32x4_splat(core::hint::black_box(0x8000_0000)),
                scale: f32x4_splat(core::hint::black_box(f32::from_bits(0x7780_0000))),
                special: u32x4_splat(core::hint::black_box(0x0f80_0000)),
                all_ones: u32x4_splat(core::hint::black_box(0x7f80_0000)),
            }
        }
    }

    /// `super::f16_to_f32` on four values (their bits in the low halves of the lanes), the same
    /// way: exponent and mantissa shifted into f32's places and scaled by 2^112, exponent 31
    /// (infinities, NaNs) made f32's 255.
    #[inline(always)]
    fn f16x4(h: v128, c: &F16Constants) -> v128 {
        let x = i32x4_shl(h, 16);
        let sign = v128_and(x, c.sign);
        let shifted = u32x4_shr(v128_xor(x, sign), 3);
        let scaled = f32x4_mul(shifted, c.scale);
        let bits = v128_bitselect(v128_or(shifted, c.all_ones), scaled, u32x4_ge(shifted, c.special));
        v128_or(bits, sign)
    }
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
