//! A bounded per-session KV window with StreamingLLM semantics (arXiv 2309.17453).
//!
//! The window keeps the first `sink` tokens forever plus the latest `window` tokens. Physically it is one
//! tensor per layer for keys and one for values, `[kv_heads, sink + window, head_dim]`, allocated when the
//! session opens and never grown: slots `0..sink` hold the sinks, slots `sink..` are a ring. Keys are
//! stored before RoPE; attention rotates them with their positions inside the cache.
//!
//! Tokens a step has computed but that are not yet known to be part of the sequence (a verify block, a
//! draft) wait in a small *scratch* beside the window. [`KvWindow::resolve`] moves the true prefix of the
//! scratch into the window and drops the rest, which is how rejected positions roll back.

use burn::prelude::*;
use burn::tensor::DType;

use troupe_kernels::{KernelBackend, PoolLayout, PooledSeq};

use crate::error::{EngineError, Result};

/// The shape of a session's window: sink tokens kept forever, plus a sliding window of recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSpec {
    /// Tokens at the start of the sequence that are never evicted.
    pub sink: usize,
    /// Most recent tokens kept besides the sinks.
    pub window: usize,
}

impl WindowSpec {
    /// A window of `sink + window` slots.
    pub fn new(sink: usize, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(EngineError::InvalidWindow(
                "the sliding window must hold at least one token".into(),
            ));
        }
        Ok(Self { sink, window })
    }

    /// Slots in the window.
    pub fn capacity(&self) -> usize {
        self.sink + self.window
    }

    /// Physical slot of the stream token at index `t`.
    pub fn slot_of(&self, t: u64) -> usize {
        if (t as usize) < self.sink {
            t as usize
        } else {
            self.sink + ((t - self.sink as u64) % self.window as u64) as usize
        }
    }
}

impl Default for WindowSpec {
    fn default() -> Self {
        Self {
            sink: 4,
            window: 1020,
        }
    }
}

/// Bytes of one session's window: `2 × layers × kv_heads × head_dim × (sink + window) × bytes/element`.
pub fn window_bytes(
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    spec: WindowSpec,
    dtype: DType,
) -> u64 {
    2 * (layers * kv_heads * head_dim * spec.capacity()) as u64 * dtype.size() as u64
}

/// One layer's cached keys and values.
#[derive(Debug, Clone)]
struct LayerKv<B: Backend> {
    /// Keys before RoPE, `[kv_heads, capacity, head_dim]`.
    k: Tensor<B, 3>,
    /// Values, `[kv_heads, capacity, head_dim]`.
    v: Tensor<B, 3>,
    /// Keys of scratch tokens, `[kv_heads, n, head_dim]`.
    scratch_k: Option<Tensor<B, 3>>,
    /// Values of scratch tokens.
    scratch_v: Option<Tensor<B, 3>>,
}

/// One session's bounded KV window, on the device of its model.
#[derive(Debug, Clone)]
pub struct KvWindow<B: Backend> {
    spec: WindowSpec,
    layers: Vec<LayerKv<B>>,
    /// Tokens committed to the stream so far (sinks, evicted and kept).
    seen: u64,
    /// Tokens in the scratch.
    scratch_len: usize,
    bytes: u64,
}

impl<B: Backend> KvWindow<B> {
    /// Allocates the whole window up front, so its memory never changes afterwards.
    pub fn new(
        spec: WindowSpec,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let shape = [kv_heads, spec.capacity(), head_dim];
        let layer = || LayerKv {
            k: Tensor::zeros(shape, (device, dtype)),
            v: Tensor::zeros(shape, (device, dtype)),
            scratch_k: None,
            scratch_v: None,
        };
        Self {
            spec,
            layers: (0..layers).map(|_| layer()).collect(),
            seen: 0,
            scratch_len: 0,
            bytes: window_bytes(layers, kv_heads, head_dim, spec, dtype),
        }
    }

    /// The window's shape.
    pub fn spec(&self) -> WindowSpec {
        self.spec
    }

    /// Bytes held by the window tensors; fixed at creation.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Tokens committed to this sequence so far, evicted ones included.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Tokens currently held in the window (sinks plus ring).
    pub fn len(&self) -> usize {
        (self.seen as usize).min(self.spec.capacity())
    }

    /// Whether nothing has been committed yet.
    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }

    /// Tokens waiting in the scratch.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// Physical slots of the held tokens, oldest first (sinks, then the ring from its oldest entry).
    pub fn logical_slots(&self) -> Vec<usize> {
        let sinks = (self.seen as usize).min(self.spec.sink);
        let ring = (self.seen as usize - sinks).min(self.spec.window);
        let mut slots: Vec<usize> = (0..sinks).collect();
        slots.extend((self.seen - ring as u64..self.seen).map(|t| self.spec.slot_of(t)));
        slots
    }

    /// Keys and values of layer `layer` for the held tokens plus the scratch, in stream order, gathered
    /// through `slots` (from [`Self::logical_slots`]); `None` when there is nothing yet.
    pub fn context(
        &self,
        layer: usize,
        slots: &Tensor<B, 1, Int>,
        n_slots: usize,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
        let l = &self.layers[layer];
        let mut ks = Vec::with_capacity(2);
        let mut vs = Vec::with_capacity(2);
        if n_slots > 0 {
            ks.push(l.k.clone().select(1, slots.clone()));
            vs.push(l.v.clone().select(1, slots.clone()));
        }
        if let (Some(k), Some(v)) = (&l.scratch_k, &l.scratch_v) {
            ks.push(k.clone());
            vs.push(v.clone());
        }
        match ks.len() {
            0 => None,
            1 => Some((ks.pop()?, vs.pop()?)),
            _ => Some((Tensor::cat(ks, 1), Tensor::cat(vs, 1))),
        }
    }

    /// Attention of this step's queries `q` (`[heads, n, head_dim]`, before RoPE, the last `n`
    /// tokens of the scratch) over layer `layer` through the backend's pooled sink-window kernel,
    /// with this window as a pool of one; keys are rotated at their window positions inside it.
    /// Returns `[n, heads · head_dim]`.
    pub fn attend_pooled(
        &self,
        layer: usize,
        q: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
    ) -> Tensor<B, 2>
    where
        B: KernelBackend,
    {
        let l = &self.layers[layer];
        let [heads, n, head_dim] = q.dims();
        let [kv_heads, cap, _] = l.k.dims();
        let scratch = |t: &Option<Tensor<B, 3>>| {
            let t = t.clone().expect("the step's keys are in the scratch");
            t.swap_dims(0, 1)
                .reshape([self.scratch_len_now(), kv_heads * head_dim])
        };
        let step_rows = self.scratch_len_now();
        let layout = PoolLayout {
            sink: self.spec.sink,
            window: self.spec.window,
            heads,
            kv_heads,
            head_dim,
        };
        let seq = PooledSeq {
            slot: 0,
            seen: self.seen,
            keys: 0..step_rows,
            queries: 0..n,
        };
        let pool = |t: &Tensor<B, 3>| t.clone().reshape([1, kv_heads, cap, head_dim]);
        B::pooled_attention(
            q.swap_dims(0, 1).reshape([n, heads * head_dim]),
            scratch(&l.scratch_k),
            scratch(&l.scratch_v),
            &pool(&l.k),
            &pool(&l.v),
            cos,
            sin,
            &[seq],
            &layout,
        )
    }

    /// Tokens in layer 0's scratch right now (a step appends to every layer before
    /// [`Self::end_append`] counts them).
    fn scratch_len_now(&self) -> usize {
        self.layers[0].scratch_k.as_ref().map_or(0, |t| t.dims()[1])
    }

    /// Appends a step's keys and values (`[kv_heads, n, head_dim]`) of layer `layer` to the scratch.
    /// Call it for every layer with the same `n`, then [`Self::end_append`].
    pub fn append_scratch(&mut self, layer: usize, k: Tensor<B, 3>, v: Tensor<B, 3>) {
        let l = &mut self.layers[layer];
        l.scratch_k = Some(match l.scratch_k.take() {
            Some(old) => Tensor::cat(vec![old, k], 1),
            None => k,
        });
        l.scratch_v = Some(match l.scratch_v.take() {
            Some(old) => Tensor::cat(vec![old, v], 1),
            None => v,
        });
    }

    /// Records that `n` tokens were appended to the scratch of every layer.
    pub fn end_append(&mut self, n: usize) {
        self.scratch_len += n;
    }

    /// Commits the first `keep` scratch tokens to the window, evicting the oldest non-sink tokens as
    /// needed, and drops the rest of the scratch.
    pub fn resolve(&mut self, keep: usize) -> Result<()> {
        if keep > self.scratch_len {
            return Err(EngineError::InvalidStep(format!(
                "cannot keep {keep} tokens of a scratch of {}",
                self.scratch_len
            )));
        }
        let runs = self.write_runs(keep);
        for l in &mut self.layers {
            let (Some(sk), Some(sv)) = (l.scratch_k.take(), l.scratch_v.take()) else {
                continue;
            };
            let [h, _, d] = sk.dims();
            for &(slot, src, len) in &runs {
                l.k = l.k.clone().slice_assign(
                    [0..h, slot..slot + len, 0..d],
                    sk.clone().slice([0..h, src..src + len, 0..d]),
                );
                l.v = l.v.clone().slice_assign(
                    [0..h, slot..slot + len, 0..d],
                    sv.clone().slice([0..h, src..src + len, 0..d]),
                );
            }
        }
        self.seen += keep as u64;
        self.scratch_len = 0;
        Ok(())
    }

    /// Drops the scratch without committing anything.
    pub fn discard_scratch(&mut self) {
        for l in &mut self.layers {
            l.scratch_k = None;
            l.scratch_v = None;
        }
        self.scratch_len = 0;
    }

    /// Contiguous copies `(dst slot, src index, len)` that commit `keep` scratch tokens. A token that a
    /// later one in the same commit overwrites is skipped.
    fn write_runs(&self, keep: usize) -> Vec<(usize, usize, usize)> {
        let spec = self.spec;
        let end = self.seen + keep as u64;
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for i in 0..keep {
            let t = self.seen + i as u64;
            // Skip a ring token that a later token of this commit evicts again.
            if t as usize >= spec.sink && end - t > spec.window as u64 {
                continue;
            }
            let slot = spec.slot_of(t);
            match runs.last_mut() {
                Some((s, src, len)) if *s + *len == slot && *src + *len == i => *len += 1,
                _ => runs.push((slot, i, 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_wrap_after_the_sinks() {
        let spec = WindowSpec::new(2, 3).unwrap();
        let slots: Vec<usize> = (0..8).map(|t| spec.slot_of(t)).collect();
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 2, 3, 4]);
    }

    #[test]
    fn zero_window_is_refused() {
        assert!(matches!(
            WindowSpec::new(4, 0),
            Err(EngineError::InvalidWindow(_))
        ));
    }

    #[test]
    fn bytes_follow_the_formula() {
        let spec = WindowSpec::new(4, 60).unwrap();
        assert_eq!(
            window_bytes(2, 2, 16, spec, DType::F32),
            2 * 2 * 2 * 16 * 64 * 4
        );
        assert_eq!(
            window_bytes(28, 8, 128, spec, DType::BF16),
            2 * 28 * 8 * 128 * 64 * 2
        );
    }
}
