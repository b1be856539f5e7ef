//! The `kernels` case's acceptance rows: one verify step's blocks decided on the device, two
//! integers per block back to the host, against the path that decision replaced: every logit row
//! read back and decided on the host (`troupe::engine::accept::accept_sampled`).
//!
//! Each row's logits peak at its draft, so every draft is accepted and both paths decide every
//! row (the host's loop would otherwise stop at the first rejection).

use burn::prelude::*;
use burn::tensor::Distribution;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use troupe::engine::accept::{accept_sampled, Acceptance};
use troupe::engine::SamplingParams;
use troupe::kernels::{BlockVerdict, DraftBlock, KernelBackend, SampledBlock};

/// Blocks, drafts and vocabulary of the acceptance rows.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AcceptShape {
    /// Blocks (sessions) in the step.
    pub blocks: usize,
    /// Drafts per block; each block has one logit row more.
    pub drafts: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// One step's logits and drafts, and the sampling parameters every block shares.
pub struct AcceptCase<B: Backend> {
    shape: AcceptShape,
    logits: Tensor<B, 2>,
    drafts: Vec<Vec<u32>>,
    params: SamplingParams,
    /// Per block: one uniform per draft, then the draw's.
    uniforms: Vec<Vec<f32>>,
}

impl<B: KernelBackend> AcceptCase<B> {
    /// Random logits for `shape`, each row raised by 20 at its draft (at a random token for a
    /// block's last row), decided with `params`.
    pub fn new(shape: AcceptShape, params: SamplingParams, device: &B::Device) -> Self {
        let AcceptShape {
            blocks,
            drafts,
            vocab,
        } = shape;
        let rows = blocks * (drafts + 1);
        let token = |r: usize| ((r * 7_919 + 13) % vocab) as u32;
        let mut peak = vec![0f32; rows * vocab];
        for r in 0..rows {
            peak[r * vocab + token(r) as usize] = 20.0;
        }
        let logits =
            Tensor::<B, 2>::random([rows, vocab], Distribution::Uniform(-1.0, 1.0), device)
                + Tensor::from_data(TensorData::new(peak, [rows, vocab]), device);
        let draft_tokens = (0..blocks)
            .map(|b| (0..drafts).map(|i| token(b * (drafts + 1) + i)).collect())
            .collect();
        let uniforms = (0..blocks)
            .map(|b| {
                (0..=drafts)
                    .map(|i| ((b * 31 + i * 17) % 97) as f32 / 97.0)
                    .collect()
            })
            .collect();
        Self {
            shape,
            logits,
            drafts: draft_tokens,
            params,
            uniforms,
        }
    }

    /// `blocks x rows per block x vocab`.
    pub fn label(&self) -> String {
        let s = self.shape;
        format!("{}x{}x{}", s.blocks, s.drafts + 1, s.vocab)
    }

    /// The logits, read once.
    pub fn bytes(&self) -> usize {
        self.logits.shape().num_elements() * 4
    }

    /// The device decides; two integers per block come back.
    pub fn device(&self) -> Vec<BlockVerdict> {
        if self.params.is_greedy() {
            let blocks: Vec<DraftBlock<'_>> = self
                .drafts
                .iter()
                .map(|d| DraftBlock { drafts: d })
                .collect();
            return B::greedy_accept(self.logits.clone(), &blocks);
        }
        let blocks: Vec<SampledBlock<'_>> = self
            .drafts
            .iter()
            .zip(&self.uniforms)
            .map(|(d, u)| SampledBlock {
                drafts: d,
                draft_probs: None,
                temperature: self.params.temperature,
                top_p: self.params.top_p,
                accept_u: &u[..d.len()],
                draw_u: u[d.len()],
            })
            .collect();
        B::sampled_accept(self.logits.clone(), &blocks)
    }

    /// Every logit row comes back and the host decides.
    pub fn host(&self) -> Vec<Acceptance> {
        let vocab = self.shape.vocab;
        let values = self
            .logits
            .clone()
            .into_data()
            .into_vec::<f32>()
            .expect("f32 logits");
        let mut rows = values.chunks(vocab).map(<[f32]>::to_vec);
        let mut rng = StdRng::seed_from_u64(7);
        self.drafts
            .iter()
            .map(|d| {
                let block: Vec<Vec<f32>> = rows.by_ref().take(d.len() + 1).collect();
                accept_sampled(d, None, &block, &self.params, &mut rng)
            })
            .collect()
    }
}
