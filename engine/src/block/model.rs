//! The block drafter's network (DFlash, arXiv 2602.06036): a few decoder layers that read the
//! verifier's hidden states. The outputs of the tapped verifier layers are concatenated,
//! projected to the hidden size (`fc`) and RMS-normalised (`hidden_norm`): that is the fused
//! context. Every drafter layer projects the fused context with its own key and value projections
//! and puts it ahead of the block's keys and values; the block attends to that context and,
//! bidirectionally, to itself. Embedding and head are the verifier's, frozen.
//!
//! One forward serves inference (a batch of blocks, each over its own cached context) and
//! training (many anchors of one sequence at once, each seeing only the context before it): what
//! differs is the visibility mask and the positions, which the caller builds.

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use troupe_kernels::KernelBackend;

use crate::block::spec::BlockSpec;
use crate::model::{rms_norm, DecoderLayer, Linear, Model};
use crate::rope::RopeTable;

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
    rope: RopeTable<B>,
}

/// Per drafter layer: the context's keys (normalised, before RoPE) and values, `[rows, kv_dim]`.
pub type ContextKv<B> = Vec<(Tensor<B, 2>, Tensor<B, 2>)>;

/// What one forward reads besides the block rows' inputs.
pub struct BlockInputs<B: Backend> {
    /// Per drafter layer: keys (normalised, before RoPE) and values of the context, `[batch,
    /// ctx, kv_dim]`. `None`: no context.
    pub ctx: Option<Vec<(Tensor<B, 3>, Tensor<B, 3>)>>,
    /// Position of each block row, `[batch, rows]`; the context sits at positions `0..ctx`.
    pub positions: Tensor<B, 2, Int>,
    /// Additive visibility mask `[batch, 1, rows, ctx + rows]` (0 or −∞).
    pub mask: Tensor<B, 4>,
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
        let rope = RopeTable::new(&stack.config, 1024, &stack.device);
        Self {
            spec,
            stack,
            fc,
            hidden_norm,
            mask,
            rope,
        }
    }

    /// Makes sure RoPE covers positions `0..len`.
    pub fn ensure_positions(&mut self, len: usize) {
        self.rope.ensure(len);
    }

    /// The fused context `[rows, hidden]` of the tapped verifier states `[rows, taps × hidden]`.
    pub fn fuse(&self, tapped: Tensor<B, 2>) -> Tensor<B, 2> {
        let eps = self.stack.config.rms_norm_eps;
        rms_norm(self.fc.forward(tapped), &self.hidden_norm, eps)
    }

    /// Each layer's keys (normalised, before RoPE) and values of fused context rows.
    pub fn context_kv(&self, fused: Tensor<B, 2>) -> ContextKv<B> {
        let c = &self.stack.config;
        let (kvh, hd) = (c.num_kv_heads, c.head_dim);
        let rows = fused.dims()[0];
        self.stack
            .layers
            .iter()
            .map(|l| {
                let mut k = l.k_proj.forward(fused.clone());
                if let Some(kn) = &l.k_norm {
                    k = rms_norm(k.reshape([rows, kvh, hd]), kn, c.rms_norm_eps)
                        .reshape([rows, kvh * hd]);
                }
                (k, l.v_proj.forward(fused.clone()))
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
        let embedded = self
            .stack
            .embed
            .clone()
            .select(0, ids)
            .cast(burn::tensor::DType::F32);
        let mask = self
            .mask
            .clone()
            .cast(burn::tensor::DType::F32)
            .unsqueeze_dim::<2>(0);
        let x = embedded * (masked.ones_like() - masked.clone()) + mask * masked;
        x.reshape([batch, n / batch.max(1), h])
    }

    /// Final-normed hidden states `[batch, rows, hidden]` of the block rows `x`.
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &BlockInputs<B>) -> Tensor<B, 3> {
        let c = &self.stack.config;
        let [b, r, _] = x.dims();
        let hd = c.head_dim;
        let ctx_len = inputs.ctx.as_ref().map_or(0, |ctx| ctx[0].0.dims()[1]);
        let flat = inputs.positions.clone().reshape([b * r]);
        let (cos, sin) = self.rope.gather(flat);
        let rows_rope = (cos.reshape([b, 1, r, hd]), sin.reshape([b, 1, r, hd]));
        let ctx_rope = (ctx_len > 0).then(|| {
            let (cos, sin) = self.rope.range(0, ctx_len);
            (
                cos.reshape([1, 1, ctx_len, hd]),
                sin.reshape([1, 1, ctx_len, hd]),
            )
        });
        let mut x = x;
        for (i, layer) in self.stack.layers.iter().enumerate() {
            let ctx = inputs
                .ctx
                .as_ref()
                .map(|ctx| (ctx[i].0.clone(), ctx[i].1.clone()));
            x = self.layer(layer, x, ctx, &rows_rope, ctx_rope.as_ref(), &inputs.mask);
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
        ctx: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
        rows_rope: &(Tensor<B, 4>, Tensor<B, 4>),
        ctx_rope: Option<&(Tensor<B, 4>, Tensor<B, 4>)>,
        mask: &Tensor<B, 4>,
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
        let q = rotate(q.swap_dims(1, 2), rows_rope);
        let mut k = rotate(k.swap_dims(1, 2), rows_rope); // [b, kvh, r, hd]
        let mut v = v.swap_dims(1, 2);
        if let (Some((ck, cv)), Some(rope)) = (ctx, ctx_rope) {
            let n = ck.dims()[1];
            let ck = rotate(ck.reshape([b, n, kvh, hd]).swap_dims(1, 2), rope);
            let cv = cv.reshape([b, n, kvh, hd]).swap_dims(1, 2);
            k = Tensor::cat(vec![ck, k], 2);
            v = Tensor::cat(vec![cv, v], 2);
        }
        let keys = k.dims()[2];
        // GQA: each key/value head serves `group` consecutive query heads.
        let k = k
            .unsqueeze_dim::<5>(2)
            .repeat_dim(2, group)
            .reshape([b, h, keys, hd]);
        let v = v
            .unsqueeze_dim::<5>(2)
            .repeat_dim(2, group)
            .reshape([b, h, keys, hd]);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt())
            + mask.clone();
        let attn = softmax(scores, 3).matmul(v); // [b, h, r, hd]
        let attn = attn.swap_dims(1, 2).reshape([b * r, h * hd]);
        let x = x.reshape([b * r, hidden]);
        let x = x.clone() + l.o_proj.forward(attn);
        let hn = rms_norm(x.clone(), &l.post_norm, eps);
        let gate = silu(l.gate_proj.forward(hn.clone()));
        let x = x + l.down_proj.forward(gate * l.up_proj.forward(hn));
        x.reshape([b, r, hidden])
    }
}

/// Rotates `x` `[batch, heads, rows, head_dim]` by cos/sin rows broadcast over its heads,
/// rotate-half style (as [`crate::rope::apply`]).
fn rotate<B: Backend>(x: Tensor<B, 4>, (cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
    let [b, h, n, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..n, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..n, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
