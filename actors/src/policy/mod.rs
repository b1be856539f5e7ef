//! The scheduler's state and policy, as a plain struct with no channels and no clocks of its own:
//! which sequences go into the next step and with how many drafted tokens, what each outcome means
//! for its turn, and which drafts to ask the proposer for. The scheduler actor is a thin dispatcher
//! over it, and the unit tests drive it the same way: [`SchedulerState::dispatch`] when the
//! verifier is free, [`SchedulerState::complete`] when its step returns.
//!
//! This file holds the configuration, the state with its accessors, and that call-order API; the
//! rest is split by concern: `seq` (one sequence), `plan` (planning a step), `outcomes` (what a
//! finished step means for each turn), `orders` (draft orders and replies), `waits` (how long to
//! wait for drafts) and `stats` (counters).

use std::collections::{BTreeSet, HashSet};

use rustc_hash::FxHashMap;
use std::time::Duration;

use troupe_engine::{DraftCost, SeqId, VerifyOutcome};

use crate::config::SchedulerConfig;
use crate::cost::CostModel;
use crate::error::RuntimeError;
use crate::protocol::{DraftOrder, Emission, Turn};

mod orders;
mod outcomes;
mod plan;
mod seq;
mod stats;
mod turnaround;
mod waits;

pub use orders::MAX_ORDERS_IN_FLIGHT;
pub use plan::PlannedStep;
pub use seq::SeqEntry;
pub use stats::{Histogram, SchedulerStats};

/// A sequence's place in a step.
#[derive(Debug, Clone)]
struct Chosen {
    /// The sequence.
    seq: SeqId,
    /// Tokens of its history fed to the verifier: a prefill chunk, or the one token left to feed.
    fed: usize,
    /// Drafted tokens verified after them.
    draft: Vec<u32>,
}

/// The step on its way to the verifier.
#[derive(Debug)]
struct InFlight {
    /// Its id.
    id: u64,
    /// Its sequences, in the order of the step's works.
    chosen: Vec<Chosen>,
}

/// A step to send the verifier, and the draft orders to send the proposer with it.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The step.
    pub step: PlannedStep,
    /// Pipelined orders: block n+1 of each decoding sequence of the step, drafted while block n
    /// is verified.
    pub orders: Vec<DraftOrder>,
}

/// What a cancellation did, from [`SchedulerState::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The turn was ended now; its session may start its next turn.
    Now,
    /// The turn's work is in the step in flight: the turn ends with that step, whose emission is
    /// marked finished.
    AfterStep,
    /// The sequence had no turn (it finished or failed first) or is not open.
    NoTurn,
}

/// What a finished step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// What each sequence of the step emitted, in the order of the step's works.
    pub emissions: Vec<Emission>,
    /// Fresh draft orders to send the proposer: those for the step's sequences first, then those
    /// for any other decoding sequence with no draft ready or coming.
    pub orders: Vec<DraftOrder>,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct SchedulerState {
    /// Configuration.
    pub config: SchedulerConfig,
    /// Open sequences.
    seqs: FxHashMap<SeqId, SeqEntry>,
    /// The open sequences with a turn, in id order: what a step is planned from, so the work per
    /// message and per step grows with the active sequences, not with the open ones.
    turns: BTreeSet<SeqId>,
    /// Round robin: the next step starts at the first sequence whose id is at least this.
    rr: u64,
    /// The step dispatched and not yet completed.
    in_flight: Option<InFlight>,
    /// Id of the next step planned.
    next_id: u64,
    /// Step-time model.
    pub cost: CostModel,
    /// Counters.
    pub stats: SchedulerStats,
    /// Seconds a step takes, averaged; `None` before the first step.
    step_ema: Option<f64>,
    /// Seconds from a draft order to its reply, averaged; `None` before the first reply.
    draft_latency_ema: Option<f64>,
    /// How the drafter's time grows with a block's length.
    draft_cost: DraftCost,
    /// Seconds per drafter forward (a reply's latency over its block's forwards), averaged.
    draft_forward_ema: Option<f64>,
    /// Sequences whose turn the last step ended and whose next turn has not come yet.
    just_finished: BTreeSet<SeqId>,
    /// Running share of follow-up turns that came within the turn-around wait.
    turnaround_hits: f64,
    /// The follow-ups the turn-around wait under way has caught, and when the last came
    /// (seconds after the step ended).
    turnaround_caught: (usize, f64),
    /// Seconds per follow-up turn, averaged over waits: how fast the runtime routes a batch of
    /// ended turns to their callers and their next turns back (`None` before a wait caught one).
    route_ema: Option<f64>,
    /// Running share of gathers at an idle verifier that caught another turn.
    gather_hits: f64,
}

impl SchedulerState {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            seqs: FxHashMap::default(),
            turns: BTreeSet::new(),
            rr: 0,
            in_flight: None,
            next_id: 1,
            cost: CostModel::default(),
            stats: SchedulerStats::default(),
            step_ema: None,
            draft_latency_ema: None,
            draft_cost: DraftCost::default(),
            draft_forward_ema: None,
            just_finished: BTreeSet::new(),
            turnaround_hits: 1.0,
            turnaround_caught: (0, 0.0),
            route_ema: None,
            gather_hits: 1.0,
        }
    }

    /// Says how the drafter's time grows with a block's length (see [`DraftCost`]).
    pub fn set_draft_cost(&mut self, cost: DraftCost) {
        self.draft_cost = cost;
    }

    /// Registers a sequence.
    pub fn open(&mut self, seq: SeqId) {
        self.seqs.entry(seq).or_insert_with(SeqEntry::new);
    }

    /// Opens `seq` as a copy of `from`: its history, as much of it in the verifier's window as
    /// `from` has (the verifier copies the window), and its acceptance estimate. `from` must be
    /// open with no turn and nothing in a step.
    pub fn fork(&mut self, from: SeqId, seq: SeqId) -> Result<(), RuntimeError> {
        if self.seqs.contains_key(&seq) {
            return Err(RuntimeError::InvalidConfig(format!(
                "sequence {seq} is open already"
            )));
        }
        let src = self
            .seqs
            .get(&from)
            .ok_or(RuntimeError::UnknownSession(from))?;
        if src.turn.is_some() || src.in_step {
            return Err(RuntimeError::TurnInProgress(from));
        }
        let mut e = SeqEntry::new();
        e.history = src.history.clone();
        e.committed = src.committed;
        e.alpha = src.alpha;
        e.acceptance = src.acceptance.clone();
        self.seqs.insert(seq, e);
        Ok(())
    }

    /// Forgets a sequence; a step in flight for it is ignored when it returns.
    pub fn close(&mut self, seq: SeqId) -> bool {
        self.turns.remove(&seq);
        self.just_finished.remove(&seq);
        self.seqs.remove(&seq).is_some()
    }

    /// The sequence, if open.
    pub fn seq(&self, seq: SeqId) -> Option<&SeqEntry> {
        self.seqs.get(&seq)
    }

    /// Open sequences.
    #[cfg(test)]
    pub fn seq_ids(&self) -> Vec<SeqId> {
        let mut ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Sequences with a turn, in id order.
    pub fn turn_ids(&self) -> Vec<SeqId> {
        self.turns.iter().copied().collect()
    }

    /// Whether a step is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Number of sequences with an active turn.
    pub fn active(&self) -> usize {
        self.turns.len()
    }

    /// Starts a turn: `tokens` join the sequence's history and will be prefilled.
    pub fn submit(&mut self, seq: SeqId, tokens: &[u32], turn: Turn) -> Result<(), RuntimeError> {
        let e = self
            .seqs
            .get_mut(&seq)
            .ok_or(RuntimeError::UnknownSession(seq))?;
        if e.turn.is_some() {
            return Err(RuntimeError::TurnInProgress(seq));
        }
        if tokens.is_empty() && e.history.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        e.history.extend_from_slice(tokens);
        e.forget_drafts();
        e.content = false;
        if turn.remaining > 0 {
            e.turn = Some(turn);
            self.turns.insert(seq);
        }
        Ok(())
    }

    /// Ends a sequence's turn without finishing it (after a failure); its history stays.
    pub fn abort_turn(&mut self, seq: SeqId) {
        if let Some(e) = self.seqs.get_mut(&seq) {
            e.turn = None;
            e.forget_drafts();
        }
        self.turns.remove(&seq);
    }

    /// Cancels a sequence's turn, keeping what it committed. A turn whose work is in the step in
    /// flight is asked for no more tokens, so it ends with that step; any other ends now, and its
    /// drafts are forgotten (orders still out come back and are dropped, returning their credit).
    pub fn cancel(&mut self, seq: SeqId) -> Cancel {
        let Some(e) = self.seqs.get_mut(&seq) else {
            return Cancel::NoTurn;
        };
        let Some(turn) = e.turn.as_mut() else {
            return Cancel::NoTurn;
        };
        if e.in_step {
            // No token left to emit: `apply_outcomes` ends the turn with the step.
            turn.remaining = 0;
            return Cancel::AfterStep;
        }
        self.abort_turn(seq);
        Cancel::Now
    }

    /// Whether there is anything for the verifier to do.
    pub fn has_work(&self) -> bool {
        self.turns.iter().any(|s| !self.seqs[s].in_step)
    }

    /// Plans the next step and the pipelined draft orders to send with it; `None` when a step is
    /// in flight or nothing waits. The step is in flight until [`complete`](Self::complete).
    pub fn dispatch(&mut self) -> Option<Dispatch> {
        let step = self.plan_step()?;
        let orders = self.pipelined_orders();
        Some(Dispatch { step, orders })
    }

    /// Applies the outcomes of step `id`, which took the verifier `elapsed`: what each sequence
    /// emitted, and the fresh draft orders that follow. A step that is not the one in flight (one
    /// from before a verifier restart) is ignored, and nothing comes of it.
    pub fn complete(
        &mut self,
        id: u64,
        outcomes: &[VerifyOutcome],
        elapsed: Duration,
    ) -> Completion {
        let Some(chosen) = self.take_in_flight(id) else {
            return Completion::default();
        };
        let emissions = self.apply_outcomes(&chosen, outcomes, elapsed);
        self.turnaround_over();
        self.just_finished
            .extend(emissions.iter().filter(|e| e.finished).map(|e| e.seq));
        let mut orders = self.follow_up_orders(&chosen);
        orders.extend(self.fresh_orders());
        Completion { emissions, orders }
    }

    /// Forgets the step in flight and every window: after a verifier restart each sequence is
    /// replayed from its history, so no accepted token is lost and none is emitted twice.
    pub fn verifier_restarted(&mut self) {
        self.in_flight = None;
        self.stats.verifier_restarts += 1;
        for e in self.seqs.values_mut() {
            e.committed = 0;
            e.in_step = false;
        }
    }

    /// Forgets every draft made or coming: the proposer lost its state. Once a new proposer is
    /// up, [`orders_after_proposer_restart`](Self::orders_after_proposer_restart) says what to
    /// ask it for.
    pub fn proposer_restarted(&mut self) {
        self.stats.proposer_restarts += 1;
        for e in self.seqs.values_mut() {
            e.forget_drafts();
            e.in_orders = 0;
        }
    }

    /// The id of the step in flight.
    pub fn in_flight_id(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.id)
    }

    /// Sequences of the step in flight.
    pub fn in_flight_seqs(&self) -> HashSet<SeqId> {
        self.in_flight
            .as_ref()
            .map(|f| f.chosen.iter().map(|c| c.seq).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
