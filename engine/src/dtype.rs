//! Dtype helpers shared by the model's layers and its attention.

use burn::prelude::*;
use burn::tensor::DType;

/// Casts to f32 unless it already is.
pub fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    }
}
