//! Waiting for drafts: whether a step waits for drafts still coming, for how long (what the drafts
//! are expected to save), and when drafts come back too late to be worth waiting for or ordering,
//! from the running step time and the running order-to-reply latency.

use super::SchedulerState;
use crate::cost::expected_emitted;

/// While drafts come back too late to be used, a sequence is sent an order only every this many
/// steps, to keep measuring how late they are.
const LATE_DRAFT_PROBE_STEPS: u64 = 8;

/// `ema` moved a fifth of the way towards `x`; `x` itself for the first observation.
fn ema(ema: Option<f64>, x: f64) -> f64 {
    match ema {
        Some(e) => 0.8 * e + 0.2 * x,
        None => x,
    }
}

impl SchedulerState {
    /// Whether some decoding sequence still waits for a draft that can apply (fresh or pipelined).
    pub fn awaiting_drafts(&self) -> bool {
        self.turns.iter().any(|s| self.seqs[s].waits_for_draft())
    }

    /// How long a step may wait for drafts, in seconds. Adapted (no `draft_wait`), the wait is
    /// worth what a draft saves: the tokens it is expected to add, times a step's time. A
    /// pipelined draft is ordered when the step before starts, so it is due (its latency − one
    /// step) after that step ends; drafts due later than the wait is worth are not waited for.
    pub fn draft_wait(&self) -> f64 {
        if let Some(wait) = self.config.draft_wait {
            return wait.as_secs_f64();
        }
        if self.drafts_too_late() {
            0.0
        } else {
            self.draft_wait_worth()
        }
    }

    /// Records how long a draft took from order to reply.
    pub fn observe_draft_latency(&mut self, seconds: f64) {
        self.draft_latency_ema = Some(ema(self.draft_latency_ema, seconds));
    }

    /// Records how long a block of `k` drafts took from order to reply: the latency, and the
    /// time per drafter forward the draft length is priced with.
    pub fn observe_draft(&mut self, seconds: f64, k: usize) {
        self.observe_draft_latency(seconds);
        let forwards = self.draft_cost.forwards(k).max(1);
        self.draft_forward_ema = Some(ema(self.draft_forward_ema, seconds / forwards as f64));
    }

    /// What one drafter forward costs in shares of a step. Pipelined or not, the drafter computes
    /// on the machine the verifier does (the same device, or the cores it shares), so its time is
    /// charged to the tokens it may save.
    pub(super) fn draft_forward_share(&self) -> f64 {
        self.draft_forward_ema
            .map_or(0.0, |f| f / self.step_estimate())
    }

    /// Records how long a step took the verifier.
    pub(super) fn observe_step_time(&mut self, seconds: f64) {
        self.step_ema = Some(ema(self.step_ema, seconds));
    }

    /// The running step time in seconds (10 ms before the first step).
    pub(super) fn step_estimate(&self) -> f64 {
        self.step_ema.unwrap_or(0.01).clamp(0.001, 1.0)
    }

    /// What waiting for drafts is worth, in seconds: the tokens a draft block is expected to add,
    /// times a step's time (at most a second).
    fn draft_wait_worth(&self) -> f64 {
        (self.step_estimate() * self.expected_draft_gain()).min(1.0)
    }

    /// Whether drafts come back later than waiting for them is worth (with the wait adapted).
    fn drafts_too_late(&self) -> bool {
        if self.config.draft_wait.is_some() {
            return false;
        }
        self.draft_latency_ema
            .is_some_and(|latency| latency - self.step_estimate() > self.draft_wait_worth())
    }

    /// Whether this step's draft orders are withheld: drafts that come too late to be used only
    /// cost the proposer's compute, so one is ordered only every few steps, to notice when they
    /// come in time again. Decided once per planning pass (it looks at every sequence).
    pub(super) fn orders_withheld(&self) -> bool {
        !self.stats.steps.is_multiple_of(LATE_DRAFT_PROBE_STEPS) && self.drafts_too_late()
    }

    /// Tokens a draft block is expected to add to a decoding sequence, at the sequences' mean
    /// acceptance estimate.
    fn expected_draft_gain(&self) -> f64 {
        let k = self.config.max_draft_len;
        let (mut sum, mut n) = (0.0, 0usize);
        for s in self.turns.iter().map(|id| &self.seqs[id]) {
            if s.is_decoding() {
                sum += expected_emitted(s.alpha, k) - 1.0;
                n += 1;
            }
        }
        sum / n.max(1) as f64
    }
}
