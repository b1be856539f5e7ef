//! troupe's compute kernels for the decode and verify step, each with a reference in plain Burn
//! tensor ops ([`mod@reference`]).
//!
//! A step multiplies a few rows by every weight, attends over bounded windows, and decides how many
//! drafts to keep. [`KernelBackend`] is the one switch the engine calls through: its default
//! methods are the references, and a backend with a kernel of its own overrides them.
//!
//! - Flex (feature `cpu`): the skinny matmul and its SwiGLU and residual epilogues run
//!   [`cpu_matmul`], a weight-streaming kernel that reads weights as checkpoints store them
//!   (`[out, in]`, [`WeightLayout::OutIn`]) in f32, bf16 or f16 (a tied output head is the same
//!   product), RMSNorm [`cpu_norm`]; pooled attention runs [`cpu_attention`] and
//!   rejection-sampling acceptance [`cpu_sampled`], both on the host memory Flex computes in.
//! - [`set_enabled`] (or `TROUPE_KERNELS=reference`) sends every backend to the references.
//! - wgpu and CUDA (feature `cube`, which `wgpu` and `cuda` turn on): the skinny matmul with its
//!   epilogues and greedy acceptance run the CubeCL kernels in `cube`, fused backend or not.
//! - Rejection-sampling acceptance ([`sampled`]) runs as Burn tensor ops on every other backend,
//!   so a sampled verify step reads back two integers per block rather than its logit rows.
//! - Every other backend (autodiff included) runs the references.

pub mod accept;
pub mod cpu_attention;
pub mod cpu_dot;
pub mod cpu_head;
pub mod cpu_matmul;
pub mod cpu_norm;
mod cpu_rows_f32;
pub mod cpu_sampled;
pub mod cpu_weight;
#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cpu")]
mod flex;
mod int8;
pub mod pool;
pub mod reference;
pub mod sampled;
mod switch;

use burn::prelude::*;

pub use accept::{BlockVerdict, DraftBlock};
pub use int8::Int8Weight;
pub use pool::{PoolLayout, PooledSeq};
pub use sampled::SampledBlock;
pub use switch::{enabled, set_enabled};

/// Most rows a skinny kernel takes; taller products (prefill) go to the backend's own matmul.
pub const MAX_SKINNY_ROWS: usize = 64;

/// How a backend keeps a projection's weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// As a checkpoint stores it, `[out, in]`: the product is `x · Wᵀ`, each output a dot
    /// product of rows, and the matrix can be used where the file lies.
    OutIn,
    /// Transposed, `[in, out]`: the product is `x · W`.
    InOut,
}

/// The kernels a decode or verify step calls. Each default method is the reference.
pub trait KernelBackend: Backend {
    /// How this backend keeps projection weights: the loader lays them out so, and
    /// [`KernelBackend::skinny_linear`] and [`KernelBackend::skinny_swiglu`] read them so.
    fn weight_layout() -> WeightLayout {
        WeightLayout::InOut
    }

    /// `x · w` (`w` `[k, n]`) or `x · wᵀ` (`w` `[n, k]`), as [`KernelBackend::weight_layout`]
    /// keeps it, plus `residual` when given. `x` is `[m, k]`.
    fn skinny_linear(
        x: Tensor<Self, 2>,
        w: &Tensor<Self, 2>,
        residual: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        reference::project(x, w, Self::weight_layout(), residual)
    }

    /// `x · wᵀ`: `x` is `[m, k]`, `w` is `[n, k]`, read by rows where it lies (a tied output
    /// head, whose weight is the embedding `[vocab, hidden]`), whatever the projections' layout.
    fn skinny_linear_t(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::linear_t(x, w, None)
    }

    /// `silu(x · gate) ⊙ (x · up)`, the weights in [`KernelBackend::weight_layout`].
    fn skinny_swiglu(
        x: Tensor<Self, 2>,
        gate: &Tensor<Self, 2>,
        up: &Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        reference::project_swiglu(x, gate, up, Self::weight_layout())
    }

    /// `w` (`[n, k]`, a float width) quantized to int8 blocks ([`Int8Weight`]) where this
    /// backend's kernels read them; `None` where they do not, or when `k` is not a whole number
    /// of blocks.
    fn quantize_int8(w: &Tensor<Self, 2>) -> Option<Int8Weight<Self>> {
        let _ = w;
        None
    }

    /// `x · wᵀ`, plus `residual` when given, for an int8 weight `[n, k]`.
    fn skinny_linear_int8(
        x: Tensor<Self, 2>,
        w: &Int8Weight<Self>,
        residual: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        reference::linear_t(x, &w.dequantize(), residual)
    }

    /// `silu(x · gateᵀ) ⊙ (x · upᵀ)` for int8 weights `[n, k]`.
    fn skinny_swiglu_int8(
        x: Tensor<Self, 2>,
        gate: &Int8Weight<Self>,
        up: &Int8Weight<Self>,
    ) -> Tensor<Self, 2> {
        reference::swiglu_t(x, &gate.dequantize(), &up.dequantize())
    }

    /// RMSNorm of each row of `x` `[rows, cols]` scaled by `weight` `[cols]`, in f32 whatever
    /// the activations' dtype.
    fn rms_norm(x: Tensor<Self, 2>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        reference::rms_norm(x, weight, eps)
    }

    /// Greedy acceptance of every block of a verify step; `logits` holds each block's
    /// `drafts.len() + 1` rows back to back.
    fn greedy_accept(logits: Tensor<Self, 2>, blocks: &[DraftBlock<'_>]) -> Vec<BlockVerdict> {
        reference::greedy_accept(logits, blocks)
    }

    /// Each row's argmax of `x · Wᵀ` (`W` the head, `[vocab, hidden]` as an embedding lies)
    /// without materialising the logits, for a step whose every row is greedy; `None` where the
    /// backend has no such kernel, and the caller takes the full logits' argmax instead.
    fn head_argmax(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Option<Vec<u32>> {
        let _ = (x, w);
        None
    }

    /// [`KernelBackend::head_argmax`] over an int8 head.
    fn head_argmax_int8(x: Tensor<Self, 2>, w: &Int8Weight<Self>) -> Option<Vec<u32>> {
        let _ = (x, w);
        None
    }

    /// Rejection-sampling acceptance of every block of a verify step (see [`sampled`]): `logits`
    /// holds each block's `drafts.len() + 1` rows back to back; two integers per block come back.
    fn sampled_accept(logits: Tensor<Self, 2>, blocks: &[SampledBlock<'_>]) -> Vec<BlockVerdict> {
        sampled::sampled_accept(logits, blocks)
    }

    /// Writes rows of a step's keys or values into a pool tensor in place, where this backend
    /// can: row `src[i]` of `rows` (`[n, head_dim]`) goes to `(slot, kv head, position)` `dst[i]`
    /// of `pool` (`[slots, kv_heads, capacity, head_dim]`). `Err` gives the pool back untouched,
    /// and the caller writes it with a gather and a scatter instead (the default: those copy the
    /// pool on backends whose scatter is not in place).
    fn write_pool_rows(
        pool: Tensor<Self, 4>,
        rows: &Tensor<Self, 2>,
        src: &[usize],
        dst: &[[usize; 3]],
    ) -> Result<Tensor<Self, 4>, Tensor<Self, 4>> {
        let _ = (rows, src, dst);
        Err(pool)
    }

    /// A zero-filled pool tensor of `shape` (`[slots, kv_heads, capacity, head_dim]`). A backend
    /// whose host memory is its device's hands out pages the system zeroes when first written,
    /// so a window reserved but not yet filled costs no time and no resident memory.
    fn pool_zeros(
        shape: [usize; 4],
        dtype: burn::tensor::DType,
        device: &Self::Device,
    ) -> Tensor<Self, 4> {
        Tensor::zeros(shape, (device, dtype))
    }

    /// Runs a whole step's work. A backend whose kernels fork over a thread pool runs it on one
    /// of the pool's own threads, so each kernel's fork and join stays inside the pool instead of
    /// waking it from outside and sleeping until it is done, a few hundred times a step.
    fn on_workers<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    /// Whether this backend's products read weights narrower than the rows they multiply (bf16
    /// or f16 weights, f32 activations), widening them where they are read. A model on such a
    /// backend keeps its activations, norms and windows in f32 whatever its weights' width.
    fn widens_weights() -> bool {
        false
    }

    /// Whether [`KernelBackend::pooled_attention`] runs a kernel of this backend's own (the engine
    /// then calls it instead of its batched Burn ops; the reference gathers key by key).
    fn has_attention_kernel() -> bool {
        false
    }

    /// Sink-window attention of a step's query rows over a pool of session windows (see
    /// [`pool`]): `q` is `[rows, heads · head_dim]` before RoPE, `step_k`/`step_v` the step's own
    /// `[step rows, kv_heads · head_dim]`, the pools `[sessions, kv_heads, capacity, head_dim]`,
    /// `cos`/`sin` `[positions, head_dim]`. Returns `[rows, heads · head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn pooled_attention(
        q: Tensor<Self, 2>,
        step_k: Tensor<Self, 2>,
        step_v: Tensor<Self, 2>,
        pool_k: &Tensor<Self, 4>,
        pool_v: &Tensor<Self, 4>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        seqs: &[PooledSeq],
        layout: &PoolLayout,
    ) -> Tensor<Self, 2> {
        pool::reference(q, step_k, step_v, pool_k, pool_v, cos, sin, seqs, layout)
    }
}

/// Training runs the references: gradients flow through plain Burn ops, on weights laid out as
/// the inner backend keeps them (a model moves between the two as it is).
#[cfg(feature = "autodiff")]
impl<B: KernelBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    KernelBackend for burn::backend::Autodiff<B, C>
where
    burn::backend::Autodiff<B, C>: burn::tensor::backend::AutodiffBackend,
{
    fn weight_layout() -> WeightLayout {
        B::weight_layout()
    }
}
