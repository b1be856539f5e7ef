//! Turning logits into a distribution (temperature, top-p) and drawing from it.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How a sequence picks its next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass kept (1.0 keeps everything).
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
        }
    }

    /// Whether this is argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The distribution `params` induces over the vocabulary: one-hot at the argmax when greedy, else the
/// softmax of `logits / temperature` restricted to the smallest top-p nucleus and renormalised.
pub fn distribution(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let n = logits.len();
    if params.is_greedy() {
        let mut p = vec![0.0; n];
        p[argmax(logits) as usize] = 1.0;
        return p;
    }
    let t = params.temperature;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    if params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let mut cum = 0.0;
        let mut keep = n;
        for (rank, &i) in order.iter().enumerate() {
            cum += p[i];
            if cum >= params.top_p {
                keep = rank + 1;
                break;
            }
        }
        let mut kept = vec![0.0; n];
        for &i in &order[..keep] {
            kept[i] = p[i];
        }
        let s: f32 = kept.iter().sum();
        kept.iter_mut().for_each(|x| *x /= s);
        p = kept;
    }
    p
}

/// Draws an index from a distribution that sums to one (up to rounding).
pub fn sample<R: Rng + ?Sized>(probs: &[f32], rng: &mut R) -> u32 {
    let total: f32 = probs.iter().sum();
    let mut u = rng.random::<f32>() * total;
    let mut last_positive = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_positive = i;
            if u < p {
                return i as u32;
            }
            u -= p;
        }
    }
    last_positive as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_one_hot_at_the_argmax() {
        let p = distribution(&[0.1, 3.0, -2.0], &SamplingParams::greedy());
        assert_eq!(p, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        let logits = [2.0f32.ln(), 1.0f32.ln(), 1.0f32.ln()]; // probs 0.5, 0.25, 0.25
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
        };
        let p = distribution(&logits, &params);
        assert!(
            (p[0] - 1.0).abs() < 1e-6 && p[1] == 0.0 && p[2] == 0.0,
            "{p:?}"
        );
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
        };
        let p = distribution(&logits, &params);
        assert!((p[0] - 2.0 / 3.0).abs() < 1e-6 && p.iter().filter(|&&x| x > 0.0).count() == 2);
    }
}
