//! The reference for every kernel, in plain Burn tensor ops. Backends without a kernel of their own
//! run these, and the tests hold each kernel to them.

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::DType;

use crate::accept::{verdicts_from_pairs, BlockVerdict, DraftBlock};
use crate::WeightLayout;

/// `x · w`, plus `residual` when given. `x` is `[m, k]`, `w` is `[k, n]`.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    residual: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let w = like(w, &x);
    let y = x.matmul(w);
    match residual {
        Some(r) => r + y,
        None => y,
    }
}

/// `x · wᵀ`, plus `residual` when given, for `w` stored `[n, k]`: a projection as a checkpoint
/// stores it, or a tied output head, whose weight is the embedding.
pub fn linear_t<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    residual: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let w = like(w, &x);
    let y = x.matmul(w.transpose());
    match residual {
        Some(r) => r + y,
        None => y,
    }
}

/// `silu(x · gate) ⊙ (x · up)`, the SwiGLU half of a gated MLP, weights `[k, n]`.
pub fn swiglu<B: Backend>(x: Tensor<B, 2>, gate: &Tensor<B, 2>, up: &Tensor<B, 2>) -> Tensor<B, 2> {
    let (gate, up) = (like(gate, &x), like(up, &x));
    silu(x.clone().matmul(gate)) * x.matmul(up)
}

/// `silu(x · gateᵀ) ⊙ (x · upᵀ)`, weights `[n, k]`.
pub fn swiglu_t<B: Backend>(
    x: Tensor<B, 2>,
    gate: &Tensor<B, 2>,
    up: &Tensor<B, 2>,
) -> Tensor<B, 2> {
    let (gate, up) = (like(gate, &x), like(up, &x));
    silu(x.clone().matmul(gate.transpose())) * x.matmul(up.transpose())
}

/// [`linear`] or [`linear_t`], as `layout` keeps `w`.
pub fn project<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    layout: WeightLayout,
    residual: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    match layout {
        WeightLayout::InOut => linear(x, w, residual),
        WeightLayout::OutIn => linear_t(x, w, residual),
    }
}

/// [`swiglu`] or [`swiglu_t`], as `layout` keeps the weights.
pub fn project_swiglu<B: Backend>(
    x: Tensor<B, 2>,
    gate: &Tensor<B, 2>,
    up: &Tensor<B, 2>,
    layout: WeightLayout,
) -> Tensor<B, 2> {
    match layout {
        WeightLayout::InOut => swiglu(x, gate, up),
        WeightLayout::OutIn => swiglu_t(x, gate, up),
    }
}

/// A weight in the activations' dtype: kept narrower than the rows it multiplies (bf16 weights
/// for f32 activations on the CPU), it is widened here, a copy only the reference makes.
fn like<B: Backend, const D: usize>(w: &Tensor<B, D>, x: &Tensor<B, 2>) -> Tensor<B, D> {
    if w.dtype() == x.dtype() {
        w.clone()
    } else {
        w.clone().cast(x.dtype())
    }
}

/// RMSNorm of each row of `x` `[rows, cols]`, scaled by `weight` `[cols]`, computed in f32
/// whatever the activations' dtype and given back in it.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: &Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let dtype = x.dtype();
    let f32s = |t: Tensor<B, 2>| {
        if t.dtype() == DType::F32 {
            t
        } else {
            t.cast(DType::F32)
        }
    };
    let x = f32s(x);
    let rms = x.clone().square().mean_dim(1).add_scalar(eps).sqrt();
    let w = f32s(weight.clone().unsqueeze_dim(0));
    ((x / rms) * w).cast(dtype)
}

/// Greedy acceptance for every block at once: the verifier's argmax is taken on the device and
/// compared with the drafts there; only two integers per block come back.
///
/// `logits` holds each block's `drafts.len() + 1` rows back to back, in the order of `blocks`.
pub fn greedy_accept<B: Backend>(
    logits: Tensor<B, 2>,
    blocks: &[DraftBlock<'_>],
) -> Vec<BlockVerdict> {
    if blocks.is_empty() {
        return Vec::new();
    }
    let device = logits.device();
    let width = blocks.iter().map(|b| b.drafts.len()).max().unwrap_or(0) + 1;
    let s = blocks.len();
    // Row of each (block, position), clamped to the block's last row; drafts padded with -1, which
    // no argmax equals.
    let mut rows = Vec::with_capacity(s * width);
    let mut drafts = Vec::with_capacity(s * width);
    let mut start = 0i64;
    for b in blocks {
        let n = b.drafts.len() as i64;
        for i in 0..width as i64 {
            rows.push(start + i.min(n));
            drafts.push(b.drafts.get(i as usize).map_or(-1, |&d| d as i64));
        }
        start += n + 1;
    }
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [s * width]), &device);
    let drafts = Tensor::<B, 2, Int>::from_data(TensorData::new(drafts, [s, width]), &device);
    let argmax = logits.cast(DType::F32).argmax(1).reshape([start as usize]);
    let picked = argmax.select(0, rows).reshape([s, width]); // [s, width]
                                                             // Leading matches: a position counts while no mismatch came before or at it.
    let mismatch = picked.clone().not_equal(drafts).int();
    let accepted = mismatch.cumsum(1).equal_elem(0).int().sum_dim(1); // [s, 1]
    let bonus = picked.gather(1, accepted.clone());
    verdicts_from_pairs(Tensor::cat(vec![accepted, bonus], 1))
}
