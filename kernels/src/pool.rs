//! Sink-window attention over a pool of session windows: the types, and the reference.
//!
//! Every session's keys and values live in one pool tensor per layer, `[sessions, kv_heads,
//! sink + window, head_dim]`, at the session's slot: slots `0..sink` of its window hold the sinks
//! and the rest is a ring (StreamingLLM, arXiv 2309.17453). Keys are stored before RoPE. A step's
//! own keys and values (not yet committed to the window) come beside the pool, one row per token.
//!
//! A query at context index `p` (held tokens first, oldest first, then the step's tokens) sees
//! key `j` when `j ≤ p` and `j` is a sink or one of the latest `window` keys up to `p`. Positions
//! are ranks in that visible set: keys and query are rotated where they sit in the window, not
//! where they sit in the stream, so a session can run forever inside its positions.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::DType;

/// The shape the pool and the heads share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLayout {
    /// Tokens at the start of a stream that are never evicted.
    pub sink: usize,
    /// Most recent tokens kept besides the sinks.
    pub window: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads; `heads` is a multiple of it (GQA).
    pub kv_heads: usize,
    /// Width of one head; even (RoPE rotates its two halves).
    pub head_dim: usize,
}

impl PoolLayout {
    /// Slots of one session's window.
    pub fn capacity(&self) -> usize {
        self.sink + self.window
    }
}

/// One session's part of a pooled attention step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PooledSeq {
    /// The session's window in the pool.
    pub slot: usize,
    /// Tokens committed to its stream so far, evicted ones included.
    pub seen: u64,
    /// Its rows of the step's keys and values, in stream order after the held tokens.
    pub keys: Range<usize>,
    /// Its query rows, which are the last `queries.len()` of its step keys (causal among
    /// themselves).
    pub queries: Range<usize>,
}

/// Where a context key of one session lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAt {
    /// In the pool, at this slot of the session's window.
    Pool(usize),
    /// Among the step's keys, at this row.
    Step(usize),
}

impl PooledSeq {
    /// Tokens the window holds: sinks plus ring.
    pub fn held(&self, layout: &PoolLayout) -> usize {
        (self.seen as usize).min(layout.capacity())
    }

    /// Context index of query row `i` of this session.
    pub fn query_index(&self, layout: &PoolLayout, i: usize) -> usize {
        self.held(layout) + self.keys.len() - self.queries.len() + i
    }

    /// Where context key `j` lives.
    pub fn key_at(&self, layout: &PoolLayout, j: usize) -> KeyAt {
        let held = self.held(layout);
        let seen = self.seen as usize;
        let sinks = seen.min(layout.sink);
        if j >= held {
            KeyAt::Step(self.keys.start + j - held)
        } else if j < sinks {
            KeyAt::Pool(j)
        } else {
            let t = seen - (held - sinks) + (j - sinks);
            KeyAt::Pool(layout.sink + (t - layout.sink) % layout.window)
        }
    }
}

/// The keys query `p` sees, each with its rotary position, and the query's own position.
pub fn visible(layout: &PoolLayout, p: usize) -> (Vec<(usize, usize)>, usize) {
    let full = layout.capacity();
    let overflow = p >= full;
    let keys = (0..=p)
        .filter(|&j| j < layout.sink || j + layout.window > p)
        .map(|j| {
            let rank = if j < layout.sink || !overflow {
                j
            } else {
                j + layout.sink + layout.window - 1 - p
            };
            (j, rank)
        })
        .collect();
    (keys, p.min(full - 1))
}

/// Rotates rows `x` (`[n, head_dim]`) by the cos and sin rows of `positions`, rotate-half style.
fn rotate<B: Backend>(
    x: Tensor<B, 2>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    positions: &[usize],
) -> Tensor<B, 2> {
    let device = x.device();
    let [n, d] = x.dims();
    let idx: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [positions.len()]), &device);
    let (c, s) = (
        cos.clone().select(0, idx.clone()),
        sin.clone().select(0, idx),
    );
    let half = d / 2;
    let x1 = x.clone().slice([0..n, 0..half]);
    let x2 = x.clone().slice([0..n, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 1);
    x * c + rotated * s
}

/// The reference: every query row gathers exactly the keys it sees, rotated at their ranks, in
/// plain Burn ops (f32). `q` is `[rows, heads · head_dim]`, `step_k`/`step_v` are
/// `[step rows, kv_heads · head_dim]`, the pools `[sessions, kv_heads, capacity, head_dim]`, and
/// `cos`/`sin` `[positions, head_dim]` with each half repeated. Returns `[rows, heads · head_dim]`;
/// rows no session names are zero.
#[allow(clippy::too_many_arguments)]
pub fn reference<B: Backend>(
    q: Tensor<B, 2>,
    step_k: Tensor<B, 2>,
    step_v: Tensor<B, 2>,
    pool_k: &Tensor<B, 4>,
    pool_v: &Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    seqs: &[PooledSeq],
    layout: &PoolLayout,
) -> Tensor<B, 2> {
    let (h, kvh, hd) = (layout.heads, layout.kv_heads, layout.head_dim);
    let group = h / kvh;
    let dtype = q.dtype();
    let f32s = |t: Tensor<B, 2>| t.cast(DType::F32);
    let (q, step_k, step_v) = (f32s(q), f32s(step_k), f32s(step_v));
    let (pool_k, pool_v) = (
        pool_k.clone().cast(DType::F32),
        pool_v.clone().cast(DType::F32),
    );
    let (cos, sin) = (f32s(cos.clone()), f32s(sin.clone()));
    let rows = q.dims()[0];
    let mut out: Vec<Option<Tensor<B, 2>>> = vec![None; rows];
    for seq in seqs {
        // [n, kv_heads · head_dim] rows of one context key.
        let key_row =
            |pool: &Tensor<B, 4>, step: &Tensor<B, 2>, j: usize| match seq.key_at(layout, j) {
                KeyAt::Pool(s) => pool
                    .clone()
                    .slice([seq.slot..seq.slot + 1, 0..kvh, s..s + 1, 0..hd])
                    .reshape([1, kvh * hd]),
                KeyAt::Step(r) => step.clone().slice([r..r + 1, 0..kvh * hd]),
            };
        for (i, row) in seq.queries.clone().enumerate() {
            let p = seq.query_index(layout, i);
            let (keys, q_pos) = visible(layout, p);
            let n = keys.len();
            let ranks: Vec<usize> = keys.iter().map(|&(_, r)| r).collect();
            let k = Tensor::cat(
                keys.iter()
                    .map(|&(j, _)| key_row(&pool_k, &step_k, j))
                    .collect(),
                0,
            );
            let v = Tensor::cat(
                keys.iter()
                    .map(|&(j, _)| key_row(&pool_v, &step_v, j))
                    .collect(),
                0,
            );
            // [n, kvh, hd] → [kvh · n, hd], rotated per key rank.
            let k = k
                .reshape([n, kvh, hd])
                .swap_dims(0, 1)
                .reshape([kvh * n, hd]);
            let k_pos: Vec<usize> = (0..kvh).flat_map(|_| ranks.iter().copied()).collect();
            let k = rotate(k, &cos, &sin, &k_pos).reshape([kvh, n, hd]);
            let v = v.reshape([n, kvh, hd]).swap_dims(0, 1); // [kvh, n, hd]
            let qr = q.clone().slice([row..row + 1, 0..h * hd]).reshape([h, hd]);
            let qr = rotate(qr, &cos, &sin, &vec![q_pos; h]).reshape([kvh, group, hd]);
            let scores = qr
                .matmul(k.swap_dims(1, 2))
                .mul_scalar(1.0 / (hd as f64).sqrt());
            let o = softmax(scores, 2).matmul(v); // [kvh, group, hd]
            out[row] = Some(o.reshape([1, h * hd]));
        }
    }
    let device = q.device();
    let rows: Vec<Tensor<B, 2>> = out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Tensor::zeros([1, h * hd], &device)))
        .collect();
    Tensor::cat(rows, 0).cast(dtype)
}
