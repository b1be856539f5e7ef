//! Drafters propose tokens for the verifier to check. Behind one trait: prompt-lookup n-grams, a
//! small draft model, and a block drafter conditioned on the verifier's hidden states.

use std::collections::HashMap;

use crate::error::{EngineError, Result};
use crate::sampling::SamplingParams;
use crate::verifier::SeqId;
use crate::window::WindowSpec;

/// A request to draft for one sequence.
#[derive(Debug, Clone)]
pub struct DraftRequest {
    /// The sequence.
    pub seq: SeqId,
    /// Tokens to assume after the observed history (a block still being verified, when pipelining).
    pub assumed: Vec<u32>,
    /// Tokens wanted (the drafter may return fewer).
    pub k: usize,
    /// The session's sampling parameters (a model drafter samples its drafts the same way).
    pub params: SamplingParams,
}

/// A drafted block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    /// Proposed tokens.
    pub tokens: Vec<u32>,
    /// The distribution each token was drawn from; `None` for a deterministic proposal.
    pub probs: Option<Vec<Vec<f32>>>,
}

/// The verifier's states of positions `from..` of one sequence (see [`Drafter::observe_hidden`]).
#[derive(Debug, Clone, Copy)]
pub struct HiddenStates<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first row.
    pub from: usize,
    /// Per layer the drafter asked for, `[rows][hidden]`.
    pub hidden: &'a [Vec<Vec<f32>>],
}

/// How a drafter's time grows with the tokens it drafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DraftCost {
    /// A block costs about one forward (or nothing) whatever its length: a block drafter, prompt
    /// lookup.
    #[default]
    PerBlock,
    /// Every drafted token costs a forward: an autoregressive draft model.
    PerToken,
}

impl DraftCost {
    /// Forwards a block of `k` drafts costs.
    pub fn forwards(self, k: usize) -> usize {
        match self {
            DraftCost::PerBlock => usize::from(k > 0),
            DraftCost::PerToken => k,
        }
    }
}

/// Something that proposes tokens for many sequences at once.
pub trait Drafter: Send {
    /// A short name for reports ("ngram", "model").
    fn name(&self) -> &str;
    /// Starts tracking a sequence.
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()>;
    /// Stops tracking a sequence.
    fn close(&mut self, seq: SeqId);
    /// Starts tracking `seq` as a copy of `from`, whose tokens so far are `history`. By default
    /// the copy is rebuilt from the history; a drafter with state of its own copies that.
    fn fork(
        &mut self,
        _from: SeqId,
        seq: SeqId,
        spec: WindowSpec,
        seed: u64,
        history: &[u32],
    ) -> Result<()> {
        self.open(seq, spec, seed)?;
        self.observe(seq, history)
    }
    /// Restarts the sampling of `seq`'s drafts from `seed` (a turn's own seed). Deterministic
    /// drafters draw nothing and ignore it.
    fn reseed(&mut self, _seq: SeqId, _seed: u64) {}
    /// Appends tokens now known to be part of the sequence (prompt, accepted tokens).
    fn observe(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()>;
    /// Drafts for each request, in order.
    fn draft(&mut self, requests: &[DraftRequest]) -> Result<Vec<Draft>>;
    /// Layers of the verifier whose hidden states this drafter wants, in the order
    /// [`Drafter::observe_hidden`] gives them.
    fn hidden_layers(&self) -> Vec<usize> {
        Vec::new()
    }
    /// The verifier's hidden states of positions `from..from + n` of `seq` (positions of its
    /// whole history, as [`Drafter::observe`] counts them): one `[n][hidden]` list per layer
    /// [`Drafter::hidden_layers`] names, in that order. States of positions given before are
    /// ignored; positions never given are missing from what it conditions on. A drafter that
    /// asks for no layers ignores them.
    fn observe_hidden(
        &mut self,
        _seq: SeqId,
        _from: usize,
        _hidden: &[Vec<Vec<f32>>],
    ) -> Result<()> {
        Ok(())
    }
    /// [`Drafter::observe_hidden`] for the sequences of one step at once (a drafter may take them
    /// in one pass). Every item is taken; the first error is returned.
    fn observe_hidden_many(&mut self, states: &[HiddenStates<'_>]) -> Result<()> {
        let mut first = Ok(());
        for s in states {
            let r = self.observe_hidden(s.seq, s.from, s.hidden);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
    /// How its time grows with the tokens it drafts (what the scheduler prices a block at).
    fn draft_cost(&self) -> DraftCost {
        DraftCost::PerBlock
    }
    /// Bytes its own per-sequence state takes for a window of shape `spec` (a draft model's
    /// window, a block drafter's context): what a session reserves beside the verifier's window.
    fn kv_bytes(&self, _spec: WindowSpec) -> u64 {
        0
    }
    /// The vocabulary its drafts and their distributions are over; `None` for a drafter that only
    /// repeats the sequence's own tokens (prompt lookup), which fits any verifier.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

/// A boxed drafter is a drafter, so a factory may return whichever drafter it built.
impl<D: Drafter + ?Sized> Drafter for Box<D> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()> {
        (**self).open(seq, spec, seed)
    }
    fn close(&mut self, seq: SeqId) {
        (**self).close(seq)
    }
    fn fork(
        &mut self,
        from: SeqId,
        seq: SeqId,
        spec: WindowSpec,
        seed: u64,
        history: &[u32],
    ) -> Result<()> {
        (**self).fork(from, seq, spec, seed, history)
    }
    fn reseed(&mut self, seq: SeqId, seed: u64) {
        (**self).reseed(seq, seed)
    }
    fn observe(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        (**self).observe(seq, tokens)
    }
    fn draft(&mut self, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        (**self).draft(requests)
    }
    fn hidden_layers(&self) -> Vec<usize> {
        (**self).hidden_layers()
    }
    fn observe_hidden(&mut self, seq: SeqId, from: usize, hidden: &[Vec<Vec<f32>>]) -> Result<()> {
        (**self).observe_hidden(seq, from, hidden)
    }
    fn observe_hidden_many(&mut self, states: &[HiddenStates<'_>]) -> Result<()> {
        (**self).observe_hidden_many(states)
    }
    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        (**self).kv_bytes(spec)
    }
    fn draft_cost(&self) -> DraftCost {
        (**self).draft_cost()
    }
    fn vocab_size(&self) -> Option<usize> {
        (**self).vocab_size()
    }
}

/// Prompt-lookup drafting: find the latest earlier occurrence of the sequence's last n tokens and
/// propose what followed it. No model, no memory beyond the token history.
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    /// Longest n-gram tried first.
    pub max_ngram: usize,
    /// Shortest n-gram tried.
    pub min_ngram: usize,
    /// How far back to search.
    pub lookback: usize,
    history: HashMap<SeqId, Vec<u32>>,
}

impl Default for NgramDrafter {
    fn default() -> Self {
        Self::new(3, 1)
    }
}

impl NgramDrafter {
    /// Matches n-grams from `max_ngram` down to `min_ngram` tokens.
    pub fn new(max_ngram: usize, min_ngram: usize) -> Self {
        Self {
            max_ngram: max_ngram.max(1),
            min_ngram: min_ngram.clamp(1, max_ngram.max(1)),
            lookback: 8192,
            history: HashMap::new(),
        }
    }

    /// The proposal for `context`, at most `k` tokens.
    pub fn lookup(&self, context: &[u32], k: usize) -> Vec<u32> {
        let len = context.len();
        if k == 0 {
            return Vec::new();
        }
        let floor = len.saturating_sub(self.lookback);
        for n in (self.min_ngram..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let suffix = &context[len - n..];
            // Latest earlier start whose n tokens equal the suffix and that has a continuation.
            for start in (floor..len - n).rev() {
                if &context[start..start + n] == suffix {
                    // Copy what followed, with overlap: a continuation that runs into the end of the
                    // context goes on with the tokens just proposed, so a repeating cycle is
                    // proposed for all k tokens, not only up to the context's end.
                    let from = start + n;
                    let mut out = Vec::with_capacity(k);
                    for i in 0..k {
                        let idx = from + i;
                        out.push(if idx < len {
                            context[idx]
                        } else {
                            out[idx - len]
                        });
                    }
                    return out;
                }
            }
        }
        Vec::new()
    }
}

impl Drafter for NgramDrafter {
    fn name(&self) -> &str {
        "ngram"
    }

    fn open(&mut self, seq: SeqId, _spec: WindowSpec, _seed: u64) -> Result<()> {
        if self.history.insert(seq, Vec::new()).is_some() {
            return Err(EngineError::DuplicateSequence(seq));
        }
        Ok(())
    }

    fn close(&mut self, seq: SeqId) {
        self.history.remove(&seq);
    }

    fn observe(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let h = self
            .history
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        h.extend_from_slice(tokens);
        // Keep the history bounded like everything else per session.
        let cap = self.lookback * 2;
        if h.len() > cap {
            h.drain(..h.len() - self.lookback);
        }
        Ok(())
    }

    fn draft(&mut self, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        requests
            .iter()
            .map(|r| {
                let h = self
                    .history
                    .get(&r.seq)
                    .ok_or(EngineError::UnknownSequence(r.seq))?;
                let tokens = if r.assumed.is_empty() {
                    self.lookup(h, r.k)
                } else {
                    let mut ctx = h.clone();
                    ctx.extend_from_slice(&r.assumed);
                    self.lookup(&ctx, r.k)
                };
                Ok(Draft {
                    tokens,
                    probs: None,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_the_continuation_of_the_latest_match() {
        let d = NgramDrafter::new(3, 1);
        // "a b c d ... a b c" -> propose "d e".
        let ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3];
        assert_eq!(d.lookup(&ctx, 2), vec![4, 5]);
        // A continuation that reaches the end of the context repeats the cycle it found.
        assert_eq!(d.lookup(&[7, 8, 7], 4), vec![8, 7, 8, 7]);
        // Nothing repeats: nothing proposed.
        assert_eq!(d.lookup(&[1, 2, 3], 4), Vec::<u32>::new());
    }

    #[test]
    fn assumed_tokens_extend_the_context() {
        let mut d = NgramDrafter::new(2, 1);
        d.open(1, WindowSpec::default(), 0).unwrap();
        d.observe(1, &[10, 11, 12, 13]).unwrap();
        let req = DraftRequest {
            seq: 1,
            assumed: vec![10, 11],
            k: 2,
            params: SamplingParams::greedy(),
        };
        let out = d.draft(&[req]).unwrap();
        assert_eq!(out[0].tokens, vec![12, 13]);
        assert!(matches!(
            d.observe(2, &[1]),
            Err(EngineError::UnknownSequence(2))
        ));
    }
}
