//! A block drafter (DFlash-style): drafts a whole block in one forward, conditioned on the
//! verifier's hidden states.
//!
//! Each sequence's block is `[anchor, known…, MASK…]`: the anchor is the first token whose
//! verifier states the drafter has not been given (the verifier's latest own token), any further
//! known tokens follow it (the block still in flight, when the order is pipelined), and masked
//! rows fill the block; the drafts are the head's argmax at the first masked rows. The context is
//! the fused states of every position before the anchor, kept per sequence in a bounded window
//! ([`ContextWindow`]) whose bytes count in the session's reservation.
//!
//! Drafts are deterministic (one-hot proposals): under sampling the verifier's rejection sampling
//! keeps the output distribution exact, and sampling each block position independently would
//! only lower acceptance.

mod context;
mod model;
mod spec;
#[cfg(feature = "train")]
pub mod train;
mod weights;

use std::collections::HashMap;

use burn::prelude::*;
use troupe_kernels::KernelBackend;

pub use context::{context_bytes, ContextWindow};
pub use model::{BlockInputs, BlockModel, LayerContext};
pub use spec::{BlockSpec, CONFIG_KEY};
pub use weights::{drafter_from_verifier, is_block_drafter, load_block_model, save_block_drafter};

use crate::drafter::{Draft, DraftRequest, Drafter, HiddenStates};
use crate::engine::{argmax_rows, logits_to_host};
use crate::error::{EngineError, Result};
use crate::verifier::SeqId;
use crate::window::WindowSpec;

#[derive(Clone)]
struct Track<B: Backend> {
    /// Tokens from position `base` of the sequence on.
    tokens: Vec<u32>,
    base: usize,
    /// Positions whose verifier states the context has taken (or skipped): the anchor's.
    featured: usize,
    ctx: ContextWindow<B>,
}

impl<B: Backend> Track<B> {
    /// The tokens from the anchor on.
    fn unfeatured(&self) -> &[u32] {
        let from = self
            .featured
            .saturating_sub(self.base)
            .min(self.tokens.len());
        &self.tokens[from..]
    }
}

/// A block drafter serving many sequences, one batched forward per call to `draft`.
pub struct BlockDrafter<B: Backend> {
    model: BlockModel<B>,
    tracks: HashMap<SeqId, Track<B>>,
}

/// One block of a batched forward: which request, its rows' tokens, and how many drafts it reads.
struct Planned {
    request: usize,
    known: Vec<u32>,
    drafts: usize,
}

impl<B: KernelBackend> BlockDrafter<B> {
    /// Drafts with `model`.
    pub fn new(model: BlockModel<B>) -> Self {
        Self {
            model,
            tracks: HashMap::new(),
        }
    }

    /// The network.
    pub fn model(&self) -> &BlockModel<B> {
        &self.model
    }

    /// Rows of the context of `seq`, if it is open.
    pub fn context_len(&self, seq: SeqId) -> Option<usize> {
        self.tracks.get(&seq).map(|t| t.ctx.len())
    }

    /// One batched forward over the blocks of `requests`: the blocks planned (requests that
    /// can draft nothing have none) and the logits of their drafted rows, blocks in order.
    fn forward_blocks(
        &mut self,
        requests: &[DraftRequest],
    ) -> Result<Option<(Vec<Planned>, Tensor<B, 2>)>> {
        let most = self.model.spec.block_size;
        let mut plans = Vec::new();
        let mut seqs = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let t = self
                .tracks
                .get(&r.seq)
                .ok_or(EngineError::UnknownSequence(r.seq))?;
            let mut known = t.unfeatured().to_vec();
            known.extend_from_slice(&r.assumed);
            // An anchor is needed, and room for at least one masked row.
            if known.is_empty() || known.len() >= most || r.k == 0 {
                continue;
            }
            let drafts = r.k.min(most - known.len());
            plans.push(Planned {
                request: i,
                known,
                drafts,
            });
            seqs.push(r.seq);
        }
        if plans.is_empty() {
            return Ok(None);
        }
        let b = plans.len();
        let (ctx, lens, anchors) = self.batch_context(&seqs);
        let longest = lens.iter().copied().max().unwrap_or(0);
        let device = self.model.stack.device.clone();
        // A block is its anchor, known tokens and one mask per draft; the batch runs the longest
        // block's rows for every block, rows past a block's own length absent (seen by nothing).
        let block = plans
            .iter()
            .map(|p| p.known.len() + p.drafts)
            .max()
            .unwrap_or(1);
        let mut rows = Vec::with_capacity(b * block);
        let mut positions = Vec::with_capacity(b * block);
        let mut mask = Vec::with_capacity(b * block * (longest + block));
        for ((p, &n), &anchor) in plans.iter().zip(&lens).zip(&anchors) {
            let len = p.known.len() + p.drafts;
            rows.extend(p.known.iter().map(|&t| Some(t)));
            rows.extend(std::iter::repeat_n(None, block - p.known.len()));
            positions.extend(anchor..anchor + block);
            for _ in 0..block {
                mask.extend((0..longest).map(|c| if c < n { 0.0 } else { f32::NEG_INFINITY }));
                mask.extend((0..block).map(|c| if c < len { 0.0 } else { f32::NEG_INFINITY }));
            }
        }
        let (cos, sin) = self.model.rope_rows(&positions);
        let hd = self.model.stack.config.head_dim;
        let inputs = BlockInputs {
            ctx,
            rope: (cos.reshape([b, block, hd]), sin.reshape([b, block, hd])),
            mask: Tensor::from_data(TensorData::new(mask, [b, block, longest + block]), &device),
        };
        let x = self.model.block_inputs(&rows, b);
        let hidden = self.model.forward(x, &inputs);
        let h = self.model.stack.config.hidden_size;
        let picked: Vec<i64> = plans
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                let first = i * block + p.known.len();
                (first..first + p.drafts).map(|r| r as i64)
            })
            .collect();
        let n = picked.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(picked, [n]), &device);
        let hidden = hidden.reshape([b * block, h]).select(0, idx);
        Ok(Some((plans, self.model.logits(hidden))))
    }

    /// The logits each request's drafts are the argmax of, one row per draft (none for a request
    /// that can draft nothing).
    pub fn draft_logits(&mut self, requests: &[DraftRequest]) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut out = vec![Vec::new(); requests.len()];
        let Some((plans, logits)) = self.forward_blocks(requests)? else {
            return Ok(out);
        };
        let mut rows = logits_to_host(logits)?.into_iter();
        for p in plans {
            out[p.request] = rows.by_ref().take(p.drafts).collect();
        }
        Ok(out)
    }

    fn track(&mut self, seq: SeqId) -> Result<&mut Track<B>> {
        self.tracks
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))
    }

    /// The context of every planned block, per layer (keys `[batch, kv_heads, head_dim,
    /// longest]`, values `[batch, kv_heads, longest, head_dim]`, shorter ones padded), each
    /// block's rows held, and its anchor's position (rows its context ever took).
    fn batch_context(
        &self,
        seqs: &[SeqId],
    ) -> (Option<Vec<LayerContext<B>>>, Vec<usize>, Vec<usize>) {
        let ctxs: Vec<&ContextWindow<B>> = seqs.iter().map(|s| &self.tracks[s].ctx).collect();
        let lens: Vec<usize> = ctxs.iter().map(|c| c.len()).collect();
        let anchors = ctxs.iter().map(|c| c.seen() as usize).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        if longest == 0 {
            return (None, lens, anchors);
        }
        let c = &self.model.stack.config;
        let (kvh, hd) = (c.num_kv_heads, c.head_dim);
        let device = &self.model.stack.device;
        // Keys grow along their last dimension, values along their middle one.
        let pad = |t: Option<&Tensor<B, 3>>, n: usize, dim: usize| -> Tensor<B, 4> {
            let zeros = |rows: usize| {
                let shape = if dim == 2 {
                    [kvh, hd, rows]
                } else {
                    [kvh, rows, hd]
                };
                Tensor::zeros(shape, device)
            };
            let t = match t {
                Some(t) if n == longest => t.clone(),
                Some(t) => Tensor::cat(vec![t.clone(), zeros(longest - n)], dim),
                None => zeros(longest),
            };
            t.unsqueeze_dim(0)
        };
        let layers = (0..c.num_layers)
            .map(|l| {
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for (ctx, &n) in ctxs.iter().zip(&lens) {
                    let held = ctx.layers().get(l);
                    ks.push(pad(held.map(|(k, _)| k), n, 2));
                    vs.push(pad(held.map(|(_, v)| v), n, 1));
                }
                let cat = |t: Vec<Tensor<B, 4>>| {
                    if t.len() == 1 {
                        t.into_iter().next().expect("one")
                    } else {
                        Tensor::cat(t, 0)
                    }
                };
                (cat(ks), cat(vs))
            })
            .collect();
        (Some(layers), lens, anchors)
    }
}

impl<B: KernelBackend> Drafter for BlockDrafter<B>
where
    B::Device: Send,
{
    fn name(&self) -> &str {
        "block"
    }

    fn open(&mut self, seq: SeqId, spec: WindowSpec, _seed: u64) -> Result<()> {
        if self.tracks.contains_key(&seq) {
            return Err(EngineError::DuplicateSequence(seq));
        }
        self.tracks.insert(
            seq,
            Track {
                tokens: Vec::new(),
                base: 0,
                featured: 0,
                ctx: ContextWindow::new(spec),
            },
        );
        Ok(())
    }

    fn close(&mut self, seq: SeqId) {
        self.tracks.remove(&seq);
    }

    fn fork(
        &mut self,
        from: SeqId,
        seq: SeqId,
        spec: WindowSpec,
        seed: u64,
        history: &[u32],
    ) -> Result<()> {
        let Some(source) = self.tracks.get(&from).cloned() else {
            self.open(seq, spec, seed)?;
            return self.observe(seq, history);
        };
        if self.tracks.contains_key(&seq) {
            return Err(EngineError::DuplicateSequence(seq));
        }
        // The context's tensors are shared until either side appends (appending makes new ones).
        self.tracks.insert(seq, source);
        Ok(())
    }

    fn observe(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        self.track(seq)?.tokens.extend_from_slice(tokens);
        Ok(())
    }

    fn observe_hidden(&mut self, seq: SeqId, from: usize, hidden: &[Vec<Vec<f32>>]) -> Result<()> {
        self.observe_hidden_many(&[HiddenStates { seq, from, hidden }])
    }

    /// Every sequence's new rows go through one fused projection; each context then takes its
    /// own slice.
    fn observe_hidden_many(&mut self, states: &[HiddenStates<'_>]) -> Result<()> {
        let taps = self.model.spec.target_layer_ids.len();
        let h = self.model.spec.verifier_hidden_size;
        let mut first_error = None;
        let mut flat = Vec::new();
        let mut positions = Vec::new();
        // (sequence, new rows, position after them)
        let mut plan: Vec<(SeqId, usize, usize)> = Vec::new();
        for s in states {
            let Some(t) = self.tracks.get(&s.seq) else {
                first_error.get_or_insert(EngineError::UnknownSequence(s.seq));
                continue;
            };
            let rows = s.hidden.first().map_or(0, Vec::len);
            let well_formed = s.hidden.len() == taps
                && s.hidden
                    .iter()
                    .all(|l| l.len() == rows && l.iter().all(|r| r.len() == h));
            if !well_formed {
                first_error.get_or_insert(EngineError::InvalidStep(format!(
                    "hidden states of sequence {} are not {taps} layers of equal rows {h} wide",
                    s.seq
                )));
                continue;
            }
            let end = s.from + rows;
            if end <= t.featured {
                continue; // positions it has (a replay after a verifier restart)
            }
            // Positions before `from` it was never given (after a restart of its own) stay out
            // of its context, as evicted ones do.
            let skip = t.featured.saturating_sub(s.from);
            for r in skip..rows {
                for layer in s.hidden {
                    flat.extend_from_slice(&layer[r]);
                }
            }
            let seen = t.ctx.seen() as usize;
            positions.extend(seen..seen + rows - skip);
            plan.push((s.seq, rows - skip, end));
        }
        if !plan.is_empty() {
            let n = positions.len();
            let device = &self.model.stack.device;
            let tapped = Tensor::from_data(TensorData::new(flat, [n, taps * h]), device);
            let layers = self.model.context(self.model.fuse(tapped), 1, &positions);
            let mut offset = 0;
            for (seq, rows, end) in plan {
                let slice = layers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone().narrow(3, offset, rows).squeeze_dim(0),
                            v.clone().narrow(2, offset, rows).squeeze_dim(0),
                        )
                    })
                    .collect();
                offset += rows;
                let t = self.tracks.get_mut(&seq).expect("planned above");
                t.ctx.push(slice);
                t.featured = end;
                let drop = t.featured.saturating_sub(t.base).min(t.tokens.len());
                t.tokens.drain(..drop);
                t.base += drop;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn draft(&mut self, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        let mut out: Vec<Draft> = requests.iter().map(|_| Draft::default()).collect();
        let Some((plans, logits)) = self.forward_blocks(requests)? else {
            return Ok(out);
        };
        let mut tokens = argmax_rows(logits)?.into_iter();
        for p in plans {
            out[p.request].tokens = tokens.by_ref().take(p.drafts).collect();
        }
        Ok(out)
    }

    fn hidden_layers(&self) -> Vec<usize> {
        self.model.spec.target_layer_ids.clone()
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.stack.config.vocab_size)
    }

    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        let c = &self.model.stack.config;
        context_bytes(c.num_layers, c.num_kv_heads * c.head_dim, spec)
    }
}
