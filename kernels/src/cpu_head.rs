//! The greedy head: each row's argmax of `x · Wᵀ` over the whole vocabulary, without its logits.
//!
//! A greedy verify step needs one token per row, yet a full head writes `rows × vocab` logits
//! (320 rows of a 151,936-token vocabulary are 194 MB, a fresh allocation each step, whose pages
//! the system clears as they are first written) and reads them back for the argmax. Here the
//! vocabulary goes by blocks: each block's logits are computed into one small buffer, reused, that
//! stays in cache, and each row keeps its best token so far. The weights are read once, as by the
//! full head.

use crate::cpu_matmul::accumulate_product;
use crate::cpu_weight::Matrix;

/// Floats of the block buffer (about 1 MB): small enough to stay in a core's L2.
const BLOCK_FLOATS: usize = 256 * 1024;

/// Vocabulary rows of a block for `m` rows of `x`: a multiple of 64, from 256 to 8,192.
fn block_rows(m: usize) -> usize {
    (BLOCK_FLOATS / m.max(1)).clamp(256, 8192) / 64 * 64
}

/// The index of each row's largest entry of `x · Wᵀ` (`x` `[m, k]`, `W` `[n, k]`), the first
/// one where several are equal, as a full product's argmax gives it.
pub fn head_argmax<M: Matrix>(x: &[f32], w: M, m: usize, k: usize, n: usize) -> Vec<u32> {
    assert!(
        x.len() >= m * k && w.len() >= k * n,
        "head_argmax: short input"
    );
    let rows = block_rows(m);
    let mut buf = vec![0f32; m * rows.min(n)];
    let mut best = vec![(f32::NEG_INFINITY, 0u32); m];
    for lo in (0..n).step_by(rows) {
        let c = rows.min(n - lo);
        let y = &mut buf[..m * c];
        accumulate_product(y, x, w.range(lo * k, c * k), m, k, c, false);
        for (row, b) in y.chunks_exact(c).zip(&mut best) {
            for (i, &v) in row.iter().enumerate() {
                // Strictly greater: the first of equal maxima wins, within a block and across.
                if v > b.0 {
                    *b = (v, (lo + i) as u32);
                }
            }
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The full product's argmax, row by row, in f64.
    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<u32> {
        (0..m)
            .map(|r| {
                let logits: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..k)
                            .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                            .sum()
                    })
                    .collect();
                let mut at = 0;
                for (j, &v) in logits.iter().enumerate() {
                    if v > logits[at] {
                        at = j;
                    }
                }
                at as u32
            })
            .collect()
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_row_gets_the_full_products_argmax_across_blocks() {
        // Row counts on the dot path and the packed one, vocabularies of one block and of many
        // with a ragged last block.
        for (m, n) in [(1, 300), (5, 8192 + 77), (40, 20_000), (70, 9_000)] {
            let k = 64;
            let (x, mut w) = (values(m * k, 1), values(n * k, 7));
            // Plant each row's winner in the last block, where a block that forgot the
            // earlier best (or its offset) would show.
            let target = (n - 1 - m % 3) as u32;
            for i in 0..k {
                w[target as usize * k + i] = x[i] * 40.0;
            }
            let want = naive(&x, &w, m, k, n);
            assert_eq!(want[0], target, "the planted row wins for row 0");
            assert_eq!(head_argmax(&x, &w[..], m, k, n), want, "m = {m}, n = {n}");
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert_eq!(
                head_argmax(&x, &wb[..], m, k, n),
                naive(&x, &wf, m, k, n),
                "bf16, m = {m}, n = {n}"
            );
        }
    }

    #[test]
    fn the_first_of_equal_maxima_wins() {
        let (m, k, n) = (2, 64, 10_000);
        let x = vec![1.0f32; m * k];
        let mut w = vec![0.0f32; n * k];
        for row in [3usize, 9_000] {
            w[row * k..(row + 1) * k].fill(1.0);
        }
        assert_eq!(head_argmax(&x, &w[..], m, k, n), vec![3, 3]);
    }
}
