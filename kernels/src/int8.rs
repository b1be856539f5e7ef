//! A projection's weight in int8, as llama.cpp's Q8_0 keeps it: each row in blocks of
//! [`Q8_BLOCK`] values that share one scale (the block's largest magnitude over 127).

use burn::prelude::*;

use crate::cpu_weight::Q8_BLOCK;

/// An int8 weight `[n, k]`: element `(r, c)` is `scales[r, c / 32] · values[r, c]`. Made by
/// [`crate::KernelBackend::quantize_int8`].
#[derive(Debug, Clone)]
pub struct Int8Weight<B: Backend> {
    /// `[n, k]` int8 values.
    pub values: Tensor<B, 2, Int>,
    /// `[n, k / 32]` f32 scales.
    pub scales: Tensor<B, 2>,
}

impl<B: Backend> Int8Weight<B> {
    /// `[n, k]`.
    pub fn dims(&self) -> [usize; 2] {
        self.values.dims()
    }

    /// The f32 values the weight stands for (what the references multiply by).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [n, k] = self.values.dims();
        let blocks = k / Q8_BLOCK;
        let values = self.values.clone().float().reshape([n, blocks, Q8_BLOCK]);
        (values * self.scales.clone().reshape([n, blocks, 1])).reshape([n, k])
    }
}
