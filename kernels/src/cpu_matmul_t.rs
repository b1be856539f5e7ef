//! Skinny matmul against a transposed weight on the CPU: `y = x · Wᵀ` for a few rows of `x` and a
//! large row-major `W[N, K]`. A tied output head is exactly this: the embedding `E[vocab, hidden]`
//! is the head's weight, read by rows.
//!
//! Each output `y[m, n]` is the dot product of row `m` of `x` and row `n` of `W`, so `W` is read
//! front to back, once, in place: each task takes a run of `W`'s rows and computes a tile of
//! [`TX`] rows of `x` against [`TW`] rows of `W` at a time, 8 lanes of `K` per step, so every
//! load of `W` feeds [`TX`] fused multiply-adds and `x` (at most 64 rows of `K` floats) stays in
//! cache.

use rayon::prelude::*;

/// Rows of `x` in one tile.
pub const TX: usize = 4;
/// Rows of `W` in one tile (4 × 3 accumulators, three weight vectors and one of `x` fit in the
/// 16 vector registers of AVX2).
pub const TW: usize = 3;
/// Rows of `W` one task reads (a multiple of [`TW`]): about 400 KiB at `K` = 1024.
const TASK_ROWS: usize = 96;

/// `y[M, N] = x[M, K] · w[N, K]ᵀ`, all row-major f32. Panics when a slice is shorter than its
/// shape says (the callers check shapes first).
pub fn skinny_matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "skinny_matmul_t: short input"
    );
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    // Column-major while computing, so each task owns one contiguous run of the output.
    let mut yt = vec![f32::NAN; n * m];
    yt.par_chunks_mut(TASK_ROWS * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * TASK_ROWS;
            let rows = out.len() / m;
            dot_rows(x, &w[first * k..(first + rows) * k], m, k, out);
        });
    let mut y = vec![0.0; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// `out[j · m + i] = x[i] · w[j]` for every row `j` of `w` and `i` of `x`.
fn dot_rows(x: &[f32], w: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let rows = w.len() / k;
    let mut j = 0;
    while j < rows {
        let tw = TW.min(rows - j);
        let mut i = 0;
        while i < m {
            let tx = TX.min(m - i);
            let mut acc = [[0.0f32; TW]; TX];
            tile(
                &x[i * k..(i + tx) * k],
                &w[j * k..(j + tw) * k],
                tx,
                tw,
                k,
                &mut acc,
            );
            for (a, row) in acc.iter().take(tx).enumerate() {
                for (b, &v) in row.iter().take(tw).enumerate() {
                    out[(j + b) * m + i + a] = v;
                }
            }
            i += tx;
        }
        j += tw;
    }
}

/// `acc[a][b] = x[a] · w[b]` for `tx` rows of `x` and `tw` rows of `w`, each `k` long.
fn tile(x: &[f32], w: &[f32], tx: usize, tw: usize, k: usize, acc: &mut [[f32; TW]; TX]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above; `x` and `w` hold `tx` and `tw`
        // rows of `k`, as `dot_rows` slices them.
        unsafe { avx2::tile(x, w, tx, tw, k, acc) };
        return;
    }
    for (a, row) in acc.iter_mut().take(tx).enumerate() {
        for (b, v) in row.iter_mut().take(tw).enumerate() {
            *v = dot(&x[a * k..(a + 1) * k], &w[b * k..(b + 1) * k]);
        }
    }
}

/// A plain dot product (the fallback, and the tails shorter than a vector).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{dot, TW, TX};

    /// The tile of [`super::tile`], dispatched to a loop whose sizes are known.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        x: &[f32],
        w: &[f32],
        tx: usize,
        tw: usize,
        k: usize,
        acc: &mut [[f32; TW]; TX],
    ) {
        assert!(x.len() >= tx * k && w.len() >= tw * k && tx <= TX && tw <= TW);
        let wide = is_x86_feature_detected!("avx512f");
        /// Calls the loop whose sizes match `(tx, tw)`.
        macro_rules! sized {
            ($f:ident) => {
                match (tx, tw) {
                    (4, 3) => $f::<4, 3>(x, w, k, acc),
                    (4, 2) => $f::<4, 2>(x, w, k, acc),
                    (4, _) => $f::<4, 1>(x, w, k, acc),
                    (3, 3) => $f::<3, 3>(x, w, k, acc),
                    (3, 2) => $f::<3, 2>(x, w, k, acc),
                    (3, _) => $f::<3, 1>(x, w, k, acc),
                    (2, 3) => $f::<2, 3>(x, w, k, acc),
                    (2, 2) => $f::<2, 2>(x, w, k, acc),
                    (2, _) => $f::<2, 1>(x, w, k, acc),
                    (_, 3) => $f::<1, 3>(x, w, k, acc),
                    (_, 2) => $f::<1, 2>(x, w, k, acc),
                    _ => $f::<1, 1>(x, w, k, acc),
                }
            };
        }
        // SAFETY (all arms): the assert above bounds every load; `wide` checked AVX-512F.
        unsafe {
            if wide {
                sized!(fixed16)
            } else {
                sized!(fixed)
            }
        }
    }

    /// [`fixed`] sixteen lanes at a time, on AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn fixed16<const RX: usize, const RW: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        acc: &mut [[f32; TW]; TX],
    ) {
        // SAFETY: as in `fixed`, with `p + 16 <= k` for every vector load.
        unsafe {
            let mut sums = [[_mm512_setzero_ps(); RW]; RX];
            let mut p = 0;
            while p + 16 <= k {
                let ws: [__m512; RW] =
                    std::array::from_fn(|b| _mm512_loadu_ps(w.as_ptr().add(b * k + p)));
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
                    let tail = dot(&x[a * k + p..(a + 1) * k], &w[b * k + p..(b + 1) * k]);
                    acc[a][b] = _mm512_reduce_add_ps(sums[a][b]) + tail;
                }
            }
        }
    }

    /// `RX × RW` dot products of length `k`, eight lanes at a time, the tail in scalar.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fixed<const RX: usize, const RW: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        acc: &mut [[f32; TW]; TX],
    ) {
        // SAFETY: the caller holds `RX` rows of `x` and `RW` rows of `w`, each `k` long; every
        // vector load reads lanes `p..p + 8` with `p + 8 <= k`.
        unsafe {
            let mut sums = [[_mm256_setzero_ps(); RW]; RX];
            let mut p = 0;
            while p + 8 <= k {
                let ws: [__m256; RW] =
                    std::array::from_fn(|b| _mm256_loadu_ps(w.as_ptr().add(b * k + p)));
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
                    let tail = dot(&x[a * k + p..(a + 1) * k], &w[b * k + p..(b + 1) * k]);
                    acc[a][b] = horizontal_sum(sums[a][b]) + tail;
                }
            }
        }
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
            let got = skinny_matmul_t(&x, &w, m, k, n);
            let want = reference(&x, &w, m, k, n);
            for (idx, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{m}×{k}×{n} at {idx}: {g} vs {r}"
                );
            }
        }
    }
}
