//! Products past a few rows (up to [`crate::cpu_matmul::ROWS_F32`]), with `W` read where it lies:
//! `y = x · Wᵀ` computed as `yᵀ = W · xᵀ`. f32 weights are read in place; narrower ones (int8
//! blocks, where this path wins) are widened a block of `K` at a time into L1, exactly as the dot
//! products widen them.
//!
//! The packed strips ([`crate::cpu_matmul`]) transpose every chunk of `W` before their tiles use
//! it, eight by eight in registers, so each tile's broadcast operand is a row of `x` and its
//! vector operand `NR` outputs of `W`. For weights already in f32 that transposition is the whole
//! cost of the packing, about half as much again as the arithmetic at 64 rows. Turned around, a
//! tile broadcasts elements of `W` (eight of its rows at a time, each read in place) against
//! vectors of `xᵀ` (32 rows of `x`, transposed once per call, a few hundred KiB): two vector loads
//! and eight broadcasts for 16 fused multiply-adds, and no packing of `W` at all.
//!
//! **Each output is summed in the order of the dot products** ([`crate::cpu_dot`]), so a row's
//! product is the same to the bit whether it is computed alone, as a dot product, or here beside
//! 63 others: the greedy guarantee rests on a session's logits not depending on what else is in
//! its step. The dot products keep sixteen partial sums per output, lane `l` summing the elements
//! `l, l + 16, l + 32, …` of `K` in turn, then add the lanes in a fixed tree, then the scalar tail
//! past the last whole vector. A tile here walks `K` in blocks of at most [`BLOCK_STEPS`] vectors, and
//! makes sixteen passes over each block of its rows of `W`, one per lane, each pass continuing
//! that lane's chain in the same order; the lanes' sums wait in memory between blocks, are added
//! in the dot products' tree at the end, and the tail last, as the dot products add it. A block of
//! `W` (eight rows of 40 cache lines, 20 KiB) stays in L1 for its sixteen passes, and each of the
//! first eight passes brings one row's next block into L2 as it goes, so that `W` streams in
//! while a block is summed rather than all at once when the next block begins.
//!
//! `kernels/examples/cpu_skinny.rs` (2048 × 6144, ms per product, summed in the dot products'
//! order vs sequentially over `K` as these tiles did before): 16 rows 1.9 vs 1.6–1.9, 32 rows
//! 2.8–2.9 vs 2.6–2.8, 64 rows 5.2–5.5 vs 4.9–5.1. Twelve rows of `W` a tile, with 24 sums, left
//! 24 KiB of sums to carry and took 10–20% longer.

use rayon::prelude::*;

use crate::cpu_dot::dot;
use crate::cpu_matmul::SendPtr;
use crate::cpu_weight::{Matrix, WeightKind};

/// Rows of `x` (columns of `xᵀ`) one tile takes: two 512-bit vectors.
const MC: usize = 32;
/// Rows of `W` one tile takes.
const NW: usize = 8;
/// Partial sums per output: the lanes of the dot products' 512-bit vectors.
const LANES: usize = 16;
/// Steps of `K` (16 elements each) in one block: the tile's rows of `W` over a block (20 KiB)
/// stay in L1 while the sixteen passes read them (24 steps left more to carry between blocks, 64
/// spilled out of L1).
const BLOCK_STEPS: usize = 40;

/// Whether this CPU runs the path (AVX-512F: 32 vector registers for the 16 sums).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return true;
    }
    false
}

/// `y = x · wᵀ`, or `y += x · wᵀ` when `accumulate`: `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]`,
/// all row-major f32. Only where [`available`] says so.
pub(crate) fn product<M: Matrix>(
    y: &mut [f32],
    x: &[f32],
    w: M,
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
    // Split as the dot products split: once `W` is 1 MiB or the arithmetic 1M multiply-adds.
    let big = k * n * M::BYTES >= 1 << 20 || m * k * n >= 1 << 20;
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
        unsafe { run_rows(rows, x, &xt, w, (m, k, n), out, accumulate) };
    };
    if parts > 1 {
        (0..parts).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// The blocks of `K` the tiles walk, as `(first step, steps)`: as few as hold at most
/// [`BLOCK_STEPS`] steps each, of equal length give or take one (64 steps are two of 32, not
/// 40 and 24).
fn blocks(steps: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = steps.div_ceil(BLOCK_STEPS).max(1);
    (0..count).map(move |b| {
        let (first, end) = (steps * b / count, steps * (b + 1) / count);
        (first, end - first)
    })
}

/// The whole vectors of `x` as the tiles read them: for each tile of 32 rows, for each block of
/// [`blocks`], for each lane, the lane's elements of the block in turn, the tile's rows side by
/// side at each (zero-padded past `m`).
fn transpose_x(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let steps = k / LANES;
    let mut xt = vec![0.0f32; m.div_ceil(MC) * LANES * steps * MC];
    for (r, row) in x.chunks_exact(k).take(m).enumerate() {
        let tile = &mut xt[r / MC * LANES * steps * MC..][..LANES * steps * MC];
        for (first, len) in blocks(steps) {
            let block = &mut tile[first * LANES * MC..][..len * LANES * MC];
            for lane in 0..LANES {
                for t in 0..len {
                    block[(lane * len + t) * MC + r % MC] = row[(first + t) * LANES + lane];
                }
            }
        }
    }
    xt
}

/// Columns `rows` of `y` (rows of `W`) for every row of `x`.
///
/// # Safety
/// `out` must point to `m · n` floats, no other thread may touch columns `rows`, and the CPU
/// must have AVX-512F.
unsafe fn run_rows<M: Matrix>(
    rows: std::ops::Range<usize>,
    x: &[f32],
    xt: &[f32],
    w: M,
    (m, k, n): (usize, usize, usize),
    out: SendPtr,
    accumulate: bool,
) {
    let whole = k / LANES * LANES;
    let mut sums = [[0.0f32; MC]; NW];
    // A block of narrower weights, widened (20 KiB); f32 weights are read in place.
    let mut widened = match M::KIND {
        WeightKind::F32 => Vec::new(),
        _ => vec![0.0f32; NW * BLOCK_STEPS * LANES],
    };
    for n0 in rows.clone().step_by(NW) {
        let nw = NW.min(rows.end - n0);
        let ws = w.range(n0 * k, nw * k);
        for t in 0..m.div_ceil(MC) {
            let mc = MC.min(m - t * MC);
            let xs = &xt[t * whole * MC..][..whole * MC];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked AVX-512F; `xs` holds `k / 16` steps of 16 lanes of
            // `MC`, `ws` `nw` rows of `k`.
            unsafe {
                avx512::tile(xs, ws, k, nw, mc > MC / 2, &mut widened, &mut sums)
            };
            for (i, s) in sums.iter().enumerate().take(nw) {
                let tail = w.range((n0 + i) * k + whole, k - whole);
                for (j, &v) in s.iter().enumerate().take(mc) {
                    let row = t * MC + j;
                    // The tail past the whole vectors, as the dot products add it.
                    let v = v + dot(&x[row * k + whole..(row + 1) * k], tail);
                    // SAFETY: row `row < m`, column `n0 + i` is in `rows`, this task's.
                    unsafe {
                        let at = out.0.add(row * n + n0 + i);
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

    use super::{BLOCK_STEPS, LANES, MC, NW};
    use crate::cpu_weight::{mload16, Matrix, WeightKind};

    /// `sums[i][j]` = the sum of `ws[i, kk] · x[j, kk]` over the whole vectors of `K`, in the
    /// dot products' order, for `nw` rows of `W` and the tile's 32 rows of `x` (16 when not
    /// `wide`).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<M: Matrix>(
        xs: &[f32],
        ws: M,
        k: usize,
        nw: usize,
        wide: bool,
        widened: &mut [f32],
        sums: &mut [[f32; MC]; NW],
    ) {
        assert!(nw > 0 && nw <= NW && ws.len() >= nw * k && xs.len() >= k / LANES * LANES * MC);
        assert!(M::KIND == WeightKind::F32 || widened.len() >= NW * BLOCK_STEPS * LANES);
        /// Calls the loop whose sizes match `(nw, wide)`.
        macro_rules! sized {
            ($($r:literal)+) => {
                match wide {
                    true => match nw { $($r => rows::<M, $r, true>(xs, ws, k, widened, sums),)+ _ => unreachable!() },
                    false => match nw { $($r => rows::<M, $r, false>(xs, ws, k, widened, sums),)+ _ => unreachable!() },
                }
            };
        }
        // SAFETY (all arms): the assert bounds every load.
        unsafe { sized!(1 2 3 4 5 6 7 8) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<M: Matrix, const R: usize, const WIDE: bool>(
        xs: &[f32],
        ws: M,
        k: usize,
        widened: &mut [f32],
        sums: &mut [[f32; MC]; NW],
    ) {
        let steps = k / LANES;
        // Each lane's sums, carried from one block of `K` to the next (16 KiB at eight rows).
        let mut lanes = [[[_mm512_setzero_ps(); 2]; R]; LANES];
        // SAFETY: `tile` bounds `xs` and `ws`.
        unsafe {
            let (xp, wp) = (xs.as_ptr(), ws.base());
            for (first, len) in super::blocks(steps) {
                let xb = xp.add(first * LANES * MC);
                // Where the block's rows of `W` are read, f32, and how far apart.
                let (wb, stride) = if M::KIND == WeightKind::F32 {
                    (wp.cast::<f32>().add(first * LANES), k)
                } else {
                    for r in 0..R {
                        for t in 0..len {
                            let v = mload16!(ws, r * k + (first + t) * LANES);
                            _mm512_storeu_ps(widened.as_mut_ptr().add((r * len + t) * LANES), v);
                        }
                    }
                    (widened.as_ptr(), len * LANES)
                };
                for (lane, carried) in lanes.iter_mut().enumerate() {
                    let (xl, wl) = (xb.add(lane * len * MC), wb.add(lane));
                    let mut lo: [__m512; R] = std::array::from_fn(|r| carried[r][0]);
                    let mut hi: [__m512; R] = std::array::from_fn(|r| carried[r][1]);
                    // The pass for lane `r` brings row `r`'s next block of `W` into L2, a line a
                    // step, so that it streams in while this block is summed.
                    let ahead = (lane < R)
                        .then(|| wp.wrapping_add((lane * k + (first + len) * LANES) * M::BYTES));
                    for t in 0..len {
                        if let Some(row) = ahead {
                            _mm_prefetch::<_MM_HINT_T1>(
                                row.wrapping_add(t * LANES * M::BYTES).cast(),
                            );
                        }
                        let a = _mm512_loadu_ps(xl.add(t * MC));
                        let b = if WIDE {
                            _mm512_loadu_ps(xl.add(t * MC + 16))
                        } else {
                            a
                        };
                        for r in 0..R {
                            let wv = _mm512_set1_ps(*wl.add(r * stride + t * LANES));
                            lo[r] = _mm512_fmadd_ps(wv, a, lo[r]);
                            if WIDE {
                                hi[r] = _mm512_fmadd_ps(wv, b, hi[r]);
                            }
                        }
                    }
                    for r in 0..R {
                        carried[r] = [lo[r], hi[r]];
                    }
                }
            }
            // The lanes' tree: `l` and `l + 8`, then `l` and `l + 4`, `l + 2`, `l + 1`.
            let mut width = LANES / 2;
            while width > 0 {
                let (low, high) = lanes.split_at_mut(width);
                for (into, from) in low.iter_mut().zip(&high[..width]) {
                    for (a, b) in into.iter_mut().zip(from) {
                        a[0] = _mm512_add_ps(a[0], b[0]);
                        if WIDE {
                            a[1] = _mm512_add_ps(a[1], b[1]);
                        }
                    }
                }
                width /= 2;
            }
            for r in 0..R {
                _mm512_storeu_ps(sums[r].as_mut_ptr(), lanes[0][r][0]);
                if WIDE {
                    _mm512_storeu_ps(sums[r].as_mut_ptr().add(16), lanes[0][r][1]);
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
            // Several blocks of `K`, the last one short, and a tail.
            (40, 1300, 9),
            (5, 9, 6),
        ]
        .into_iter()
        // Every count of rows of `W` a tile can take, wide and narrow.
        .chain((1..=2 * NW).map(|n| (35 + n % 2 * 10, 17, n)))
        {
            let (x, w) = (noise(m * k, 3), noise(n * k, 5));
            let want = naive(&x, &w, m, k, n);
            let mut y = vec![f32::NAN; m * n];
            product(&mut y, &x, w.as_slice(), (m, k, n), false);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-3, "({m}, {k}, {n}) at {i}: {a} vs {b}");
            }
            // Accumulating adds the product onto what `y` holds.
            let mut acc = vec![1.0f32; m * n];
            product(&mut acc, &x, w.as_slice(), (m, k, n), true);
            for (a, b) in acc.iter().zip(&want) {
                assert!((a - (b + 1.0)).abs() <= 1e-3);
            }
        }
    }
}
