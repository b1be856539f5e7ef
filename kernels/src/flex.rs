//! Flex, Burn's CPU backend: the skinny products run the weight-streaming [`cpu_matmul`] kernel.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};

use crate::accept::verdicts_from_argmax;
use crate::cpu_matmul::{skinny_matmul, CpuEpilogue};
use crate::{enabled, reference, KernelBackend, MAX_SKINNY_ROWS};
use crate::{BlockVerdict, DraftBlock};

impl KernelBackend for Flex {
    fn skinny_linear(
        x: Tensor<Self, 2>,
        w: &Tensor<Self, 2>,
        residual: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        if !skinny_f32(&x, &[w]) || residual.as_ref().is_some_and(|r| r.dtype() != DType::F32) {
            return reference::linear(x, w, residual);
        }
        let ([m, k], n) = (x.dims(), w.dims()[1]);
        let (x, w) = (f32_storage(x), f32_storage(w.clone()));
        let y = match residual.map(f32_storage) {
            Some(r) => skinny_matmul(
                slice(&x),
                slice(&w),
                m,
                k,
                n,
                CpuEpilogue::Residual(slice(&r)),
            ),
            None => skinny_matmul(slice(&x), slice(&w), m, k, n, CpuEpilogue::None),
        };
        from_rows(y, [m, n])
    }

    fn skinny_swiglu(
        x: Tensor<Self, 2>,
        gate: &Tensor<Self, 2>,
        up: &Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        if !skinny_f32(&x, &[gate, up]) || gate.dims() != up.dims() {
            return reference::swiglu(x, gate, up);
        }
        let ([m, k], n) = (x.dims(), gate.dims()[1]);
        let (x, g, u) = (
            f32_storage(x),
            f32_storage(gate.clone()),
            f32_storage(up.clone()),
        );
        let y = skinny_matmul(
            slice(&x),
            slice(&g),
            m,
            k,
            n,
            CpuEpilogue::SwiGlu(slice(&u)),
        );
        from_rows(y, [m, n])
    }

    /// On the CPU the host is the device: the argmax rows are compared where they are.
    fn greedy_accept(logits: Tensor<Self, 2>, blocks: &[DraftBlock<'_>]) -> Vec<BlockVerdict> {
        if !enabled() {
            return reference::greedy_accept(logits, blocks);
        }
        let argmax: Vec<u32> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("an int tensor reads back as i64")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        verdicts_from_argmax(&argmax, blocks)
    }
}

/// Whether the kernel takes this product: few rows, f32 throughout, matching inner sizes.
fn skinny_f32(x: &Tensor<Flex, 2>, weights: &[&Tensor<Flex, 2>]) -> bool {
    let [m, k] = x.dims();
    enabled()
        && m <= MAX_SKINNY_ROWS
        && x.dtype() == DType::F32
        && weights
            .iter()
            .all(|w| w.dtype() == DType::F32 && w.dims()[0] == k)
}

/// The tensor's storage, made contiguous when it is a strided view.
fn f32_storage(t: Tensor<Flex, 2>) -> FlexTensor {
    let t = t.into_primitive().tensor();
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The contiguous f32 elements of a tensor from [`f32_storage`].
fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("made contiguous f32 by f32_storage")
}

/// A row-major result as a Flex tensor.
fn from_rows(y: Vec<f32>, shape: [usize; 2]) -> Tensor<Flex, 2> {
    let t = FlexTensor::from_data(TensorData::new(y, shape));
    Tensor::from_primitive(TensorPrimitive::Float(t))
}
