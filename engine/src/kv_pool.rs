//! The committed keys and values of every open window, per window shape in chunks of slots: each
//! chunk one tensor per layer, `[slots, kv_heads, sink + window, head_dim]`, each window at its own
//! slot of one chunk.
//!
//! A chunk per layer lets a backend's attention kernel serve every session of that chunk in one
//! launch ([`troupe_kernels::KernelBackend::pooled_attention`]).
//!
//! Memory: a shape's slots grow by a new chunk of half as many slots as it already has (at least
//! one) when its slots run out, and nothing is ever copied to grow: a window's keys stay where they
//! were first written. So a shape holds at most 1.5 times the most windows of it open at once (plus
//! one), its chunks number about `log1.5` of that, and opening a window costs the same whether one
//! or a hundred are open. Slots of closed windows are handed out again, lowest first; a shape's
//! chunks are dropped, memory and all, when its last window closes. The runtime's KV budget counts
//! each open window's bytes, so the slack above it is at most that half.

use std::collections::HashMap;

use burn::prelude::*;
use burn::tensor::{DType, IndexingUpdateOp};

use troupe_kernels::KernelBackend;

use crate::window_spec::WindowSpec;

/// A run of slots with one tensor per layer for keys and one for values (`None` only while
/// being written).
struct Chunk<B: Backend> {
    k: Vec<Option<Tensor<B, 4>>>,
    v: Vec<Option<Tensor<B, 4>>>,
    /// The first slot it holds.
    first: usize,
    /// Slots it holds.
    slots: usize,
}

/// The chunks of one window shape.
struct Pool<B: Backend> {
    chunks: Vec<Chunk<B>>,
    /// Slots allocated in all chunks.
    slots: usize,
    /// Slots no window holds, lowest last.
    free: Vec<usize>,
}

impl<B: Backend> Pool<B> {
    /// The chunk holding `slot`, and the slot's index in it.
    fn locate(&self, slot: usize) -> (usize, usize) {
        let at = self.chunks.partition_point(|c| c.first + c.slots <= slot);
        let chunk = &self.chunks[at];
        assert!(slot >= chunk.first, "slot {slot} was never allocated");
        (at, slot - chunk.first)
    }
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

    /// Gives `slot` back; the chunks of `spec` go away with its last window.
    pub fn release(&mut self, spec: WindowSpec, slot: usize) {
        if let Some(pool) = self.pools.get_mut(&spec) {
            // Lowest last, so that the lowest chunks fill first.
            let at = pool.free.partition_point(|&s| s > slot);
            pool.free.insert(at, slot);
            if pool.free.len() == pool.slots {
                self.pools.remove(&spec);
            }
        }
    }

    /// Where the window at `slot` of shape `spec` lives: its chunk, and its slot in that chunk.
    pub fn locate(&self, spec: WindowSpec, slot: usize) -> (usize, usize) {
        self.pools[&spec].locate(slot)
    }

    /// Keys and values of layer `layer` for every window of chunk `chunk` of shape `spec`,
    /// `[chunk slots, kv_heads, capacity, head_dim]`.
    pub fn layer(
        &self,
        spec: WindowSpec,
        chunk: usize,
        layer: usize,
    ) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        let chunk = &self.pools[&spec].chunks[chunk];
        let present = "a pool tensor is only absent while written";
        (
            chunk.k[layer].as_ref().expect(present),
            chunk.v[layer].as_ref().expect(present),
        )
    }

    /// Keys and values of layer `layer` of the window at `slot`, `[kv_heads, capacity, head_dim]`.
    pub fn window(
        &self,
        spec: WindowSpec,
        slot: usize,
        layer: usize,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let (chunk, local) = self.locate(spec, slot);
        let (k, v) = self.layer(spec, chunk, layer);
        let [_, h, c, d] = k.dims();
        let one = |t: &Tensor<B, 4>| t.clone().slice(local..local + 1).reshape([h, c, d]);
        (one(k), one(v))
    }

    /// Slots allocated for windows of shape `spec` (0 when none is open).
    pub fn slots(&self, spec: WindowSpec) -> usize {
        self.pools.get(&spec).map_or(0, |p| p.slots)
    }

    /// Chunks holding the windows of shape `spec` (0 when none is open).
    pub fn chunks(&self, spec: WindowSpec) -> usize {
        self.pools.get(&spec).map_or(0, |p| p.chunks.len())
    }
}

impl<B: KernelBackend> KvPool<B> {
    /// A free slot for a window of shape `spec`, adding a chunk of half as many slots as the
    /// shape has (at least one) when none is left.
    pub fn alloc(&mut self, spec: WindowSpec) -> usize {
        let shape = [self.kv_heads, spec.capacity(), self.head_dim];
        let pool = self.pools.entry(spec).or_insert_with(|| Pool {
            chunks: Vec::new(),
            slots: 0,
            free: Vec::new(),
        });
        if let Some(slot) = pool.free.pop() {
            return slot;
        }
        let (first, more) = (pool.slots, (pool.slots / 2).max(1));
        let (dtype, device) = (self.dtype, &self.device);
        let zeros = || {
            Some(B::pool_zeros(
                [more, shape[0], shape[1], shape[2]],
                dtype,
                device,
            ))
        };
        pool.chunks.push(Chunk {
            k: (0..self.layers).map(|_| zeros()).collect(),
            v: (0..self.layers).map(|_| zeros()).collect(),
            first,
            slots: more,
        });
        pool.slots += more;
        pool.free = (first + 1..pool.slots).rev().collect();
        first
    }

    /// Commits rows of one step's keys and values to many windows of shape `spec` at once: row
    /// `rows[i]` of every layer's `(k, v)` in `step` (token-major `[n, kv_heads, head_dim]`) goes to
    /// position `targets[i].1` of the window at slot `targets[i].0`, however many windows;
    /// targets must be distinct. A backend that can writes the rows into each chunk in place
    /// ([`KernelBackend::write_pool_rows`]); elsewhere each chunk's keys and values of a layer take
    /// one gather and one scatter.
    pub fn commit_rows(
        &mut self,
        spec: WindowSpec,
        step: &[(Tensor<B, 3>, Tensor<B, 3>)],
        rows: &[usize],
        targets: &[(usize, usize)],
    ) {
        assert_eq!(rows.len(), targets.len(), "one target per row");
        let pool = self.pools.get_mut(&spec).expect("the windows' pool exists");
        let (h, d) = (self.kv_heads, self.head_dim);
        // Every head of every row, by chunk: its row in `[n · kv_heads, head_dim]`, and its (slot
        // in the chunk, head, position).
        let mut by_chunk: Vec<(Vec<usize>, Vec<[usize; 3]>)> =
            vec![(Vec::new(), Vec::new()); pool.chunks.len()];
        for (&r, &(slot, pos)) in rows.iter().zip(targets) {
            let (chunk, local) = pool.locate(slot);
            let (src, dst) = &mut by_chunk[chunk];
            src.extend((0..h).map(|hh| r * h + hh));
            dst.extend((0..h).map(|hh| [local, hh, pos]));
        }
        for (chunk, (src, dst)) in pool.chunks.iter_mut().zip(by_chunk) {
            if src.is_empty() {
                continue;
            }
            // The gather and scatter's index tensors, built when a backend first cannot write
            // in place.
            let mut indices = None;
            for (layer, (k, v)) in step.iter().enumerate() {
                for (store, rows) in [(&mut chunk.k[layer], k), (&mut chunk.v[layer], v)] {
                    let n = rows.dims()[0];
                    let rows = rows.clone().reshape([n * h, d]);
                    write_rows(store, &rows, &src, &dst, &mut indices, &self.device);
                }
            }
        }
    }

    /// Copies the keys and values at `positions` of the window at slot `from` to the same
    /// positions of the window at slot `to`, both of shape `spec`, in every layer: the window of
    /// a forked session. Each layer's rows are gathered first, so `from` and `to` may share a
    /// chunk.
    pub fn copy_positions(
        &mut self,
        spec: WindowSpec,
        from: usize,
        to: usize,
        positions: &[usize],
    ) {
        if positions.is_empty() {
            return;
        }
        let (h, d, c) = (self.kv_heads, self.head_dim, spec.capacity());
        let (chunk, local) = self.locate(spec, to);
        // Head-major rows of the source window, `[kv_heads · capacity, head_dim]`, and where each
        // goes in the target's chunk.
        let gather: Vec<i64> = (0..h)
            .flat_map(|hh| positions.iter().map(move |&p| (hh * c + p) as i64))
            .collect();
        let dst: Vec<[usize; 3]> = (0..h)
            .flat_map(|hh| positions.iter().map(move |&p| [local, hh, p]))
            .collect();
        let n = gather.len();
        let gather = Tensor::<B, 1, Int>::from_data(TensorData::new(gather, [n]), &self.device);
        let src: Vec<usize> = (0..n).collect();
        let mut indices = None;
        for layer in 0..self.layers {
            let (k, v) = self.window(spec, from, layer);
            let rows = [k, v].map(|t| t.reshape([h * c, d]).select(0, gather.clone()));
            let target = &mut self
                .pools
                .get_mut(&spec)
                .expect("the windows' pool exists")
                .chunks[chunk];
            let [k_rows, v_rows] = rows;
            write_rows(
                &mut target.k[layer],
                &k_rows,
                &src,
                &dst,
                &mut indices,
                &self.device,
            );
            write_rows(
                &mut target.v[layer],
                &v_rows,
                &src,
                &dst,
                &mut indices,
                &self.device,
            );
        }
    }
}

/// The gather's and the scatter's index tensors of a write that a backend cannot do in place.
type RowIndices<B> = (Tensor<B, 1, Int>, Tensor<B, 2, Int>);

/// Writes row `src[i]` of `rows` (`[n, head_dim]`) to (slot in the chunk, head, position)
/// `dst[i]` of the chunk tensor in `store`: in place where the backend can
/// ([`KernelBackend::write_pool_rows`]), else with one gather and one scatter, whose index
/// tensors `indices` keeps for the next call with the same `src` and `dst`.
fn write_rows<B: KernelBackend>(
    store: &mut Option<Tensor<B, 4>>,
    rows: &Tensor<B, 2>,
    src: &[usize],
    dst: &[[usize; 3]],
    indices: &mut Option<RowIndices<B>>,
    device: &B::Device,
) {
    let t = store
        .take()
        .expect("a pool tensor is present between writes");
    *store = Some(match B::write_pool_rows(t, rows, src, dst) {
        Ok(t) => t,
        Err(t) => {
            let (s, i) = indices.get_or_insert_with(|| index_tensors(src, dst, device));
            let values = rows.clone().select(0, s.clone());
            t.scatter_nd(i.clone(), values, IndexingUpdateOp::Assign)
        }
    });
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
            (c, pool.slots(spec), pool.chunks(spec)),
            (2, 3, 3),
            "a shape grows by a chunk of half its slots, at least one"
        );
        let (d, e) = (pool.alloc(spec), pool.alloc(spec));
        assert_eq!((d, e, pool.slots(spec), pool.chunks(spec)), (3, 4, 6, 5));
        assert_eq!(pool.locate(spec, e), (4, 0), "slots 4 and 5 share a chunk");
        pool.commit_rows(spec, &step(500.0, 600.0), &[0], &[(e, 2)]);
        let (k, _) = pool.window(spec, e, 1);
        assert_eq!(
            host(k)[(4 + 2) * 3],
            503.0,
            "head 1 at position 2 of the fifth window"
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
        pool.release(spec, d);
        pool.release(spec, b);
        assert_eq!(
            pool.alloc(spec),
            b,
            "the lowest released slot is handed out first"
        );
        assert_eq!(pool.alloc(spec), d);
        assert_eq!(pool.alloc(spec), 5, "then the last chunk's free slot");
        for slot in [a, b, c, d, e, 5] {
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
