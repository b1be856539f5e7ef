//! A small draft model as drafter: any loadable model sharing the verifier's tokenizer, with its own
//! bounded windows.

use std::collections::HashMap;

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use troupe_kernels::KernelBackend;

use crate::drafter::{Draft, DraftCost, DraftRequest, Drafter};
use crate::engine::{logits_to_host, Engine, StepItem};
use crate::error::{EngineError, Result};
use crate::sampling::{argmax, distribution, sample};
use crate::verifier::{SeqId, Verifier};
use crate::window::WindowSpec;

struct Track {
    /// True tokens of the sequence not yet in the draft model's window.
    unfed: Vec<u32>,
    rng: StdRng,
}

/// Drafts with a small model, autoregressively, many sequences per forward.
pub struct ModelDrafter<B: Backend> {
    engine: Engine<B>,
    tracks: HashMap<SeqId, Track>,
}

impl<B: KernelBackend> ModelDrafter<B>
where
    B::Device: Send,
{
    /// Drafts with `engine`'s model.
    pub fn new(engine: Engine<B>) -> Self {
        Self {
            engine,
            tracks: HashMap::new(),
        }
    }
}

impl<B: KernelBackend> Drafter for ModelDrafter<B>
where
    B::Device: Send,
{
    fn name(&self) -> &str {
        "model"
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.engine.model().config.vocab_size)
    }

    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        Verifier::kv_bytes(&self.engine, spec)
    }

    fn draft_cost(&self) -> DraftCost {
        DraftCost::PerToken
    }

    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()> {
        Verifier::open(&mut self.engine, seq, spec, seed)?;
        self.tracks.insert(
            seq,
            Track {
                unfed: Vec::new(),
                rng: StdRng::seed_from_u64(seed ^ 0x5eed_d4af),
            },
        );
        Ok(())
    }

    fn close(&mut self, seq: SeqId) {
        let _ = Verifier::close(&mut self.engine, seq);
        self.tracks.remove(&seq);
    }

    fn reseed(&mut self, seq: SeqId, seed: u64) {
        if let Some(t) = self.tracks.get_mut(&seq) {
            t.rng = StdRng::seed_from_u64(seed ^ 0x5eed_d4af);
        }
    }

    fn observe(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        self.tracks
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?
            .unfed
            .extend_from_slice(tokens);
        Ok(())
    }

    fn draft(&mut self, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        let mut drafts: Vec<Draft> = requests.iter().map(|_| Draft::default()).collect();
        let mut probs: Vec<Vec<Vec<f32>>> = requests.iter().map(|_| Vec::new()).collect();
        // Feeds per request: first the unfed history plus the assumed tokens, then one draft at a time.
        let mut feeds: Vec<Vec<u32>> = Vec::with_capacity(requests.len());
        for r in requests {
            let t = self
                .tracks
                .get(&r.seq)
                .ok_or(EngineError::UnknownSequence(r.seq))?;
            let mut feed = t.unfed.clone();
            feed.extend_from_slice(&r.assumed);
            feeds.push(feed);
        }
        let max_k = requests.iter().map(|r| r.k).max().unwrap_or(0);
        for round in 0..max_k {
            let active: Vec<usize> = (0..requests.len())
                .filter(|&i| requests[i].k > round && !feeds[i].is_empty())
                .collect();
            if active.is_empty() {
                break;
            }
            let items: Vec<StepItem> = active
                .iter()
                .map(|&i| StepItem {
                    seq: requests[i].seq,
                    tokens: std::mem::take(&mut feeds[i]),
                    logit_rows: 1,
                })
                .collect();
            let step = self.engine.step(&items)?;
            let rows = logits_to_host(step.logits.expect("every item asked for a row"))?;
            for (row, &i) in rows.iter().zip(&active) {
                let r = &requests[i];
                let token = if r.params.is_greedy() {
                    argmax(row)
                } else {
                    let p = distribution(row, &r.params);
                    let rng = &mut self.tracks.get_mut(&r.seq).expect("tracked").rng;
                    let t = sample(&p, rng);
                    probs[i].push(p);
                    t
                };
                drafts[i].tokens.push(token);
                feeds[i] = vec![token];
            }
        }
        // Keep the true history in the draft model's window; drop assumed tokens and drafts.
        for (i, r) in requests.iter().enumerate() {
            let track = self.tracks.get_mut(&r.seq).expect("tracked");
            let scratch = self.engine.window(r.seq)?.scratch_len();
            let keep = track.unfed.len().min(scratch);
            self.engine.resolve(r.seq, keep)?;
            track.unfed.drain(..keep);
            if !r.params.is_greedy() {
                drafts[i].probs = Some(std::mem::take(&mut probs[i]));
            }
        }
        Ok(drafts)
    }
}
