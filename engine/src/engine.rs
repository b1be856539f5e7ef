//! A model together with the windows of the sequences it serves: the batched step, and verification
//! with acceptance and commit.

use std::collections::{HashMap, HashSet};

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use troupe_kernels::accept::verdicts_from_argmax;
use troupe_kernels::{BlockVerdict, DraftBlock, KernelBackend, SampledBlock};

use crate::accept::Acceptance;
use crate::batch::SeqInput;
use crate::error::{EngineError, Result};
use crate::kv_pool::KvPool;
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::verifier::{SeqId, Verifier, VerifyOutcome, VerifyWork};
use crate::window::{KvWindow, WindowSpec};

/// One sequence's part of a batched step.
#[derive(Debug, Clone)]
pub struct StepItem {
    /// The sequence.
    pub seq: SeqId,
    /// Its new tokens; their keys and values go to the sequence's scratch.
    pub tokens: Vec<u32>,
    /// How many of the last positions need logits (0 for none).
    pub logit_rows: usize,
}

/// Output of [`Engine::step`].
pub struct StepResult<B: Backend> {
    /// Logits `[sum of logit_rows, vocab]`, f32, items in order; `None` if no item asked for any.
    pub logits: Option<Tensor<B, 2>>,
    /// First logits row of each item.
    pub row_offsets: Vec<usize>,
    /// Captured hidden states of each item's tokens, per captured layer: `[item][layer]` rows.
    pub captured: Vec<Vec<Tensor<B, 2>>>,
    /// Each layer's keys and values of the step's tokens (see [`Engine::resolve_step`]).
    pub kv: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
}

/// A step up to its head: the final-normed hidden rows that need logits, items in order.
struct StepHidden<B: Backend> {
    head: Option<Tensor<B, 2>>,
    row_offsets: Vec<usize>,
    captured: Vec<Vec<Tensor<B, 2>>>,
    kv: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
}

/// The committed tokens of one window shape in a step: their rows in the step, and the (slot,
/// position) each goes to.
struct ShapeCommit {
    spec: WindowSpec,
    rows: Vec<usize>,
    targets: Vec<(usize, usize)>,
}

struct SeqState<B: Backend> {
    window: KvWindow<B>,
    rng: StdRng,
}

/// A model and the windows of its open sequences.
pub struct Engine<B: Backend> {
    model: Model<B>,
    /// Committed keys and values of every open window.
    pool: KvPool<B>,
    seqs: HashMap<SeqId, SeqState<B>>,
    capture: Vec<usize>,
}

impl<B: KernelBackend> Engine<B> {
    /// Serves sequences with `model`.
    pub fn new(model: Model<B>) -> Self {
        Self {
            pool: model.new_pool(),
            model,
            seqs: HashMap::new(),
            capture: Vec::new(),
        }
    }

    /// The model.
    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    /// Layers whose outputs every step reports (for drafters conditioned on the verifier's states).
    pub fn set_capture(&mut self, layers: Vec<usize>) {
        self.capture = layers;
    }

    /// Whether `seq` is open.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// The window of `seq`.
    pub fn window(&self, seq: SeqId) -> Result<&KvWindow<B>> {
        self.seqs
            .get(&seq)
            .map(|s| &s.window)
            .ok_or(EngineError::UnknownSequence(seq))
    }

    /// Commits the first `keep` scratch tokens of `seq` and drops the rest.
    pub fn resolve(&mut self, seq: SeqId, keep: usize) -> Result<()> {
        self.seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?
            .window
            .resolve(keep, &mut self.pool)
    }

    /// Commits the first `keeps[i]` tokens of each of a step's `items` at once, as
    /// [`Engine::resolve`] does one by one. `items` are the step's, in its order, and `kv` is its
    /// [`StepResult::kv`]: the windows of one shape take their keys and values from it in one write
    /// per layer ([`KvPool::commit_rows`]). A window holding scratch from an earlier step is resolved
    /// on its own. Nothing is written unless every keep is valid.
    pub fn resolve_step(
        &mut self,
        kv: &[(Tensor<B, 3>, Tensor<B, 3>)],
        items: &[StepItem],
        keeps: &[usize],
    ) -> Result<()> {
        if keeps.len() != items.len() {
            return Err(EngineError::InvalidStep(format!(
                "{} keeps for a step of {} sequences",
                keeps.len(),
                items.len()
            )));
        }
        let mut planned = Vec::with_capacity(items.len());
        for (item, &keep) in items.iter().zip(keeps) {
            let window = self.window(item.seq)?;
            let only_this_step = window.scratch_len() == item.tokens.len();
            let targets = window.commit_targets(keep)?;
            planned.push((only_this_step, targets));
        }
        let mut groups: Vec<ShapeCommit> = Vec::new();
        let mut offset = 0;
        for ((item, &keep), (batched, targets)) in items.iter().zip(keeps).zip(planned) {
            let window = &mut self.seqs.get_mut(&item.seq).expect("checked").window;
            if !batched {
                window.resolve(keep, &mut self.pool)?;
            } else {
                let spec = window.spec();
                let at = match groups.iter().position(|g| g.spec == spec) {
                    Some(at) => at,
                    None => {
                        groups.push(ShapeCommit {
                            spec,
                            rows: Vec::new(),
                            targets: Vec::new(),
                        });
                        groups.len() - 1
                    }
                };
                let group = &mut groups[at];
                group
                    .rows
                    .extend(targets.iter().map(|&(_, src)| offset + src));
                group
                    .targets
                    .extend(targets.iter().map(|&(pos, _)| (window.slot(), pos)));
                window.committed(keep);
            }
            offset += item.tokens.len();
        }
        for g in groups {
            self.pool.commit_rows(g.spec, kv, &g.rows, &g.targets);
        }
        Ok(())
    }

    /// One batched forward over `items`. Windows are taken out for the step and always put back.
    pub fn step(&mut self, items: &[StepItem]) -> Result<StepResult<B>> {
        let s = self.step_hidden(items)?;
        Ok(StepResult {
            logits: s.head.map(|h| self.model.logits(h)),
            row_offsets: s.row_offsets,
            captured: s.captured,
            kv: s.kv,
        })
    }

    /// [`Engine::step`] up to the final-normed hidden rows the logits would be computed from.
    fn step_hidden(&mut self, items: &[StepItem]) -> Result<StepHidden<B>> {
        self.check(items.iter().map(|i| (i.seq, i.tokens.as_slice())))?;
        for it in items {
            if it.logit_rows > it.tokens.len() {
                return Err(EngineError::InvalidStep(format!(
                    "sequence {} asks for {} logits rows of {} tokens",
                    it.seq,
                    it.logit_rows,
                    it.tokens.len()
                )));
            }
        }
        let mut states: Vec<SeqState<B>> = items
            .iter()
            .map(|i| self.seqs.remove(&i.seq).expect("checked above"))
            .collect();
        let result = self.step_inner(items, &mut states);
        for (it, st) in items.iter().zip(states) {
            self.seqs.insert(it.seq, st);
        }
        result
    }

    fn step_inner(
        &mut self,
        items: &[StepItem],
        states: &mut [SeqState<B>],
    ) -> Result<StepHidden<B>> {
        let tokens: Vec<u32> = items
            .iter()
            .flat_map(|i| i.tokens.iter().copied())
            .collect();
        let mut inputs: Vec<SeqInput<'_, B>> = states
            .iter_mut()
            .zip(items)
            .map(|(s, i)| SeqInput {
                window: &mut s.window,
                len: i.tokens.len(),
            })
            .collect();
        let capture = self.capture.clone();
        let out = self
            .model
            .forward(&tokens, &mut inputs, &self.pool, &capture);
        let mut rows = Vec::new();
        let mut row_offsets = Vec::with_capacity(items.len());
        let mut captured = Vec::with_capacity(items.len());
        let mut offset = 0;
        for it in items {
            row_offsets.push(rows.len());
            let end = offset + it.tokens.len();
            rows.extend((end - it.logit_rows..end).map(|r| r as i64));
            captured.push(
                out.captured
                    .iter()
                    .map(|c| c.clone().slice([offset..end, 0..c.dims()[1]]))
                    .collect(),
            );
            offset = end;
        }
        let head = (!rows.is_empty()).then(|| {
            let n = rows.len();
            let idx = Tensor::from_data(TensorData::new(rows, [n]), &self.model.device);
            out.hidden.select(0, idx)
        });
        Ok(StepHidden {
            head,
            row_offsets,
            captured,
            kv: out.kv,
        })
    }

    fn check<'a>(&self, items: impl Iterator<Item = (SeqId, &'a [u32])>) -> Result<()> {
        let vocab = self.model.config.vocab_size;
        let mut seen = HashSet::new();
        let mut any = false;
        for (seq, tokens) in items {
            any = true;
            if !self.seqs.contains_key(&seq) {
                return Err(EngineError::UnknownSequence(seq));
            }
            if !seen.insert(seq) {
                return Err(EngineError::InvalidStep(format!(
                    "sequence {seq} appears twice in one step"
                )));
            }
            if tokens.is_empty() {
                return Err(EngineError::InvalidStep(format!(
                    "sequence {seq} has no tokens"
                )));
            }
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange { token: t, vocab });
            }
        }
        if !any {
            return Err(EngineError::InvalidStep("empty step".into()));
        }
        Ok(())
    }
}

/// Copies logits rows to the host, one `Vec` per row.
pub fn logits_to_host<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<Vec<f32>>> {
    let [rows, vocab] = logits.dims();
    let flat = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| EngineError::Backend(format!("{e:?}")))?;
    Ok((0..rows)
        .map(|r| flat[r * vocab..(r + 1) * vocab].to_vec())
        .collect())
}

/// Row-wise argmax on the device; only the indices cross to the host.
pub fn argmax_rows<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<u32>> {
    let idx = logits.argmax(1);
    let v = idx
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| EngineError::Backend(format!("{e:?}")))?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

impl<B: KernelBackend> Engine<B> {
    /// [`Verifier::verify`], on the backend's workers.
    fn verify_on_workers(&mut self, works: &[VerifyWork]) -> Result<Vec<VerifyOutcome>> {
        for w in works {
            if let Some(p) = &w.draft_probs {
                if p.len() != w.draft.len() {
                    return Err(EngineError::InvalidStep(format!(
                        "sequence {}: {} draft distributions for {} drafted tokens",
                        w.seq,
                        p.len(),
                        w.draft.len()
                    )));
                }
            }
            if !w.sample && !w.draft.is_empty() {
                return Err(EngineError::InvalidStep(format!(
                    "sequence {}: drafts need a sampled position",
                    w.seq
                )));
            }
        }
        let items: Vec<StepItem> = works
            .iter()
            .map(|w| StepItem {
                seq: w.seq,
                tokens: w.fed.iter().chain(&w.draft).copied().collect(),
                logit_rows: if w.sample { w.draft.len() + 1 } else { 0 },
            })
            .collect();
        let step = self.step_hidden(&items)?;
        // Acceptance runs on the device; two integers per sampled work come back. A greedy
        // step on a backend with a greedy head needs no logits at all: one token per row.
        let sampled = || works.iter().filter(|w| w.sample);
        let verdicts: Vec<BlockVerdict> = match step.head {
            None => Vec::new(),
            Some(h) if sampled().all(|w| w.params.is_greedy()) => {
                let blocks: Vec<DraftBlock<'_>> =
                    sampled().map(|w| DraftBlock { drafts: &w.draft }).collect();
                match self.model.head_argmax(h.clone()) {
                    Some(tokens) => verdicts_from_argmax(&tokens, &blocks),
                    None => B::greedy_accept(self.model.logits(h), &blocks),
                }
            }
            Some(h) => {
                let l = self.model.logits(h);
                let uniforms = self.draw_uniforms(works);
                let blocks: Vec<SampledBlock<'_>> = sampled()
                    .zip(&uniforms)
                    .map(|(w, (accept_u, draw_u))| SampledBlock {
                        drafts: &w.draft,
                        draft_probs: w.draft_probs.as_deref(),
                        temperature: w.params.temperature.max(0.0),
                        top_p: w.params.top_p,
                        accept_u,
                        draw_u: *draw_u,
                    })
                    .collect();
                B::sampled_accept(l, &blocks)
            }
        };
        let mut verdicts = verdicts.iter();
        let mut outcomes = Vec::with_capacity(works.len());
        let mut keeps = Vec::with_capacity(works.len());
        for (i, w) in works.iter().enumerate() {
            let acceptance = w.sample.then(|| {
                let v = verdicts.next().expect("one verdict per sampled work");
                let mut tokens = w.draft[..v.accepted].to_vec();
                tokens.push(v.token);
                Acceptance {
                    accepted: v.accepted,
                    tokens,
                }
            });
            let acceptance = acceptance.map(|a| a.stop_at(&w.stop));
            let accepted = acceptance.as_ref().map_or(0, |a| a.accepted);
            let keep = w.fed.len() + accepted;
            keeps.push(keep);
            let hidden = step.captured[i]
                .iter()
                .map(|t| {
                    let d = t.dims()[1];
                    logits_to_host(t.clone().slice([0..keep, 0..d]))
                })
                .collect::<Result<Vec<_>>>()?;
            outcomes.push(VerifyOutcome {
                seq: w.seq,
                accepted,
                tokens: acceptance.map(|a| a.tokens).unwrap_or_default(),
                hidden,
            });
        }
        self.resolve_step(&step.kv, &items, &keeps)?;
        Ok(outcomes)
    }
}

impl<B: KernelBackend> Verifier for Engine<B>
where
    B::Device: Send,
{
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> Result<()> {
        if self.seqs.contains_key(&seq) {
            return Err(EngineError::DuplicateSequence(seq));
        }
        let positions = self.model.config.max_position_embeddings;
        if spec.capacity() > positions {
            return Err(EngineError::WindowPastPositions {
                capacity: spec.capacity(),
                positions,
            });
        }
        let window = self.model.new_window(spec, self.pool.alloc(spec));
        self.insert(seq, window, seed);
        Ok(())
    }

    fn fork(&mut self, from: SeqId, seq: SeqId, seed: u64) -> Result<()> {
        if self.seqs.contains_key(&seq) {
            return Err(EngineError::DuplicateSequence(seq));
        }
        let source = &self
            .seqs
            .get(&from)
            .ok_or(EngineError::UnknownSequence(from))?
            .window;
        let (spec, from_slot, held) = (source.spec(), source.slot(), source.logical_slots());
        let slot = self.pool.alloc(spec);
        let window = match source.forked(slot) {
            Ok(w) => w,
            Err(e) => {
                self.pool.release(spec, slot);
                return Err(e);
            }
        };
        self.pool.copy_positions(spec, from_slot, slot, &held);
        self.insert(seq, window, seed);
        Ok(())
    }

    fn reseed(&mut self, seq: SeqId, seed: u64) -> Result<()> {
        self.seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?
            .rng = StdRng::seed_from_u64(seed);
        Ok(())
    }

    fn close(&mut self, seq: SeqId) -> Result<()> {
        let state = self
            .seqs
            .remove(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        self.pool.release(state.window.spec(), state.window.slot());
        Ok(())
    }

    fn verify(&mut self, works: &[VerifyWork]) -> Result<Vec<VerifyOutcome>> {
        B::on_workers(|| self.verify_on_workers(works))
    }

    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        let c = &self.model.config;
        crate::window::window_bytes(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            spec,
            self.model.dtype,
        )
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.model.config.max_position_embeddings)
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn set_hidden_layers(&mut self, layers: Vec<usize>) {
        self.set_capture(layers);
    }

    fn window_fill(&self, seq: SeqId) -> Option<(u64, usize)> {
        self.seqs
            .get(&seq)
            .map(|s| (s.window.seen(), s.window.len()))
    }
}

impl<B: KernelBackend> Engine<B> {
    /// Opens `seq` with `window`, sampling from `seed`.
    fn insert(&mut self, seq: SeqId, window: KvWindow<B>, seed: u64) {
        let rng = StdRng::seed_from_u64(seed);
        self.seqs.insert(seq, SeqState { window, rng });
    }

    /// The uniforms device-side acceptance consumes for each sampled work, from its sequence's
    /// generator: one per draft, then one for the token the block adds. Greedy works draw none.
    fn draw_uniforms(&mut self, works: &[VerifyWork]) -> Vec<(Vec<f32>, f32)> {
        works
            .iter()
            .filter(|w| w.sample)
            .map(|w| {
                if w.params.is_greedy() {
                    return (vec![0.0; w.draft.len()], 0.0);
                }
                let rng = &mut self.seqs.get_mut(&w.seq).expect("present after step").rng;
                let accept_u = (0..w.draft.len()).map(|_| rng.random()).collect();
                (accept_u, rng.random())
            })
            .collect()
    }
}

/// Sampling parameters that cannot be honoured.
pub fn check_params(params: &SamplingParams) -> Result<()> {
    if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
        return Err(EngineError::InvalidStep(format!(
            "temperature {} is not a finite non-negative number",
            params.temperature
        )));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(EngineError::InvalidStep(format!(
            "top_p {} is outside (0, 1]",
            params.top_p
        )));
    }
    Ok(())
}
