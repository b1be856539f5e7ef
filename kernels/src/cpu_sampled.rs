//! Rejection-sampling acceptance on the CPU, where the logits already sit in host memory: the
//! decision of [`crate::sampled`] computed on the rows themselves, block by block, each block only
//! as far as its first rejected draft.
//!
//! Per row: the temperature softmax (one-hot at the argmax when greedy), the nucleus by a radix
//! select on the probabilities' bits (a histogram of their mass by exponent and leading mantissa
//! bits, then a sort of the one bucket the threshold falls in), the accept test `u·q(d) < p(d)`,
//! and the inverse-CDF draw from `max(0, p − q)` (from `p` when that has no mass).

use rayon::prelude::*;

use crate::accept::BlockVerdict;
use crate::sampled::SampledBlock;

/// Buckets of the nucleus histogram: the top 12 bits of a non-negative f32 (exponent and three
/// mantissa bits).
const BUCKETS: usize = 1 << 12;
/// Shift that leaves those bits.
const BUCKET_SHIFT: u32 = 31 - 12;
/// Below this many logits in a step, the blocks are decided on the calling thread.
const PARALLEL_LOGITS: usize = 1 << 16;

/// Verdicts for every block; `logits` is `[rows, vocab]` row-major, each block's
/// `drafts.len() + 1` rows back to back in the order of `blocks`.
pub fn sampled_accept(
    logits: &[f32],
    vocab: usize,
    blocks: &[SampledBlock<'_>],
) -> Vec<BlockVerdict> {
    let mut starts = Vec::with_capacity(blocks.len());
    let mut row = 0;
    for b in blocks {
        assert_eq!(
            b.accept_u.len(),
            b.drafts.len(),
            "sampled_accept: one uniform per draft"
        );
        starts.push(row);
        row += b.drafts.len() + 1;
    }
    assert!(
        logits.len() >= row * vocab,
        "sampled_accept: one logit row per draft and block"
    );
    let decide = |(b, &start): (&SampledBlock<'_>, &usize)| {
        let rows = &logits[start * vocab..(start + b.drafts.len() + 1) * vocab];
        decide_block(rows, vocab, b)
    };
    if row * vocab >= PARALLEL_LOGITS {
        blocks.par_iter().zip(&starts).map(decide).collect()
    } else {
        blocks.iter().zip(&starts).map(decide).collect()
    }
}

/// One block: drafts are tested row by row until one fails, then the block's token is drawn.
fn decide_block(rows: &[f32], vocab: usize, b: &SampledBlock<'_>) -> BlockVerdict {
    let row = |i: usize| &rows[i * vocab..(i + 1) * vocab];
    if b.temperature == 0.0 {
        // One-hot `p`: a draft passes exactly when it is the argmax, and the draw is the argmax.
        for (i, &d) in b.drafts.iter().enumerate() {
            let top = argmax(row(i));
            if d != top {
                return BlockVerdict {
                    accepted: i,
                    token: top,
                };
            }
        }
        let n = b.drafts.len();
        return BlockVerdict {
            accepted: n,
            token: argmax(row(n)),
        };
    }
    let mut p = vec![0.0f32; vocab];
    for (i, &d) in b.drafts.iter().enumerate() {
        distribution(row(i), b.temperature, b.top_p, &mut p);
        let q = b.draft_probs.map(|q| &q[i][..vocab]);
        let q_d = q.map_or(1.0, |q| q[d as usize]);
        if q_d > 0.0 && b.accept_u[i] * q_d < p[d as usize] {
            continue;
        }
        // Rejected: the residual `max(0, p − q)`, or `p` itself when that is empty.
        let mut residual: Vec<f32> = match q {
            Some(q) => p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect(),
            None => {
                let mut r = p.clone();
                r[d as usize] = (r[d as usize] - 1.0).max(0.0);
                r
            }
        };
        if residual.iter().sum::<f32>() == 0.0 {
            residual.copy_from_slice(&p);
        }
        return BlockVerdict {
            accepted: i,
            token: draw(&residual, b.draw_u),
        };
    }
    let n = b.drafts.len();
    distribution(row(n), b.temperature, b.top_p, &mut p);
    BlockVerdict {
        accepted: n,
        token: draw(&p, b.draw_u),
    }
}

/// The index of the first largest value.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `p = softmax(logits / t)` cut to its nucleus of mass `top_p` and renormalised.
fn distribution(logits: &[f32], t: f32, top_p: f32, p: &mut [f32]) {
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scale = 1.0 / t;
    let mut total = 0.0f32;
    for (pi, &l) in p.iter_mut().zip(logits) {
        *pi = ((l - top) * scale).exp();
        total += *pi;
    }
    let mut kept = 0.0f32;
    let threshold = nucleus_threshold(p, total, top_p * total);
    for pi in p.iter_mut() {
        if *pi < threshold {
            *pi = 0.0;
        }
        kept += *pi;
    }
    for pi in p.iter_mut() {
        *pi /= kept;
    }
}

/// The largest `t` such that the values at or above `t` hold at least `mass` (0 when even all of
/// them, `total`, fall short, so that every token stays). `values` are non-negative.
fn nucleus_threshold(values: &[f32], total: f32, mass: f32) -> f32 {
    if mass >= total {
        return 0.0;
    }
    // Non-negative floats order as their bits do, so the top bits bucket them in order.
    let bucket = |x: f32| (x.to_bits() >> BUCKET_SHIFT) as usize;
    let mut in_bucket = vec![0.0f32; BUCKETS];
    for &x in values {
        in_bucket[bucket(x)] += x;
    }
    let mut above = 0.0f32;
    let mut edge = 0;
    for b in (0..BUCKETS).rev() {
        if above + in_bucket[b] >= mass {
            edge = b;
            break;
        }
        above += in_bucket[b];
    }
    let mut inside: Vec<f32> = values
        .iter()
        .copied()
        .filter(|&x| bucket(x) == edge)
        .collect();
    inside.sort_unstable_by(|a, b| b.total_cmp(a));
    for &x in &inside {
        above += x;
        if above >= mass {
            return x;
        }
    }
    // Rounding kept the bucket's sum above its members' own: its smallest member.
    inside.last().copied().unwrap_or(0.0)
}

/// The token an inverse CDF of `f` (non-negative, some mass) gives the uniform `v`: the first whose
/// running sum passes `v · Σf`, or the last with mass when rounding leaves none past it.
fn draw(f: &[f32], v: f32) -> u32 {
    let target = v * f.iter().sum::<f32>();
    let mut sum = 0.0f32;
    let mut last = 0;
    for (i, &x) in f.iter().enumerate() {
        if x > 0.0 {
            last = i;
        }
        sum += x;
        if sum > target && x > 0.0 {
            return i as u32;
        }
    }
    last as u32
}
