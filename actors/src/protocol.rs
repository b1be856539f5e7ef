//! The data actors exchange: turns, emissions, draft orders and replies, and the messages each
//! peer may send the scheduler or a session. Plain values, so a message can be compared, logged
//! and, where its fields allow, serialized.
//!
//! A peer never holds the whole `SchedulerMsg`: it holds a ractor `DerivedActorRef` of the one
//! message type it may send. The verifier actor can only report a [`StepDone`], the proposer only
//! send [`Drafts`], a session (and the manager that closes it) only make a [`SeqRequest`] about its
//! own sequence, and the scheduler reaches a session only with a [`TurnUpdate`].

use std::sync::Arc;
use std::time::Duration;

use ractor::{DerivedActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use troupe_engine::drafter::Draft;
use troupe_engine::{EngineError, SamplingParams, SeqId, VerifyOutcome, WindowSpec};

use crate::error::RuntimeError;

/// A turn a session asks the scheduler to generate; the scheduler keeps it while the turn runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// Tokens still to emit.
    pub remaining: usize,
    /// Sampling.
    pub params: SamplingParams,
    /// Tokens that end the turn: the first of them emitted (but see `stop_after_content`) is the
    /// turn's last token. Empty: only `remaining` ends the turn.
    pub stop: Vec<u32>,
    /// Stop tokens that come before the turn's first token that is not a stop token are emitted as
    /// ordinary tokens and do not end the turn (so a reply that opens with the newline that ends
    /// replies is not empty).
    #[serde(default)]
    pub stop_after_content: bool,
}

/// What one sequence got from a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Emission {
    /// The sequence.
    pub seq: SeqId,
    /// Emitted tokens (may be empty for a prefill chunk).
    pub tokens: Vec<u32>,
    /// Drafted tokens verified.
    pub drafted: usize,
    /// Of which accepted.
    pub accepted: usize,
    /// Whether the turn ended.
    pub finished: bool,
    /// Time the verifier spent on the step (model time, injected delay included).
    pub step_time: Duration,
}

/// A draft the proposer should make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftOrder {
    /// The sequence.
    pub seq: SeqId,
    /// History length the draft starts from.
    pub base_len: usize,
    /// Tokens assumed after the history (a block in flight); empty for a fresh draft.
    pub assumed: Vec<u32>,
    /// Tokens wanted.
    pub k: usize,
    /// Sampling of the sequence.
    pub params: SamplingParams,
    /// Drafted while the block before it is verified; its first token guesses the verifier's own.
    pub pipelined: bool,
}

/// A draft the proposer made. (Not serializable: the engine's [`Draft`] is not.)
#[derive(Debug, Clone)]
pub struct DraftReply {
    /// The order it answers.
    pub order: DraftOrder,
    /// The draft.
    pub draft: Draft,
}

/// The verifier actor's report of a step: verifier → scheduler.
#[derive(Debug)]
pub struct StepDone {
    /// Step number.
    pub id: u64,
    /// One outcome per sequence of the step, or the engine's refusal of the whole step.
    pub result: Result<Vec<VerifyOutcome>, Arc<EngineError>>,
    /// Time the forward took (model time, injected delay included).
    pub elapsed: Duration,
}

/// Drafts the proposer made for the orders it was sent: proposer → scheduler.
#[derive(Debug)]
pub struct Drafts(pub Vec<DraftReply>);

/// What a session's side asks of the scheduler about its sequence: session (or manager) →
/// scheduler.
#[derive(Debug)]
pub enum SeqRequest {
    /// Register a session's sequence.
    Open {
        /// Sequence.
        seq: SeqId,
        /// Its window.
        spec: WindowSpec,
        /// Sampling seed.
        seed: u64,
        /// Where its turns' updates go.
        session: DerivedActorRef<TurnUpdate>,
    },
    /// Open a sequence as a copy of another with no turn: its history and its window as they
    /// stand. Sent by the source's session, in order with its turns.
    Fork {
        /// The sequence copied.
        from: SeqId,
        /// The new sequence.
        seq: SeqId,
        /// Its sampling seed.
        seed: u64,
        /// Where its turns' updates go.
        session: DerivedActorRef<TurnUpdate>,
        /// Done, or why not.
        reply: RpcReplyPort<Result<(), RuntimeError>>,
    },
    /// Restart a sequence's sampling from `seed` (a turn's own seed), before its next turn.
    Reseed {
        /// Sequence.
        seq: SeqId,
        /// Seed.
        seed: u64,
    },
    /// Start a turn.
    Submit {
        /// Sequence.
        seq: SeqId,
        /// New tokens (prompt).
        tokens: Vec<u32>,
        /// The turn.
        turn: Turn,
    },
    /// End the sequence's turn without waiting for it to finish: the tokens committed so far stay
    /// in its window. Answered with [`TurnUpdate::Cancelled`] at once, or (when its work is in the
    /// step in flight) with that step's emission, marked finished.
    Cancel {
        /// Sequence.
        seq: SeqId,
    },
    /// Forget a sequence.
    Close {
        /// Sequence.
        seq: SeqId,
    },
}

/// What the scheduler tells a session about its current turn: scheduler → session.
#[derive(Debug, Clone)]
pub enum TurnUpdate {
    /// Tokens a step emitted for the turn (the last emission says it finished).
    Emitted(Emission),
    /// The turn failed; the session's next turn may start.
    Failed(RuntimeError),
    /// The turn was cancelled as asked before any more of it was emitted; the next may start.
    Cancelled,
}
