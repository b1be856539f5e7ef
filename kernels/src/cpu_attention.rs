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

/// Queries of one session one pass over its keys serves, while their keys all sit at their
/// context index (prefill chunks, verify blocks): each key and value is then read once for this
/// many queries times the GQA group's heads.
const QUERY_BLOCK: usize = 8;

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
        let (mut scores, mut run_scores, mut qr) = (Vec::new(), Vec::new(), vec![0.0f32; hd]);
        let mut values: Vec<&[f32]> = Vec::new();
        let mut i = 0;
        while i < seq.queries.len() {
            let row = seq.queries.start + i;
            let p = seq.query_index(layout, i);
            if p < full {
                // Queries whose keys all sit at their index: a block of them shares one pass
                // over the keys and values.
                let count = QUERY_BLOCK.min(seq.queries.len() - i).min(full - p);
                for j in at_index.len() / hd..p + count {
                    let start = at_index.len();
                    at_index.resize(start + hd, 0.0);
                    self.rotate(self.key(j).0, j, &mut at_index[start..]);
                }
                let o = &mut out[i * group * hd..(i + count) * group * hd];
                self.block(i, count, &at_index[..(p + count) * hd], o);
                i += count;
                continue;
            }
            values.clear();
            values.extend(self.seen(p).map(|j| self.key(j).1));
            // The rotated keys the query sees, in rank order, in runs that each pair with the
            // query rotated at one position.
            let runs: [(&[f32], usize); 2] =
                if let Some(sh) = shifted.as_ref().filter(|sh| p >= sh.first) {
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
            // Every head of the group meets each key and value once: scores `[group, keys]`, one
            // run's columns after the other, each run with the queries rotated at its position.
            let n: usize = runs.iter().map(|r| r.0.len() / hd).sum();
            scores.clear();
            scores.resize(group * n, 0.0);
            let mut col = 0;
            for &(keys, q_pos) in runs.iter().filter(|r| !r.0.is_empty()) {
                let nk = keys.len() / hd;
                qr.resize(group * hd, 0.0);
                for head in 0..group {
                    let qh = &self.inputs.q[(row * h + self.g * group + head) * hd..][..hd];
                    self.rotate(qh, q_pos, &mut qr[head * hd..(head + 1) * hd]);
                }
                run_scores.clear();
                run_scores.resize(group * nk, 0.0);
                block_scores(&qr[..group * hd], keys, hd, scale, &mut run_scores);
                for head in 0..group {
                    scores[head * n + col..][..nk]
                        .copy_from_slice(&run_scores[head * nk..(head + 1) * nk]);
                }
                col += nk;
            }
            for row_scores in scores.chunks_exact_mut(n.max(1)) {
                let top = row_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0f32;
                for s in row_scores.iter_mut() {
                    *s = (*s - top).exp();
                    total += *s;
                }
                row_scores.iter_mut().for_each(|s| *s /= total);
            }
            let o = &mut out[i * group * hd..(i + 1) * group * hd];
            block_values(&scores, &values, hd, o);
            i += 1;
        }
        out
    }

    /// Queries `first..first + count` of the session, whose context indices are all below the
    /// window's capacity, over `keys` (`[keys, head_dim]`, rotated at their index, up to the
    /// last query's): every head of the group for every query, as `[count, group, head_dim]`
    /// into `out`. Each key and value is read once for all `count · group` rows; a query's rows
    /// see keys up to its own index.
    fn block(&self, first: usize, count: usize, keys: &[f32], out: &mut [f32]) {
        let (layout, seq) = (self.layout, self.seq);
        let (h, hd) = (layout.heads, layout.head_dim);
        let group = h / layout.kv_heads;
        let n = keys.len() / hd;
        let rows = count * group;
        let scale = 1.0 / (hd as f32).sqrt();
        let first_p = seq.query_index(layout, first);
        let mut qr = vec![0.0f32; rows * hd];
        for b in 0..count {
            let row = seq.queries.start + first + b;
            for head in 0..group {
                let qh = &self.inputs.q[(row * h + self.g * group + head) * hd..][..hd];
                self.rotate(qh, first_p + b, &mut qr[(b * group + head) * hd..][..hd]);
            }
        }
        let mut scores = vec![0.0f32; rows * n];
        block_scores(&qr, keys, hd, scale, &mut scores);
        for r in 0..rows {
            // Query `first + b` sees keys up to its own index.
            let seen = first_p + r / group + 1;
            let s = &mut scores[r * n..(r + 1) * n];
            let top = s[..seen].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0f32;
            for v in s[..seen].iter_mut() {
                *v = (*v - top).exp();
                total += *v;
            }
            s[..seen].iter_mut().for_each(|v| *v /= total);
            s[seen..].fill(0.0);
        }
        let values: Vec<&[f32]> = (0..n).map(|j| self.key(j).1).collect();
        block_values(&scores, &values, hd, out);
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

/// `Σ a_i · b_i`, on AVX2 with FMA where the CPU has them (the block paths use AVX-512).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len() == b.len()
        && a.len().is_multiple_of(16)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA were just detected; the lengths are equal multiples of 16.
        return unsafe { simd::dot8(a, b) };
    }
    dot_lanes(a, b)
}

/// `scores[r][j] = scale · q[r] · k[j]` for every row of `q` and `keys` (`[rows, hd]`, `[n, hd]`;
/// `scores` `[rows, n]`): each key read once for all rows.
fn block_scores(q: &[f32], keys: &[f32], hd: usize, scale: f32, scores: &mut [f32]) {
    let n = keys.len() / hd;
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(16) && hd <= 256 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected; the shapes are checked inside.
        return unsafe { simd::block_scores16(q, keys, hd, scale, scores) };
    }
    for (j, k) in keys.chunks_exact(hd).enumerate() {
        for (r, qr) in q.chunks_exact(hd).enumerate() {
            scores[r * n + j] = dot(qr, k) * scale;
        }
    }
}

/// `out[r] = Σ_j scores[r][j] · values[j]` (`scores` `[rows, n]`, `out` `[rows, hd]`): each value
/// read once for all rows.
fn block_values(scores: &[f32], values: &[&[f32]], hd: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(16) && hd <= 128 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected; the shapes are checked inside.
        return unsafe { simd::block_values16(scores, values, hd, out) };
    }
    let n = values.len();
    out.fill(0.0);
    for (j, v) in values.iter().enumerate() {
        for (r, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[r * n + j];
            if w != 0.0 {
                add_scaled(o, w, v);
            }
        }
    }
}

/// `o += w · v`, on AVX2 with FMA where the CPU has them (the block paths use AVX-512).
fn add_scaled(o: &mut [f32], w: f32, v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if o.len() == v.len()
        && o.len().is_multiple_of(16)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA were just detected; the lengths are equal multiples of 16.
        return unsafe { simd::add_scaled8(o, w, v) };
    }
    for (od, vd) in o.iter_mut().zip(v) {
        *od += w * vd;
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// [`super::block_scores`] with each key held in registers while every row meets it.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `hd` a multiple of 16 up to 256.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_scores16(
        q: &[f32],
        keys: &[f32],
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let (n, rows, lanes) = (keys.len() / hd, q.len() / hd, hd / 16);
        assert!(hd.is_multiple_of(16) && lanes <= 16 && scores.len() >= rows * n);
        // SAFETY: every load reads 16 floats inside row `j` of `keys` or row `r` of `q`.
        unsafe {
            let mut k = [_mm512_setzero_ps(); 16];
            for j in 0..n {
                let kp = keys.as_ptr().add(j * hd);
                #[allow(clippy::needless_range_loop)]
                for c in 0..lanes {
                    k[c] = _mm512_loadu_ps(kp.add(c * 16));
                }
                for r in 0..rows {
                    let qp = q.as_ptr().add(r * hd);
                    let mut acc = _mm512_mul_ps(_mm512_loadu_ps(qp), k[0]);
                    #[allow(clippy::needless_range_loop)]
                    for c in 1..lanes {
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16)), k[c], acc);
                    }
                    *scores.get_unchecked_mut(r * n + j) = _mm512_reduce_add_ps(acc) * scale;
                }
            }
        }
    }

    /// [`super::block_values`]: two rows at a time, their sums held in registers while every
    /// value they weigh is added in.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `hd` a multiple of 16 up to 128.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_values16(scores: &[f32], values: &[&[f32]], hd: usize, out: &mut [f32]) {
        let (n, rows, lanes) = (values.len(), out.len() / hd, hd / 16);
        assert!(hd.is_multiple_of(16) && lanes <= 8 && scores.len() >= rows * n);
        assert!(values.iter().all(|v| v.len() >= hd));
        // SAFETY: every access covers 16 floats inside row `r` of `out` or a value of `hd`.
        unsafe {
            let mut r = 0;
            while r < rows {
                let two = rows - r >= 2;
                let mut a = [_mm512_setzero_ps(); 8];
                let mut b = [_mm512_setzero_ps(); 8];
                for (j, v) in values.iter().enumerate() {
                    let wa = _mm512_set1_ps(*scores.get_unchecked(r * n + j));
                    let wb = _mm512_set1_ps(if two {
                        *scores.get_unchecked((r + 1) * n + j)
                    } else {
                        0.0
                    });
                    for c in 0..lanes {
                        let vv = _mm512_loadu_ps(v.as_ptr().add(c * 16));
                        a[c] = _mm512_fmadd_ps(wa, vv, a[c]);
                        b[c] = _mm512_fmadd_ps(wb, vv, b[c]);
                    }
                }
                for c in 0..lanes {
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * hd + c * 16), a[c]);
                    if two {
                        _mm512_storeu_ps(out.as_mut_ptr().add((r + 1) * hd + c * 16), b[c]);
                    }
                }
                r += 2;
            }
        }
    }

    /// [`super::dot`] eight lanes at a time, two accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` and `b` must be equally long, a multiple of 16.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot8(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        // SAFETY: every load reads 8 floats below `n`, which both slices hold.
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    s1,
                );
                i += 16;
            }
            let s = _mm256_add_ps(s0, s1);
            let half = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
    }

    /// [`super::add_scaled`] eight lanes at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `o` and `v` must be equally long, a multiple of 16.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_scaled8(o: &mut [f32], w: f32, v: &[f32]) {
        // SAFETY: every access covers 8 floats below the common length.
        unsafe {
            let wv = _mm256_set1_ps(w);
            for i in (0..o.len()).step_by(8) {
                let p = o.as_mut_ptr().add(i);
                _mm256_storeu_ps(
                    p,
                    _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
                );
            }
        }
    }
}

/// `Σ a_i · b_i` in eight independent lanes, so the compiler can keep them in one vector.
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
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
