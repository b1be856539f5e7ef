//! The block drafter's network (DFlash, arXiv 2602.06036): a few decoder layers that read the
//! verifier's hidden states. The outputs of the tapped verifier layers are concatenated,
//! projected to the hidden size (`fc`) and RMS-normalised (`hidden_norm`): that is the fused
//! context. Every drafter layer projects the fused context with its own key and value projections
//! and puts it ahead of the block's keys and values; the block attends to that context and,
//! bidirectionally, to itself. Embedding and head are the verifier's, frozen.
//!
//! One forward serves inference (a batch of blocks, each over its own cached context) and
//! training (many anchors of one sequence at once, each seeing only the context before it): what
//! differs is the visibility mask and the positions, which the caller builds. Context keys are
//! rotated once, when they are made, and kept transposed (`[kv_heads, head_dim, rows]`), so a
//! draft reads them as they lie; query heads are grouped by the key/value head they share, so
//! no key is copied per query head.

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::DType;
use troupe_kernels::KernelBackend;

use crate::block::spec::BlockSpec;
use crate::model::{rms_norm, DecoderLayer, Linear, Model};

/// The block drafter's weights, and the verifier's embedding and head it shares.
#[derive(Debug, Clone)]
pub struct BlockModel<B: Backend> {
    /// Taps and block size.
    pub spec: BlockSpec,
    /// The decoder stack: its `embed` (and `lm_head`, if untied) are the verifier's, frozen; its
    /// layers and final norm are the drafter's.
    pub stack: Model<B>,
    /// Projection of the concatenated tapped states to the hidden size.
    pub fc: Linear<B>,
    /// RMSNorm of the projected context.
    pub hidden_norm: Tensor<B, 1>,
    /// The learned embedding of a masked block position (the byte vocabulary has no spare id).
    pub mask: Tensor<B, 1>,
    inv_freq: Vec<f64>,
}

/// One drafter layer's context: keys rotated at their positions and transposed, `[batch,
/// kv_heads, head_dim, rows]`, and values `[batch, kv_heads, rows, head_dim]`.
pub type LayerContext<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// What one forward reads besides the block rows' inputs.
pub struct BlockInputs<B: Backend> {
    /// Per drafter layer, the context (see [`LayerContext`]); `None`: no context.
    pub ctx: Option<Vec<LayerContext<B>>>,
    /// Cos and sin of each block row's position, `[batch, rows, head_dim]`.
    pub rope: (Tensor<B, 3>, Tensor<B, 3>),
    /// Additive visibility mask `[batch, rows, ctx + rows]` (0 or −∞).
    pub mask: Tensor<B, 3>,
}

impl<B: KernelBackend> BlockModel<B> {
    /// Assembles a drafter from its parts.
    pub fn new(
        spec: BlockSpec,
        stack: Model<B>,
        fc: Linear<B>,
        hidden_norm: Tensor<B, 1>,
        mask: Tensor<B, 1>,
    ) -> Self {
        let inv_freq = crate::rope::inv_freq(&stack.config);
        Self {
            spec,
            stack,
            fc,
            hidden_norm,
            mask,
            inv_freq,
        }
    }

    /// Cos and sin `[n, head_dim]` of `positions` (rotate-half layout, each half repeated).
    pub fn rope_rows(&self, positions: &[usize]) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.stack.config.head_dim;
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        for &p in positions {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let angle = p as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let device = &self.stack.device;
        (
            Tensor::from_data(TensorData::new(cos, [n, hd]), device),
            Tensor::from_data(TensorData::new(sin, [n, hd]), device),
        )
    }

    /// The fused context `[rows, hidden]` of the tapped verifier states `[rows, taps × hidden]`.
    pub fn fuse(&self, tapped: Tensor<B, 2>) -> Tensor<B, 2> {
        let eps = self.stack.config.rms_norm_eps;
        rms_norm(self.fc.forward(tapped), &self.hidden_norm, eps)
    }

    /// Each layer's context of fused rows `[batch × rows, hidden]` at `positions` (the same for
    /// every batch entry, `rows` of them).
    pub fn context(
        &self,
        fused: Tensor<B, 2>,
        batch: usize,
        positions: &[usize],
    ) -> Vec<LayerContext<B>> {
        let c = &self.stack.config;
        let (kvh, hd) = (c.num_kv_heads, c.head_dim);
        let n = positions.len();
        let (cos, sin) = self.rope_rows(positions);
        let cos: Tensor<B, 4> = cos.reshape([1, n, 1, hd]);
        let sin: Tensor<B, 4> = sin.reshape([1, n, 1, hd]);
        self.stack
            .layers
            .iter()
            .map(|l| {
                let mut k = l.k_proj.forward(fused.clone()).reshape([batch, n, kvh, hd]);
                if let Some(kn) = &l.k_norm {
                    k = rms_norm(k, kn, c.rms_norm_eps);
                }
                let k = rotate(k, &cos, &sin).permute([0, 2, 3, 1]);
                let v = l
                    .v_proj
                    .forward(fused.clone())
                    .reshape([batch, n, kvh, hd])
                    .swap_dims(1, 2);
                (k, v)
            })
            .collect()
    }

    /// Inputs of block rows: the embedding of each known token, the mask embedding elsewhere.
    /// `tokens[i]` is `None` for a masked row. Returns `[batch, rows, hidden]` for `batch` blocks
    /// of `rows` rows each.
    pub fn block_inputs(&self, tokens: &[Option<u32>], batch: usize) -> Tensor<B, 3> {
        let h = self.stack.config.hidden_size;
        let n = tokens.len();
        let device = &self.stack.device;
        let ids: Vec<i64> = tokens.iter().map(|t| t.unwrap_or(0) as i64).collect();
        let masked: Vec<f32> = tokens.iter().map(|t| t.is_none() as u8 as f32).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device);
        let masked = Tensor::<B, 2>::from_data(TensorData::new(masked, [n, 1]), device);
        let embedded = self.stack.embed.clone().select(0, ids).cast(DType::F32);
        let mask = self.mask.clone().cast(DType::F32).unsqueeze_dim::<2>(0);
        let x = embedded * (masked.ones_like() - masked.clone()) + mask * masked;
        x.reshape([batch, n / batch.max(1), h])
    }

    /// Final-normed hidden states `[batch, rows, hidden]` of the block rows `x`.
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &BlockInputs<B>) -> Tensor<B, 3> {
        let c = &self.stack.config;
        let [b, r, _] = x.dims();
        let keys = inputs.mask.dims()[2];
        let hd = c.head_dim;
        let rope = (
            inputs.rope.0.clone().reshape([b, r, 1, hd]),
            inputs.rope.1.clone().reshape([b, r, 1, hd]),
        );
        let mask: Tensor<B, 5> = inputs.mask.clone().reshape([b, 1, 1, r, keys]);
        let mut x = x;
        for (i, layer) in self.stack.layers.iter().enumerate() {
            let ctx = inputs.ctx.as_ref().map(|ctx| &ctx[i]);
            x = self.layer(layer, x, ctx, &rope, &mask);
        }
        rms_norm(x, &self.stack.norm, c.rms_norm_eps)
    }

    /// Logits `[rows, vocab]` (f32) of final-normed hidden rows, through the verifier's head.
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        self.stack.logits(hidden)
    }

    fn layer(
        &self,
        l: &DecoderLayer<B>,
        x: Tensor<B, 3>,
        ctx: Option<&LayerContext<B>>,
        (cos, sin): &(Tensor<B, 4>, Tensor<B, 4>),
        mask: &Tensor<B, 5>,
    ) -> Tensor<B, 3> {
        let c = &self.stack.config;
        let eps = c.rms_norm_eps;
        let [b, r, hidden] = x.dims();
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = h / kvh;
        let hn = rms_norm(x.clone().reshape([b * r, hidden]), &l.input_norm, eps);
        let mut q = l.q_proj.forward(hn.clone()).reshape([b, r, h, hd]);
        let mut k = l.k_proj.forward(hn.clone()).reshape([b, r, kvh, hd]);
        let v = l.v_proj.forward(hn).reshape([b, r, kvh, hd]);
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = rms_norm(q, qn, eps);
            k = rms_norm(k, kn, eps);
        }
        // Query heads grouped by their key/value head: [b, kvh, group × r, hd].
        let q = rotate(q, cos, sin)
            .reshape([b, r, kvh, group, hd])
            .permute([0, 2, 3, 1, 4])
            .reshape([b, kvh, group * r, hd]);
        let k = rotate(k, cos, sin).permute([0, 2, 3, 1]); // [b, kvh, hd, r]
        let v = v.swap_dims(1, 2); // [b, kvh, r, hd]
        let scale = 1.0 / (hd as f64).sqrt();
        let own = q.clone().matmul(k).mul_scalar(scale);
        let scores = match ctx {
            Some((ck, _)) => Tensor::cat(vec![q.matmul(ck.clone()).mul_scalar(scale), own], 3),
            None => own,
        };
        let keys = scores.dims()[3];
        let p = softmax(scores.reshape([b, kvh, group, r, keys]) + mask.clone(), 4).reshape([
            b,
            kvh,
            group * r,
            keys,
        ]);
        let attn = match ctx {
            Some((_, cv)) => {
                let n = keys - r;
                let pc = p.clone().slice([0..b, 0..kvh, 0..group * r, 0..n]);
                let pb = p.slice([0..b, 0..kvh, 0..group * r, n..keys]);
                pc.matmul(cv.clone()) + pb.matmul(v)
            }
            None => p.matmul(v),
        };
        // Back to [b × r, h × hd], heads in order.
        let attn = attn
            .reshape([b, kvh, group, r, hd])
            .permute([0, 3, 1, 2, 4])
            .reshape([b * r, h * hd]);
        let x = x.reshape([b * r, hidden]);
        let x = x.clone() + l.o_proj.forward(attn);
        let hn = rms_norm(x.clone(), &l.post_norm, eps);
        let gate = silu(l.gate_proj.forward(hn.clone()));
        let x = x + l.down_proj.forward(gate * l.up_proj.forward(hn));
        x.reshape([b, r, hidden])
    }
}

/// Rotates `x` `[batch, rows, heads, head_dim]` by cos/sin `[batch or 1, rows, 1, head_dim]`,
/// rotate-half style (as [`crate::rope::apply`]).
fn rotate<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, n, h, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..n, 0..h, 0..half]);
    let x2 = x.clone().slice([0..b, 0..n, 0..h, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
