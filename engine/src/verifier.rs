//! The interface a verifier offers the runtime, whatever computes it: a Burn model on any backend, or
//! the scripted model the runtime's own tests and benchmarks use.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sampling::SamplingParams;
use crate::window::WindowSpec;

/// Identifies one sequence (a session's conversation) inside a verifier or drafter.
pub type SeqId = u64;

/// One sequence's share of a verify step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyWork {
    /// The sequence.
    pub seq: SeqId,
    /// Tokens that are certainly part of the sequence and not yet in its window: a prefill chunk, or
    /// the last emitted token. Never empty.
    pub fed: Vec<u32>,
    /// Drafted tokens to verify after `fed`.
    pub draft: Vec<u32>,
    /// The distributions the drafts were drawn from (`None`: a deterministic drafter).
    pub draft_probs: Option<Vec<Vec<f32>>>,
    /// Whether to emit tokens (false for a prefill chunk that is not the last).
    pub sample: bool,
    /// How to pick tokens.
    pub params: SamplingParams,
    /// Tokens that end the turn: emission stops after the first of them, and drafts accepted
    /// beyond it are not committed, exactly as plain decoding would have stopped.
    #[serde(default)]
    pub stop: Vec<u32>,
}

/// What a verify step did for one sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyOutcome {
    /// The sequence.
    pub seq: SeqId,
    /// Drafted tokens accepted.
    pub accepted: usize,
    /// Emitted tokens: the accepted drafts, then the verifier's own token. Empty when `sample` was off.
    pub tokens: Vec<u32>,
    /// Hidden states of the committed positions for each captured layer, row-major `[rows][hidden]`.
    pub hidden: Vec<Vec<Vec<f32>>>,
}

/// A shared model that verifies the steps of many sequences at once. All tokens a step commits go to
/// each sequence's own bounded window; rejected positions leave no trace.
pub trait Verifier: Send {
    /// Opens a sequence with its own window; `seed` seeds its sampling.
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()>;
    /// Closes a sequence and frees its window.
    fn close(&mut self, seq: SeqId) -> Result<()>;
    /// Opens `seq` as a copy of `from` (its window and what it has seen), sampling with `seed`
    /// from here on. `from` must have no step in progress.
    fn fork(&mut self, from: SeqId, seq: SeqId, seed: u64) -> Result<()>;
    /// Restarts the sampling of `seq` from `seed` (a turn's own seed).
    fn reseed(&mut self, seq: SeqId, seed: u64) -> Result<()>;
    /// One batched step over many sequences (each at most once).
    fn verify(&mut self, works: &[VerifyWork]) -> Result<Vec<VerifyOutcome>>;
    /// Bytes one sequence's window takes with this model.
    fn kv_bytes(&self, spec: WindowSpec) -> u64;
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
    /// Layers whose hidden states each outcome should carry.
    fn set_hidden_layers(&mut self, _layers: Vec<usize>) {}
    /// Tokens seen and tokens held in the window of `seq`.
    fn window_fill(&self, seq: SeqId) -> Option<(u64, usize)>;
    /// The most positions a window may hold (the model's `max_position_embeddings`); `None`
    /// when any window fits.
    fn max_positions(&self) -> Option<usize> {
        None
    }
}

/// A boxed verifier is a verifier, so a factory may return whichever model it loaded.
impl<V: Verifier + ?Sized> Verifier for Box<V> {
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()> {
        (**self).open(seq, spec, seed)
    }
    fn close(&mut self, seq: SeqId) -> Result<()> {
        (**self).close(seq)
    }
    fn fork(&mut self, from: SeqId, seq: SeqId, seed: u64) -> Result<()> {
        (**self).fork(from, seq, seed)
    }
    fn reseed(&mut self, seq: SeqId, seed: u64) -> Result<()> {
        (**self).reseed(seq, seed)
    }
    fn verify(&mut self, works: &[VerifyWork]) -> Result<Vec<VerifyOutcome>> {
        (**self).verify(works)
    }
    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        (**self).kv_bytes(spec)
    }
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn set_hidden_layers(&mut self, layers: Vec<usize>) {
        (**self).set_hidden_layers(layers)
    }
    fn window_fill(&self, seq: SeqId) -> Option<(u64, usize)> {
        (**self).window_fill(seq)
    }
    fn max_positions(&self) -> Option<usize> {
        (**self).max_positions()
    }
}
