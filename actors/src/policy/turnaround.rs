//! Keeping sessions in phase: the policy half (how long to wait, and whether waiting pays); the
//! scheduler actor keeps the clocks (`phase.rs`).
//!
//! When a step ends a session's turn while other sessions still have work, the next step would go
//! out at once without it, and its caller's next turn (which often follows within a millisecond: a
//! persona answering, an agent loop) would wait a whole step for the one in flight; from then on
//! the two sessions stay a step apart, every turn of each waiting a step for the other's
//! ("phase-lock"). So the next step waits for the sessions whose turn just ended ("turn-around"),
//! while their next turns keep coming. The same holds when turns arrive at an idle verifier in a
//! burst (many clients starting at once): the step that starts it waits while they keep coming
//! ("gather"). Each wait ends when what it waits for has come, when no turn has come for a short
//! gap, or at a cap; each is skipped while it has not been catching turns.

use troupe_engine::SeqId;

use super::SchedulerState;

/// The cap of a wait, as a share of the running step time.
const CAP_SHARE: f64 = 0.5;
/// The longest cap, in seconds.
const CAP_MAX: f64 = 0.05;
/// The quiet gap that ends a wait, as a share of the running step time.
const GAP_SHARE: f64 = 0.02;
/// The longest gap, in seconds.
const GAP_MAX: f64 = 0.001;
/// Seconds per follow-up turn assumed before a wait has measured it: what routing an ended turn
/// to its caller and its next turn back costs on two cores.
const ROUTE_PRIOR: f64 = 30e-6;
/// Below this running share of waits that caught a turn, waits are skipped.
const MIN_HITS: f64 = 0.5;
/// What a skipped gather adds to the share, so that a few skips lead to one more try.
const SKIP_CREDIT: f64 = 0.05;

/// `ema` moved a fifth of the way towards `hit`.
fn toward(ema: f64, hit: bool) -> f64 {
    0.8 * ema + 0.2 * f64::from(u8::from(hit))
}

impl SchedulerState {
    /// The longest a step waits to keep sessions in phase, in seconds: half a step, at most 50 ms
    /// (or the configured `turnaround_wait`).
    pub fn phase_cap(&self) -> f64 {
        match self.config.turnaround_wait {
            Some(wait) => wait.as_secs_f64(),
            None => (self.step_estimate() * CAP_SHARE).min(CAP_MAX),
        }
    }

    /// How long without a new turn ends a wait, in seconds: a fiftieth of a step, at most 1 ms
    /// (or the configured `turnaround_wait`).
    pub fn arrival_gap(&self) -> f64 {
        match self.config.turnaround_wait {
            Some(wait) => wait.as_secs_f64(),
            None => (self.step_estimate() * GAP_SHARE).min(GAP_MAX),
        }
    }

    /// How long without a new turn ends a turn-around wait, in seconds: the gap, plus the time
    /// the runtime takes to route the follow-ups still awaited (a thousand sessions ending their
    /// turns in one step take milliseconds to reach their callers and come back), within the cap.
    pub fn turnaround_gap(&self) -> f64 {
        let routing = self.route_ema.unwrap_or(ROUTE_PRIOR) * self.just_finished.len() as f64;
        (self.arrival_gap() + routing).min(self.phase_cap())
    }

    /// Whether a step waits for the follow-up turns of the sessions whose turn the last step ended.
    pub fn awaits_turnaround(&self) -> bool {
        !self.just_finished.is_empty() && self.phase_cap() > 0.0 && self.turnaround_hits >= MIN_HITS
    }

    /// Whether a step that starts an idle verifier gathers more turns first.
    pub fn gathers(&self) -> bool {
        self.phase_cap() > 0.0 && self.gather_hits >= MIN_HITS
    }

    /// A turn of `seq` arrived `seconds` after the step that ended its previous one: counts
    /// whether it came within the cap.
    pub fn observe_turnaround(&mut self, seq: SeqId, seconds: f64) {
        if self.just_finished.remove(&seq) {
            let hit = seconds <= self.phase_cap();
            self.turnaround_hits = toward(self.turnaround_hits, hit);
            if hit {
                let (caught, last) = &mut self.turnaround_caught;
                *caught += 1;
                *last = last.max(seconds);
            }
        }
    }

    /// The turn-around wait is over (or was skipped): the sessions still awaited count as missed.
    pub fn turnaround_over(&mut self) {
        for _ in 0..self.just_finished.len() {
            self.turnaround_hits = toward(self.turnaround_hits, false);
        }
        self.just_finished.clear();
        let (caught, last) = std::mem::take(&mut self.turnaround_caught);
        if caught > 0 {
            let per_turn = last / caught as f64;
            self.route_ema = Some(
                self.route_ema
                    .map_or(per_turn, |e| 0.8 * e + 0.2 * per_turn),
            );
        }
    }

    /// A step started an idle verifier without gathering (gathers have not been catching turns):
    /// the skip counts a little towards trying again, so gathers resume once bursts return.
    pub fn gather_skipped(&mut self) {
        self.gather_hits = (self.gather_hits + SKIP_CREDIT).min(1.0);
    }

    /// A gather ended: `caught` turns arrived during it.
    pub fn gather_over(&mut self, caught: usize) {
        self.gather_hits = toward(self.gather_hits, caught > 0);
    }
}
