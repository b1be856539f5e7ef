//! The types of device-side greedy acceptance.

use burn::prelude::*;

/// One sequence's drafted block in a verify step: its rows of logits are `drafts.len() + 1`.
#[derive(Debug, Clone, Copy)]
pub struct DraftBlock<'a> {
    /// The drafted tokens the verifier checks.
    pub drafts: &'a [u32],
}

/// What greedy acceptance decides for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockVerdict {
    /// Leading drafts equal to the verifier's argmax.
    pub accepted: usize,
    /// The verifier's own token after them: the correction, or the bonus after a whole block.
    pub token: u32,
}

/// Greedy verdicts from each logit row's argmax, already on the host: `argmax` holds each block's
/// `drafts.len() + 1` entries back to back, in the order of `blocks`.
pub fn verdicts_from_argmax(argmax: &[u32], blocks: &[DraftBlock<'_>]) -> Vec<BlockVerdict> {
    let mut start = 0;
    blocks
        .iter()
        .map(|b| {
            let rows = &argmax[start..start + b.drafts.len() + 1];
            start += rows.len();
            let accepted = b
                .drafts
                .iter()
                .zip(rows)
                .take_while(|(d, a)| d == a)
                .count();
            BlockVerdict {
                accepted,
                token: rows[accepted],
            }
        })
        .collect()
}

/// Verdicts from `(accepted, token)` pairs computed on the device, one pair per block: the only
/// read-back of an acceptance.
pub fn verdicts_from_pairs<B: Backend, const D: usize>(
    pairs: Tensor<B, D, Int>,
) -> Vec<BlockVerdict> {
    let pairs = pairs
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("an int tensor reads back as i64");
    pairs
        .chunks_exact(2)
        .map(|p| BlockVerdict {
            accepted: p[0] as usize,
            token: p[1] as u32,
        })
        .collect()
}
