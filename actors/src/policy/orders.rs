//! Draft orders: how long a draft to ask for, pipelined orders sent with a step, fresh orders after
//! one, the credit that bounds the orders unanswered per sequence, and the replies: fresh drafts
//! made ready, pipelined ones promoted when their block was accepted whole.

use troupe_engine::SeqId;

use super::seq::{PipeRequest, ReadyDraft, SeqEntry};
use super::{Chosen, SchedulerState};
use crate::cost::best_draft_len_drafting;
use crate::protocol::{DraftOrder, DraftReply};

/// Draft orders one sequence may have unanswered at once: a fresh block and a pipelined one.
pub const MAX_ORDERS_IN_FLIGHT: usize = 2;

/// Steps after which unanswered draft orders are presumed lost (a dropped message).
const ORDER_EXPIRY_STEPS: u64 = 8;

impl SchedulerState {
    /// How many sequences with a turn have only their last token left to feed.
    fn decoding(&self) -> usize {
        self.turns
            .iter()
            .filter(|s| self.seqs[*s].is_decoding())
            .count()
    }

    /// Whether a sequence may be sent one more draft order: under its credit, or its unanswered
    /// orders are so old they are presumed lost.
    fn may_order(&self, e: &SeqEntry) -> bool {
        e.in_orders < MAX_ORDERS_IN_FLIGHT
            || self.stats.steps >= e.last_order_step + ORDER_EXPIRY_STEPS
    }

    /// Draft length for a sequence about to draft, from its acceptance and the current load.
    fn draft_len(&self, e: &SeqEntry, decoding: usize) -> usize {
        let turn = match &e.turn {
            Some(t) => t,
            None => return 0,
        };
        let max_k = self.config.max_draft_len;
        if max_k == 0 {
            return 0;
        }
        // Load: what is left of the token budget, shared among the decoding sequences.
        let per_seq = self.config.max_step_tokens.saturating_sub(decoding) / decoding.max(1);
        let cap = max_k.min(per_seq).min(turn.remaining.saturating_sub(1));
        if !self.config.adaptive {
            return cap;
        }
        let ratio = self.cost.marginal_ratio(decoding.max(1));
        best_draft_len_drafting(
            e.alpha,
            ratio,
            cap,
            self.draft_forward_share(),
            self.draft_cost,
        )
    }

    /// Drafts to make while the step in flight is verified: block n+1 of each decoding sequence,
    /// assuming block n is accepted whole (the first drafted token is a guess of the verifier's
    /// own token).
    pub(super) fn pipelined_orders(&mut self) -> Vec<DraftOrder> {
        let steps = self.stats.steps;
        if !self.config.pipelined || self.config.max_draft_len == 0 || self.orders_withheld() {
            return Vec::new();
        }
        let Some(in_flight) = &self.in_flight else {
            return Vec::new();
        };
        let chosen = in_flight.chosen.clone();
        let decoding = chosen.iter().filter(|c| c.fed == 1).count();
        let mut orders = Vec::new();
        for Chosen { seq, fed, draft } in chosen {
            let e = &self.seqs[&seq];
            let sampled_end = e.committed + fed == e.history.len();
            if !sampled_end {
                continue;
            }
            let remaining_after = e
                .turn
                .as_ref()
                .map_or(0, |t| t.remaining.saturating_sub(draft.len() + 1));
            let k = self
                .draft_len(e, decoding)
                .min(remaining_after.saturating_sub(1));
            if k == 0 {
                continue;
            }
            if !self.may_order(e) {
                continue;
            }
            let order = e.order(seq, draft, k + 1, true);
            let e = self.seqs.get_mut(&seq).expect("present");
            e.pipe = Some(PipeRequest {
                base_len: order.base_len,
                assumed: order.assumed.clone(),
            });
            e.pipe_reply = None;
            e.take_credit(steps);
            orders.push(order);
        }
        orders
    }

    /// After a step of `chosen` is applied: promotes the pipelined drafts that guessed right, and
    /// orders fresh drafts for the step's other decoding sequences.
    pub(super) fn follow_up_orders(&mut self, chosen: &[Chosen]) -> Vec<DraftOrder> {
        if self.config.max_draft_len == 0 {
            return Vec::new(); // no drafts are ordered, so none can be promoted
        }
        let steps = self.stats.steps;
        let decoding = self.decoding();
        let withheld = self.orders_withheld();
        let mut orders = Vec::new();
        for seq in chosen.iter().map(|c| c.seq) {
            self.promote(seq);
            if withheld {
                continue;
            }
            let Some(e) = self.seqs.get(&seq) else {
                continue;
            };
            if !e.is_decoding() || e.ready.as_ref().is_some_and(|r| r.at == e.history.len()) {
                continue;
            }
            if e.pipe_may_apply() {
                continue; // its pipelined draft is still coming and continues the history
            }
            let k = self.draft_len(e, decoding);
            if k == 0 {
                continue;
            }
            if !self.may_order(e) {
                continue;
            }
            let order = e.order(seq, Vec::new(), k, false);
            let e = self.seqs.get_mut(&seq).expect("present");
            e.awaiting = Some(order.base_len);
            e.pipe = None;
            e.take_credit(steps);
            orders.push(order);
        }
        orders
    }

    /// Orders fresh drafts for decoding sequences that have none ready and none coming (after a
    /// turn starts decoding from a prefill, or after a proposer restart).
    pub(super) fn fresh_orders(&mut self) -> Vec<DraftOrder> {
        if self.config.max_draft_len == 0 || self.orders_withheld() {
            return Vec::new();
        }
        let steps = self.stats.steps;
        let decoding = self.decoding();
        let mut orders = Vec::new();
        for seq in self.turn_ids() {
            let e = &self.seqs[&seq];
            let len = e.history.len();
            if !e.is_decoding()
                || e.in_step
                || e.ready.as_ref().is_some_and(|r| r.at == len)
                || e.awaiting == Some(len)
                || e.pipe_may_apply()
                || !self.may_order(e)
            {
                continue;
            }
            let k = self.draft_len(e, decoding);
            if k == 0 {
                continue;
            }
            orders.push(e.order(seq, Vec::new(), k, false));
            let e = self.seqs.get_mut(&seq).expect("present");
            e.awaiting = Some(len);
            e.take_credit(steps);
        }
        orders
    }

    /// The draft orders to send a new proposer once it is up after
    /// [`proposer_restarted`](Self::proposer_restarted): a fresh draft for every decoding sequence
    /// with none ready or coming. (After a step, [`complete`](Self::complete) returns them.)
    pub fn orders_after_proposer_restart(&mut self) -> Vec<DraftOrder> {
        self.fresh_orders()
    }

    /// Applies drafts from the proposer; stale ones are dropped.
    pub fn on_drafts(&mut self, replies: Vec<DraftReply>) {
        for r in replies {
            let seq = r.order.seq;
            let Some(e) = self.seqs.get_mut(&seq) else {
                continue;
            };
            e.in_orders = e.in_orders.saturating_sub(1);
            if !r.order.pipelined {
                if r.order.base_len == e.history.len() && !r.draft.tokens.is_empty() {
                    e.ready = Some(ReadyDraft {
                        at: r.order.base_len,
                        tokens: r.draft.tokens,
                        probs: r.draft.probs,
                    });
                }
                if e.awaiting == Some(r.order.base_len) {
                    e.awaiting = None;
                }
            } else if e
                .pipe
                .as_ref()
                .is_some_and(|p| p.base_len == r.order.base_len && p.assumed == r.order.assumed)
            {
                let req = e.pipe.clone().expect("checked");
                e.pipe_reply = Some((req, r.draft));
                self.promote(seq);
            }
        }
    }

    /// Turns a pipelined draft into a ready one if its block was accepted whole and its first token
    /// guessed the verifier's own token.
    fn promote(&mut self, seq: SeqId) {
        let Some(e) = self.seqs.get_mut(&seq) else {
            return;
        };
        if e.in_step {
            return;
        }
        let Some((req, draft)) = e.pipe_reply.take() else {
            return;
        };
        e.pipe = None;
        let end = req.base_len + req.assumed.len();
        let hit = e.history.len() == end + 1
            && e.history[req.base_len..end] == req.assumed[..]
            && draft.tokens.first() == e.history.last();
        if hit && draft.tokens.len() > 1 {
            e.ready = Some(ReadyDraft {
                at: e.history.len(),
                tokens: draft.tokens[1..].to_vec(),
                probs: draft.probs.map(|p| p[1..].to_vec()),
            });
        }
    }
}
