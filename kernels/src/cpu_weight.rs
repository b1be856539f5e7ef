//! The widths a CPU weight is kept in: f32, bf16 or f16. The weight-streaming kernels read a
//! narrow weight as it lies and widen it to f32 in registers (a shift for bf16, F16C's convert
//! for f16), accumulating in f32, so a step reads half the bytes an f32 copy would.

use half::{bf16, f16};

/// Which of the three widths a [`Weight`] is; the kernels match on it at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    /// 32-bit IEEE floats.
    F32,
    /// bfloat16: the upper half of an f32.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// An element a weight matrix may be kept in.
pub trait Weight: Copy + Send + Sync + 'static {
    /// Which width this is.
    const KIND: WeightKind;

    /// The value as an f32 (exact for all three widths).
    fn to_f32(self) -> f32;

    /// Widens `src` into `dst`, element for element (`dst` as long as `src`).
    fn widen_into(src: &[Self], dst: &mut [f32]);
}

impl Weight for f32 {
    const KIND: WeightKind = WeightKind::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn widen_into(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Weight for bf16 {
    const KIND: WeightKind = WeightKind::Bf16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    fn widen_into(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "widen_into: lengths differ");
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

impl Weight for f16 {
    const KIND: WeightKind = WeightKind::F16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn widen_into(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}

/// Whether this CPU has what the vector loops need to widen any [`Weight`]: AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Eight weights from `$p` (a `*const W`) widened to a `__m256`. Expands inside a function
/// compiled with `avx2` and `f16c`, so the widening is inlined there.
#[cfg(target_arch = "x86_64")]
macro_rules! load8 {
    ($w:ty, $p:expr) => {
        match <$w as $crate::cpu_weight::Weight>::KIND {
            $crate::cpu_weight::WeightKind::F32 => _mm256_loadu_ps($p as *const f32),
            $crate::cpu_weight::WeightKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(_mm_loadu_si128($p as *const __m128i)),
            )),
            $crate::cpu_weight::WeightKind::F16 => {
                _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
            }
        }
    };
}

/// Sixteen weights from `$p` (a `*const W`) widened to a `__m512`, inside an `avx512f` function.
#[cfg(target_arch = "x86_64")]
macro_rules! load16 {
    ($w:ty, $p:expr) => {
        match <$w as $crate::cpu_weight::Weight>::KIND {
            $crate::cpu_weight::WeightKind::F32 => _mm512_loadu_ps($p as *const f32),
            $crate::cpu_weight::WeightKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256($p as *const __m256i)),
            )),
            $crate::cpu_weight::WeightKind::F16 => {
                _mm512_cvtph_ps(_mm256_loadu_si256($p as *const __m256i))
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) use {load16, load8};

/// `dst = src` widened to f32 (equal lengths), sixteen or eight at a time where the CPU can.
pub fn widen<W: Weight>(src: &[W], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if W::KIND != WeightKind::F32 {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just detected; the lengths are equal.
            return unsafe { simd::widen16(src, dst) };
        }
        if has_avx2() {
            // SAFETY: AVX2 and F16C were just detected; the lengths are equal.
            return unsafe { simd::widen8(src, dst) };
        }
    }
    W::widen_into(src, dst);
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::Weight;

    /// [`super::widen`] sixteen at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `src` and `dst` equally long.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen16<W: Weight>(src: &[W], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        // SAFETY: every access covers 16 elements below `n`.
        unsafe {
            while i + 16 <= n {
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), load16!(W, src.as_ptr().add(i)));
                i += 16;
            }
        }
        W::widen_into(&src[i..], &mut dst[i..]);
    }

    /// [`super::widen`] eight at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `src` and `dst` equally long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen8<W: Weight>(src: &[W], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        // SAFETY: every access covers 8 elements below `n`.
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), load8!(W, src.as_ptr().add(i)));
                i += 8;
            }
        }
        W::widen_into(&src[i..], &mut dst[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_for_every_width() {
        let values = [0.0f32, -1.5, 3.140625, 1e-3, -65504.0, 0.333_333_34];
        for v in values {
            let b = bf16::from_f32(v);
            let h = f16::from_f32(v);
            assert_eq!(b.to_f32(), Weight::to_f32(b));
            assert_eq!(h.to_f32(), Weight::to_f32(h));
            let (mut wb, mut wh) = ([0.0f32; 1], [0.0f32; 1]);
            bf16::widen_into(&[b], &mut wb);
            f16::widen_into(&[h], &mut wh);
            assert_eq!((wb[0], wh[0]), (b.to_f32(), h.to_f32()));
        }
    }
}
