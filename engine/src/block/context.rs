//! A block drafter's per-sequence context: each drafter layer's keys and values of the fused
//! verifier states, with the sink + sliding window semantics of the verifier's own windows and an
//! exact byte bound.

use burn::prelude::*;

use crate::window::WindowSpec;

/// One sequence's context rows, per drafter layer `(keys, values)`, each `[rows, kv_dim]` f32.
#[derive(Debug, Clone)]
pub struct ContextWindow<B: Backend> {
    spec: WindowSpec,
    layers: Vec<(Tensor<B, 2>, Tensor<B, 2>)>,
    rows: usize,
    seen: u64,
}

/// Bytes of one sequence's context: keys and values of every drafter layer for every slot, f32.
pub fn context_bytes(layers: usize, kv_dim: usize, spec: WindowSpec) -> u64 {
    (2 * layers * kv_dim * spec.capacity() * std::mem::size_of::<f32>()) as u64
}

impl<B: Backend> ContextWindow<B> {
    /// An empty context of `spec`'s shape.
    pub fn new(spec: WindowSpec) -> Self {
        Self {
            spec,
            layers: Vec::new(),
            rows: 0,
            seen: 0,
        }
    }

    /// Rows held (at most the window's capacity).
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows ever added, evicted ones included.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The held rows of each layer.
    pub fn layers(&self) -> &[(Tensor<B, 2>, Tensor<B, 2>)] {
        &self.layers
    }

    /// Appends rows (per layer `(keys, values)`, `[new, kv_dim]`), then evicts past the
    /// capacity: the first `sink` rows ever added stay, and the latest `window` after them.
    pub fn push(&mut self, new: Vec<(Tensor<B, 2>, Tensor<B, 2>)>) {
        let Some(n) = new.first().map(|(k, _)| k.dims()[0]) else {
            return;
        };
        if n == 0 {
            return;
        }
        self.layers = if self.layers.is_empty() {
            new
        } else {
            std::mem::take(&mut self.layers)
                .into_iter()
                .zip(new)
                .map(|((k, v), (nk, nv))| {
                    (Tensor::cat(vec![k, nk], 0), Tensor::cat(vec![v, nv], 0))
                })
                .collect()
        };
        self.rows += n;
        self.seen += n as u64;
        let cap = self.spec.capacity();
        if self.rows > cap {
            let sink = self.spec.sink;
            let keep = |t: Tensor<B, 2>| {
                let [rows, d] = t.dims();
                let tail = t.clone().slice([rows - self.spec.window..rows, 0..d]);
                if sink == 0 {
                    tail
                } else {
                    Tensor::cat(vec![t.slice([0..sink, 0..d]), tail], 0)
                }
            };
            self.layers = std::mem::take(&mut self.layers)
                .into_iter()
                .map(|(k, v)| (keep(k), keep(v)))
                .collect();
            self.rows = cap;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn rows(values: &[f32]) -> Vec<(Tensor<Flex, 2>, Tensor<Flex, 2>)> {
        let t = Tensor::<Flex, 2>::from_data(
            TensorData::new(values.to_vec(), [values.len(), 1]),
            &Default::default(),
        );
        vec![(t.clone(), t.neg())]
    }

    fn held(w: &ContextWindow<Flex>) -> Vec<f32> {
        w.layers()[0]
            .0
            .to_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }

    #[test]
    fn keeps_the_sinks_and_the_latest_window() {
        let mut w = ContextWindow::<Flex>::new(WindowSpec { sink: 2, window: 3 });
        w.push(rows(&[0., 1., 2.]));
        assert_eq!(held(&w), vec![0., 1., 2.]);
        w.push(rows(&[3., 4., 5., 6.]));
        assert_eq!(held(&w), vec![0., 1., 4., 5., 6.]);
        assert_eq!((w.len(), w.seen()), (5, 7));
        let values: Vec<f32> = w.layers()[0]
            .1
            .to_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        assert_eq!(
            values,
            vec![-0., -1., -4., -5., -6.],
            "values evict with their keys"
        );
        w.push(rows(&[7.]));
        assert_eq!(held(&w), vec![0., 1., 5., 6., 7.]);
        assert_eq!(
            context_bytes(1, 1, WindowSpec { sink: 2, window: 3 }),
            2 * 5 * 4
        );
    }
}
