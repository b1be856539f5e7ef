//! Attention of one sequence's step over its bounded window, with in-cache positions.
//!
//! The keys a query sees are the sinks plus the latest `window` tokens up to and including itself, and
//! their positions are their ranks in that set (StreamingLLM). Because RoPE scores depend only on the
//! difference of positions, the window part is computed with *virtual* positions (the index in the
//! gathered context), which differ from in-cache positions by a constant per query; the sink columns
//! are computed separately with the query rotated at its true in-cache position. Both are exact.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::config::ModelConfig;
use crate::dtype::to_f32;
use crate::rope::{self, RopeTable};
use crate::window::KvWindow;

/// Everything about one sequence's step that all layers share: gather indices, RoPE rows and the mask.
pub struct SeqPlan<B: Backend> {
    /// Physical slots of the held tokens, oldest first.
    pub slots: Tensor<B, 1, Int>,
    /// How many slots.
    pub n_slots: usize,
    /// Query rows in this step.
    pub q_len: usize,
    /// Keys in the context: held + scratch + this step.
    pub n_keys: usize,
    /// Sink columns that need their own scores (0 when no query has overflowed the window).
    pub sink_split: usize,
    q_rope: (Tensor<B, 2>, Tensor<B, 2>),
    k_rope: (Tensor<B, 2>, Tensor<B, 2>),
    q_sink_rope: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// Additive mask `[1, group * q_len, n_keys]`.
    mask: Tensor<B, 3>,
}

impl<B: Backend> SeqPlan<B> {
    /// Plans a step of `q_len` new tokens for a sequence holding `window` (before the step is appended).
    pub fn new(
        window: &KvWindow<B>,
        q_len: usize,
        c: &ModelConfig,
        table: &mut RopeTable<B>,
        device: &B::Device,
    ) -> Self {
        let spec = window.spec();
        let slot_list = window.logical_slots();
        let n_slots = slot_list.len();
        let prior = n_slots + window.scratch_len();
        let n_keys = prior + q_len;
        table.ensure(n_keys);
        let slots_i64: Vec<i64> = slot_list.iter().map(|&s| s as i64).collect();
        let slots = Tensor::from_data(TensorData::new(slots_i64, [n_slots]), device);

        let last_query = prior + q_len - 1;
        let full = spec.sink + spec.window;
        let sink_split = if spec.sink > 0 && last_query >= full {
            spec.sink
        } else {
            0
        };
        let q_sink_rope = (sink_split > 0).then(|| {
            let pos: Vec<i64> = (prior..prior + q_len)
                .map(|p| p.min(full - 1) as i64)
                .collect();
            table.gather(Tensor::from_data(TensorData::new(pos, [q_len]), device))
        });

        let group = c.num_heads / c.num_kv_heads;
        let mut mask = vec![0f32; group * q_len * n_keys];
        for g in 0..group {
            for i in 0..q_len {
                let p = prior + i;
                let row = &mut mask[(g * q_len + i) * n_keys..(g * q_len + i + 1) * n_keys];
                for (j, m) in row.iter_mut().enumerate() {
                    let visible = j <= p && (j < spec.sink || j + spec.window > p);
                    if !visible {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_data(TensorData::new(mask, [1, group * q_len, n_keys]), device);
        Self {
            slots,
            n_slots,
            q_len,
            n_keys,
            sink_split,
            q_rope: table.range(prior, q_len),
            k_rope: table.range(0, n_keys),
            q_sink_rope,
            mask,
        }
    }
}

/// Attention of `q` (`[heads, q_len, head_dim]`, before RoPE) over the context keys and values
/// (`[kv_heads, n_keys, head_dim]`, keys before RoPE). Returns `[q_len, heads * head_dim]`.
pub fn attend<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    plan: &SeqPlan<B>,
    c: &ModelConfig,
) -> Tensor<B, 2> {
    let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let (ql, n) = (plan.q_len, plan.n_keys);
    let group = h / kvh;
    let dtype = q.dtype();
    let k = rope::apply(k, &plan.k_rope.0, &plan.k_rope.1);
    let qv = rope::apply(q.clone(), &plan.q_rope.0, &plan.q_rope.1).reshape([kvh, group * ql, hd]);
    let scores = match &plan.q_sink_rope {
        Some((cos, sin)) => {
            let s = plan.sink_split;
            let qs = rope::apply(q, cos, sin).reshape([kvh, group * ql, hd]);
            let ks = k.clone().slice([0..kvh, 0..s, 0..hd]);
            let kw = k.slice([0..kvh, s..n, 0..hd]);
            Tensor::cat(
                vec![qs.matmul(ks.swap_dims(1, 2)), qv.matmul(kw.swap_dims(1, 2))],
                2,
            )
        }
        None => qv.matmul(k.swap_dims(1, 2)),
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = to_f32(scores).mul_scalar(scale) + plan.mask.clone();
    let probs = softmax(scores, 2).cast(dtype);
    let out = probs.matmul(v); // [kvh, group * ql, hd]
    out.reshape([h, ql, hd])
        .swap_dims(0, 1)
        .reshape([ql, h * hd])
}
