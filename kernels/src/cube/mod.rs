//! The CubeCL kernels (wgpu and CUDA), on the plain cube backend and on its fused wrapper.
//!
//! [`CubeOps`] is the primitive-level face of the kernels: [`burn_cubecl::CubeBackend`] launches
//! them, and [`burn_fusion::Fusion`] records each call as one custom operation of its stream, so
//! the kernels run in order with the fused graph around them. Both then implement
//! [`KernelBackend`] through the same tensor-level guards: a call the kernels do not cover
//! (switched off, more than [`MAX_SKINNY_ROWS`] rows, mixed dtypes, a broadcast residual) runs the
//! reference.

pub mod accept;
pub mod attention;
mod fusion;
pub mod skinny;

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::prelude::InputScalar;
use burn_cubecl::element::BoolElement;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::accept::{verdicts_from_pairs, BlockVerdict, DraftBlock};
use crate::pool::{PoolLayout, PooledSeq};
use crate::{enabled, pool, reference, KernelBackend, MAX_SKINNY_ROWS};
pub use skinny::Epilogue;

/// The kernels on primitive tensors, for a backend that can launch or record them.
pub trait CubeOps: Backend {
    /// `x[m, k] · w[k, n]` with `epilogue`: `w2` is SwiGLU's up projection, `residual` the
    /// `[m, n]` addend. Every operand has `x`'s dtype.
    fn skinny(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        w2: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
        epilogue: Epilogue,
    ) -> FloatTensor<Self>;

    /// `(accepted, token)` for each of `blocks` blocks, from the argmax of every logit row, the
    /// drafts back to back, and a plan of `(first row, first draft, drafts)` per block.
    fn accept(
        argmax: IntTensor<Self>,
        drafts: IntTensor<Self>,
        plan: IntTensor<Self>,
        blocks: usize,
    ) -> IntTensor<Self>;

    /// Pooled sink-window attention (see [`crate::pool`]); `plan` holds
    /// [`attention::PLAN_FIELDS`] integers per query row, and every float operand has `q`'s dtype.
    #[allow(clippy::too_many_arguments)]
    fn window_attention(
        q: FloatTensor<Self>,
        step_k: FloatTensor<Self>,
        step_v: FloatTensor<Self>,
        pool_k: FloatTensor<Self>,
        pool_v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        plan: IntTensor<Self>,
        layout: PoolLayout,
    ) -> FloatTensor<Self>;
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> CubeOps
    for CubeBackend<R, F, I, BT>
{
    fn skinny(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        w2: Option<FloatTensor<Self>>,
        residual: Option<FloatTensor<Self>>,
        epilogue: Epilogue,
    ) -> FloatTensor<Self> {
        let shape = Shape::new([x.meta.shape()[0], w.meta.shape()[1]]);
        let out = output(&x, shape, x.dtype, Some(f32::NAN));
        skinny::launch(
            with_rows(x),
            with_rows(w),
            w2.map(with_rows),
            residual.map(with_rows),
            &out,
            epilogue,
        );
        out
    }

    fn accept(
        argmax: IntTensor<Self>,
        drafts: IntTensor<Self>,
        plan: IntTensor<Self>,
        blocks: usize,
    ) -> IntTensor<Self> {
        let dtype = argmax.dtype;
        let out = output(&argmax, Shape::new([2 * blocks]), dtype, Some(-1.0));
        let contiguous = burn_cubecl::kernel::into_contiguous;
        accept::launch(
            contiguous(argmax),
            contiguous(drafts),
            contiguous(plan),
            &out,
            blocks,
        );
        out
    }

    fn window_attention(
        q: FloatTensor<Self>,
        step_k: FloatTensor<Self>,
        step_v: FloatTensor<Self>,
        pool_k: FloatTensor<Self>,
        pool_v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        plan: IntTensor<Self>,
        layout: PoolLayout,
    ) -> FloatTensor<Self> {
        let shape = q.meta.shape().clone();
        let out = output(&q, shape, q.dtype, Some(f32::NAN));
        let c = burn_cubecl::kernel::into_contiguous;
        attention::launch(
            c(q),
            c(step_k),
            c(step_v),
            c(pool_k),
            c(pool_v),
            c(cos),
            c(sin),
            c(plan),
            &out,
            &layout,
        );
        out
    }
}

/// A fresh contiguous tensor on `like`'s device. Debug builds fill it with `poison` first, so an
/// element a kernel fails to write shows in every test.
fn output<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Shape,
    dtype: DType,
    poison: Option<f32>,
) -> CubeTensor<R> {
    let (client, device) = (like.client.clone(), like.device.clone());
    match poison {
        Some(v) if cfg!(debug_assertions) => {
            let t = burn_cubecl::ops::numeric::full_device_dtype(
                client,
                shape,
                device,
                InputScalar::new(v, dtype),
                dtype,
            );
            burn_cubecl::kernel::into_contiguous(t)
        }
        _ => {
            let bytes = client.empty(shape.num_elements() * dtype.size());
            CubeTensor::new_contiguous(client, device, shape, bytes, dtype)
        }
    }
}

/// The tensor itself when its rows are contiguous (pitched included), else a contiguous copy.
fn with_rows<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if skinny::rows_contiguous(&t) {
        t
    } else {
        burn_cubecl::kernel::into_contiguous(t)
    }
}

/// Float dtypes the kernels compute in (with f32 accumulation).
fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the skinny kernel covers `x · w` (and the other operands, of the same shape as their
/// counterparts).
fn covers<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, more: &[&Tensor<B, 2>]) -> bool {
    let [m, k] = x.dims();
    let [kw, n] = w.dims();
    let dtype = x.dtype();
    enabled()
        && (1..=MAX_SKINNY_ROWS).contains(&m)
        && k == kw
        && k > 0
        && n > 0
        && kernel_dtype(dtype)
        && w.dtype() == dtype
        && more.iter().all(|t| t.dtype() == dtype)
}

/// A 1-d int tensor of `values` on `device`.
fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

fn float<B: Backend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn linear<B: CubeOps>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    residual: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let shape = [x.dims()[0], w.dims()[1]];
    let fits = match &residual {
        Some(r) => r.dims() == shape && covers(&x, w, &[r]),
        None => covers(&x, w, &[]),
    };
    if !fits {
        return reference::linear(x, w, residual);
    }
    let epilogue = match residual {
        Some(_) => Epilogue::Residual,
        None => Epilogue::Plain,
    };
    let out = B::skinny(
        float(x),
        float(w.clone()),
        None,
        residual.map(float),
        epilogue,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn swiglu<B: CubeOps>(x: Tensor<B, 2>, gate: &Tensor<B, 2>, up: &Tensor<B, 2>) -> Tensor<B, 2> {
    if !(gate.dims() == up.dims() && covers(&x, gate, &[up])) {
        return reference::swiglu(x, gate, up);
    }
    let out = B::skinny(
        float(x),
        float(gate.clone()),
        Some(float(up.clone())),
        None,
        Epilogue::SwiGlu,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn greedy_accept<B: CubeOps>(logits: Tensor<B, 2>, blocks: &[DraftBlock<'_>]) -> Vec<BlockVerdict> {
    if blocks.is_empty() || !enabled() {
        return reference::greedy_accept(logits, blocks);
    }
    let device = logits.device();
    let mut plan = Vec::with_capacity(3 * blocks.len());
    let mut drafts = Vec::new();
    let mut row = 0i64;
    for b in blocks {
        plan.extend([row, drafts.len() as i64, b.drafts.len() as i64]);
        drafts.extend(b.drafts.iter().map(|&d| d as i64));
        row += b.drafts.len() as i64 + 1;
    }
    if drafts.is_empty() {
        // A buffer needs an element; no block reads it.
        drafts.push(-1);
    }
    let argmax = logits.argmax(1).reshape([row as usize]);
    let ints = |v: Vec<i64>| int_tensor::<B>(v, &device).into_primitive();
    let out = B::accept(
        argmax.into_primitive(),
        ints(drafts),
        ints(plan),
        blocks.len(),
    );
    verdicts_from_pairs(Tensor::<B, 1, Int>::from_primitive(out))
}

#[allow(clippy::too_many_arguments)]
fn pooled_attention<B: CubeOps>(
    q: Tensor<B, 2>,
    step_k: Tensor<B, 2>,
    step_v: Tensor<B, 2>,
    pool_k: &Tensor<B, 4>,
    pool_v: &Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    seqs: &[PooledSeq],
    layout: &PoolLayout,
) -> Tensor<B, 2> {
    let dtype = q.dtype();
    let hd = layout.head_dim;
    let fits = enabled()
        && kernel_dtype(dtype)
        && hd >= 2
        && hd.is_multiple_of(2)
        && hd <= 1024
        && layout.kv_heads > 0
        && layout.heads.is_multiple_of(layout.kv_heads)
        && [
            step_k.dtype(),
            step_v.dtype(),
            pool_k.dtype(),
            pool_v.dtype(),
        ]
        .iter()
        .all(|&d| d == dtype);
    let rows = q.dims()[0];
    if !fits || rows == 0 {
        return pool::reference(q, step_k, step_v, pool_k, pool_v, cos, sin, seqs, layout);
    }
    let device = q.device();
    let mut plan = vec![0i64; rows * attention::PLAN_FIELDS];
    for seq in seqs {
        let held = seq.held(layout);
        for (i, row) in seq.queries.clone().enumerate() {
            let fields = [
                1,
                seq.slot as i64,
                seq.seen as i64,
                held as i64,
                seq.keys.start as i64,
                seq.query_index(layout, i) as i64,
            ];
            let at = row * attention::PLAN_FIELDS;
            plan[at..at + attention::PLAN_FIELDS].copy_from_slice(&fields);
        }
    }
    let plan = int_tensor::<B>(plan, &device);
    let table = |t: &Tensor<B, 2>| float(t.clone().cast(dtype));
    let pool = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
    let out = B::window_attention(
        float(q),
        float(step_k),
        float(step_v),
        pool(pool_k),
        pool(pool_v),
        table(cos),
        table(sin),
        plan.into_primitive(),
        *layout,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The tensor-level kernels of a cube backend, one body for the plain and the fused one.
macro_rules! kernel_backend {
    () => {
        fn skinny_linear(
            x: Tensor<Self, 2>,
            w: &Tensor<Self, 2>,
            residual: Option<Tensor<Self, 2>>,
        ) -> Tensor<Self, 2> {
            linear(x, w, residual)
        }

        fn skinny_swiglu(
            x: Tensor<Self, 2>,
            gate: &Tensor<Self, 2>,
            up: &Tensor<Self, 2>,
        ) -> Tensor<Self, 2> {
            swiglu(x, gate, up)
        }

        fn greedy_accept(logits: Tensor<Self, 2>, blocks: &[DraftBlock<'_>]) -> Vec<BlockVerdict> {
            greedy_accept(logits, blocks)
        }

        fn has_attention_kernel() -> bool {
            enabled()
        }

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
            pooled_attention(q, step_k, step_v, pool_k, pool_v, cos, sin, seqs, layout)
        }
    };
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> KernelBackend
    for CubeBackend<R, F, I, BT>
{
    kernel_backend!();
}

impl<B: burn_fusion::FusionBackend + CubeOps> KernelBackend for burn_fusion::Fusion<B> {
    kernel_backend!();
}
