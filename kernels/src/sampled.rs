//! Rejection-sampling acceptance on the device (Leviathan et al. 2023, arXiv 2211.17192; Chen et
//! al. 2023, arXiv 2302.01318), in plain Burn tensor ops over every block of a verify step at once.
//!
//! The verifier's distributions, the accept tests and the draw of the one token each block adds all
//! stay on the device; two integers per block come back. The randomness comes from the host, as one
//! uniform per draft and one per block, so a session's seed still decides its tokens.
//!
//! Per block of `n` drafts (rows `0..=n` of its logits, `p_i` the verifier's distribution at row `i`,
//! `q_i` the drafter's, `d_i` the draft):
//! - draft `i` is accepted while every earlier one was and `u_i · q_i(d_i) < p_i(d_i)` (the test
//!   `u_i < min(1, p_i(d_i) / q_i(d_i))` without a division);
//! - after `a` accepted drafts the block adds one token drawn with `v` from `max(0, p_a − q_a)`
//!   normalised (from `p_a` if that has no mass), or from `p_n` after a whole block, by inverse CDF.
//!
//! A greedy block (temperature 0) is the same test with `p` one-hot at the argmax and `u = v = 0`:
//! it accepts exactly the drafts equal to the argmax and adds the argmax. A block with `top_p`
//! below 1 samples from the nucleus of `p`, found by bisecting for its threshold rather than by
//! sorting the vocabulary.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::DType;

use crate::accept::{verdicts_from_pairs, BlockVerdict};

/// One sequence's block in a sampled verify step: its logit rows are `drafts.len() + 1`.
#[derive(Debug, Clone, Copy)]
pub struct SampledBlock<'a> {
    /// The drafted tokens the verifier checks.
    pub drafts: &'a [u32],
    /// The distribution each draft was drawn from, one vocabulary-wide row per draft; `None` for a
    /// deterministic drafter (a point mass on each draft).
    pub draft_probs: Option<&'a [Vec<f32>]>,
    /// Softmax temperature of the verifier's distribution; 0 is greedy.
    pub temperature: f32,
    /// Probability mass of the nucleus the verifier samples from (1 keeps every token).
    pub top_p: f32,
    /// One uniform in `[0, 1)` per draft, for its accept test.
    pub accept_u: &'a [f32],
    /// A uniform in `[0, 1)` for the token the block adds.
    pub draw_u: f32,
}

/// Rejection-sampling verdicts for every block at once; `logits` holds each block's
/// `drafts.len() + 1` rows back to back, in the order of `blocks`. The emitted tokens follow the
/// verifier's distribution at each block's temperature exactly, whatever the drafts.
pub fn sampled_accept<B: Backend>(
    logits: Tensor<B, 2>,
    blocks: &[SampledBlock<'_>],
) -> Vec<BlockVerdict> {
    if blocks.is_empty() {
        return Vec::new();
    }
    let device = logits.device();
    let [rows, vocab] = logits.dims();
    let plan = Plan::new(blocks, vocab);
    assert_eq!(
        plan.rows, rows,
        "sampled_accept: one logit row per draft and block"
    );
    let floats = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [rows, 1]), &device);
    let ints = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), &device)
    };
    let wide = [rows, vocab];

    // The verifier's distribution at each row: a softmax, or one-hot at the argmax when greedy.
    let logits = logits.cast(DType::F32);
    let column = Tensor::<B, 1, Int>::arange(0..vocab as i64, &device)
        .reshape([1, vocab])
        .expand(wide);
    let argmax = logits.clone().argmax(1).expand(wide);
    let one_hot = column.clone().equal(argmax).float();
    let greedy = floats(plan.temperature.clone())
        .equal_elem(0.0)
        .expand(wide);
    let scale = floats(
        plan.temperature
            .iter()
            .map(|&t| if t > 0.0 { 1.0 / t } else { 1.0 })
            .collect(),
    );
    let p = softmax(logits * scale.expand(wide), 1).mask_where(greedy, one_hot);
    let p = match plan.top_p.iter().all(|&t| t >= 1.0) {
        true => p,
        false => nucleus(p, floats(plan.top_p.clone())),
    };

    // The drafter's distribution at each row: uploaded rows, or a point mass on the draft; none
    // (all zero) at a block's last row, which therefore never passes the test.
    let draft = ints(plan.draft.clone(), [rows, 1]);
    let q = match &plan.draft_probs {
        Some(q) => Tensor::<B, 2>::from_data(TensorData::new(q.clone(), wide), &device),
        None => column.clone().equal(draft.clone().expand(wide)).float(),
    };
    let at = draft.clamp_min(0);
    let (p_d, q_d) = (p.clone().gather(1, at.clone()), q.clone().gather(1, at));
    let passed = (floats(plan.accept_u) * q_d.clone())
        .lower(p_d)
        .bool_and(q_d.greater_elem(0.0));

    // Leading passes of each block, in a `[blocks, width]` layout padded with its last row.
    let (s, width) = (blocks.len(), plan.width);
    let padded = Tensor::<B, 1, Int>::from_data(TensorData::new(plan.padded, [s * width]), &device);
    let failed = passed
        .int()
        .reshape([rows])
        .select(0, padded.clone())
        .reshape([s, width])
        .equal_elem(0)
        .int();
    let accepted = failed.cumsum(1).equal_elem(0).int().sum_dim(1); // [s, 1]

    // Every row draws its candidate token; each block keeps the one at its first failed row.
    let residual = (p.clone() - q).clamp_min(0.0);
    let empty = residual.clone().sum_dim(1).equal_elem(0.0).expand(wide);
    let f = residual.mask_where(empty, p);
    let target = floats(plan.draw_u) * f.clone().sum_dim(1);
    let below = f.clone().cumsum(1).lower_equal(target.expand(wide));
    let count = below.int().sum_dim(1);
    // Rounding can leave the target at or past the whole mass: the last token with mass then.
    let positive = f.greater_elem(0.0).int();
    let last = (positive * column.add_scalar(1)).max_dim(1).sub_scalar(1);
    let drawn = count.min_pair(last).reshape([rows]);
    let token = drawn
        .select(0, padded)
        .reshape([s, width])
        .gather(1, accepted.clone());
    verdicts_from_pairs(Tensor::cat(vec![accepted, token], 1))
}

/// Bisection steps of [`nucleus`]: its threshold ends within `2 · max p / 2^32` of the exact one.
const NUCLEUS_STEPS: usize = 32;

/// Each row of `p` (`[rows, vocab]`, summing to one) restricted to its smallest top-`top_p`
/// nucleus and renormalised, without sorting: the nucleus is every token at or above the largest
/// threshold whose mass still reaches `top_p` (`[rows, 1]`), found by bisection. Rows with
/// `top_p ≥ 1` keep every token. Tokens tied at the threshold are all kept.
fn nucleus<B: Backend>(p: Tensor<B, 2>, top_p: Tensor<B, 2>) -> Tensor<B, 2> {
    let wide = p.dims();
    let mass = |threshold: &Tensor<B, 2>| {
        let below = p.clone().lower(threshold.clone().expand(wide));
        p.clone().mask_fill(below, 0.0).sum_dim(1)
    };
    // Invariant: the mass at or above `lo` reaches `top_p`, the mass at or above `hi` does not.
    let mut lo = top_p.zeros_like();
    let mut hi = p.clone().max_dim(1).mul_scalar(2.0);
    for _ in 0..NUCLEUS_STEPS {
        let mid = (lo.clone() + hi.clone()).mul_scalar(0.5);
        let reaches = mass(&mid).greater_equal(top_p.clone());
        lo = lo.mask_where(reaches.clone(), mid.clone());
        hi = mid.mask_where(reaches, hi);
    }
    let lo = lo.mask_fill(top_p.greater_equal_elem(1.0), 0.0);
    let kept = p.clone().mask_fill(p.lower(lo.expand(wide)), 0.0);
    let total = kept.clone().sum_dim(1);
    kept / total.expand(wide)
}

/// The host side of a sampled step, laid out for upload.
struct Plan {
    rows: usize,
    /// Longest block plus its added row.
    width: usize,
    /// Per row: its block's temperature.
    temperature: Vec<f32>,
    /// Per row: its block's nucleus mass.
    top_p: Vec<f32>,
    /// Per row: its draft, or -1 on a block's last row.
    draft: Vec<i64>,
    /// Per row: its accept uniform (unused on a last row).
    accept_u: Vec<f32>,
    /// Per row: its block's draw uniform.
    draw_u: Vec<f32>,
    /// `[rows, vocab]` drafter distributions when any block has them.
    draft_probs: Option<Vec<f32>>,
    /// Row of each (block, position), clamped to the block's last row.
    padded: Vec<i64>,
}

impl Plan {
    fn new(blocks: &[SampledBlock<'_>], vocab: usize) -> Self {
        let rows: usize = blocks.iter().map(|b| b.drafts.len() + 1).sum();
        let width = blocks.iter().map(|b| b.drafts.len()).max().unwrap_or(0) + 1;
        let any_probs = blocks.iter().any(|b| b.draft_probs.is_some());
        let mut plan = Plan {
            rows,
            width,
            temperature: Vec::with_capacity(rows),
            top_p: Vec::with_capacity(rows),
            draft: Vec::with_capacity(rows),
            accept_u: Vec::with_capacity(rows),
            draw_u: Vec::with_capacity(rows),
            draft_probs: any_probs.then(|| Vec::with_capacity(rows * vocab)),
            padded: Vec::with_capacity(blocks.len() * width),
        };
        let mut start = 0i64;
        for b in blocks {
            let n = b.drafts.len();
            assert_eq!(b.accept_u.len(), n, "sampled_accept: one uniform per draft");
            for i in 0..=n {
                plan.temperature.push(b.temperature);
                plan.top_p.push(b.top_p);
                plan.draft.push(b.drafts.get(i).map_or(-1, |&d| d as i64));
                plan.accept_u
                    .push(b.accept_u.get(i).copied().unwrap_or(1.0));
                plan.draw_u.push(b.draw_u);
                if let Some(q) = plan.draft_probs.as_mut() {
                    match (b.draft_probs, b.drafts.get(i)) {
                        (Some(rows), Some(_)) => q.extend_from_slice(&rows[i][..vocab]),
                        (None, Some(&d)) => {
                            q.extend((0..vocab).map(|t| if t == d as usize { 1.0 } else { 0.0 }))
                        }
                        (_, None) => q.extend(std::iter::repeat_n(0.0, vocab)),
                    }
                }
            }
            for i in 0..width as i64 {
                plan.padded.push(start + i.min(n as i64));
            }
            start += n as i64 + 1;
        }
        plan
    }
}
