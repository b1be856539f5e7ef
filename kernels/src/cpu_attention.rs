//! Sink-window attention over a pool of session windows, on the CPU: the computation of
//! [`crate::pool::reference`] done in place on the pool's f32 elements, one task per session and
//! KV head spread over the cores.
//!
//! Each task reads its keys where they live (the session's slot of the pool, or the step's rows),
//! rotates each at its rank in what a query sees, and serves every query head of its GQA group
//! from those rotated keys, with f32 scores, a max-subtracted softmax and f32 sums. Until a
//! session's window has overflowed every key's rank is its context index, so the rotated keys are
//! computed once for all of its queries. After that each query ranks its window keys one lower
//! than the query before it; since a score depends on positions only through their difference,
//! the keys are rotated once, for the first such query, and each later query is rotated as many
//! positions further instead (when the RoPE table reaches that far; otherwise each query rotates
//! its keys at its own ranks).

use rayon::prelude::*;

use crate::pool::{KeyAt, PoolLayout, PooledSeq};

/// The inputs of one pooled attention call, all row-major f32 (shapes as in
/// [`crate::KernelBackend::pooled_attention`]).
#[derive(Debug, Clone, Copy)]
pub struct PooledInputs<'a> {
    /// `[rows, heads · head_dim]`, before RoPE.
    pub q: &'a [f32],
    /// `[step rows, kv_heads · head_dim]`, before RoPE.
    pub step_k: &'a [f32],
    /// `[step rows, kv_heads · head_dim]`.
    pub step_v: &'a [f32],
    /// `[sessions, kv_heads, capacity, head_dim]`, before RoPE.
    pub pool_k: &'a [f32],
    /// `[sessions, kv_heads, capacity, head_dim]`.
    pub pool_v: &'a [f32],
    /// `[positions, head_dim]`, each half repeated.
    pub cos: &'a [f32],
    /// `[positions, head_dim]`, each half repeated.
    pub sin: &'a [f32],
}

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

/// Attention of every query row of `seqs`; returns `[rows, heads · head_dim]` with zeros in rows
/// no session names. Panics when a slice is shorter than the layout and the sessions say (the
/// caller checks the tensors' shapes).
pub fn pooled_attention(
    inputs: &PooledInputs<'_>,
    seqs: &[PooledSeq],
    layout: &PoolLayout,
    rows: usize,
) -> Vec<f32> {
    let (h, kvh, hd) = (layout.heads, layout.kv_heads, layout.head_dim);
    assert!(
        kvh > 0 && h % kvh == 0 && hd % 2 == 0,
        "pooled attention: bad layout"
    );
    assert!(
        inputs.cos.len() >= layout.capacity() * hd && inputs.sin.len() == inputs.cos.len(),
        "pooled attention: the RoPE table must cover the window"
    );
    let group = h / kvh;
    let tasks: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..kvh).map(move |g| (s, g)))
        .collect();
    let work: usize = seqs
        .iter()
        .map(|s| s.queries.len() * (s.held(layout) + s.keys.len()) * h * hd)
        .sum();
    let run = |&(s, g): &(usize, usize)| Task::new(inputs, &seqs[s], layout, g).run();
    let outs: Vec<Vec<f32>> = if work >= PARALLEL_WORK {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    let mut out = vec![0.0f32; rows * h * hd];
    for (&(s, g), o) in tasks.iter().zip(&outs) {
        // The task's output is `[queries, group, head_dim]`; its heads are `g·group ..`.
        for (i, row) in seqs[s].queries.clone().enumerate() {
            let src = &o[i * group * hd..][..group * hd];
            out[(row * h + g * group) * hd..][..group * hd].copy_from_slice(src);
        }
    }
    out
}

/// One session and one KV head.
struct Task<'a> {
    inputs: &'a PooledInputs<'a>,
    seq: &'a PooledSeq,
    layout: &'a PoolLayout,
    /// The KV head.
    g: usize,
}

impl<'a> Task<'a> {
    fn new(
        inputs: &'a PooledInputs<'a>,
        seq: &'a PooledSeq,
        layout: &'a PoolLayout,
        g: usize,
    ) -> Self {
        Self {
            inputs,
            seq,
            layout,
            g,
        }
    }

    /// Head `g` of context key `j`: its key and its value.
    fn key(&self, j: usize) -> (&'a [f32], &'a [f32]) {
        let (kvh, hd, cap) = (
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.capacity(),
        );
        let i = self.inputs;
        match self.seq.key_at(self.layout, j) {
            KeyAt::Pool(s) => {
                let o = ((self.seq.slot * kvh + self.g) * cap + s) * hd;
                (&i.pool_k[o..o + hd], &i.pool_v[o..o + hd])
            }
            KeyAt::Step(r) => {
                let o = (r * kvh + self.g) * hd;
                (&i.step_k[o..o + hd], &i.step_v[o..o + hd])
            }
        }
    }

    /// `[queries, group, head_dim]`: this head group's output for each of the session's queries.
    fn run(&self) -> Vec<f32> {
        let (layout, seq) = (self.layout, self.seq);
        let (h, hd) = (layout.heads, layout.head_dim);
        let group = h / layout.kv_heads;
        let full = layout.capacity();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0.0f32; seq.queries.len() * group * hd];
        // Keys rotated at their context index: every key's rank until the window overflows.
        let mut at_index: Vec<f32> = Vec::new();
        let shifted = self.shifted();
        let mut at_rank: Vec<f32> = Vec::new();
        let (mut scores, mut qr) = (Vec::new(), vec![0.0f32; hd]);
        let mut values: Vec<&[f32]> = Vec::new();
        for (i, row) in seq.queries.clone().enumerate() {
            let p = seq.query_index(layout, i);
            values.clear();
            values.extend(self.seen(p).map(|j| self.key(j).1));
            // The rotated keys the query sees, in rank order, in runs that each pair with the
            // query rotated at one position.
            let runs: [(&[f32], usize); 2] = if p < full {
                // Every key up to `p` is seen, at rank = index.
                for j in at_index.len() / hd..=p {
                    let start = at_index.len();
                    at_index.resize(start + hd, 0.0);
                    self.rotate(self.key(j).0, j, &mut at_index[start..]);
                }
                [(&at_index[..(p + 1) * hd], p), (&[], 0)]
            } else if let Some(sh) = shifted.as_ref().filter(|sh| p >= sh.first) {
                // Scores depend on positions only through their difference: the window keys
                // rotated for the step's first overflowed query serve a later one with the query
                // rotated as many positions further.
                let from = (p + 1 - layout.window - sh.from) * hd;
                [
                    (&sh.sinks[..], full - 1),
                    (
                        &sh.window[from..from + layout.window * hd],
                        full - 1 + p - sh.first,
                    ),
                ]
            } else {
                // The sinks at their own index, then the latest `window - 1` keys and the query's
                // own, ranked right after them.
                at_rank.clear();
                for (rank, j) in self.seen(p).enumerate() {
                    let start = at_rank.len();
                    at_rank.resize(start + hd, 0.0);
                    self.rotate(self.key(j).0, rank, &mut at_rank[start..]);
                }
                [(&at_rank[..], full - 1), (&[], 0)]
            };
            for head in 0..group {
                let qh = &self.inputs.q[(row * h + self.g * group + head) * hd..][..hd];
                scores.clear();
                for &(keys, q_pos) in runs.iter().filter(|r| !r.0.is_empty()) {
                    self.rotate(qh, q_pos, &mut qr);
                    scores.extend(keys.chunks_exact(hd).map(|k| dot(&qr, k) * scale));
                }
                let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0f32;
                for s in scores.iter_mut() {
                    *s = (*s - top).exp();
                    total += *s;
                }
                let o = &mut out[(i * group + head) * hd..][..hd];
                for (s, v) in scores.iter().zip(&values) {
                    let w = s / total;
                    for (od, vd) in o.iter_mut().zip(*v) {
                        *od += w * vd;
                    }
                }
            }
        }
        out
    }

    /// For a step whose queries overflow the window: the sinks rotated at their index, and every
    /// window key of those queries rotated at the rank the first of them gives it. `None` when
    /// no query overflows or the RoPE table stops short of the later queries' positions.
    fn shifted(&self) -> Option<Shifted> {
        let (layout, seq) = (self.layout, self.seq);
        let (hd, full) = (layout.head_dim, layout.capacity());
        let n = seq.queries.len();
        let first = (0..n)
            .map(|i| seq.query_index(layout, i))
            .find(|&p| p >= full)?;
        let last = seq.query_index(layout, n - 1);
        if full - 1 + last - first >= self.inputs.cos.len() / hd {
            return None;
        }
        let from = first + 1 - layout.window;
        let mut sinks = vec![0.0f32; layout.sink * hd];
        for (j, out) in sinks.chunks_exact_mut(hd).enumerate() {
            self.rotate(self.key(j).0, j, out);
        }
        let mut window = vec![0.0f32; (last + 1 - from) * hd];
        for (t, out) in window.chunks_exact_mut(hd).enumerate() {
            let j = from + t;
            self.rotate(self.key(j).0, j + full - 1 - first, out);
        }
        Some(Shifted {
            first,
            from,
            sinks,
            window,
        })
    }

    /// The context indices query `p` sees, in rank order: the sinks, then the latest `window`
    /// keys up to `p`.
    fn seen(&self, p: usize) -> impl Iterator<Item = usize> {
        let (sink, window) = (self.layout.sink, self.layout.window);
        let recent = (p + 1).saturating_sub(window).max(sink.min(p + 1));
        (0..sink.min(p + 1)).chain(recent..=p)
    }

    /// `x` rotated at position `pos`, rotate-half style, into `out`.
    fn rotate(&self, x: &[f32], pos: usize, out: &mut [f32]) {
        let hd = x.len();
        let half = hd / 2;
        let cos = &self.inputs.cos[pos * hd..][..hd];
        let sin = &self.inputs.sin[pos * hd..][..hd];
        for d in 0..half {
            out[d] = x[d] * cos[d] - x[d + half] * sin[d];
            out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
        }
    }
}

/// Keys rotated once for all of a step's overflowed queries (see [`Task::shifted`]).
struct Shifted {
    /// Context index of the first overflowed query.
    first: usize,
    /// Context index of the first key in `window`.
    from: usize,
    /// `[sink, head_dim]`: the sinks at their index.
    sinks: Vec<f32>,
    /// `[keys, head_dim]`: keys `from..` at their rank for query `first`.
    window: Vec<f32>,
}

/// `Σ a_i · b_i` in eight independent lanes, so the compiler can keep them in one vector.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}
