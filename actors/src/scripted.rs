//! A deterministic scripted model: a heuristic next-token function with an injectable delay. It
//! stands in for the verifier and the drafter so the runtime's own overhead can be measured apart from
//! model time, as the persona-stress seed did with a 50 ms delay.
//!
//! It keeps, per sequence, exactly the tokens a bounded window would keep (sinks plus the latest
//! `window`), and its next token depends only on those, so it honours the same contract as a real
//! model: verify blocks, accept, commit, and forget what was evicted.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rustc_hash::FxHashMap;
use troupe_engine::accept::{accept_greedy, accept_sampled};
use troupe_engine::drafter::{Draft, DraftRequest, Drafter};
use troupe_engine::verifier::{SeqId, Verifier, VerifyOutcome, VerifyWork};
use troupe_engine::{EngineError, Result, WindowSpec};

/// Bytes one window slot would take in a Qwen3-0.6B-shaped model in bf16 (2 × 28 × 8 × 128 × 2).
pub const DEFAULT_SLOT_BYTES: u64 = 2 * 28 * 8 * 128 * 2;

/// The heuristic: the next token after `a, b`. It cycles through printable bytes, so decoded text is
/// readable, and depends on two tokens, so an n-gram drafter can learn it.
pub fn next_token(a: u32, b: u32, vocab: u32) -> u32 {
    let span = vocab.min(127).saturating_sub(32).max(1);
    32 + (a
        .wrapping_mul(31)
        .wrapping_add(b.wrapping_mul(17))
        .wrapping_add(7))
        % span
}

#[derive(Debug, Clone)]
struct Track {
    spec: WindowSpec,
    sinks: Vec<u32>,
    recent: VecDeque<u32>,
    seen: u64,
    rng: StdRng,
}

impl Track {
    fn push(&mut self, t: u32) {
        self.seen += 1;
        if self.sinks.len() < self.spec.sink {
            self.sinks.push(t);
            return;
        }
        if self.recent.len() == self.spec.window {
            self.recent.pop_front();
        }
        self.recent.push_back(t);
    }

    fn last_two(&self, extra: &[u32]) -> (u32, u32) {
        let mut it = extra
            .iter()
            .rev()
            .chain(self.recent.iter().rev())
            .chain(self.sinks.iter().rev());
        let b = it.next().copied().unwrap_or(0);
        let a = it.next().copied().unwrap_or(0);
        (a, b)
    }
}

/// Logits that put most mass on the heuristic's token (so sampling mostly agrees with greedy).
fn logits_for(a: u32, b: u32, vocab: usize) -> Vec<f32> {
    let mut l = vec![0.0f32; vocab];
    let t = next_token(a, b, vocab as u32) as usize;
    l[t] = 6.0;
    l[(t + 1) % vocab] = 3.0;
    l
}

/// The scripted verifier.
#[derive(Debug)]
pub struct ScriptedModel {
    vocab: usize,
    delay: Duration,
    slot_bytes: u64,
    tracks: FxHashMap<SeqId, Track>,
}

impl ScriptedModel {
    /// A byte-vocabulary model whose every step takes `delay`.
    pub fn new(delay: Duration) -> Self {
        Self {
            vocab: 256,
            delay,
            slot_bytes: DEFAULT_SLOT_BYTES,
            tracks: FxHashMap::default(),
        }
    }

    /// Sets the bytes a window slot is accounted at.
    pub fn with_slot_bytes(mut self, bytes: u64) -> Self {
        self.slot_bytes = bytes;
        self
    }
}

impl Verifier for ScriptedModel {
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()> {
        if self.tracks.contains_key(&seq) {
            return Err(EngineError::DuplicateSequence(seq));
        }
        self.tracks.insert(
            seq,
            Track {
                spec,
                sinks: Vec::new(),
                recent: VecDeque::new(),
                seen: 0,
                rng: StdRng::seed_from_u64(seed),
            },
        );
        Ok(())
    }

    fn fork(&mut self, from: SeqId, seq: SeqId, seed: u64) -> Result<()> {
        if self.tracks.contains_key(&seq) {
            return Err(EngineError::DuplicateSequence(seq));
        }
        let mut track = self
            .tracks
            .get(&from)
            .ok_or(EngineError::UnknownSequence(from))?
            .clone();
        track.rng = StdRng::seed_from_u64(seed);
        self.tracks.insert(seq, track);
        Ok(())
    }

    fn reseed(&mut self, seq: SeqId, seed: u64) -> Result<()> {
        self.tracks
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?
            .rng = StdRng::seed_from_u64(seed);
        Ok(())
    }

    fn close(&mut self, seq: SeqId) -> Result<()> {
        self.tracks
            .remove(&seq)
            .map(|_| ())
            .ok_or(EngineError::UnknownSequence(seq))
    }

    fn verify(&mut self, works: &[VerifyWork]) -> Result<Vec<VerifyOutcome>> {
        if works.is_empty() {
            return Err(EngineError::InvalidStep("empty step".into()));
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let vocab = self.vocab;
        works
            .iter()
            .map(|w| {
                let track = self
                    .tracks
                    .get_mut(&w.seq)
                    .ok_or(EngineError::UnknownSequence(w.seq))?;
                if w.fed.is_empty() {
                    return Err(EngineError::InvalidStep(format!(
                        "sequence {} has no tokens",
                        w.seq
                    )));
                }
                if let Some(&t) = w.fed.iter().chain(&w.draft).find(|&&t| t as usize >= vocab) {
                    return Err(EngineError::TokenOutOfRange { token: t, vocab });
                }
                let mut accepted = 0;
                let mut tokens = Vec::new();
                if w.sample {
                    // Row i predicts the token after fed ++ draft[..i].
                    let mut ctx: Vec<u32> = w.fed.clone();
                    // Row i continues (a, b), the last two tokens of fed ++ draft[..i].
                    let mut pairs = Vec::with_capacity(w.draft.len() + 1);
                    for i in 0..=w.draft.len() {
                        pairs.push(track.last_two(&ctx));
                        if i < w.draft.len() {
                            ctx.push(w.draft[i]);
                        }
                    }
                    let acc = if w.params.is_greedy() {
                        // The argmax of `logits_for` is the heuristic's token: no row is built.
                        let argmaxes: Vec<u32> = pairs
                            .iter()
                            .map(|&(a, b)| next_token(a, b, vocab as u32))
                            .collect();
                        accept_greedy(&w.draft, &argmaxes)
                    } else {
                        let rows: Vec<Vec<f32>> = pairs
                            .iter()
                            .map(|&(a, b)| logits_for(a, b, vocab))
                            .collect();
                        accept_sampled(
                            &w.draft,
                            w.draft_probs.as_deref(),
                            &rows,
                            &w.params,
                            &mut track.rng,
                        )
                    }
                    .stop_at(&w.stop);
                    accepted = acc.accepted;
                    tokens = acc.tokens;
                }
                for &t in w.fed.iter().chain(&w.draft[..accepted]) {
                    track.push(t);
                }
                Ok(VerifyOutcome {
                    seq: w.seq,
                    accepted,
                    tokens,
                    hidden: Vec::new(),
                })
            })
            .collect()
    }

    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        self.slot_bytes * spec.capacity() as u64
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn window_fill(&self, seq: SeqId) -> Option<(u64, usize)> {
        self.tracks
            .get(&seq)
            .map(|t| (t.seen, t.sinks.len() + t.recent.len()))
    }
}

/// The scripted drafter: the same heuristic, wrong on a fixed fraction of positions (chosen by a
/// hash, so runs repeat exactly), with an injectable delay per drafting call.
#[derive(Debug)]
pub struct ScriptedDrafter {
    vocab: u32,
    miss_per_mille: u64,
    delay: Duration,
    history: FxHashMap<SeqId, Vec<u32>>,
}

impl ScriptedDrafter {
    /// A drafter that guesses wrong on `miss_per_mille` of 1000 positions.
    pub fn new(miss_per_mille: u64, delay: Duration) -> Self {
        Self {
            vocab: 256,
            miss_per_mille,
            delay,
            history: FxHashMap::default(),
        }
    }
}

impl Drafter for ScriptedDrafter {
    fn name(&self) -> &str {
        "scripted"
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.vocab as usize)
    }

    fn open(&mut self, seq: SeqId, _spec: WindowSpec, _seed: u64) -> Result<()> {
        self.history.insert(seq, Vec::new());
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
        if h.len() > 64 {
            h.drain(..h.len() - 2);
        }
        Ok(())
    }

    fn draft(&mut self, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        requests
            .iter()
            .map(|r| {
                let h = self
                    .history
                    .get(&r.seq)
                    .ok_or(EngineError::UnknownSequence(r.seq))?;
                let mut ctx: Vec<u32> = h.iter().rev().take(2).rev().copied().collect();
                ctx.extend_from_slice(&r.assumed);
                let mut tokens = Vec::with_capacity(r.k);
                for _ in 0..r.k {
                    let n = ctx.len();
                    let (a, b) = (
                        if n >= 2 { ctx[n - 2] } else { 0 },
                        ctx.last().copied().unwrap_or(0),
                    );
                    let mut t = next_token(a, b, self.vocab);
                    let hash = (a as u64 * 1_000_003 + b as u64 * 7919 + n as u64) % 1000;
                    if hash < self.miss_per_mille {
                        t = 32 + (t + 1 - 32) % (self.vocab.min(127) - 32);
                    }
                    tokens.push(t);
                    ctx.push(t);
                }
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
    use troupe_engine::{generate, GenerateOptions};

    #[test]
    fn speculation_with_the_scripted_pair_matches_plain_decoding() {
        let prompt: Vec<u32> = b"hello, troupe".iter().map(|&b| b as u32).collect();
        let opts = GenerateOptions {
            max_new_tokens: 40,
            draft_len: 0,
            window: WindowSpec::new(2, 6).unwrap(),
            ..Default::default()
        };
        let mut m = ScriptedModel::new(Duration::ZERO);
        let plain = generate(&mut m, None, &prompt, &opts).unwrap();
        let mut d = ScriptedDrafter::new(200, Duration::ZERO);
        let spec = GenerateOptions {
            draft_len: 4,
            ..opts
        };
        let fast = generate(&mut m, Some(&mut d), &prompt, &spec).unwrap();
        assert_eq!(plain.tokens, fast.tokens);
        assert!(fast.stats.accepted > 0 && fast.stats.accepted < fast.stats.drafted);
        assert!(fast.stats.verify_steps < plain.stats.verify_steps);
    }
}
