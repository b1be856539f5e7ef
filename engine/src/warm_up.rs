//! Warming a verifier up before it serves: one pass over the step shapes it will meet, so a GPU
//! backend tunes and compiles its kernels at start-up rather than on a user's first request.
//!
//! Burn's CubeCL backends autotune each new shape the first time they meet it, which can take
//! seconds per shape, and compile each kernel once per process. The tuning results persist on disk
//! (CubeCL writes them under `target/autotune` in a Cargo project, else `~/.cache/cubecl`; a
//! `cubecl.toml` with `[autotune] cache = { file = "DIR" }` moves them), so a warm-up after the first
//! start mostly compiles. Shapes are keyed coarsely (rounded to powers of two), so batches of
//! 1, 2, 4, … up to the largest cover the sizes in between.

use crate::error::Result;
use crate::sampling::SamplingParams;
use crate::verifier::{SeqId, Verifier, VerifyWork};
use crate::window::WindowSpec;

/// The step shapes a warm-up runs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WarmUp {
    /// Sequences per step, one round of steps for each.
    pub batches: Vec<usize>,
    /// Drafts per verify step.
    pub draft_len: usize,
    /// Prompt tokens per sequence in the prefill step.
    pub prefill_chunk: usize,
    /// Window of the temporary sequences.
    pub window: WindowSpec,
}

impl WarmUp {
    /// Batches of 1, 2, 4, … up to `max_batch` (itself included).
    pub fn up_to(max_batch: usize, draft_len: usize, prefill_chunk: usize) -> Self {
        let mut batches: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
            .take_while(|&b| b < max_batch)
            .collect();
        batches.push(max_batch.max(1));
        Self {
            batches,
            draft_len,
            prefill_chunk: prefill_chunk.max(1),
            window: WindowSpec::default(),
        }
    }

    /// Runs the temporary sequences in windows of `window` (the shape the runtime's sessions use).
    pub fn with_window(mut self, window: WindowSpec) -> Self {
        self.window = window;
        self
    }

    /// Steps the warm-up takes: a prefill, a plain decode, a greedy and a sampled verify per batch.
    pub fn steps(&self) -> usize {
        self.batches.len() * ROUND.len()
    }
}

/// One step of a round: its name, whether it feeds a prefill chunk, whether it verifies drafts,
/// and how it samples.
struct Step(&'static str, bool, bool, SamplingParams);

const GREEDY: SamplingParams = SamplingParams {
    temperature: 0.0,
    top_p: 1.0,
};

/// Sampling as a typical sampled session does it.
const SAMPLED: SamplingParams = SamplingParams {
    temperature: 1.0,
    top_p: 1.0,
};

/// The steps of one round, in order.
const ROUND: [Step; 4] = [
    Step("prefill", true, false, GREEDY),
    Step("decode", false, false, GREEDY),
    Step("verify greedy", false, true, GREEDY),
    Step("verify sampled", false, true, SAMPLED),
];

/// Where a warm-up is: `done` of `total` steps, the last one `what` over `batch` sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUpProgress {
    /// Steps finished.
    pub done: usize,
    /// Steps in all.
    pub total: usize,
    /// Sequences in the step just finished.
    pub batch: usize,
    /// What the step was.
    pub what: &'static str,
}

/// Runs `plan` on `verifier` with temporary sequences, calling `progress` after each step. The
/// sequences are closed afterwards, on error too, so open sequences are left as they were.
pub fn warm_up(
    verifier: &mut dyn Verifier,
    plan: &WarmUp,
    progress: &mut dyn FnMut(WarmUpProgress),
) -> Result<()> {
    let vocab = verifier.vocab_size().max(1) as u32;
    let token = |i: usize, j: usize| ((i * 7919 + j * 31 + 1) as u32) % vocab;
    let total = plan.steps();
    let mut done = 0;
    for &batch in &plan.batches {
        let seqs = free_ids(&*verifier, batch);
        let mut opened = Vec::with_capacity(batch);
        let result = (|| {
            for &seq in &seqs {
                verifier.open(seq, plan.window, seq)?;
                opened.push(seq);
            }
            for Step(what, prefill, drafts, params) in ROUND {
                let fed = if prefill { plan.prefill_chunk } else { 1 };
                let draft = if drafts { plan.draft_len } else { 0 };
                let works: Vec<VerifyWork> = seqs
                    .iter()
                    .enumerate()
                    .map(|(i, &seq)| VerifyWork {
                        seq,
                        fed: (0..fed).map(|j| token(i, j)).collect(),
                        draft: (0..draft).map(|j| token(i, fed + j)).collect(),
                        draft_probs: None,
                        sample: true,
                        params,
                        stop: Vec::new(),
                    })
                    .collect();
                verifier.verify(&works)?;
                done += 1;
                progress(WarmUpProgress {
                    done,
                    total,
                    batch,
                    what,
                });
            }
            Ok(())
        })();
        for seq in opened {
            verifier.close(seq)?;
        }
        result?;
    }
    Ok(())
}

/// `n` sequence ids no open sequence uses, from the top of the id space down.
fn free_ids(verifier: &dyn Verifier, n: usize) -> Vec<SeqId> {
    (0..=SeqId::MAX)
        .rev()
        .filter(|&id| verifier.window_fill(id).is_none())
        .take(n)
        .collect()
}
