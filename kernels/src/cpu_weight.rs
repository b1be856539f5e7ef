//! The widths a CPU weight is kept in: f32, bf16, f16, or int8 in blocks with a scale each
//! ([`Q8`]). The weight-streaming kernels read a narrow weight as it lies and widen it to f32 in
//! registers (a shift for bf16, F16C's convert for f16, a sign extension and a scale for int8),
//! accumulating in f32, so a step reads half (a quarter and a bit) of the bytes an f32 copy would.
//! The kernels see a weight matrix as a [`Matrix`]: a slice of one width, or a [`Q8`].

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
    /// int8 values in blocks of [`Q8_BLOCK`] along a row, an f32 scale each ([`Q8`]).
    Q8,
}

/// Elements of a row that share one scale in a [`Q8`] matrix (llama.cpp's Q8_0 block).
pub const Q8_BLOCK: usize = 32;

/// An int8 weight matrix: element `i` is `scales[i / Q8_BLOCK] · values[i]`. Rows are whole
/// blocks long, so a block never spans two rows. As llama.cpp's Q8_0, with its scales in f32.
#[derive(Debug, Clone, Copy)]
pub struct Q8<'a> {
    values: &'a [i8],
    scales: &'a [f32],
    /// The element of `values` this view starts at.
    start: usize,
    len: usize,
}

impl<'a> Q8<'a> {
    /// The whole matrix: `values.len()` elements, a scale for each block of [`Q8_BLOCK`].
    /// `None` when the scales do not cover the values.
    pub fn new(values: &'a [i8], scales: &'a [f32]) -> Option<Self> {
        (scales.len() == values.len().div_ceil(Q8_BLOCK)).then_some(Self {
            values,
            scales,
            start: 0,
            len: values.len(),
        })
    }
}

/// Quantizes `rows` rows of `k` elements (`k` a multiple of [`Q8_BLOCK`]) to [`Q8`]'s values and
/// scales, as llama.cpp's Q8_0 does: each block's scale is its largest magnitude over 127, each
/// value its element over the scale, rounded to nearest (a block of zeros has scale zero).
pub fn quantize_q8<W: Weight>(src: &[W]) -> (Vec<i8>, Vec<f32>) {
    use rayon::prelude::*;
    assert!(
        src.len().is_multiple_of(Q8_BLOCK),
        "quantize_q8: whole blocks"
    );
    let mut values = vec![0i8; src.len()];
    let mut scales = vec![0.0f32; src.len() / Q8_BLOCK];
    values
        .par_chunks_mut(Q8_BLOCK * 1024)
        .zip(scales.par_chunks_mut(1024))
        .zip(src.par_chunks(Q8_BLOCK * 1024))
        .for_each(|((values, scales), src)| {
            quantize_blocks(src, values, scales);
        });
    (values, scales)
}

/// [`quantize_q8`] over whole blocks of `src`, one scale each.
fn quantize_blocks<W: Weight>(src: &[W], values: &mut [i8], scales: &mut [f32]) {
    for ((q, d), s) in values
        .chunks_mut(Q8_BLOCK)
        .zip(scales.iter_mut())
        .zip(src.chunks(Q8_BLOCK))
    {
        let mut wide = [0.0f32; Q8_BLOCK];
        W::widen_into(s, &mut wide);
        let amax = wide.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        *d = amax / 127.0;
        let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(wide) {
            // Half away from zero, as `roundf`, in a form the loop vectorizes.
            let x = v * inv;
            *q = (x + 0.5f32.copysign(x)) as i8;
        }
    }
}

/// A weight matrix as the CPU kernels read it, row-major: a run of elements of one [`Weight`]
/// width, or a [`Q8`] view. The vector loads (`mload8!`, `mload16!`) widen eight or sixteen
/// elements from an index; for a [`Q8`], a load never crosses a block (the kernels load from
/// multiples of eight and sixteen, and rows are whole blocks).
pub trait Matrix: Copy + Send + Sync {
    /// Which width the elements are.
    const KIND: WeightKind;
    /// Bytes per element (what a prefetch distance counts in).
    const BYTES: usize;

    /// How many elements the view holds.
    fn len(&self) -> usize;

    /// Whether the view is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, widened to f32.
    fn at(&self, i: usize) -> f32;

    /// Elements `start..start + len` of the view. Panics past its end.
    fn range(self, start: usize, len: usize) -> Self;

    /// The address of element 0.
    fn base(&self) -> *const u8;

    /// The scale element `i` is multiplied by (1 but for [`Q8`]); `i` must be below `len`.
    fn scale_at(&self, i: usize) -> f32;

    /// [`Matrix::KIND`], from a value (for the load macros).
    #[inline(always)]
    fn kind(&self) -> WeightKind {
        Self::KIND
    }
}

impl<W: Weight> Matrix for &[W] {
    const KIND: WeightKind = W::KIND;
    const BYTES: usize = std::mem::size_of::<W>();

    #[inline(always)]
    fn len(&self) -> usize {
        <[W]>::len(self)
    }

    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        self[i].to_f32()
    }

    #[inline(always)]
    fn range(self, start: usize, len: usize) -> Self {
        &self[start..start + len]
    }

    #[inline(always)]
    fn base(&self) -> *const u8 {
        self.as_ptr().cast()
    }

    #[inline(always)]
    fn scale_at(&self, _: usize) -> f32 {
        1.0
    }
}

impl Matrix for Q8<'_> {
    const KIND: WeightKind = WeightKind::Q8;
    const BYTES: usize = 1;

    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        assert!(i < self.len, "Q8: element {i} of {}", self.len);
        self.values[self.start + i] as f32 * self.scales[(self.start + i) / Q8_BLOCK]
    }

    #[inline(always)]
    fn range(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.len, "Q8: range past the end");
        Self {
            start: self.start + start,
            len,
            ..self
        }
    }

    #[inline(always)]
    fn base(&self) -> *const u8 {
        self.values[self.start..].as_ptr().cast()
    }

    #[inline(always)]
    fn scale_at(&self, i: usize) -> f32 {
        debug_assert!(i < self.len);
        // SAFETY: `start + i` is below the values' length (`i < len`), and the scales cover
        // every block of the values (`Q8::new`).
        unsafe { *self.scales.get_unchecked((self.start + i) / Q8_BLOCK) }
    }
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

/// Eight elements `$i..$i + 8` of the [`Matrix`] `$m` widened to a `__m256`, inside an `avx2`,
/// `fma` and `f16c` function; the caller bounds `$i + 8` by the matrix's length.
#[cfg(target_arch = "x86_64")]
macro_rules! mload8 {
    ($m:expr, $i:expr) => {{
        let (m, i) = (&$m, $i);
        let p = m.base();
        match $crate::cpu_weight::Matrix::kind(m) {
            $crate::cpu_weight::WeightKind::F32 => _mm256_loadu_ps((p as *const f32).add(i)),
            $crate::cpu_weight::WeightKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i)),
            )),
            $crate::cpu_weight::WeightKind::F16 => {
                _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i))
            }
            $crate::cpu_weight::WeightKind::Q8 => _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    (p as *const i8).add(i) as *const __m128i,
                ))),
                _mm256_set1_ps($crate::cpu_weight::Matrix::scale_at(m, i)),
            ),
        }
    }};
}

/// Sixteen elements `$i..$i + 16` of the [`Matrix`] `$m` widened to a `__m512`, inside an
/// `avx512f` function; the caller bounds `$i + 16` by the matrix's length.
#[cfg(target_arch = "x86_64")]
macro_rules! mload16 {
    ($m:expr, $i:expr) => {{
        let (m, i) = (&$m, $i);
        let p = m.base();
        match $crate::cpu_weight::Matrix::kind(m) {
            $crate::cpu_weight::WeightKind::F32 => _mm512_loadu_ps((p as *const f32).add(i)),
            $crate::cpu_weight::WeightKind::Bf16 => {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((p as *const u16).add(i) as *const __m256i),
                )))
            }
            $crate::cpu_weight::WeightKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(
                (p as *const u16).add(i) as *const __m256i,
            )),
            $crate::cpu_weight::WeightKind::Q8 => _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    (p as *const i8).add(i) as *const __m128i,
                ))),
                _mm512_set1_ps($crate::cpu_weight::Matrix::scale_at(m, i)),
            ),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
pub(crate) use {mload16, mload8};

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

    /// Each value is its element over its block's scale, rounded: within half a scale of the
    /// element, the block's largest magnitude at ±127, a block of zeros all zeros.
    #[test]
    fn int8_blocks_round_each_element_to_its_blocks_scale() {
        let mut src: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.013)
            .collect();
        src[32..64].fill(0.0);
        let (q, scales) = quantize_q8(src.as_slice());
        let m = Q8::new(&q, &scales).expect("a scale per block");
        assert_eq!(scales[1], 0.0);
        for (i, v) in src.iter().enumerate() {
            let d = scales[i / Q8_BLOCK];
            assert!((m.at(i) - v).abs() <= d / 2.0 + 1e-7, "element {i}");
        }
        for block in q.chunks(Q8_BLOCK).filter(|b| b.iter().any(|&v| v != 0)) {
            assert_eq!(block.iter().map(|v| v.unsigned_abs()).max(), Some(127));
        }
        assert!(Q8::new(&q, &scales[..2]).is_none());
    }
}
