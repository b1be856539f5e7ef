//! The committed keys and values of every open window, in one pool tensor per window shape and
//! layer: `[sessions, kv_heads, sink + window, head_dim]`, each window at its own slot.
//!
//! One tensor per layer lets a backend's attention kernel serve every session of a step in one
//! launch ([`troupe_kernels::KernelBackend::pooled_attention`]).
//!
//! Memory: a pool holds `slots × window bytes`. When its slots run out it grows by a quarter (at
//! least one slot), copying what it holds once, so it stays within 25% of the most windows of its
//! shape open at once, plus the old pool while a growth copies it, and each key is copied a
//! bounded number of times on average. Slots of closed windows are handed out again; the pool
//! is dropped, memory and all, when its last window closes. The runtime's KV budget counts each
//! open window's bytes, so the slack above it is at most that quarter.

use std::collections::HashMap;

use burn::prelude::*;
use burn::tensor::{DType, IndexingUpdateOp};

use troupe_kernels::KernelBackend;

use crate::window_spec::WindowSpec;

/// The pools of one window shape: per layer, keys and values (`None` only while being written).
struct Pool<B: Backend> {
    k: Vec<Option<Tensor<B, 4>>>,
    v: Vec<Option<Tensor<B, 4>>>,
    /// Slots allocated in each tensor.
    slots: usize,
    /// Slots no window holds, lowest last.
    free: Vec<usize>,
}

/// Every window's committed keys and values, on one device.
pub struct KvPool<B: Backend> {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: B::Device,
    pools: HashMap<WindowSpec, Pool<B>>,
}

impl<B: Backend> KvPool<B> {
    /// An empty pool for a model's layers, KV heads, head width and dtype.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        Self {
            layers,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            pools: HashMap::new(),
        }
    }

    /// A free slot for a window of shape `spec`, growing its pool by a quarter when none is left.
    pub fn alloc(&mut self, spec: WindowSpec) -> usize {
        let shape = [self.kv_heads, spec.capacity(), self.head_dim];
        let (layers, dtype, device) = (self.layers, self.dtype, self.device.clone());
        let pool = self.pools.entry(spec).or_insert_with(|| Pool {
            k: vec![None; layers],
            v: vec![None; layers],
            slots: 0,
            free: Vec::new(),
        });
        if let Some(slot) = pool.free.pop() {
            return slot;
        }
        let (old, new) = (pool.slots, pool.slots + (pool.slots / 4).max(1));
        let grow = |t: Option<Tensor<B, 4>>| {
            let more = Tensor::zeros([new - old, shape[0], shape[1], shape[2]], (&device, dtype));
            Some(match t {
                Some(t) => Tensor::cat(vec![t, more], 0),
                None => more,
            })
        };
        for t in pool.k.iter_mut().chain(pool.v.iter_mut()) {
            *t = grow(t.take());
        }
        pool.slots = new;
        pool.free = (old + 1..new).rev().collect();
        old
    }

    /// Gives `slot` back; the pool of `spec` goes away with its last window.
    pub fn release(&mut self, spec: WindowSpec, slot: usize) {
        if let Some(pool) = self.pools.get_mut(&spec) {
            pool.free.push(slot);
            if pool.free.len() == pool.slots {
                self.pools.remove(&spec);
            }
        }
    }

    /// Keys and values of layer `layer` for every window of shape `spec`,
    /// `[slots, kv_heads, capacity, head_dim]`.
    pub fn layer(&self, spec: WindowSpec, layer: usize) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        let pool = &self.pools[&spec];
        let present = "a pool tensor is only absent while written";
        (
            pool.k[layer].as_ref().expect(present),
            pool.v[layer].as_ref().expect(present),
        )
    }

    /// Keys and values of layer `layer` of the window at `slot`, `[kv_heads, capacity, head_dim]`.
    pub fn window(
        &self,
        spec: WindowSpec,
        slot: usize,
        layer: usize,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let (k, v) = self.layer(spec, layer);
        let [_, h, c, d] = k.dims();
        let one = |t: &Tensor<B, 4>| t.clone().slice(slot..slot + 1).reshape([h, c, d]);
        (one(k), one(v))
    }

    /// Slots allocated for windows of shape `spec` (0 when none is open).
    pub fn slots(&self, spec: WindowSpec) -> usize {
        self.pools.get(&spec).map_or(0, |p| p.slots)
    }
}

impl<B: KernelBackend> KvPool<B> {
    /// Commits rows of one step's keys and values to many windows of shape `spec` at once: row
    /// `rows[i]` of every layer's `(k, v)` in `step` (token-major `[n, kv_heads, head_dim]`) goes to
    /// position `targets[i].1` of the window at slot `targets[i].0`, however many windows;
    /// targets must be distinct. A backend that can writes the rows into the pool in place
    /// ([`KernelBackend::write_pool_rows`]); elsewhere each layer's keys and values take one
    /// gather and one scatter.
    pub fn commit_rows(
        &mut self,
        spec: WindowSpec,
        step: &[(Tensor<B, 3>, Tensor<B, 3>)],
        rows: &[usize],
        targets: &[(usize, usize)],
    ) {
        assert_eq!(rows.len(), targets.len(), "one target per row");
        if rows.is_empty() {
            return;
        }
        let pool = self.pools.get_mut(&spec).expect("the windows' pool exists");
        let (h, d) = (self.kv_heads, self.head_dim);
        // Every head of every row: its row in `[n · kv_heads, head_dim]`, and its (slot, head,
        // position) in the pool.
        let src: Vec<usize> = rows
            .iter()
            .flat_map(|&r| (0..h).map(move |hh| r * h + hh))
            .collect();
        let dst: Vec<[usize; 3]> = targets
            .iter()
            .flat_map(|&(slot, pos)| (0..h).map(move |hh| [slot, hh, pos]))
            .collect();
        // The gather and scatter's index tensors, built when a backend first cannot write in place.
        let mut indices: Option<(Tensor<B, 1, Int>, Tensor<B, 2, Int>)> = None;
        for (layer, (k, v)) in step.iter().enumerate() {
            for (store, rows) in [(&mut pool.k[layer], k), (&mut pool.v[layer], v)] {
                let n = rows.dims()[0];
                let rows = rows.clone().reshape([n * h, d]);
                let t = store
                    .take()
                    .expect("a pool tensor is present between writes");
                *store = Some(match B::write_pool_rows(t, &rows, &src, &dst) {
                    Ok(t) => t,
                    Err(t) => {
                        let (s, i) =
                            indices.get_or_insert_with(|| index_tensors(&src, &dst, &self.device));
                        let values = rows.select(0, s.clone());
                        t.scatter_nd(i.clone(), values, IndexingUpdateOp::Assign)
                    }
                });
            }
        }
    }
}

/// `src` and `dst` as the gather's and the scatter's index tensors.
fn index_tensors<B: Backend>(
    src: &[usize],
    dst: &[[usize; 3]],
    device: &B::Device,
) -> (Tensor<B, 1, Int>, Tensor<B, 2, Int>) {
    let src: Vec<i64> = src.iter().map(|&i| i as i64).collect();
    let dst: Vec<i64> = dst.iter().flatten().map(|&i| i as i64).collect();
    let n = src.len();
    (
        Tensor::from_data(TensorData::new(src, [n]), device),
        Tensor::from_data(TensorData::new(dst, [n, 3]), device),
    )
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn rows(n: usize, base: f32) -> Tensor<Flex, 3> {
        let data: Vec<f32> = (0..n * 2 * 3).map(|i| base + i as f32).collect();
        Tensor::from_data(TensorData::new(data, [n, 2, 3]), &Default::default())
    }

    fn host(t: Tensor<Flex, 3>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    #[test]
    fn windows_keep_their_keys_while_the_pool_grows_and_slots_are_reused() {
        let spec = WindowSpec::new(1, 3).unwrap();
        let other = WindowSpec::new(0, 2).unwrap();
        let mut pool = KvPool::<Flex>::new(2, 2, 3, DType::F32, &Default::default());
        let (a, b) = (pool.alloc(spec), pool.alloc(spec));
        assert_eq!((a, b, pool.slots(spec)), (0, 1, 2));
        // Window `a` gets tokens at positions 0..2 of layer 1, `b` one token at position 3.
        let step = |k: f32, v: f32| [(rows(2, 0.5), rows(2, 0.5)), (rows(2, k), rows(2, v))];
        pool.commit_rows(spec, &step(100.0, 200.0), &[0, 1], &[(a, 0), (a, 1)]);
        pool.commit_rows(spec, &step(300.0, 400.0), &[1], &[(b, 3)]);
        let c = pool.alloc(spec);
        assert_eq!(
            (c, pool.slots(spec)),
            (2, 3),
            "the pool grows by a quarter, at least one"
        );
        assert_eq!(pool.alloc(other), 0, "another shape has a pool of its own");
        let (k, v) = pool.window(spec, a, 1);
        let want = |base: f32| -> Vec<f32> {
            // [kv_heads, capacity, head_dim]: positions 0 and 1 hold rows 0 and 1.
            let mut w = vec![0.0; 2 * 4 * 3];
            for (t, h, d) in
                (0..2).flat_map(|t| (0..2).flat_map(move |h| (0..3).map(move |d| (t, h, d))))
            {
                w[(h * 4 + t) * 3 + d] = base + (t * 6 + h * 3 + d) as f32;
            }
            w
        };
        assert_eq!(host(k), want(100.0));
        assert_eq!(host(v), want(200.0));
        let (k, _) = pool.window(spec, b, 1);
        let k = host(k);
        // Head 0, position 3, element 0: element 0 of head 0 of source row 1.
        let (head, pos) = (0, 3);
        assert_eq!(
            k[(head * 4 + pos) * 3],
            306.0,
            "row 1 of the source at position 3"
        );
        assert_eq!(k.iter().filter(|&&x| x != 0.0).count(), 2 * 3);
        pool.release(spec, b);
        assert_eq!(pool.alloc(spec), b, "a released slot is handed out again");
        for slot in [a, b, c] {
            pool.release(spec, slot);
        }
        assert_eq!(
            pool.slots(spec),
            0,
            "the last window takes its pool with it"
        );
        assert_eq!(pool.slots(other), 1);
    }
}
