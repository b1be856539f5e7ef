//! Fault and delay injection: a plan, per actor kind and message, of delays, dropped messages and
//! panics, plus a proposer↔verifier round-trip per draft block. Service authors use it to test how
//! their agents behave when the model is slow or parts of the runtime fail.
//!
//! ```
//! use std::time::Duration;
//! use troupe_actors::faults::{ActorKind, FaultPlan};
//! let plan = FaultPlan::default()
//!     .delay(ActorKind::Verifier, "step", Duration::from_millis(50))
//!     .panic_after(ActorKind::Verifier, "step", 20)
//!     .proposer_rtt(Duration::from_millis(30));
//! assert!(plan.has_rules());
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// The kinds of actor a rule can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ActorKind {
    /// A session actor (messages: "generate", "info", "tokens", "failed", "cancelled", "cancel",
    /// "fail").
    Session,
    /// The scheduler (messages: "submit", "step_done").
    Scheduler,
    /// The session manager (messages: "spawn", "close", "lookup", "budget", "stop_admitting",
    /// "fail").
    Manager,
    /// The verifier's model thread (message: "step").
    Verifier,
    /// The proposer's drafting thread (message: "draft").
    Proposer,
}

/// What a rule does to a matching message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum FaultAction {
    /// Wait `fixed` plus a uniform draw from `0..=jitter` before handling.
    Delay {
        /// Always added.
        fixed: Duration,
        /// Upper bound of the random part.
        jitter: Duration,
    },
    /// Drop every `every`-th matching message (1: all of them).
    Drop {
        /// Period.
        every: u64,
    },
    /// Panic while handling the `after`-th matching message (1-based), once.
    PanicAfter {
        /// Which message.
        after: u64,
    },
}

/// One rule: an action on the messages of one kind that an actor kind handles.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct FaultRule {
    /// Actor kind.
    pub actor: ActorKind,
    /// Message name ("*" matches all).
    pub message: String,
    /// What to do.
    pub action: FaultAction,
}

impl FaultRule {
    /// `action` on the messages called `message` ("*": all) that `actor` handles.
    pub fn new(actor: ActorKind, message: impl Into<String>, action: FaultAction) -> Self {
        Self {
            actor,
            message: message.into(),
            action,
        }
    }
}

/// What an actor must do with one message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Wait this long first.
    pub delay: Duration,
    /// Drop the message.
    pub drop: bool,
    /// Panic while handling it.
    pub panic: bool,
}

/// A set of rules, shared by every actor of a runtime. Counters are per (actor kind, message) and
/// survive restarts, so "panic after N" fires once.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    rules: Vec<FaultRule>,
    rtt: Duration,
    state: Arc<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    counters: Mutex<HashMap<(ActorKind, String), u64>>,
    fired: Mutex<Vec<bool>>,
    seed: AtomicU64,
}

impl FaultPlan {
    /// Adds a rule.
    pub fn rule(mut self, rule: FaultRule) -> Self {
        self.rules.push(rule);
        if let Ok(mut f) = self.state.fired.lock() {
            f.push(false);
        }
        self
    }

    /// Delays every matching message by `fixed`.
    pub fn delay(self, actor: ActorKind, message: &str, fixed: Duration) -> Self {
        self.jittered_delay(actor, message, fixed, Duration::ZERO)
    }

    /// Delays every matching message by `fixed` plus up to `jitter`.
    pub fn jittered_delay(
        self,
        actor: ActorKind,
        message: &str,
        fixed: Duration,
        jitter: Duration,
    ) -> Self {
        self.rule(FaultRule {
            actor,
            message: message.into(),
            action: FaultAction::Delay { fixed, jitter },
        })
    }

    /// Drops every `every`-th matching message.
    pub fn drop_every(self, actor: ActorKind, message: &str, every: u64) -> Self {
        self.rule(FaultRule {
            actor,
            message: message.into(),
            action: FaultAction::Drop {
                every: every.max(1),
            },
        })
    }

    /// Panics on the `after`-th matching message, once.
    pub fn panic_after(self, actor: ActorKind, message: &str, after: u64) -> Self {
        self.rule(FaultRule {
            actor,
            message: message.into(),
            action: FaultAction::PanicAfter {
                after: after.max(1),
            },
        })
    }

    /// Adds a round trip between verifier and proposer: every message to the proposer reaches its
    /// thread this much later, in order, with any number in flight at once (as over a network), so
    /// each draft block pays it once and pipelined blocks overlap theirs.
    pub fn proposer_rtt(mut self, rtt: Duration) -> Self {
        self.rtt = rtt;
        self
    }

    /// The proposer↔verifier round trip per block.
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// Whether any rule is set.
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty() || !self.rtt.is_zero()
    }

    /// Counts one message and says what to do with it.
    pub fn check(&self, actor: ActorKind, message: &str) -> Verdict {
        let mut verdict = Verdict::default();
        let matches =
            |r: &FaultRule| r.actor == actor && (r.message == "*" || r.message == message);
        if !self.rules.iter().any(matches) {
            return verdict; // nothing to count: the messages no rule names cost no lock
        }
        let n = {
            let mut c = self
                .state
                .counters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = c.entry((actor, message.to_owned())).or_insert(0);
            *n += 1;
            *n
        };
        for (i, r) in self.rules.iter().enumerate() {
            if r.actor != actor || (r.message != "*" && r.message != message) {
                continue;
            }
            match &r.action {
                FaultAction::Delay { fixed, jitter } => {
                    verdict.delay += *fixed;
                    if !jitter.is_zero() {
                        let s = self.state.seed.fetch_add(1, Ordering::Relaxed);
                        let mut rng = rand::rngs::StdRng::seed_from_u64(s);
                        verdict.delay += jitter.mul_f64(rng.random::<f64>());
                    }
                }
                FaultAction::Drop { every } => verdict.drop |= n % every == 0,
                FaultAction::PanicAfter { after } => {
                    let mut fired = self.state.fired.lock().unwrap_or_else(|e| e.into_inner());
                    if n >= *after && !fired[i] {
                        fired[i] = true;
                        verdict.panic = true;
                    }
                }
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_fires_once_and_drops_follow_their_period() {
        let plan = FaultPlan::default()
            .panic_after(ActorKind::Verifier, "step", 3)
            .drop_every(ActorKind::Proposer, "draft", 2);
        let panics: Vec<bool> = (0..6)
            .map(|_| plan.check(ActorKind::Verifier, "step").panic)
            .collect();
        assert_eq!(panics, vec![false, false, true, false, false, false]);
        let drops: Vec<bool> = (0..4)
            .map(|_| plan.check(ActorKind::Proposer, "draft").drop)
            .collect();
        assert_eq!(drops, vec![false, true, false, true]);
        assert_eq!(
            plan.check(ActorKind::Session, "generate"),
            Verdict::default()
        );
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let plan = FaultPlan::default().jittered_delay(
            ActorKind::Verifier,
            "*",
            Duration::from_millis(10),
            Duration::from_millis(5),
        );
        for _ in 0..50 {
            let d = plan.check(ActorKind::Verifier, "step").delay;
            assert!(
                d >= Duration::from_millis(10) && d <= Duration::from_millis(15),
                "{d:?}"
            );
        }
    }
}
