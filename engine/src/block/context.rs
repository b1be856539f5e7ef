//! A block drafter's per-sequence context: each drafter layer's keys (rotated at their positions,
//! transposed) and values of the fused verifier states, with the sink + sliding window semantics
//! of the verifier's own windows and an exact byte bound.

use burn::prelude::*;

use crate::window::WindowSpec;

/// One sequence's context, per drafter layer: keys `[kv_heads, head_dim, rows]` and values
/// `[kv_heads, rows, head_dim]`, f32.
#[derive(Debug, Clone)]
pub struct ContextWindow<B: Backend> {
    spec: WindowSpec,
    layers: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
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

    /// Rows ever added, evicted ones included: the position the next row takes.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The held rows of each layer: keys `[kv_heads, head_dim, rows]`, values `[kv_heads, rows,
    /// head_dim]`.
    pub fn layers(&self) -> &[(Tensor<B, 3>, Tensor<B, 3>)] {
        &self.layers
    }

    /// Appends rows (per layer keys `[kv_heads, head_dim, new]` and values `[kv_heads, new,
    /// head_dim]`), then evicts past the capacity: the first `sink` rows ever added stay, and the
    /// latest `window` after them.
    pub fn push(&mut self, new: Vec<(Tensor<B, 3>, Tensor<B, 3>)>) {
        let Some(n) = new.first().map(|(k, _)| k.dims()[2]) else {
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
                    (Tensor::cat(vec![k, nk], 2), Tensor::cat(vec![v, nv], 1))
                })
                .collect()
        };
        self.rows += n;
        self.seen += n as u64;
        let cap = self.spec.capacity();
        if self.rows > cap {
            let (sink, window, rows) = (self.spec.sink, self.spec.window, self.rows);
            let keep = |t: Tensor<B, 3>, dim: usize| {
                let tail = t.clone().narrow(dim, rows - window, window);
                if sink == 0 {
                    tail
                } else {
                    Tensor::cat(vec![t.narrow(dim, 0, sink), tail], dim)
                }
            };
            self.layers = std::mem::take(&mut self.layers)
                .into_iter()
                .map(|(k, v)| (keep(k, 2), keep(v, 1)))
                .collect();
            self.rows = cap;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn rows(values: &[f32]) -> Vec<(Tensor<Flex, 3>, Tensor<Flex, 3>)> {
        let n = values.len();
        let t = Tensor::<Flex, 1>::from_data(
            TensorData::new(values.to_vec(), [n]),
            &Default::default(),
        );
        vec![(t.clone().reshape([1, 1, n]), t.neg().reshape([1, n, 1]))]
    }

    fn held(w: &ContextWindow<Flex>) -> (Vec<f32>, Vec<f32>) {
        let (k, v) = &w.layers()[0];
        (
            k.to_data().convert::<f32>().into_vec().unwrap(),
            v.to_data().convert::<f32>().into_vec().unwrap(),
        )
    }

    #[test]
    fn keeps_the_sinks_and_the_latest_window() {
        let mut w = ContextWindow::<Flex>::new(WindowSpec { sink: 2, window: 3 });
        w.push(rows(&[0., 1., 2.]));
        assert_eq!(held(&w).0, vec![0., 1., 2.]);
        w.push(rows(&[3., 4., 5., 6.]));
        assert_eq!(held(&w).0, vec![0., 1., 4., 5., 6.]);
        assert_eq!((w.len(), w.seen()), (5, 7));
        assert_eq!(
            held(&w).1,
            vec![-0., -1., -4., -5., -6.],
            "values evict with their keys"
        );
        w.push(rows(&[7.]));
        assert_eq!(held(&w).0, vec![0., 1., 5., 6., 7.]);
        assert_eq!(
            context_bytes(1, 1, WindowSpec { sink: 2, window: 3 }),
            2 * 5 * 4
        );
    }
}
