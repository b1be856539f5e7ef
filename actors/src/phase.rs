//! The scheduler's clocks for keeping sessions in phase (see the policy's `turnaround` module):
//! when the last step ended, when the last turn arrived, and the gather under way. [`Phase::hold`]
//! says whether the next step waits, and until when.

use std::time::{Duration, Instant};

use crate::policy::SchedulerState;

/// The scheduler's clocks for the turn-around and gather waits.
#[derive(Debug, Default)]
pub(crate) struct Phase {
    /// When the last step came back.
    step_ended: Option<Instant>,
    /// When the last turn arrived.
    last_arrival: Option<Instant>,
    /// A gather under way: since when, and how many turns it caught.
    gathering: Option<(Instant, usize)>,
    /// Whether a turn-around wait ran since the last step came back: the turns it waited for are
    /// in, so the verifier is not idle in the sense a gather answers.
    turned_around: bool,
}

impl Phase {
    /// A step came back at `now`.
    pub(crate) fn step_ended(&mut self, now: Instant) {
        self.step_ended = Some(now);
        self.turned_around = false;
    }

    /// A turn arrived at `now`: seconds since the last step ended (`f64::MAX` before any).
    pub(crate) fn arrival(&mut self, now: Instant) -> f64 {
        self.last_arrival = Some(now);
        if let Some((_, caught)) = &mut self.gathering {
            *caught += 1;
        }
        self.step_ended
            .map_or(f64::MAX, |t| now.duration_since(t).as_secs_f64())
    }

    /// Whether the step about to go out waits, and until when: `None` dispatches now. A wait ends
    /// at its cap, or once no turn has arrived for the gap; a turn-around wait also ends when
    /// every session it waits for has sent its turn.
    pub(crate) fn hold(&mut self, policy: &mut SchedulerState, now: Instant) -> Option<Instant> {
        let cap = Duration::from_secs_f64(policy.phase_cap());
        let gap = Duration::from_secs_f64(policy.arrival_gap());
        let due = |since: Instant, last: Option<Instant>| {
            let quiet = last.map_or(since, |l| l.max(since));
            (since + cap).min(quiet + gap)
        };
        if let Some(ended) = self.step_ended.filter(|_| policy.awaits_turnaround()) {
            self.turned_around = true;
            let quiet = self.last_arrival.map_or(ended, |l| l.max(ended));
            let gap = Duration::from_secs_f64(policy.turnaround_gap());
            let until = (ended + cap).min(quiet + gap);
            if now < until {
                return Some(until);
            }
            // Those not come yet count as missed. (A skipped wait leaves them to be counted when
            // they come, or at the next step's end, so skipped waits resume once turns come fast.)
            policy.turnaround_over();
        }
        // After a turn-around wait the step goes at once: its follow-ups came (or were given up
        // on), and a gather would only hold them a gap longer.
        let idle =
            !self.turned_around && self.step_ended.is_none_or(|t| now.duration_since(t) > gap);
        if self.gathering.is_none() && idle {
            if policy.gathers() {
                self.gathering = Some((now, 0));
            } else {
                policy.gather_skipped();
            }
        }
        if let Some((since, caught)) = self.gathering {
            let until = due(since, self.last_arrival);
            if now < until {
                return Some(until);
            }
            self.gathering = None;
            policy.gather_over(caught);
        }
        None
    }
}
