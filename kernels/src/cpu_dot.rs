//! The skinny product as dot products of rows: `y = x · Wᵀ` for a few rows of `x` and a large
//! row-major `W[N, K]`, the layout a checkpoint stores a projection in (`[out, in]`) and the
//! embedding a tied head reads (`[vocab, hidden]`).
//!
//! Each output `y[m, n]` is the dot product of row `m` of `x` and row `n` of `W`, so `W` is read
//! front to back, once, in place: each task takes a run of `W`'s rows and computes a tile of
//! up to [`TX`] rows of `x` against up to [`TW`] rows of `W` at a time, 16 (or 8) lanes of `K` per
//! step, so every load of `W` feeds several fused multiply-adds and `x` (at most
//! [`crate::cpu_matmul::DOT_ROWS`] rows of `K` floats) stays in cache.

use rayon::prelude::*;

use crate::cpu_matmul::SendPtr;
use crate::cpu_weight::Matrix;

/// Most rows of `x` in one tile: 5 × 5 accumulators on AVX-512 where five-row tiles take fewer
/// passes over `W` than four-row ones (a verify block of 1 + 4 tokens in one pass), else 4.
pub const TX: usize = 5;
/// Most rows of `W` in one tile: 4 × 6 accumulators, six weight vectors and one of `x` fit in
/// the 32 vector registers of AVX-512; AVX2's 16 take half as many rows ([`TW_NARROW`]).
pub const TW: usize = 6;
/// Rows of `W` in one tile without AVX-512 (4 × 3 accumulators, three weight vectors and one of
/// `x` in 16 registers).
pub const TW_NARROW: usize = 3;
/// Most rows of `W` one task reads (a multiple of every tile height: 6, 5 and 3): about 480 KiB
/// of f32 at `K` = 1024.
const TASK_ROWS: usize = 120;

/// `y[M, N] = x[M, K] · w[N, K]ᵀ`, or `y += …` when `accumulate`; all row-major, `x` and `y`
/// f32, `w` any [`Matrix`] (widened in registers). Panics when a slice is shorter than its shape
/// says (the callers check shapes first).
pub fn dot_product<M: Matrix>(
    y: &mut [f32],
    x: &[f32],
    w: M,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && y.len() >= m * n,
        "dot_product: short input"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Worth the cores' fork and join once `W` is 1 MiB or the arithmetic 1M multiply-adds; a
    // 256-wide model's 0.1 ms one-row products lose to the split, its verify blocks of 6 rows
    // and more gain. Split, the tasks come in a multiple of the threads, of equal rows, so no
    // core waits on another's last task (1,024 rows in runs of 120 would leave one core a
    // fifth of the work more than the other).
    let split = n * k * M::BYTES >= 1 << 20 || m * n * k >= 1 << 20;
    let threads = if split {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let tasks = n.div_ceil(TASK_ROWS).div_ceil(threads) * threads;
    let per = n.div_ceil(tasks);
    let out = SendPtr(y.as_mut_ptr());
    let task = |task: usize| {
        let first = (task * per).min(n);
        let rows = per.min(n - first);
        if rows == 0 {
            return;
        }
        let w = w.range(first * k, rows * k);
        // SAFETY: this task alone writes columns `first..first + rows` of `y`, `m * n` floats.
        unsafe { dot_rows(x, w, (m, k, n), out, first, accumulate) };
    };
    if split {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// `y[i · n + first + j] (+)= x[i] · w[j]` for every row `j` of `w` and `i` of `x`.
///
/// # Safety
/// `y` must point to `m · n` floats, and no other thread may write columns `first..first +
/// rows of w`.
unsafe fn dot_rows<M: Matrix>(
    x: &[f32],
    w: M,
    (m, k, n): (usize, usize, usize),
    y: SendPtr,
    first: usize,
    accumulate: bool,
) {
    let rows = w.len() / k;
    // Five rows of `x` by five of `W` (25 accumulators of AVX-512's 32 registers) where that
    // takes fewer passes over `W` than four by six.
    let (most_x, most) = match wide_tiles() {
        true if m.div_ceil(TX) < m.div_ceil(4) => (TX, 5),
        true => (4, TW),
        false => (4, TW_NARROW),
    };
    let mut j = 0;
    while j < rows {
        let tw = most.min(rows - j);
        let mut i = 0;
        while i < m {
            let tx = most_x.min(m - i);
            let mut acc = [[0.0f32; TW]; TX];
            tile(
                &x[i * k..(i + tx) * k],
                w.range(j * k, tw * k),
                tx,
                tw,
                k,
                &mut acc,
            );
            for (a, row) in acc.iter().take(tx).enumerate() {
                let at = (i + a) * n + first + j;
                // SAFETY: row `i + a < m`, columns `first + j..first + j + tw` are this task's.
                let dst = unsafe { std::slice::from_raw_parts_mut(y.0.add(at), tw) };
                if accumulate {
                    dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                } else {
                    dst.copy_from_slice(&row[..tw]);
                }
            }
            i += tx;
        }
        j += tw;
    }
}

/// `acc[a][b] = x[a] · w[b]` for `tx` rows of `x` and `tw` rows of `w`, each `k` long.
fn tile<M: Matrix>(x: &[f32], w: M, tx: usize, tw: usize, k: usize, acc: &mut [[f32; TW]; TX]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_weight::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA, checked just above; `x` and `w` hold `tx` and `tw`
        // rows of `k`, as `dot_rows` slices them.
        unsafe { avx2::tile(x, w, tx, tw, k, acc) };
        return;
    }
    for (a, row) in acc.iter_mut().take(tx).enumerate() {
        for (b, v) in row.iter_mut().take(tw).enumerate() {
            *v = dot(&x[a * k..(a + 1) * k], w.range(b * k, k));
        }
    }
}

/// Whether tiles take [`TW`] rows of `W` (AVX-512F) rather than [`TW_NARROW`].
fn wide_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return true;
    }
    false
}

/// A plain dot product (the fallback, and the tails shorter than a vector).
pub(crate) fn dot<M: Matrix>(a: &[f32], b: M) -> f32 {
    a.iter().enumerate().map(|(i, p)| p * b.at(i)).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{dot, TW, TX};
    use crate::cpu_weight::{mload16, mload8, Matrix};

    /// The tile of [`super::tile`], dispatched to a loop whose sizes are known.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<M: Matrix>(
        x: &[f32],
        w: M,
        tx: usize,
        tw: usize,
        k: usize,
        acc: &mut [[f32; TW]; TX],
    ) {
        assert!(x.len() >= tx * k && w.len() >= tw * k && tx <= TX && tw <= TW);
        assert!(tx < 5 || tw <= 5, "a five-row tile takes five rows of W");
        /// Calls the loop whose sizes match `(tx, tw)`, for the `tw` sizes listed.
        macro_rules! sized {
            ($f:ident, $($tw:literal)+) => {
                match tx {
                    5 => match tw { $($tw => $f::<M, 5, $tw>(x, w, k, acc),)+ _ => unreachable!() },
                    4 => match tw { $($tw => $f::<M, 4, $tw>(x, w, k, acc),)+ _ => unreachable!() },
                    3 => match tw { $($tw => $f::<M, 3, $tw>(x, w, k, acc),)+ _ => unreachable!() },
                    2 => match tw { $($tw => $f::<M, 2, $tw>(x, w, k, acc),)+ _ => unreachable!() },
                    _ => match tw { $($tw => $f::<M, 1, $tw>(x, w, k, acc),)+ _ => unreachable!() },
                }
            };
        }
        // SAFETY (all arms): the assert above bounds every load; `wide_tiles` checked AVX-512F.
        unsafe {
            if super::wide_tiles() {
                sized!(fixed16, 1 2 3 4 5 6)
            } else {
                assert!(tw <= super::TW_NARROW, "AVX2 tiles hold three rows of W");
                sized!(fixed, 1 2 3)
            }
        }
    }

    /// [`fixed`] sixteen lanes at a time, on AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn fixed16<M: Matrix, const RX: usize, const RW: usize>(
        x: &[f32],
        w: M,
        k: usize,
        acc: &mut [[f32; TW]; TX],
    ) {
        // SAFETY: as in `fixed`, with `p + 16 <= k` for every vector load.
        unsafe {
            let mut sums = [[_mm512_setzero_ps(); RW]; RX];
            let mut p = 0;
            while p + 16 <= k {
                if (p * M::BYTES).is_multiple_of(64) {
                    for b in 0..RW {
                        _mm_prefetch::<_MM_HINT_T0>(
                            w.base().wrapping_add(((RW + b) * k + p) * M::BYTES).cast(),
                        );
                    }
                }
                let ws: [__m512; RW] = std::array::from_fn(|b| mload16!(w, b * k + p));
                for (a, row) in sums.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(a * k + p));
                    for (s, wv) in row.iter_mut().zip(&ws) {
                        *s = _mm512_fmadd_ps(xv, *wv, *s);
                    }
                }
                p += 16;
            }
            for a in 0..RX {
                for b in 0..RW {
                    let tail = dot(&x[a * k + p..(a + 1) * k], w.range(b * k + p, k - p));
                    acc[a][b] = sum16(sums[a][b]) + tail;
                }
            }
        }
    }

    /// `RX × RW` dot products of length `k`, eight lanes at a time, the tail in scalar.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fixed<M: Matrix, const RX: usize, const RW: usize>(
        x: &[f32],
        w: M,
        k: usize,
        acc: &mut [[f32; TW]; TX],
    ) {
        // SAFETY: the caller holds `RX` rows of `x` and `RW` rows of `w`, each `k` long; every
        // vector load reads lanes `p..p + 8` with `p + 8 <= k`.
        unsafe {
            let mut sums = [[_mm256_setzero_ps(); RW]; RX];
            let mut p = 0;
            while p + 8 <= k {
                let ws: [__m256; RW] = std::array::from_fn(|b| mload8!(w, b * k + p));
                for (a, row) in sums.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(a * k + p));
                    for (s, wv) in row.iter_mut().zip(&ws) {
                        *s = _mm256_fmadd_ps(xv, *wv, *s);
                    }
                }
                p += 8;
            }
            for a in 0..RX {
                for b in 0..RW {
                    let tail = dot(&x[a * k + p..(a + 1) * k], w.range(b * k + p, k - p));
                    acc[a][b] = horizontal_sum(sums[a][b]) + tail;
                }
            }
        }
    }

    /// The sum of a vector's sixteen lanes, in a fixed order: lane `l` and lane `l + 8` first,
    /// then `l` and `l + 4`, `l + 2`, `l + 1`. The in-place tiles of
    /// `cpu_rows_f32` add their sixteen partial sums in this same order, so a row's product is
    /// the same to the bit whichever path computes it.
    #[target_feature(enable = "avx512f")]
    unsafe fn sum16(v: __m512) -> f32 {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let eight = _mm256_add_ps(_mm512_castps512_ps256(v), high);
        let four = _mm_add_ps(
            _mm256_castps256_ps128(eight),
            _mm256_extractf128_ps::<1>(eight),
        );
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
    }

    /// The sum of a vector's eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_weight::{quantize_q8, Weight, Q8};

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2_654_435_761) ^ seed).wrapping_mul(2_246_822_519);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every tile size and tail: rows of `x` and `W` that are not multiples of the tile, `K` not
    /// a multiple of eight, `W` spread over several tasks.
    #[test]
    fn matches_the_reference_on_ragged_shapes() {
        for (m, k, n) in [
            (1, 8, 1),
            (1, 1030, 301),
            (3, 17, 7),
            (5, 64, 193),
            (8, 100, 97),
            (13, 33, 290),
            (64, 24, 11),
        ] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let mut got = vec![f32::NAN; m * n];
            dot_product(&mut got, &x, w.as_slice(), (m, k, n), false);
            let want = reference(&x, &w, m, k, n);
            for (idx, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{m}×{k}×{n} at {idx}: {g} vs {r}"
                );
            }
        }
    }

    /// bf16 and f16 rows of `W`, widened in the kernel, give the product of their f32 values,
    /// added onto what `y` held.
    #[test]
    fn narrow_weights_match_the_product_of_their_widened_values() {
        fn check<W: Weight>(narrow: impl Fn(f32) -> W) {
            for (m, k, n) in [(1, 1030, 301), (5, 64, 193), (13, 33, 290)] {
                let x = values(m * k, 3);
                let w: Vec<W> = values(n * k, 4).into_iter().map(&narrow).collect();
                let wide: Vec<f32> = w.iter().map(|e| e.to_f32()).collect();
                let mut got = values(m * n, 5);
                let before = got.clone();
                dot_product(&mut got, &x, w.as_slice(), (m, k, n), true);
                let want: Vec<f32> = reference(&x, &wide, m, k, n)
                    .iter()
                    .zip(&before)
                    .map(|(p, b)| p + b)
                    .collect();
                for (idx, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "{m}×{k}×{n} at {idx}: {g} vs {r}"
                    );
                }
            }
        }
        check(half::bf16::from_f32);
        check(half::f16::from_f32);
    }

    /// int8 rows of `W` in blocks of 32, widened and scaled in the kernel, give the product of
    /// their dequantized values, on every tile size.
    #[test]
    fn int8_blocks_match_the_product_of_their_dequantized_values() {
        for (m, k, n) in [(1, 1024, 301), (5, 64, 193), (13, 96, 290), (64, 32, 11)] {
            let x = values(m * k, 6);
            let (q, scales) = quantize_q8(values(n * k, 7).as_slice());
            let w = Q8::new(&q, &scales).expect("a scale per block");
            let wide: Vec<f32> = (0..n * k).map(|i| w.at(i)).collect();
            let mut got = vec![f32::NAN; m * n];
            dot_product(&mut got, &x, w, (m, k, n), false);
            let want = reference(&x, &wide, m, k, n);
            for (idx, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{m}×{k}×{n} at {idx}: {g} vs {r}"
                );
            }
        }
    }
}
