//! What speculation costs and gains: an online model of what a verify step costs, `t(n) ≈ a + b·n`
//! for a step of `n` tokens, fitted by least squares over the latest steps; a running estimate of
//! the per-token acceptance rate; and the draft length that pays best given both. The scheduler
//! uses them to decide whether one more drafted token is worth its price at the current load.

use std::collections::VecDeque;

use troupe_engine::DraftCost;

/// Step-time model fitted from observations.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// The latest steps observed, as (tokens, seconds).
    samples: VecDeque<(f64, f64)>,
    /// Most steps kept.
    capacity: usize,
    /// Fixed cost per step, seconds.
    a: f64,
    /// Cost per token, seconds.
    b: f64,
    /// Whether `a` and `b` come from a fit (steps of different sizes were seen).
    fitted: bool,
    /// Marginal-cost ratio used before the model has data.
    prior_ratio: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self::new(64, 0.25)
    }
}

impl CostModel {
    /// Keeps the latest `capacity` steps; `prior_ratio` stands in until the fit has data.
    pub fn new(capacity: usize, prior_ratio: f64) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity: capacity.max(4),
            a: 0.0,
            b: 0.0,
            fitted: false,
            prior_ratio,
        }
    }

    /// Records a step of `tokens` tokens that took `seconds`.
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((tokens as f64, seconds));
        self.refit();
    }

    /// Fits `a` and `b` to the samples, once there are enough of different sizes.
    fn refit(&mut self) {
        let n = self.samples.len() as f64;
        if n < 4.0 {
            return;
        }
        let mx = self.samples.iter().map(|s| s.0).sum::<f64>() / n;
        let my = self.samples.iter().map(|s| s.1).sum::<f64>() / n;
        let var = self.samples.iter().map(|s| (s.0 - mx).powi(2)).sum::<f64>();
        if var < 1e-9 {
            return; // every step had the same size: the slope is unknown, keep the last fit
        }
        let cov = self
            .samples
            .iter()
            .map(|s| (s.0 - mx) * (s.1 - my))
            .sum::<f64>();
        self.b = (cov / var).max(0.0);
        self.a = (my - self.b * mx).max(0.0);
        self.fitted = true;
    }

    /// The price of one more token in a step shared by `seqs` sequences, relative to one sequence's
    /// share of the step: `b / (a / seqs + b)`. Near 0 when steps are bound by fixed cost (a GPU at
    /// small batch), near 1 when every token costs its full share (a saturated CPU).
    pub fn marginal_ratio(&self, seqs: usize) -> f64 {
        if !self.fitted {
            return self.prior_ratio;
        }
        let share = self.a / seqs.max(1) as f64 + self.b;
        if share <= 0.0 {
            0.0
        } else {
            self.b / share
        }
    }
}

/// A running estimate of the probability that a drafted token is accepted, given the ones before
/// it were. A block of `k` drafts with `a` accepted holds `a` acceptances and, if `a < k`, one
/// rejection (the drafts after it are never judged), so the estimate is acceptances over
/// acceptances plus rejections, each decayed so the estimate follows the text. (The fraction of
/// drafts accepted, `a / k`, underestimates it: at 0.8 per token, four drafts keep 59% on average.)
#[derive(Debug, Clone)]
pub struct AcceptanceRate {
    /// Acceptances seen, decayed.
    accepted: f64,
    /// Rejections seen, decayed.
    rejected: f64,
}

/// How much of its weight an acceptance estimate keeps at each block.
const ACCEPTANCE_DECAY: f64 = 0.7;

impl AcceptanceRate {
    /// An estimate starting at `prior` with the weight of a couple of blocks.
    pub fn new(prior: f64) -> Self {
        let prior = prior.clamp(0.0, 1.0);
        Self {
            accepted: 2.0 * prior,
            rejected: 2.0 * (1.0 - prior),
        }
    }

    /// Records a verified block: `accepted` of `drafted` drafts.
    pub fn observe(&mut self, accepted: usize, drafted: usize) {
        if drafted == 0 {
            return;
        }
        self.accepted = ACCEPTANCE_DECAY * self.accepted + accepted.min(drafted) as f64;
        self.rejected = ACCEPTANCE_DECAY * self.rejected + f64::from(u8::from(accepted < drafted));
    }

    /// The per-token acceptance probability.
    pub fn alpha(&self) -> f64 {
        let total = self.accepted + self.rejected;
        if total <= 0.0 {
            0.0
        } else {
            self.accepted / total
        }
    }
}

/// Expected tokens a verify step emits with `k` drafts accepted independently with probability
/// `alpha`: `1 + alpha + ... + alpha^k`.
pub fn expected_emitted(alpha: f64, k: usize) -> f64 {
    (0..=k).map(|i| alpha.powi(i as i32)).sum()
}

/// The draft length in `0..=max_k` that maximises tokens emitted per unit of cost, where a step of
/// `1 + k` tokens costs `1 + ratio·k` shares (drafting free).
#[cfg(test)]
pub fn best_draft_len(alpha: f64, ratio: f64, max_k: usize) -> usize {
    best_draft_len_drafting(alpha, ratio, max_k, 0.0, DraftCost::PerBlock)
}

/// [`best_draft_len`] when drafting also takes the step's time: each drafter forward costs
/// `forward` shares (its time over a step's), and a block of `k` costs as many forwards as
/// `cost` says (one for a block drafter, `k` for a draft model).
pub fn best_draft_len_drafting(
    alpha: f64,
    ratio: f64,
    max_k: usize,
    forward: f64,
    cost: DraftCost,
) -> usize {
    let mut best = (0, 1.0);
    for k in 1..=max_k {
        let drafting = forward * cost.forwards(k) as f64;
        let gain = expected_emitted(alpha, k) / (1.0 + ratio * k as f64 + drafting);
        if gain > best.1 + 1e-9 {
            best = (k, gain);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_a_line() {
        let mut m = CostModel::new(16, 0.5);
        assert_eq!(m.marginal_ratio(8), 0.5);
        for n in [10, 20, 40, 80, 10, 30] {
            m.observe(n, 0.002 + 0.0001 * n as f64);
        }
        assert!((m.a - 0.002).abs() < 1e-9 && (m.b - 0.0001).abs() < 1e-9);
        // a = 2 ms, b = 0.1 ms: with 8 sequences a share is 0.35 ms, of which 0.1 is per token.
        assert!((m.marginal_ratio(8) - 0.1 / 0.35).abs() < 1e-9);
    }

    #[test]
    fn acceptance_is_estimated_per_token_not_per_draft() {
        // Blocks of four drafts from a drafter right 80% of the time per token, in the proportions
        // a truncated geometric gives them: 0 (20%), 1 (16%), 2 (12.8%), 3 (10.2%), 4 (41%).
        let mut est = AcceptanceRate::new(0.5);
        let pattern = [4, 0, 4, 1, 2, 4, 3, 0, 4, 1, 4, 2, 4, 4, 3, 0, 4, 1, 4, 2];
        for _ in 0..20 {
            for &a in &pattern {
                est.observe(a, 4);
            }
        }
        let fraction = pattern.iter().sum::<usize>() as f64 / (4 * pattern.len()) as f64;
        assert!(fraction < 0.65, "{fraction}");
        let alpha = est.alpha();
        assert!((0.7..0.9).contains(&alpha), "{alpha}");
        // Every draft accepted, or every one rejected.
        let mut all = AcceptanceRate::new(0.5);
        let mut none = AcceptanceRate::new(0.5);
        for _ in 0..30 {
            all.observe(4, 4);
            none.observe(0, 4);
        }
        assert!(all.alpha() > 0.99 && none.alpha() < 0.01);
        // No drafts: nothing learned.
        let mut idle = AcceptanceRate::new(0.6);
        idle.observe(0, 0);
        assert_eq!(idle.alpha(), 0.6);
    }

    #[test]
    fn speculation_stops_when_tokens_cost_their_full_share() {
        // Fixed-cost steps: draft as much as allowed.
        assert_eq!(best_draft_len(0.8, 0.0, 8), 8);
        // Every token costs a full share: with imperfect acceptance, drafting never pays.
        assert_eq!(best_draft_len(0.9, 1.0, 8), 0);
        // In between, the length grows with acceptance.
        let low = best_draft_len(0.4, 0.2, 8);
        let high = best_draft_len(0.9, 0.2, 8);
        assert!(low < high, "{low} {high}");
        assert_eq!(best_draft_len(0.0, 0.0, 8), 0);
        // Drafting that costs half a step per forward: a draft model, paying per token, drafts
        // short or not at all; a block drafter, paying once per block, drafts long.
        let per_token = best_draft_len_drafting(0.8, 0.1, 8, 0.5, DraftCost::PerToken);
        let per_block = best_draft_len_drafting(0.8, 0.1, 8, 0.5, DraftCost::PerBlock);
        assert!(per_token < per_block, "{per_token} vs {per_block}");
        assert!(
            per_token <= 1 && per_block >= 6,
            "{per_token} vs {per_block}"
        );
    }
}
