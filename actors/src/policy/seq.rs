//! One sequence as the scheduler sees it: its history and how much of it the verifier holds, its
//! turn, its acceptance estimate, and the drafts ready, ordered or coming for it.

use troupe_engine::drafter::Draft;
use troupe_engine::SeqId;

use super::orders::MAX_ORDERS_IN_FLIGHT;
use crate::cost::AcceptanceRate;
use crate::protocol::{DraftOrder, Turn};

/// A draft the next step may verify.
#[derive(Debug, Clone)]
pub(super) struct ReadyDraft {
    /// History length the draft continues.
    pub(super) at: usize,
    /// The drafted tokens.
    pub(super) tokens: Vec<u32>,
    /// The distributions they were drawn from (`None`: a deterministic drafter).
    pub(super) probs: Option<Vec<Vec<f32>>>,
}

/// What a pipelined order assumed: the block in flight when it was sent.
#[derive(Debug, Clone)]
pub(super) struct PipeRequest {
    /// History length the block in flight continues.
    pub(super) base_len: usize,
    /// The block in flight, assumed accepted whole.
    pub(super) assumed: Vec<u32>,
}

/// One sequence as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct SeqEntry {
    /// Every token known to be in the sequence: prompt, emitted tokens.
    pub history: Vec<u32>,
    /// How many of `history` are in the verifier's window.
    pub committed: usize,
    /// The turn being generated, if any.
    pub turn: Option<Turn>,
    /// Per-token acceptance estimate.
    pub alpha: f64,
    /// The running estimate `alpha` is read from.
    pub(super) acceptance: AcceptanceRate,
    /// Whether the sequence is in the step in flight.
    pub(super) in_step: bool,
    /// A fresh or promoted draft for the next step.
    pub(super) ready: Option<ReadyDraft>,
    /// The pipelined order sent last and not yet answered or given up.
    pub(super) pipe: Option<PipeRequest>,
    /// The reply to the pipelined order, until the step it assumed returns and says whether it
    /// applies.
    pub(super) pipe_reply: Option<(PipeRequest, Draft)>,
    /// History length of the fresh order sent and not yet answered.
    pub(super) awaiting: Option<usize>,
    /// Draft orders sent and not yet answered (the credit limit on blocks in flight).
    pub(super) in_orders: usize,
    /// Step count when the last order was sent: credits unanswered for long are presumed lost.
    pub(super) last_order_step: u64,
    /// Whether the turn has emitted a token that is not a stop token (see
    /// [`Turn::stop_after_content`]).
    pub(super) content: bool,
}

impl SeqEntry {
    /// A sequence with no history and no turn.
    pub(super) fn new() -> Self {
        Self {
            history: Vec::new(),
            committed: 0,
            turn: None,
            alpha: 0.6,
            acceptance: AcceptanceRate::new(0.6),
            in_step: false,
            ready: None,
            pipe: None,
            pipe_reply: None,
            awaiting: None,
            in_orders: 0,
            last_order_step: 0,
            content: false,
        }
    }

    /// Forgets the drafts ready or coming (orders still out are dropped when they come back, which
    /// returns their credit).
    pub(super) fn forget_drafts(&mut self) {
        self.ready = None;
        self.pipe = None;
        self.pipe_reply = None;
        self.awaiting = None;
    }

    /// Tokens of the history not yet in the verifier's window.
    pub(super) fn pending(&self) -> usize {
        self.history.len() - self.committed
    }

    /// Counts one more draft order in flight; credits of orders presumed lost are reclaimed.
    pub(super) fn take_credit(&mut self, step: u64) {
        if self.in_orders >= MAX_ORDERS_IN_FLIGHT {
            self.in_orders = 0;
        }
        self.in_orders += 1;
        self.last_order_step = step;
    }

    /// A draft order continuing this sequence's history after `assumed`.
    pub(super) fn order(
        &self,
        seq: SeqId,
        assumed: Vec<u32>,
        k: usize,
        pipelined: bool,
    ) -> DraftOrder {
        DraftOrder {
            seq,
            base_len: self.history.len(),
            assumed,
            k,
            params: self.turn.as_ref().map(|t| t.params).unwrap_or_default(),
            pipelined,
        }
    }

    /// Whether the sequence has a turn and only its last token left to feed.
    pub(super) fn is_decoding(&self) -> bool {
        self.turn.is_some() && self.pending() == 1
    }

    /// Whether the pipelined draft still on its way can apply: its assumed block was accepted
    /// whole and one more token followed, so the draft continues the history as it now stands.
    pub(super) fn pipe_may_apply(&self) -> bool {
        let Some(p) = self.pipe.as_ref().filter(|_| self.pipe_reply.is_none()) else {
            return false;
        };
        let end = p.base_len + p.assumed.len();
        self.history.len() == end + 1 && self.history[p.base_len..end] == p.assumed[..]
    }

    /// Whether this decoding sequence waits for a draft that can still apply: a fresh one ordered
    /// at its current length, or a pipelined one that guessed its last block right.
    pub(super) fn waits_for_draft(&self) -> bool {
        self.is_decoding() && (self.awaiting == Some(self.history.len()) || self.pipe_may_apply())
    }
}
