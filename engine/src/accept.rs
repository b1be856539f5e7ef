//! Lossless speculative acceptance: greedy prefix matching, and rejection sampling
//! (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).

use rand::Rng;

use crate::sampling::{argmax, distribution, sample, SamplingParams};

/// The verdict on one drafted block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    /// Drafted tokens accepted.
    pub accepted: usize,
    /// The accepted drafts followed by the one token the verifier adds (correction or bonus).
    pub tokens: Vec<u32>,
}

impl Acceptance {
    /// Cuts the emitted tokens after the first of the `stop` tokens. Drafts past it are no longer
    /// accepted, so only what plain decoding would have committed is committed.
    pub fn stop_at(mut self, stop: &[u32]) -> Self {
        if let Some(p) = self.tokens.iter().position(|t| stop.contains(t)) {
            self.tokens.truncate(p + 1);
            self.accepted = self.accepted.min(p);
        }
        self
    }
}

/// Greedy acceptance: the longest prefix of `draft` equal to the verifier's argmax at each position,
/// then the verifier's own token at the first mismatch (or after the whole block). `argmaxes` has
/// `draft.len() + 1` entries.
pub fn accept_greedy(draft: &[u32], argmaxes: &[u32]) -> Acceptance {
    let accepted = draft
        .iter()
        .zip(argmaxes)
        .take_while(|(d, a)| d == a)
        .count();
    let mut tokens = draft[..accepted].to_vec();
    tokens.push(argmaxes[accepted]);
    Acceptance { accepted, tokens }
}

/// Rejection sampling over a block. `target_logits[i]` are the verifier's logits at draft position `i`
/// (`draft.len() + 1` rows); `draft_probs[i]` is the distribution the drafter drew `draft[i]` from, or
/// `None` for a deterministic drafter (a point mass). The emitted tokens are distributed exactly as
/// sampling the verifier alone with `params`.
pub fn accept_sampled<R: Rng + ?Sized>(
    draft: &[u32],
    draft_probs: Option<&[Vec<f32>]>,
    target_logits: &[Vec<f32>],
    params: &SamplingParams,
    rng: &mut R,
) -> Acceptance {
    if params.is_greedy() {
        let argmaxes: Vec<u32> = target_logits.iter().map(|l| argmax(l)).collect();
        return accept_greedy(draft, &argmaxes);
    }
    let mut tokens = Vec::with_capacity(draft.len() + 1);
    for (i, &d) in draft.iter().enumerate() {
        let p = distribution(&target_logits[i], params);
        let q_d = match draft_probs {
            Some(q) => q[i][d as usize],
            None => 1.0,
        };
        let p_d = p[d as usize];
        let u: f32 = rng.random();
        if q_d > 0.0 && u < (p_d / q_d).min(1.0) {
            tokens.push(d);
            continue;
        }
        // Rejected: draw from the normalised residual max(0, p - q).
        let residual: Vec<f32> = match draft_probs {
            Some(q) => p.iter().zip(&q[i]).map(|(a, b)| (a - b).max(0.0)).collect(),
            None => {
                let mut r = p.clone();
                r[d as usize] = 0.0;
                r
            }
        };
        let mass: f32 = residual.iter().sum();
        let token = if mass > 0.0 {
            sample(&residual, rng)
        } else {
            sample(&p, rng)
        };
        tokens.push(token);
        return Acceptance {
            accepted: i,
            tokens,
        };
    }
    let p = distribution(&target_logits[draft.len()], params);
    tokens.push(sample(&p, rng));
    Acceptance {
        accepted: draft.len(),
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_the_matching_prefix_and_the_correction() {
        let a = accept_greedy(&[5, 6, 7], &[5, 6, 9, 1]);
        assert_eq!(
            a,
            Acceptance {
                accepted: 2,
                tokens: vec![5, 6, 9]
            }
        );
        let all = accept_greedy(&[5, 6], &[5, 6, 8]);
        assert_eq!(
            all,
            Acceptance {
                accepted: 2,
                tokens: vec![5, 6, 8]
            }
        );
        let none = accept_greedy(&[], &[3]);
        assert_eq!(
            none,
            Acceptance {
                accepted: 0,
                tokens: vec![3]
            }
        );
    }

    #[test]
    fn a_stop_token_ends_the_block() {
        let a = accept_greedy(&[5, 0, 7], &[5, 0, 7, 9]).stop_at(&[0]);
        assert_eq!(
            a,
            Acceptance {
                accepted: 1,
                tokens: vec![5, 0]
            }
        );
        let untouched = accept_greedy(&[5, 6], &[5, 6, 8]).stop_at(&[0]);
        assert_eq!(untouched.tokens, vec![5, 6, 8]);
        // Of a set, the first stop token emitted ends the block, whichever it is.
        let either = accept_greedy(&[5, 6, 7], &[5, 6, 7, 9]).stop_at(&[7, 6]);
        assert_eq!(
            either,
            Acceptance {
                accepted: 1,
                tokens: vec![5, 6]
            }
        );
    }

    /// The first emitted token of a sampled block must follow the verifier's distribution, whatever
    /// the drafter proposes. Checked by chi-square on a 4-token vocabulary.
    #[test]
    fn rejection_sampling_preserves_the_target_distribution() {
        let target = vec![1.0f32, 0.0, -1.0, 0.5];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        };
        let p = distribution(&target, &params);
        let q = vec![0.1f32, 0.6, 0.2, 0.1];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let d = sample(&q, &mut rng);
            let a = accept_sampled(
                &[d],
                Some(std::slice::from_ref(&q)),
                &[target.clone(), target.clone()],
                &params,
                &mut rng,
            );
            counts[a.tokens[0] as usize] += 1;
        }
        let chi2: f64 = (0..4)
            .map(|i| {
                let e = p[i] as f64 * n as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        // 3 degrees of freedom: p = 0.001 at 16.27.
        assert!(chi2 < 16.27, "chi2 {chi2}, counts {counts:?}, p {p:?}");
    }
}
