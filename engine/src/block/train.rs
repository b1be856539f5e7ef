//! Training a block drafter on its verifier's own greedy continuations (DFlash's recipe): the
//! verifier continues corpus prompts and reports the states of the layers the drafter taps; the
//! drafter learns to fill blocks after many random anchors per sequence, each seeing only the
//! context before its anchor, with the loss of the k-th masked position weighted by
//! `exp(−(k − 1)/γ)`.
//!
//! Blocks are trained as they are drafted: with the anchor alone, and (for pipelined orders) with
//! a few more known tokens after it whose states the drafter does not have yet.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use troupe_kernels::KernelBackend;

use crate::block::model::{BlockInputs, BlockModel};
use crate::engine::argmax_rows;
use crate::error::{EngineError, Result};
use crate::model::{LinearWeight, Model};
use crate::sampling::SamplingParams;
use crate::train::{as_row, layer_params, layer_with, scalar, AdamW};
use crate::verifier::{Verifier, VerifyWork};
use crate::window::WindowSpec;

/// Settings of a block drafter's training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockTrainConfig {
    /// Drafter layers.
    pub layers: usize,
    /// Verifier layers tapped; empty: [`default_taps`].
    pub taps: Vec<usize>,
    /// Rows of a block (drafts at most `block_size − 1` tokens).
    pub block_size: usize,
    /// Training sequences the verifier generates.
    pub sequences: usize,
    /// Held-out sequences for validation.
    pub val_sequences: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Tokens the verifier generates per sequence.
    pub gen_len: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Anchors per sequence per step.
    pub anchors: usize,
    /// Most known tokens after the anchor in a training block (as a pipelined order has).
    pub max_known: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Decoupled weight decay on matrices.
    pub weight_decay: f64,
    /// Decay of the loss weight over block positions.
    pub gamma: f64,
    /// Seed of prompts, anchors and batches.
    pub seed: u64,
}

impl Default for BlockTrainConfig {
    fn default() -> Self {
        Self {
            layers: 2,
            taps: Vec::new(),
            block_size: 17,
            sequences: 768,
            val_sequences: 48,
            prompt_len: 64,
            gen_len: 192,
            steps: 1200,
            batch: 8,
            anchors: 16,
            max_known: 8,
            lr: 2e-3,
            warmup: 50,
            weight_decay: 0.01,
            gamma: 7.0,
            seed: 0,
        }
    }
}

impl BlockTrainConfig {
    /// Learning rate at `step`: linear warm-up, then cosine down to a tenth.
    pub fn lr_at(&self, step: usize) -> f64 {
        crate::train::TrainConfig {
            steps: self.steps,
            lr: self.lr,
            warmup: self.warmup,
            ..Default::default()
        }
        .lr_at(step)
    }
}

/// Taps spread from shallow to deep over a verifier of `layers` layers, the last always among
/// them: three where there are that many.
pub fn default_taps(layers: usize) -> Vec<usize> {
    let mut taps: Vec<usize> = match layers {
        0 => Vec::new(),
        1..=3 => (0..layers).collect(),
        n => vec![0, n / 2, n - 1],
    };
    taps.dedup();
    taps
}

/// One generated sequence: prompt and continuation, and the tapped states of every position but
/// the last (which the verifier never read).
#[derive(Debug, Clone)]
pub struct Sample {
    /// Prompt then continuation.
    pub tokens: Vec<u32>,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// `[tokens − 1][taps × hidden]`, row-major.
    pub states: Vec<f32>,
}

/// Generated sequences of one length, with the width of their state rows.
#[derive(Debug, Clone)]
pub struct Samples {
    /// The sequences.
    pub samples: Vec<Sample>,
    /// `taps × hidden`.
    pub width: usize,
}

/// `n` prompts of `len` tokens from `ids`, each starting after a newline where one is near.
pub fn corpus_prompts(
    ids: &[u32],
    newline: Option<u32>,
    n: usize,
    len: usize,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    if ids.len() < len * 4 {
        return Err(EngineError::InvalidConfig(format!(
            "{} corpus tokens are too few for {len}-token prompts",
            ids.len()
        )));
    }
    Ok((0..n)
        .map(|_| {
            let mut at = rng.random_range(0..ids.len() - 2 * len);
            if let Some(nl) = newline {
                if let Some(p) = ids[at..at + len].iter().position(|&t| t == nl) {
                    at += p + 1;
                }
            }
            ids[at..at + len].to_vec()
        })
        .collect())
}

/// Greedy continuations of `prompts` by `verifier`, `gen_len` tokens each, `batch` sequences per
/// step, with the states of the layers `taps` names. `progress` hears the sequences done.
pub fn generate_samples(
    verifier: &mut dyn Verifier,
    taps: &[usize],
    prompts: &[Vec<u32>],
    gen_len: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Samples> {
    verifier.set_hidden_layers(taps.to_vec());
    let mut samples = Vec::with_capacity(prompts.len());
    let mut width = 0;
    for (chunk_no, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let seqs: Vec<u64> = (0..chunk.len())
            .map(|i| (chunk_no * batch + i) as u64)
            .collect();
        let longest = chunk.iter().map(Vec::len).max().unwrap_or(0) + gen_len;
        let spec = WindowSpec::new(4, longest)?;
        for &s in &seqs {
            verifier.open(s, spec, 0)?;
        }
        let mut tokens: Vec<Vec<u32>> = chunk.to_vec();
        let mut states: Vec<Vec<f32>> = vec![Vec::new(); chunk.len()];
        let mut fed: Vec<Vec<u32>> = chunk.to_vec();
        let run = (|| -> Result<()> {
            for _ in 0..gen_len {
                let works: Vec<VerifyWork> = seqs
                    .iter()
                    .zip(&mut fed)
                    .map(|(&seq, f)| VerifyWork {
                        seq,
                        fed: std::mem::take(f),
                        draft: Vec::new(),
                        draft_probs: None,
                        sample: true,
                        params: SamplingParams::greedy(),
                        stop: Vec::new(),
                    })
                    .collect();
                for (i, o) in verifier.verify(&works)?.into_iter().enumerate() {
                    let rows = o.hidden.first().map_or(0, Vec::len);
                    for r in 0..rows {
                        for layer in &o.hidden {
                            states[i].extend_from_slice(&layer[r]);
                        }
                    }
                    let next = *o.tokens.first().ok_or_else(|| {
                        EngineError::Backend("a greedy step emitted no token".into())
                    })?;
                    tokens[i].push(next);
                    fed[i] = vec![next];
                }
            }
            Ok(())
        })();
        for &s in &seqs {
            let _ = verifier.close(s);
        }
        run?;
        for ((t, s), p) in tokens.into_iter().zip(states).zip(chunk) {
            width = s.len() / (t.len() - 1);
            samples.push(Sample {
                tokens: t,
                prompt_len: p.len(),
                states: s,
            });
        }
        progress(samples.len());
    }
    verifier.set_hidden_layers(Vec::new());
    Ok(Samples { samples, width })
}

/// One training block: which sample, its anchor, the known tokens after it, and its rows.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    /// Index into the samples.
    pub sample: usize,
    /// Position of the anchor.
    pub at: usize,
    /// Known tokens after the anchor.
    pub known: usize,
    /// Rows of the block (anchor, known tokens, masks), at most the drafter's block size: a
    /// draft of `k` tokens runs a block of `1 + known + k` rows.
    pub len: usize,
}

/// Blocks of several samples laid out for one forward: `anchors` per sample, in sample order.
pub struct BlockBatch<B: Backend> {
    states: Tensor<B, 2>,
    rows: Vec<Option<u32>>,
    positions: Vec<usize>,
    mask: Tensor<B, 3>,
    targets: Vec<i64>,
    weights: Vec<f32>,
    batch: usize,
    ctx: usize,
}

/// Lays out `anchors` (grouped by sample, the same number for each of `samples`' ids in
/// `which`) for one forward, `block` rows each. A block row sees the context strictly before its
/// anchor and every row of its own block; its target is the token at its position, weighted
/// where it is masked. Rows past a block's `len` are absent: nothing sees them, nothing is
/// learned from them.
pub fn block_batch<B: Backend>(
    data: &Samples,
    which: &[usize],
    anchors: &[Anchor],
    block: usize,
    gamma: f64,
    device: &B::Device,
) -> BlockBatch<B> {
    let b = which.len();
    let per = anchors.len() / b.max(1);
    let rows_per = per * block;
    let ctx = data.samples[which[0]].tokens.len() - 1;
    let w = data.width;
    let mut states = Vec::with_capacity(b * ctx * w);
    for &s in which {
        states.extend_from_slice(&data.samples[s].states[..ctx * w]);
    }
    let mut rows = Vec::with_capacity(b * rows_per);
    let mut positions = Vec::with_capacity(b * rows_per);
    let mut targets = Vec::with_capacity(b * rows_per);
    let mut weights = Vec::with_capacity(b * rows_per);
    let mut mask = Vec::with_capacity(b * rows_per * (ctx + rows_per));
    for (i, &s) in which.iter().enumerate() {
        let tokens = &data.samples[s].tokens;
        for (n, a) in anchors[i * per..(i + 1) * per].iter().enumerate() {
            debug_assert_eq!(a.sample, s);
            for r in 0..block {
                let pos = a.at + r;
                let masked = r > a.known;
                rows.push((!masked).then(|| tokens[pos]));
                positions.push(pos);
                targets.push(tokens[pos] as i64);
                weights.push(if masked && r < a.len {
                    (-((r - a.known - 1) as f64) / gamma).exp() as f32
                } else {
                    0.0
                });
                mask.extend((0..ctx).map(|c| if c < a.at { 0.0 } else { f32::NEG_INFINITY }));
                for m in 0..per {
                    mask.extend((0..block).map(|c| {
                        if m == n && c < a.len {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    }));
                }
            }
        }
    }
    BlockBatch {
        states: Tensor::from_data(TensorData::new(states, [b * ctx, w]), device),
        rows,
        positions,
        mask: Tensor::from_data(TensorData::new(mask, [b, rows_per, ctx + rows_per]), device),
        targets,
        weights,
        batch: b,
        ctx,
    }
}

/// Random anchors for training: `per` per sample, in the continuation, each with no known token
/// after it half the time and otherwise up to `max_known`, and a block of any length that drafts
/// at least one token.
pub fn random_anchors(
    data: &Samples,
    which: &[usize],
    per: usize,
    block: usize,
    max_known: usize,
    rng: &mut StdRng,
) -> Vec<Anchor> {
    let mut out = Vec::with_capacity(which.len() * per);
    for &s in which {
        let sample = &data.samples[s];
        let last = sample.tokens.len() - block;
        for _ in 0..per {
            let known = if max_known == 0 || rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(1..=max_known.min(block - 2))
            };
            out.push(Anchor {
                sample: s,
                at: rng.random_range(sample.prompt_len.min(last)..=last),
                known,
                len: rng.random_range(known + 2..=block),
            });
        }
    }
    out
}

impl<B: KernelBackend> BlockModel<B> {
    /// Final-normed hidden states `[rows, hidden]` of a batch's block rows.
    fn batch_hidden(&self, batch: BlockBatch<B>) -> (Tensor<B, 2>, Vec<i64>, Vec<f32>) {
        let BlockBatch {
            states,
            rows,
            positions,
            mask,
            targets,
            weights,
            batch: b,
            ctx,
        } = batch;
        let context_positions: Vec<usize> = (0..ctx).collect();
        let hd = self.stack.config.head_dim;
        let r = rows.len() / b.max(1);
        let (cos, sin) = self.rope_rows(&positions);
        let inputs = BlockInputs {
            ctx: Some(self.context(self.fuse(states), b, &context_positions)),
            rope: (cos.reshape([b, r, hd]), sin.reshape([b, r, hd])),
            mask,
        };
        let x = self.block_inputs(&rows, b);
        let hidden = self.forward(x, &inputs);
        let [_, r, h] = hidden.dims();
        (hidden.reshape([b * r, h]), targets, weights)
    }

    /// Logits `[blocks × block_size, vocab]` of every row of a batch, blocks in order.
    pub fn batch_logits(&self, batch: BlockBatch<B>) -> Tensor<B, 2> {
        self.logits(self.batch_hidden(batch).0)
    }

    /// The weighted cross-entropy (nats per weighted position) of a batch.
    pub fn block_loss(&self, batch: BlockBatch<B>) -> Tensor<B, 1> {
        let device = self.stack.device.clone();
        let (hidden, targets, weights) = self.batch_hidden(batch);
        let n = targets.len();
        let total: f32 = weights.iter().sum();
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
        let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [n, 1]), &device);
        let logp = log_softmax(self.logits(hidden), 1).gather(1, targets);
        (logp * weights).sum().div_scalar(total.max(1e-6)).neg()
    }

    /// For each block of a batch laid out `block` rows a block, how many of its masked rows in a
    /// row the head's argmax gets right (the drafts a greedy verifier would accept).
    pub fn accepted_runs(&self, batch: BlockBatch<B>, block: usize) -> Result<Vec<usize>> {
        let (hidden, targets, weights) = self.batch_hidden(batch);
        let picked = argmax_rows(self.logits(hidden))?;
        Ok(picked
            .chunks(block)
            .zip(targets.chunks(block).zip(weights.chunks(block)))
            .map(|(p, (t, w))| {
                p.iter()
                    .zip(t)
                    .zip(w)
                    .filter(|(_, &w)| w > 0.0)
                    .take_while(|((&p, &t), _)| p as i64 == t)
                    .count()
            })
            .collect())
    }
}

/// Acceptance measured on held-out sequences.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Validation {
    /// Per draft length `k` (4, 8 and the block's most): the mean drafts a greedy verifier
    /// accepts from a block of `1 + k` rows, and the fraction of blocks whose first `n + 1`
    /// drafts are all right, for each `n < k`.
    pub by_draft_len: Vec<(usize, f64, Vec<f64>)>,
}

impl Validation {
    /// The mean accepted drafts at draft length `k`, if it was measured.
    pub fn mean_accepted(&self, k: usize) -> Option<f64> {
        self.by_draft_len
            .iter()
            .find(|(len, _, _)| *len == k)
            .map(|(_, m, _)| *m)
    }
}

/// Greedy acceptance of `model` on `data`: blocks of the anchor alone and `k` masks, every
/// `stride` positions of each continuation, at draft lengths 4, 8 and the block's most.
pub fn validate<B: KernelBackend>(
    model: &BlockModel<B>,
    data: &Samples,
    stride: usize,
    batch: usize,
) -> Result<Validation> {
    let block = model.spec.block_size;
    let mut lens: Vec<usize> = [4, 8, block - 1]
        .into_iter()
        .filter(|&k| k < block)
        .collect();
    lens.dedup();
    let mut by_draft_len = Vec::new();
    for k in lens {
        let mut runs = Vec::new();
        let ids: Vec<usize> = (0..data.samples.len()).collect();
        for which in ids.chunks(batch.max(1)) {
            let s0 = &data.samples[which[0]];
            let starts: Vec<usize> = (s0.prompt_len..=s0.tokens.len() - block)
                .step_by(stride.max(1))
                .collect();
            let anchors: Vec<Anchor> = which
                .iter()
                .flat_map(|&s| {
                    starts.iter().map(move |&at| Anchor {
                        sample: s,
                        at,
                        known: 0,
                        len: k + 1,
                    })
                })
                .collect();
            let b = block_batch::<B>(data, which, &anchors, k + 1, 7.0, &model.stack.device);
            runs.extend(model.accepted_runs(b, k + 1)?);
        }
        let n = runs.len().max(1) as f64;
        let mean = runs.iter().sum::<usize>() as f64 / n;
        let at_least = (0..k)
            .map(|j| runs.iter().filter(|&&r| r > j).count() as f64 / n)
            .collect();
        by_draft_len.push((k, mean, at_least));
    }
    Ok(Validation { by_draft_len })
}

/// Every trainable tensor of a drafter viewed as 2-D, with whether weight decay applies; the
/// embedding and head are the verifier's and stay frozen.
fn block_params<B: Backend>(m: &BlockModel<B>) -> Vec<(Tensor<B, 2>, bool)> {
    let mut out = vec![
        (m.fc.weight.to_float(), true),
        as_row(&m.hidden_norm),
        as_row(&m.mask),
    ];
    for l in &m.stack.layers {
        layer_params(l, &mut out);
    }
    out.push(as_row(&m.stack.norm));
    out
}

/// A drafter shaped like `m` from tensors in [`block_params`] order, with `embed` and `head`.
fn block_with<B: KernelBackend, C: KernelBackend>(
    m: &BlockModel<B>,
    new: Vec<Tensor<C, 2>>,
    embed: Tensor<C, 2>,
    head: Option<LinearWeight<C>>,
) -> BlockModel<C> {
    let device = embed.device();
    let mut it = new.into_iter();
    let mut mat = || it.next().expect("as many tensors as parameters");
    let fc = crate::model::Linear {
        weight: LinearWeight::Float(mat()),
        bias: None,
    };
    let hidden_norm = mat().squeeze_dim(0);
    let mask = mat().squeeze_dim(0);
    let layers = m
        .stack
        .layers
        .iter()
        .map(|l| layer_with(l, &mut mat))
        .collect();
    let norm = mat().squeeze_dim(0);
    let stack = Model::from_parts(m.stack.config.clone(), embed, layers, norm, head, device);
    BlockModel::new(m.spec.clone(), stack, fc, hidden_norm, mask)
}

/// The same drafter with its trainable tensors requiring gradients (embedding and head frozen).
pub fn trainable_block<B: AutodiffBackend + KernelBackend>(
    m: &BlockModel<B::InnerBackend>,
) -> BlockModel<B>
where
    B::InnerBackend: KernelBackend,
{
    let list = block_params(m)
        .into_iter()
        .map(|(t, _)| Tensor::<B, 2>::from_inner(t).require_grad())
        .collect();
    let embed = Tensor::from_inner(m.stack.embed.clone());
    let head = m
        .stack
        .lm_head
        .as_ref()
        .map(|h| LinearWeight::Float(Tensor::from_inner(h.to_float())));
    block_with(m, list, embed, head)
}

/// The same drafter on the backend without autodiff (for validation and saving).
pub fn inner_block<B: AutodiffBackend + KernelBackend>(
    m: &BlockModel<B>,
) -> BlockModel<B::InnerBackend>
where
    B::InnerBackend: KernelBackend,
{
    let list = block_params(m)
        .into_iter()
        .map(|(t, _)| t.inner())
        .collect();
    let head = m
        .stack
        .lm_head
        .as_ref()
        .map(|h| LinearWeight::Float(h.to_float().inner()));
    block_with(m, list, m.stack.embed.clone().inner(), head)
}

/// A drafter being trained and its optimizer.
pub struct BlockTrainer<B: AutodiffBackend + KernelBackend> {
    /// The drafter, its trainable tensors requiring gradients.
    pub model: BlockModel<B>,
    opt: AdamW<B>,
    /// The run's settings.
    pub cfg: BlockTrainConfig,
}

impl<B: AutodiffBackend + KernelBackend> BlockTrainer<B>
where
    B::InnerBackend: KernelBackend,
{
    /// Starts training `model` (on the backend without autodiff) with `cfg`.
    pub fn new(model: &BlockModel<B::InnerBackend>, cfg: BlockTrainConfig) -> Self {
        let model = trainable_block::<B>(model);
        let opt = AdamW::for_params(&block_params(&model));
        Self { model, opt, cfg }
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.opt.t
    }

    /// One optimizer step on a random batch of `data`; returns the batch loss (nats).
    pub fn step(&mut self, data: &Samples, rng: &mut StdRng) -> Result<f64> {
        let c = &self.cfg;
        let which: Vec<usize> = (0..c.batch)
            .map(|_| rng.random_range(0..data.samples.len()))
            .collect();
        let anchors = random_anchors(data, &which, c.anchors, c.block_size, c.max_known, rng);
        let device = self.model.stack.device.clone();
        let batch = block_batch::<B>(data, &which, &anchors, c.block_size, c.gamma, &device);
        let loss = self.model.block_loss(batch);
        let value = scalar(&loss)?;
        let lr = c.lr_at(self.opt.t);
        let updated = self
            .opt
            .update(block_params(&self.model), loss, lr, c.weight_decay);
        let embed = self.model.stack.embed.clone();
        let head = self.model.stack.lm_head.clone();
        self.model = block_with(&self.model, updated, embed, head);
        Ok(value)
    }

    /// The drafter as it stands, without autodiff.
    pub fn inner(&self) -> BlockModel<B::InnerBackend> {
        inner_block(&self.model)
    }
}
