//! Test bodies shared by every backend: each kernel against its reference on random inputs, many
//! shapes, odd sizes and ragged batches.
#![allow(dead_code)]

use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use troupe_kernels::accept::verdicts_from_argmax;
use troupe_kernels::{reference, DraftBlock, KernelBackend};

/// `(m, k, n)` shapes: single rows, odd sizes, tile edges, the 64-row limit and past it.
pub const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 64, 64),
    (1, 257, 129),
    (2, 33, 17),
    (5, 96, 300),
    (6, 128, 16),
    (7, 31, 1000),
    (16, 200, 77),
    (33, 64, 513),
    (64, 128, 96),
    (65, 40, 24),
];

fn random<B: Backend>(shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
}

/// Largest absolute difference, relative to the reference's largest magnitude (at least 1).
fn rel_err<B: Backend>(got: Tensor<B, 2>, want: Tensor<B, 2>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let scale = want.clone().abs().max().into_scalar().to_f32().max(1.0);
    let diff = (got.cast(DType::F32) - want.cast(DType::F32)).abs().max();
    diff.into_scalar().to_f32() / scale
}

/// The projection, with and without the residual, in the weights' dtype.
pub fn linear_matches_reference<B: KernelBackend>(device: &B::Device, dtype: DType, tol: f32) {
    for &(m, k, n) in SHAPES {
        let x = random::<B>([m, k], device);
        let w = random::<B>([k, n], device).cast(dtype);
        let r = random::<B>([m, n], device);
        let xw = x.clone().cast(dtype);
        let want = reference::linear(xw.clone(), &w, None);
        let got = B::skinny_linear(xw.clone(), &w, None);
        let e = rel_err(got, want);
        assert!(e < tol, "linear {m}x{k}x{n} {dtype:?}: error {e}");
        let rw = r.cast(dtype);
        let want = reference::linear(xw.clone(), &w, Some(rw.clone()));
        let got = B::skinny_linear(xw, &w, Some(rw));
        let e = rel_err(got, want);
        assert!(e < tol, "linear+residual {m}x{k}x{n} {dtype:?}: error {e}");
    }
}

/// The SwiGLU product of two weights.
pub fn swiglu_matches_reference<B: KernelBackend>(device: &B::Device, dtype: DType, tol: f32) {
    for &(m, k, n) in SHAPES {
        let x = random::<B>([m, k], device).cast(dtype);
        let g = random::<B>([k, n], device).cast(dtype);
        let u = random::<B>([k, n], device).cast(dtype);
        let want = reference::swiglu(x.clone(), &g, &u);
        let got = B::skinny_swiglu(x, &g, &u);
        let e = rel_err(got, want);
        assert!(e < tol, "swiglu {m}x{k}x{n} {dtype:?}: error {e}");
    }
}

/// Ragged blocks whose drafts agree with the argmax for a chosen number of leading positions.
pub fn greedy_accept_matches_host<B: KernelBackend>(device: &B::Device) {
    let vocab = 1000;
    // (drafts, leading drafts that agree): an empty block, whole blocks, early misses.
    let plan: &[(usize, usize)] = &[
        (0, 0),
        (4, 4),
        (4, 0),
        (1, 1),
        (7, 3),
        (2, 1),
        (9, 9),
        (3, 2),
    ];
    let rows: usize = plan.iter().map(|(d, _)| d + 1).sum();
    let logits = random::<B>([rows, vocab], device);
    let argmax: Vec<u32> = logits
        .clone()
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let mut start = 0;
    let drafts: Vec<Vec<u32>> = plan
        .iter()
        .map(|&(d, agree)| {
            let block = (0..d)
                .map(|i| {
                    let a = argmax[start + i];
                    if i < agree {
                        a
                    } else {
                        (a + 1 + i as u32) % vocab as u32
                    }
                })
                .collect();
            start += d + 1;
            block
        })
        .collect();
    let blocks: Vec<DraftBlock<'_>> = drafts.iter().map(|d| DraftBlock { drafts: d }).collect();
    let want = verdicts_from_argmax(&argmax, &blocks);
    for (v, &(_, agree)) in want.iter().zip(plan) {
        assert_eq!(v.accepted, agree, "the plan's agreement");
    }
    assert_eq!(B::greedy_accept(logits.clone(), &blocks), want, "kernel");
    assert_eq!(reference::greedy_accept(logits, &blocks), want, "reference");
}
