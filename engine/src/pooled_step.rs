//! A step's attention through the backend's pooled sink-window kernel: the sessions whose windows
//! share a shape and a chunk of the [`KvPool`] are served by one launch per layer.

use burn::prelude::*;
use troupe_kernels::{KernelBackend, PoolLayout, PooledSeq};

use crate::batch::SeqInput;
use crate::config::ModelConfig;
use crate::kv_pool::KvPool;
use crate::window::WindowSpec;

/// What every layer of one step shares.
pub struct PooledStep {
    /// Per window shape and chunk of the pool in the step: its sessions' slots in the chunk,
    /// fills, step keys and query rows.
    groups: Vec<((WindowSpec, usize), Vec<PooledSeq>)>,
    /// Whether a session still holds scratch from an earlier step, so that the step's keys are
    /// every session's scratch rather than this step's rows alone.
    earlier: bool,
}

impl PooledStep {
    /// Plans a step of `seqs` (before the step's keys are appended to their scratch).
    pub fn new<B: Backend>(seqs: &[SeqInput<'_, B>], pool: &KvPool<B>) -> Self {
        let mut groups: Vec<((WindowSpec, usize), Vec<PooledSeq>)> = Vec::new();
        let (mut row, mut key) = (0, 0);
        for s in seqs {
            let (spec, earlier) = (s.window.spec(), s.window.scratch_len());
            let (chunk, slot) = pool.locate(spec, s.window.slot());
            let spec = (spec, chunk);
            let seq = PooledSeq {
                slot,
                seen: s.window.seen(),
                keys: key..key + earlier + s.len,
                queries: row..row + s.len,
            };
            match groups.iter_mut().find(|(g, _)| *g == spec) {
                Some((_, group)) => group.push(seq),
                None => groups.push((spec, vec![seq])),
            }
            row += s.len;
            key += earlier + s.len;
        }
        Self {
            groups,
            earlier: seqs.iter().any(|s| s.window.scratch_len() > 0),
        }
    }

    /// Attention of layer `layer`. `q` is `[tokens, heads · head_dim]` before RoPE; `k` and `v`
    /// are the step's rows `[tokens, kv_heads, head_dim]`, already appended to each window's
    /// scratch; `cos`/`sin` cover every position. Returns `[tokens, heads · head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend<B: KernelBackend>(
        &self,
        layer: usize,
        q: Tensor<B, 2>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        seqs: &[SeqInput<'_, B>],
        pool: &KvPool<B>,
        (cos, sin): (&Tensor<B, 2>, &Tensor<B, 2>),
        c: &ModelConfig,
    ) -> Tensor<B, 2> {
        let (kvh, hd) = (c.num_kv_heads, c.head_dim);
        let (k, v) = if self.earlier {
            let (ks, vs): (Vec<_>, Vec<_>) = seqs
                .iter()
                .map(|s| {
                    s.window
                        .scratch(layer)
                        .expect("the step was appended")
                        .clone()
                })
                .unzip();
            (Tensor::cat(ks, 0), Tensor::cat(vs, 0))
        } else {
            (k, v)
        };
        let n = k.dims()[0];
        let (k, v) = (k.reshape([n, kvh * hd]), v.reshape([n, kvh * hd]));
        // Rows outside a launch's sessions come back zero, so the launches add up.
        self.groups
            .iter()
            .map(|((spec, chunk), group)| {
                let layout = PoolLayout {
                    sink: spec.sink,
                    window: spec.window,
                    heads: c.num_heads,
                    kv_heads: kvh,
                    head_dim: hd,
                };
                let (pool_k, pool_v) = pool.layer(*spec, *chunk, layer);
                B::pooled_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    pool_k,
                    pool_v,
                    cos,
                    sin,
                    group,
                    &layout,
                )
            })
            .reduce(|a, b| a + b)
            .expect("a step has a session")
    }
}
