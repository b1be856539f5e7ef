//! The `kernels` case's attention rows: the pooled sink-window kernel over every session's full
//! window, against the same attention in batched Burn ops (all keys rotated, GQA by reshaping,
//! matmul, softmax, matmul), which is a lower bound on what the engine's per-session ops cost.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Distribution};
use serde::Serialize;
use troupe::kernels::{KernelBackend, PoolLayout, PooledSeq};

/// Sessions and heads of the attention rows.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionShape {
    /// Sessions in the pool, each with a full window.
    pub sessions: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Sink tokens per window.
    pub sink: usize,
    /// Ring tokens per window.
    pub window: usize,
}

/// Inputs of one attention measurement: every session's window is full and has wrapped, and each
/// brings `queries` new tokens.
pub struct AttentionCase<B: Backend> {
    layout: PoolLayout,
    q: Tensor<B, 2>,
    step_k: Tensor<B, 2>,
    step_v: Tensor<B, 2>,
    pool_k: Tensor<B, 4>,
    pool_v: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    seqs: Vec<PooledSeq>,
    queries: usize,
}

impl<B: KernelBackend> AttentionCase<B> {
    /// Random inputs for `shape` with `queries` query tokens per session, in `dtype`.
    pub fn new(shape: AttentionShape, queries: usize, dtype: DType, device: &B::Device) -> Self {
        let layout = PoolLayout {
            sink: shape.sink,
            window: shape.window,
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
        };
        let (s, cap, hd) = (shape.sessions, layout.capacity(), shape.head_dim);
        let rows = s * queries;
        let r2 = |r: usize, c: usize| {
            Tensor::<B, 2>::random([r, c], Distribution::Uniform(-1.0, 1.0), device).cast(dtype)
        };
        let r4 = || {
            Tensor::<B, 4>::random(
                [s, shape.kv_heads, cap, hd],
                Distribution::Uniform(-1.0, 1.0),
                device,
            )
            .cast(dtype)
        };
        let positions = cap + queries;
        let angles: Vec<f32> = (0..positions)
            .flat_map(|p| {
                (0..hd).map(move |i| {
                    let f = 1.0 / 10000f64.powf(2.0 * (i % (hd / 2)) as f64 / hd as f64);
                    (p as f64 * f) as f32
                })
            })
            .collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [positions, hd]), device)
        };
        let seqs = (0..s)
            .map(|i| PooledSeq {
                slot: i,
                seen: (3 * cap + i) as u64,
                keys: i * queries..(i + 1) * queries,
                queries: i * queries..(i + 1) * queries,
            })
            .collect();
        Self {
            layout,
            q: r2(rows, shape.heads * hd),
            step_k: r2(rows, shape.kv_heads * hd),
            step_v: r2(rows, shape.kv_heads * hd),
            pool_k: r4(),
            pool_v: r4(),
            cos: table(f32::cos),
            sin: table(f32::sin),
            seqs,
            queries,
        }
    }

    /// Bytes the attention must read and write: both pools, the step's rows, the output.
    pub fn bytes(&self) -> usize {
        let es = self.q.dtype().size();
        let pools = 2 * self.pool_k.shape().num_elements() * es;
        let step = 2 * self.step_k.shape().num_elements() * es;
        pools + step + 2 * self.q.shape().num_elements() * es
    }

    /// `sessions x queries x heads/kv_heads x head_dim x window`.
    pub fn label(&self) -> String {
        let l = &self.layout;
        format!(
            "{}x{}x{}/{}x{}x{}+{}",
            self.seqs.len(),
            self.queries,
            l.heads,
            l.kv_heads,
            l.head_dim,
            l.sink,
            l.window
        )
    }

    /// The pooled kernel.
    pub fn kernel(&self) -> Tensor<B, 2> {
        B::pooled_attention(
            self.q.clone(),
            self.step_k.clone(),
            self.step_v.clone(),
            &self.pool_k,
            &self.pool_v,
            &self.cos,
            &self.sin,
            &self.seqs,
            &self.layout,
        )
    }

    /// Batched Burn ops over whole windows: rotate every key, attend without a mask.
    pub fn burn(&self) -> Tensor<B, 2> {
        let l = &self.layout;
        let (s, ql, h, kvh, hd) = (
            self.seqs.len(),
            self.queries,
            l.heads,
            l.kv_heads,
            l.head_dim,
        );
        let cap = l.capacity();
        let dtype = self.q.dtype();
        let rows = |t: &Tensor<B, 2>, n: usize| {
            let c = t.clone().slice([0..n, 0..hd]).cast(dtype);
            c.unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(0)
        };
        let rotate = |x: Tensor<B, 4>, n: usize| {
            let [a, b, c, d] = x.dims();
            let half = d / 2;
            let x1 = x.clone().slice([0..a, 0..b, 0..c, 0..half]);
            let x2 = x.clone().slice([0..a, 0..b, 0..c, half..d]);
            let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
            x * rows(&self.cos, n) + rotated * rows(&self.sin, n)
        };
        let k = rotate(self.pool_k.clone(), cap);
        let q = self.q.clone().reshape([s, ql, h, hd]).swap_dims(1, 2); // [s, h, ql, hd]
        let q = rotate(q.slice([0..s, 0..h, 0..ql, 0..hd]), ql);
        let q = q.reshape([s, kvh, (h / kvh) * ql, hd]);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt());
        let out = softmax(scores, 3).matmul(self.pool_v.clone()); // [s, kvh, g·ql, hd]
        out.reshape([s * ql, h * hd])
    }
}
