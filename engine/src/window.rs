//! A bounded per-session KV window with StreamingLLM semantics (arXiv 2309.17453).
//!
//! The window keeps the first `sink` tokens forever plus the latest `window` tokens. Physically it is
//! one slot of the [`KvPool`] of its shape, per layer `[kv_heads, sink + window, head_dim]` for keys and
//! for values, reserved when the session opens and never grown: positions `0..sink` hold the sinks,
//! positions `sink..` are a ring. Keys are stored before RoPE; attention rotates them with their
//! positions inside the cache.
//!
//! Tokens a step has computed but that are not yet known to be part of the sequence (a verify block, a
//! draft) wait in a small *scratch* beside the window. [`KvWindow::resolve`] moves the true prefix of the
//! scratch into the window and drops the rest, which is how rejected positions roll back.

use burn::prelude::*;
use burn::tensor::DType;
use troupe_kernels::KernelBackend;

use crate::error::{EngineError, Result};
use crate::kv_pool::KvPool;
pub use crate::window_spec::{window_bytes, WindowSpec};

/// One session's bounded KV window: its slot in the [`KvPool`], its fill, and the scratch of the
/// tokens a step computed but has not committed.
#[derive(Debug, Clone)]
pub struct KvWindow<B: Backend> {
    spec: WindowSpec,
    /// Where the committed keys and values live in the pool of windows of this shape.
    slot: usize,
    /// Per layer: keys and values of the scratch tokens, token-major `[n, kv_heads, head_dim]`.
    scratch: Vec<Option<(Tensor<B, 3>, Tensor<B, 3>)>>,
    /// Tokens committed to the stream so far (sinks, evicted and kept).
    seen: u64,
    /// Tokens in the scratch.
    scratch_len: usize,
    bytes: u64,
}

impl<B: Backend> KvWindow<B> {
    /// A window at `slot` of the pool of shape `spec`; its bytes are reserved there already.
    pub fn new(
        spec: WindowSpec,
        slot: usize,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Self {
        Self {
            spec,
            slot,
            scratch: vec![None; layers],
            seen: 0,
            scratch_len: 0,
            bytes: window_bytes(layers, kv_heads, head_dim, spec, dtype),
        }
    }

    /// The same window at `slot` of its pool: a fork's, once [`KvPool::copy_positions`] has copied
    /// the held tokens there. A window with tokens in its scratch (a step in progress) is not
    /// forked.
    pub fn forked(&self, slot: usize) -> Result<Self> {
        if self.scratch_len > 0 {
            return Err(EngineError::InvalidStep(format!(
                "a window with {} uncommitted tokens cannot be forked: fork it between steps",
                self.scratch_len
            )));
        }
        Ok(Self {
            slot,
            ..self.clone()
        })
    }

    /// The window's shape.
    pub fn spec(&self) -> WindowSpec {
        self.spec
    }

    /// The window's slot in the pool of its shape.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Bytes of the window's keys and values in the pool; fixed at creation.
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

    /// Tokens waiting in the scratch (those of a step in progress count once it ends).
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

    /// Keys and values of layer `layer` for the held tokens plus the scratch, in stream order,
    /// `[kv_heads, n, head_dim]`, the held ones gathered from `pool` through `slots` (from
    /// [`Self::logical_slots`]); `None` when there is nothing yet.
    pub fn context(
        &self,
        layer: usize,
        slots: &Tensor<B, 1, Int>,
        n_slots: usize,
        pool: &KvPool<B>,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
        let mut ks = Vec::with_capacity(2);
        let mut vs = Vec::with_capacity(2);
        if n_slots > 0 {
            let (k, v) = pool.window(self.spec, self.slot, layer);
            ks.push(k.select(1, slots.clone()));
            vs.push(v.select(1, slots.clone()));
        }
        if let Some((k, v)) = &self.scratch[layer] {
            ks.push(k.clone().swap_dims(0, 1));
            vs.push(v.clone().swap_dims(0, 1));
        }
        match ks.len() {
            0 => None,
            1 => Some((ks.pop()?, vs.pop()?)),
            _ => Some((Tensor::cat(ks, 1), Tensor::cat(vs, 1))),
        }
    }

    /// Keys and values of layer `layer`'s scratch, token-major `[n, kv_heads, head_dim]`.
    pub fn scratch(&self, layer: usize) -> Option<&(Tensor<B, 3>, Tensor<B, 3>)> {
        self.scratch[layer].as_ref()
    }

    /// Appends a step's keys and values (token-major `[n, kv_heads, head_dim]`) of layer `layer`
    /// to the scratch. Call it for every layer with the same `n`, then [`Self::end_append`].
    pub fn append_scratch(&mut self, layer: usize, k: Tensor<B, 3>, v: Tensor<B, 3>) {
        let slot = &mut self.scratch[layer];
        *slot = Some(match slot.take() {
            Some((ok, ov)) => (Tensor::cat(vec![ok, k], 0), Tensor::cat(vec![ov, v], 0)),
            None => (k, v),
        });
    }

    /// Records that `n` tokens were appended to the scratch of every layer.
    pub fn end_append(&mut self, n: usize) {
        self.scratch_len += n;
    }

    /// Commits the first `keep` scratch tokens to the window's slot in `pool`, evicting the oldest
    /// non-sink tokens as needed, and drops the rest of the scratch.
    pub fn resolve(&mut self, keep: usize, pool: &mut KvPool<B>) -> Result<()>
    where
        B: KernelBackend,
    {
        let targets = self.commit_targets(keep)?;
        // Every layer holds the scratch once a step has appended to it, or none does.
        let scratch: Option<Vec<(Tensor<B, 3>, Tensor<B, 3>)>> =
            self.scratch.iter().cloned().collect();
        if let Some(scratch) = scratch {
            let (rows, to): (Vec<usize>, Vec<(usize, usize)>) = targets
                .iter()
                .map(|&(pos, src)| (src, (self.slot, pos)))
                .unzip();
            pool.commit_rows(self.spec, &scratch, &rows, &to);
        }
        self.committed(keep);
        Ok(())
    }

    /// Where committing the first `keep` scratch tokens puts them: `(position in the window,
    /// index in the scratch)` for each token that stays (one that a later token of the same
    /// commit evicts again is left out). Write them with [`KvPool::commit_rows`], then call
    /// [`Self::committed`].
    pub fn commit_targets(&self, keep: usize) -> Result<Vec<(usize, usize)>> {
        self.check_keep(keep)?;
        Ok(self
            .write_runs(keep)
            .into_iter()
            .flat_map(|(dst, src, len)| (0..len).map(move |i| (dst + i, src + i)))
            .collect())
    }

    /// Records that the first `keep` scratch tokens are in the pool, and drops the scratch.
    pub fn committed(&mut self, keep: usize) {
        self.seen += keep.min(self.scratch_len) as u64;
        self.discard_scratch();
    }

    fn check_keep(&self, keep: usize) -> Result<()> {
        if keep > self.scratch_len {
            return Err(EngineError::InvalidStep(format!(
                "cannot keep {keep} tokens of a scratch of {}",
                self.scratch_len
            )));
        }
        Ok(())
    }

    /// Drops the scratch without committing anything.
    pub fn discard_scratch(&mut self) {
        self.scratch.iter_mut().for_each(|s| *s = None);
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
