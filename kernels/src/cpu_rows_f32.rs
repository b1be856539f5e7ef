//! f32 products past the dot path's rows (up to [`crate::cpu_matmul::ROWS_F32`]), with `W` read
//! where it lies: `y = x · Wᵀ` computed as
//! `yᵀ = W · xᵀ`.
//!
//! The packed strips ([`crate::cpu_matmul`]) transpose every chunk of `W` before their tiles use
//! it, eight by eight in registers, so each tile's broadcast operand is a row of `x` and its
//! vector operand `NR` outputs of `W`. For weights already in f32 that transposition is the whole
//! cost of the packing, about half as much again as the arithmetic at 64 rows. Turned around, a
//! tile broadcasts elements of `W` (twelve of its rows at a time, each read front to back in
//! place) against vectors of `xᵀ` (32 rows of `x`, transposed once per call, a few hundred KiB):
//! two vector loads and twelve broadcasts for 24 fused multiply-adds, 24 of the 32 vector
//! registers holding sums, and no packing of `W` at all. Each group of twelve rows of `W` stays in
//! L1 while it serves every 32 rows of `x`, and the sums of a tile stay in registers over the
//! whole of `K`. (Six rows at a time, which reads each vector of `xᵀ` from L2 twice as often, was
//! 4–8% slower at 64 rows and up to 20% at 40.)

use rayon::prelude::*;

use crate::cpu_matmul::SendPtr;

/// Rows of `x` (columns of `xᵀ`) one tile takes: two 512-bit vectors.
const MC: usize = 32;
/// Rows of `W` one tile takes.
const NW: usize = 12;

/// Whether this CPU runs the path (AVX-512F: 32 vector registers for the 12 sums).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return true;
    }
    false
}

/// `y = x · wᵀ`, or `y += x · wᵀ` when `accumulate`: `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]`,
/// all row-major f32. Only where [`available`] says so.
pub(crate) fn product(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(available(), "cpu_rows_f32 needs AVX-512F");
    assert!(
        y.len() >= m * n && x.len() >= m * k && w.len() >= n * k,
        "cpu_rows_f32: short input"
    );
    if m == 0 || n == 0 {
        return;
    }
    let xt = transpose_x(x, m, k);
    let big = k * n >= 1 << 20 || m * k * n >= 1 << 22;
    let parts = if big {
        rayon::current_num_threads().clamp(1, n.div_ceil(NW))
    } else {
        1
    };
    let per = n.div_ceil(NW).div_ceil(parts) * NW;
    let out = SendPtr(y.as_mut_ptr());
    let run = |p: usize| {
        let rows = (p * per).min(n)..((p + 1) * per).min(n);
        // SAFETY: this task alone writes columns `rows` of `y`, which holds `m · n` floats.
        unsafe { run_rows(rows, &xt, w, (m, k, n), out, accumulate) };
    };
    if parts > 1 {
        (0..parts).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// `x` as `[tile][k][MC]`: each tile's 32 rows side by side at every step of `k`, zero-padded.
fn transpose_x(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut xt = vec![0.0f32; m.div_ceil(MC) * k * MC];
    for (r, row) in x.chunks_exact(k).take(m).enumerate() {
        let tile = &mut xt[r / MC * k * MC..][..k * MC];
        for (kk, &v) in row.iter().enumerate() {
            tile[kk * MC + r % MC] = v;
        }
    }
    xt
}

/// Columns `rows` of `y` (rows of `W`) for every row of `x`.
///
/// # Safety
/// `out` must point to `m · n` floats, no other thread may touch columns `rows`, and the CPU
/// must have AVX-512F.
unsafe fn run_rows(
    rows: std::ops::Range<usize>,
    xt: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    out: SendPtr,
    accumulate: bool,
) {
    let mut sums = [[0.0f32; MC]; NW];
    for n0 in rows.clone().step_by(NW) {
        let nw = NW.min(rows.end - n0);
        let ws = &w[n0 * k..(n0 + nw) * k];
        for t in 0..m.div_ceil(MC) {
            let mc = MC.min(m - t * MC);
            let xs = &xt[t * k * MC..][..k * MC];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked AVX-512F; `xs` holds `k` steps of `MC`, `ws` `nw` rows
            // of `k`.
            unsafe {
                avx512::tile(xs, ws, k, nw, mc > MC / 2, &mut sums)
            };
            for (i, s) in sums.iter().enumerate().take(nw) {
                for (j, &v) in s.iter().enumerate().take(mc) {
                    // SAFETY: row `t·MC + j < m`, column `n0 + i` is in `rows`, this task's.
                    unsafe {
                        let at = out.0.add((t * MC + j) * n + n0 + i);
                        *at = if accumulate { *at + v } else { v };
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MC, NW};

    /// `sums[i][j] = Σ_kk ws[i, kk] · xs[kk, j]` for `nw` rows of `W` and the tile's 32 columns
    /// of `xᵀ` (16 when not `wide`).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        xs: &[f32],
        ws: &[f32],
        k: usize,
        nw: usize,
        wide: bool,
        sums: &mut [[f32; MC]; NW],
    ) {
        assert!(nw > 0 && nw <= NW && ws.len() >= nw * k && xs.len() >= k * MC);
        // SAFETY (all arms): the assert bounds every load.
        unsafe {
            match (nw, wide) {
                (1, true) => rows::<1, true>(xs, ws, k, sums),
                (2, true) => rows::<2, true>(xs, ws, k, sums),
                (3, true) => rows::<3, true>(xs, ws, k, sums),
                (4, true) => rows::<4, true>(xs, ws, k, sums),
                (5, true) => rows::<5, true>(xs, ws, k, sums),
                (6, true) => rows::<6, true>(xs, ws, k, sums),
                (7, true) => rows::<7, true>(xs, ws, k, sums),
                (8, true) => rows::<8, true>(xs, ws, k, sums),
                (9, true) => rows::<9, true>(xs, ws, k, sums),
                (10, true) => rows::<10, true>(xs, ws, k, sums),
                (11, true) => rows::<11, true>(xs, ws, k, sums),
                (_, true) => rows::<12, true>(xs, ws, k, sums),
                (1, false) => rows::<1, false>(xs, ws, k, sums),
                (2, false) => rows::<2, false>(xs, ws, k, sums),
                (3, false) => rows::<3, false>(xs, ws, k, sums),
                (4, false) => rows::<4, false>(xs, ws, k, sums),
                (5, false) => rows::<5, false>(xs, ws, k, sums),
                (6, false) => rows::<6, false>(xs, ws, k, sums),
                (7, false) => rows::<7, false>(xs, ws, k, sums),
                (8, false) => rows::<8, false>(xs, ws, k, sums),
                (9, false) => rows::<9, false>(xs, ws, k, sums),
                (10, false) => rows::<10, false>(xs, ws, k, sums),
                (11, false) => rows::<11, false>(xs, ws, k, sums),
                (_, false) => rows::<12, false>(xs, ws, k, sums),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const R: usize, const WIDE: bool>(
        xs: &[f32],
        ws: &[f32],
        k: usize,
        sums: &mut [[f32; MC]; NW],
    ) {
        // SAFETY: `tile` bounds `xs` and `ws`.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
            for kk in 0..k {
                let a = _mm512_loadu_ps(xp.add(kk * MC));
                let b = if WIDE {
                    _mm512_loadu_ps(xp.add(kk * MC + 16))
                } else {
                    a
                };
                for r in 0..R {
                    let wv = _mm512_set1_ps(*wp.add(r * k + kk));
                    lo[r] = _mm512_fmadd_ps(wv, a, lo[r]);
                    if WIDE {
                        hi[r] = _mm512_fmadd_ps(wv, b, hi[r]);
                    }
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(sums[r].as_mut_ptr(), lo[r]);
                if WIDE {
                    _mm512_storeu_ps(sums[r].as_mut_ptr().add(16), hi[r]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn noise(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((h >> 9) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_naive_product_on_ragged_shapes() {
        if !available() {
            return;
        }
        // Ragged tiles of both operands; a product big enough to split over the threads.
        for (m, k, n) in [
            (33, 40, 7),
            (47, 64, 13),
            (64, 96, 66),
            (70, 128, 1030),
            (5, 9, 6),
        ]
        .into_iter()
        // Every count of rows of `W` a tile can take, wide and narrow.
        .chain((1..=2 * NW).map(|n| (35 + n % 2 * 10, 17, n)))
        {
            let (x, w) = (noise(m * k, 3), noise(n * k, 5));
            let want = naive(&x, &w, m, k, n);
            let mut y = vec![f32::NAN; m * n];
            product(&mut y, &x, &w, (m, k, n), false);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-3, "({m}, {k}, {n}) at {i}: {a} vs {b}");
            }
            // Accumulating adds the product onto what `y` holds.
            let mut acc = vec![1.0f32; m * n];
            product(&mut acc, &x, &w, (m, k, n), true);
            for (a, b) in acc.iter().zip(&want) {
                assert!((a - (b + 1.0)).abs() <= 1e-3);
            }
        }
    }
}
