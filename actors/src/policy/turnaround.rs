//! Turn-around: keeping sessions in phase. When a step ends a session's turn while other sessions
//! still have work, the next step would go out at once without it, and its caller's next turn
//! (which often follows within a millisecond: a persona answering, an agent loop) would wait a
//! whole step for the one in flight; from then on the two sessions stay a step apart, every turn
//! of each waiting a step for the other's ("phase-lock"). So the step waits a little for the
//! sessions whose turn just ended: a small share of a step, and only while follow-up turns have
//! been coming back that fast.
//!
//! The same holds when turns arrive at an idle verifier in a burst (many clients starting at
//! once): the first would go out alone and the rest wait a whole step, staggered from then on. So
//! a step that starts an idle verifier gathers for the same short time, while such gathers have
//! been catching more turns.

use troupe_engine::SeqId;

use super::SchedulerState;

/// The share of a step the next one may wait for follow-up turns.
const TURNAROUND_SHARE: f64 = 0.25;
/// The longest wait for follow-up turns, in seconds.
const TURNAROUND_CAP: f64 = 0.02;
/// Below this running share of follow-ups that came within the wait, none is waited for.
const TURNAROUND_MIN_HITS: f64 = 0.5;

impl SchedulerState {
    /// How long a step may wait for the follow-up turns of the sessions whose turn the last step
    /// ended, in seconds: the configured wait, or (adapted) a tenth of a step up to 10 ms while
    /// follow-ups have been coming within it, else none.
    pub fn turnaround_wait(&self) -> f64 {
        if let Some(wait) = self.config.turnaround_wait {
            return wait.as_secs_f64();
        }
        if self.turnaround_hits < TURNAROUND_MIN_HITS {
            return 0.0;
        }
        self.turnaround_window()
    }

    /// The adapted wait, whether or not follow-ups have been coming within it: what a follow-up
    /// turn's delay is measured against.
    pub fn turnaround_window(&self) -> f64 {
        (self.step_estimate() * TURNAROUND_SHARE).min(TURNAROUND_CAP)
    }

    /// Whether a session whose turn the last step ended has not asked for its next turn yet.
    pub fn awaiting_turnaround(&self) -> bool {
        !self.just_finished.is_empty()
    }

    /// A turn of `seq` arrived `seconds` after the step that ended its previous one: counts
    /// whether it came within the wait.
    pub fn observe_turnaround(&mut self, seq: SeqId, seconds: f64) {
        if self.just_finished.remove(&seq) {
            let hit = seconds <= self.turnaround_window();
            self.turnaround_hits = 0.8 * self.turnaround_hits + 0.2 * f64::from(u8::from(hit));
        }
    }

    /// How long a step that starts an idle verifier may gather more turns, in seconds: the
    /// configured turn-around wait, or (adapted) the same share of a step while gathers have been
    /// catching more turns, else none.
    pub fn gather_wait(&self) -> f64 {
        if let Some(wait) = self.config.turnaround_wait {
            return wait.as_secs_f64();
        }
        if self.gather_hits < TURNAROUND_MIN_HITS {
            return 0.0;
        }
        self.turnaround_window()
    }

    /// A gather ended: `caught` turns arrived during it.
    pub fn gather_over(&mut self, caught: usize) {
        let hit = f64::from(u8::from(caught > 0));
        self.gather_hits = 0.8 * self.gather_hits + 0.2 * hit;
    }

    /// The wait ran out, or the next step went out: the sessions still awaited count as missed.
    pub fn turnaround_over(&mut self) {
        for _ in 0..self.just_finished.len() {
            self.turnaround_hits *= 0.8;
        }
        self.just_finished.clear();
    }
}
