//! Rotary position embedding in Hugging Face's rotate-half convention, with Llama 3 / linear scaling.
//!
//! HF checkpoints pair dimension `i` with `i + head_dim/2` (rotate-half), not adjacent pairs as Burn's
//! `RotaryEncoding` does, so the table and the rotation are written here.

use burn::prelude::*;

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `theta^(-2i/d)` for `i < d/2`, with the config's scaling applied.
pub fn inv_freq(config: &ModelConfig) -> Vec<f64> {
    let d = config.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_wavelen = old_len / low_freq_factor;
            let high_wavelen = old_len / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Cos and sin tables `[positions, head_dim]` (each half repeated), grown on demand.
#[derive(Debug, Clone)]
pub struct RopeTable<B: Backend> {
    inv_freq: Vec<f64>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    len: usize,
}

impl<B: Backend> RopeTable<B> {
    /// A table covering positions `0..len`.
    pub fn new(config: &ModelConfig, len: usize, device: &B::Device) -> Self {
        let inv_freq = inv_freq(config);
        let (cos, sin) = build(&inv_freq, len, device);
        Self {
            inv_freq,
            cos,
            sin,
            len,
        }
    }

    /// Makes sure positions `0..len` are covered, doubling the table when they are not.
    pub fn ensure(&mut self, len: usize) {
        if len > self.len {
            let new_len = len.max(self.len * 2);
            let (cos, sin) = build(&self.inv_freq, new_len, &self.cos.device());
            self.cos = cos;
            self.sin = sin;
            self.len = new_len;
        }
    }

    /// Cos and sin rows for the consecutive positions `start..start + n`, as `[n, head_dim]`.
    pub fn range(&self, start: usize, n: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let d = self.cos.dims()[1];
        let cos = self.cos.clone().slice([start..start + n, 0..d]);
        let sin = self.sin.clone().slice([start..start + n, 0..d]);
        (cos, sin)
    }

    /// The whole cos and sin tables, `[positions, head_dim]` each.
    pub fn tables(&self) -> (&Tensor<B, 2>, &Tensor<B, 2>) {
        (&self.cos, &self.sin)
    }

    /// Cos and sin rows for arbitrary positions, as `[n, head_dim]`.
    pub fn gather(&self, positions: Tensor<B, 1, Int>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let cos = self.cos.clone().select(0, positions.clone());
        let sin = self.sin.clone().select(0, positions);
        (cos, sin)
    }
}

fn build<B: Backend>(
    inv_freq: &[f64],
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * half * 2);
    let mut sin = Vec::with_capacity(len * half * 2);
    for p in 0..len {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let shape = [len, half * 2];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Rotates `x` (`[heads, n, head_dim]`) by `[n, head_dim]` cos/sin rows, rotate-half style.
pub fn apply<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
    let [h, n, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..h, 0..n, 0..half]);
    let x2 = x.clone().slice([0..h, 0..n, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    let dtype = x.dtype();
    let cos: Tensor<B, 3> = cos.clone().cast(dtype).unsqueeze_dim(0);
    let sin: Tensor<B, 3> = sin.clone().cast(dtype).unsqueeze_dim(0);
    x * cos + rotated * sin
}
