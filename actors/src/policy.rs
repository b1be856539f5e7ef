//! The scheduler's state and policy, as a plain struct with no channels and no clocks of its own:
//! which sequences go into the next step and with how many drafted tokens, what each outcome means
//! for its turn, and which drafts to ask the proposer for. The scheduler actor is a thin dispatcher
//! over it, and the unit tests drive it directly.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use troupe_engine::drafter::Draft;
use troupe_engine::{SamplingParams, SeqId, VerifyOutcome, VerifyWork};

use crate::cost::{best_draft_len, expected_emitted, Acceptance, CostModel};

/// Limits and switches of the scheduler.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Most tokens in one verify step (decode, drafts and prefill together).
    pub max_step_tokens: usize,
    /// Most sequences in one verify step.
    pub max_step_seqs: usize,
    /// Largest prefill chunk of one sequence in one step.
    pub prefill_chunk: usize,
    /// Longest draft block; 0 turns speculation off.
    pub max_draft_len: usize,
    /// Draft block n+1 while block n is verified.
    pub pipelined: bool,
    /// Pick the draft length per sequence from acceptance and load; otherwise always the maximum.
    pub adaptive: bool,
    /// Longest a step waits for drafts, in seconds; `None` adapts it to what the drafts are
    /// expected to save, and waits not at all for drafts that come back later than that (a
    /// distant or overloaded proposer), so waiting does not make decoding slower than plain.
    pub draft_wait_s: Option<f64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 1024,
            max_step_seqs: 256,
            prefill_chunk: 128,
            max_draft_len: 6,
            pipelined: true,
            adaptive: true,
            draft_wait_s: None,
        }
    }
}

/// The active turn of a sequence.
#[derive(Debug, Clone)]
pub struct Turn {
    /// Tokens still to emit.
    pub remaining: usize,
    /// Sampling.
    pub params: SamplingParams,
    /// Token that ends the turn.
    pub stop: Option<u32>,
}

#[derive(Debug, Clone)]
struct ReadyDraft {
    /// History length the draft continues.
    at: usize,
    tokens: Vec<u32>,
    probs: Option<Vec<Vec<f32>>>,
}

#[derive(Debug, Clone)]
struct PipeRequest {
    base_len: usize,
    assumed: Vec<u32>,
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
    acceptance: Acceptance,
    /// Tokens drafted for this sequence.
    pub drafted: u64,
    /// Drafted tokens accepted.
    pub accepted: u64,
    in_step: bool,
    ready: Option<ReadyDraft>,
    pipe: Option<PipeRequest>,
    pipe_reply: Option<(PipeRequest, Draft)>,
    awaiting: Option<usize>,
    /// Draft orders sent and not yet answered (the credit limit on blocks in flight).
    in_orders: usize,
    /// Step count when the last order was sent: credits unanswered for long are presumed lost.
    last_order_step: u64,
}

impl SeqEntry {
    fn new() -> Self {
        Self {
            history: Vec::new(),
            committed: 0,
            turn: None,
            alpha: 0.6,
            acceptance: Acceptance::new(0.6),
            drafted: 0,
            accepted: 0,
            in_step: false,
            ready: None,
            pipe: None,
            pipe_reply: None,
            awaiting: None,
            in_orders: 0,
            last_order_step: 0,
        }
    }

    fn pending(&self) -> usize {
        self.history.len() - self.committed
    }

    /// Counts one more draft order in flight; credits of orders presumed lost are reclaimed.
    fn take_credit(&mut self, step: u64) {
        if self.in_orders >= MAX_ORDERS_IN_FLIGHT {
            self.in_orders = 0;
        }
        self.in_orders += 1;
        self.last_order_step = step;
    }

    /// A draft order continuing this sequence's history after `assumed`.
    fn order(&self, seq: SeqId, assumed: Vec<u32>, k: usize, pipelined: bool) -> DraftOrder {
        DraftOrder {
            seq,
            base_len: self.history.len(),
            assumed,
            k,
            params: self.turn.as_ref().map(|t| t.params).unwrap_or_default(),
            pipelined,
        }
    }

    fn is_decoding(&self) -> bool {
        self.turn.is_some() && self.pending() == 1
    }

    /// Whether the pipelined draft still on its way can apply: its assumed block was accepted
    /// whole and one more token followed, so the draft continues the history as it now stands.
    fn pipe_may_apply(&self) -> bool {
        let Some(p) = self.pipe.as_ref().filter(|_| self.pipe_reply.is_none()) else {
            return false;
        };
        let end = p.base_len + p.assumed.len();
        self.history.len() == end + 1 && self.history[p.base_len..end] == p.assumed[..]
    }

    /// Whether this decoding sequence waits for a draft that can still apply: a fresh one ordered
    /// at its current length, or a pipelined one that guessed its last block right.
    fn waits_for_draft(&self) -> bool {
        self.is_decoding() && (self.awaiting == Some(self.history.len()) || self.pipe_may_apply())
    }
}

/// Draft orders one sequence may have unanswered at once: a fresh block and a pipelined one.
pub const MAX_ORDERS_IN_FLIGHT: usize = 2;

/// While drafts come back too late to be used, a sequence is sent an order only every this many
/// steps, to keep measuring how late they are.
const LATE_DRAFT_PROBE_STEPS: u64 = 8;

/// Steps after which unanswered draft orders are presumed lost (a dropped message).
const ORDER_EXPIRY_STEPS: u64 = 8;

/// A draft the proposer should make.
#[derive(Debug, Clone, PartialEq)]
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

/// A draft the proposer made.
#[derive(Debug, Clone)]
pub struct DraftReply {
    /// The order it answers.
    pub order: DraftOrder,
    /// The draft.
    pub draft: Draft,
}

/// A step on its way to the verifier.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    /// Step number.
    pub id: u64,
    /// One work per sequence.
    pub works: Vec<VerifyWork>,
    /// Tokens in the step.
    pub tokens: usize,
}

/// What one sequence got from a step.
#[derive(Debug, Clone, PartialEq)]
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
    /// Seconds the verifier spent on the step (model time, injected delay included).
    pub step_seconds: f64,
}

/// Counters of the scheduler.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SchedulerStats {
    /// Steps run.
    pub steps: u64,
    /// Largest number of sequences in one step.
    pub max_step_seqs: usize,
    /// Sum of sequences over steps (for the mean).
    pub total_step_seqs: u64,
    /// Tokens fed to the verifier.
    pub tokens: u64,
    /// Tokens emitted.
    pub emitted: u64,
    /// Drafted tokens verified.
    pub drafted: u64,
    /// Of which accepted.
    pub accepted: u64,
    /// Times the verifier was restarted.
    pub verifier_restarts: u64,
    /// Times the proposer was restarted.
    pub proposer_restarts: u64,
    /// Seconds the verifier spent in forward passes.
    pub forward_seconds: f64,
}

/// A sequence's place in a step: (sequence, tokens fed, drafted tokens).
type Chosen = (SeqId, usize, Vec<u32>);

/// The scheduler's state.
#[derive(Debug)]
pub struct SchedulerState {
    /// Configuration.
    pub config: SchedulerConfig,
    seqs: BTreeMap<SeqId, SeqEntry>,
    rr: u64,
    in_flight: Option<(u64, Vec<Chosen>)>,
    next_id: u64,
    /// Step-time model.
    pub cost: CostModel,
    /// Counters.
    pub stats: SchedulerStats,
    last_step_seqs: usize,
    step_ema: Option<f64>,
    /// Seconds from a draft order to its reply, averaged.
    draft_latency_ema: Option<f64>,
}

impl SchedulerState {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            seqs: BTreeMap::new(),
            rr: 0,
            in_flight: None,
            next_id: 1,
            cost: CostModel::default(),
            stats: SchedulerStats::default(),
            last_step_seqs: 1,
            step_ema: None,
            draft_latency_ema: None,
        }
    }

    /// Registers a sequence.
    pub fn open(&mut self, seq: SeqId) {
        self.seqs.entry(seq).or_insert_with(SeqEntry::new);
    }

    /// Forgets a sequence; a step in flight for it is ignored when it returns.
    pub fn close(&mut self, seq: SeqId) -> bool {
        self.seqs.remove(&seq).is_some()
    }

    /// The sequence, if open.
    pub fn seq(&self, seq: SeqId) -> Option<&SeqEntry> {
        self.seqs.get(&seq)
    }

    /// Open sequences.
    pub fn seq_ids(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }

    /// Whether a step is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Number of sequences with an active turn.
    pub fn active(&self) -> usize {
        self.seqs.values().filter(|s| s.turn.is_some()).count()
    }

    /// Starts a turn: `tokens` join the sequence's history and will be prefilled.
    pub fn submit(&mut self, seq: SeqId, tokens: &[u32], turn: Turn) -> Result<(), String> {
        let e = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| format!("unknown sequence {seq}"))?;
        if e.turn.is_some() {
            return Err(format!("sequence {seq} already has a turn in progress"));
        }
        if tokens.is_empty() && e.history.is_empty() {
            return Err("the first turn of a session needs a prompt".into());
        }
        e.history.extend_from_slice(tokens);
        e.ready = None;
        e.pipe = None;
        e.pipe_reply = None;
        e.awaiting = None;
        if turn.remaining > 0 {
            e.turn = Some(turn);
        }
        Ok(())
    }

    /// Ends a sequence's turn without finishing it (after a failure); its history stays.
    pub fn abort_turn(&mut self, seq: SeqId) {
        if let Some(e) = self.seqs.get_mut(&seq) {
            e.turn = None;
        }
    }

    /// Whether there is anything for the verifier to do.
    pub fn has_work(&self) -> bool {
        self.seqs.values().any(|s| s.turn.is_some() && !s.in_step)
    }

    /// Whether some decoding sequence still waits for a draft that can apply (fresh or pipelined).
    pub fn awaiting_drafts(&self) -> bool {
        self.seqs.values().any(SeqEntry::waits_for_draft)
    }

    /// How long a step may wait for drafts, in seconds. Adapted (no `draft_wait_s`), the wait is
    /// worth what a draft saves: the tokens it is expected to add, times a step's time. A
    /// pipelined draft is ordered when the step before starts, so it is due (its latency − one
    /// step) after that step ends; drafts due later than the wait is worth are not waited for.
    pub fn draft_wait(&self) -> f64 {
        if let Some(s) = self.config.draft_wait_s {
            return s;
        }
        if self.drafts_too_late() {
            0.0
        } else {
            self.draft_wait_worth()
        }
    }

    /// The running step time in seconds (10 ms before the first step).
    fn step_estimate(&self) -> f64 {
        self.step_ema.unwrap_or(0.01).clamp(0.001, 1.0)
    }

    fn draft_wait_worth(&self) -> f64 {
        (self.step_estimate() * self.expected_draft_gain()).min(1.0)
    }

    /// Whether drafts come back later than waiting for them is worth (with the wait adapted).
    fn drafts_too_late(&self) -> bool {
        if self.config.draft_wait_s.is_some() {
            return false;
        }
        self.draft_latency_ema
            .is_some_and(|latency| latency - self.step_estimate() > self.draft_wait_worth())
    }

    /// Whether this step's draft orders are withheld: drafts that come too late to be used only
    /// cost the proposer's compute, so one is ordered only every few steps, to notice when they
    /// come in time again. Decided once per planning pass (it looks at every sequence).
    fn orders_withheld(&self) -> bool {
        !self.stats.steps.is_multiple_of(LATE_DRAFT_PROBE_STEPS) && self.drafts_too_late()
    }

    /// Tokens a draft block is expected to add to a decoding sequence, at the sequences' mean
    /// acceptance estimate.
    fn expected_draft_gain(&self) -> f64 {
        let k = self.config.max_draft_len;
        let gains: Vec<f64> = self
            .seqs
            .values()
            .filter(|s| s.is_decoding())
            .map(|s| expected_emitted(s.alpha, k) - 1.0)
            .collect();
        gains.iter().sum::<f64>() / gains.len().max(1) as f64
    }

    /// Records how long a draft took from order to reply.
    pub fn observe_draft_latency(&mut self, seconds: f64) {
        self.draft_latency_ema = Some(match self.draft_latency_ema {
            Some(e) => 0.8 * e + 0.2 * seconds,
            None => seconds,
        });
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
        best_draft_len(e.alpha, ratio, cap)
    }

    /// Plans the next step; `None` when a step is in flight or nothing waits.
    pub fn plan_step(&mut self) -> Option<PlannedStep> {
        if self.in_flight.is_some() {
            return None;
        }
        let ids: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.turn.is_some() && !s.in_step)
            .map(|(&id, _)| id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        // Round robin: start after the sequence that started last time, so none starves.
        let start = ids.iter().position(|&id| id >= self.rr).unwrap_or(0);
        let order: Vec<SeqId> = ids[start..].iter().chain(&ids[..start]).copied().collect();
        let cfg = self.config.clone();
        let mut budget = cfg.max_step_tokens.max(1);
        let mut chosen: Vec<Chosen> = Vec::new();

        let prefill_waiting = order.iter().any(|id| self.seqs[id].pending() > 1);
        let reserve = if prefill_waiting {
            cfg.prefill_chunk.min(budget / 4).max(1)
        } else {
            0
        };
        // A waiting prompt also keeps one seat, or decoders filling `max_step_seqs` would starve it.
        let seat = usize::from(prefill_waiting && cfg.max_step_seqs > 1);
        // Decoding sequences first: one token each.
        for &id in &order {
            let e = &self.seqs[&id];
            if e.pending() == 1 && chosen.len() + seat < cfg.max_step_seqs && budget > reserve {
                chosen.push((id, 1, Vec::new()));
                budget -= 1;
            }
        }
        let decoders = chosen.len();
        let decoders_left_out = order
            .iter()
            .filter(|id| self.seqs[*id].pending() == 1)
            .count()
            > decoders;
        // Then prefill chunks with what is left.
        for &id in &order {
            let e = &self.seqs[&id];
            if e.pending() > 1 && chosen.len() < cfg.max_step_seqs && budget > 0 {
                let n = e.pending().min(cfg.prefill_chunk).min(budget);
                chosen.push((id, n, Vec::new()));
                budget -= n;
            }
        }
        if chosen.is_empty() {
            return None;
        }
        // Drafts fill the rest, each truncated to what the budget still allows. Only a chunk that
        // reaches the end of the history samples, so only it can carry a draft.
        for c in chosen.iter_mut().filter(|c| c.1 == 1) {
            let e = &self.seqs[&c.0];
            let at_end = e.committed + c.1 == e.history.len();
            if let Some(r) = e
                .ready
                .as_ref()
                .filter(|r| at_end && r.at == e.history.len())
            {
                let remaining = e.turn.as_ref().map_or(0, |t| t.remaining);
                let n = r.tokens.len().min(budget).min(remaining.saturating_sub(1));
                c.2 = r.tokens[..n].to_vec();
                budget -= n;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        // When decoders were left out, the next step starts after the last one served (round
        // robin); otherwise after the first, which rotates who gets draft budget first.
        let last = if decoders_left_out && decoders > 0 {
            chosen.get(decoders - 1)
        } else {
            chosen.first()
        };
        self.rr = last.map(|c| c.0 + 1).unwrap_or(0);
        let mut works = Vec::with_capacity(chosen.len());
        let mut tokens = 0;
        for (seq, fed, draft) in &chosen {
            let e = self.seqs.get_mut(seq).expect("chosen from the map");
            e.in_step = true;
            let turn = e
                .turn
                .as_ref()
                .expect("only sequences with a turn are chosen");
            let fed_tokens = e.history[e.committed..e.committed + fed].to_vec();
            let sample = e.committed + fed == e.history.len();
            let probs = e
                .ready
                .take()
                .and_then(|r| r.probs)
                .map(|p| p[..draft.len()].to_vec());
            tokens += fed + draft.len();
            works.push(VerifyWork {
                seq: *seq,
                fed: fed_tokens,
                draft: draft.clone(),
                draft_probs: if draft.is_empty() { None } else { probs },
                sample,
                params: turn.params,
                stop: turn.stop,
            });
        }
        self.in_flight = Some((id, chosen));
        Some(PlannedStep { id, works, tokens })
    }

    /// Drafts to make while step `id` is verified: block n+1 of each decoding sequence, assuming
    /// block n is accepted whole (the first drafted token is a guess of the verifier's own token).
    pub fn pipelined_orders(&mut self) -> Vec<DraftOrder> {
        let steps = self.stats.steps;
        if !self.config.pipelined || self.config.max_draft_len == 0 || self.orders_withheld() {
            return Vec::new();
        }
        let Some((_, chosen)) = &self.in_flight else {
            return Vec::new();
        };
        let decoding = chosen.iter().filter(|c| c.1 == 1).count();
        let mut orders = Vec::new();
        for (seq, fed, draft) in chosen.clone() {
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

    /// Applies a finished step. Returns what each sequence emitted and the fresh drafts to order.
    pub fn on_step_done(
        &mut self,
        id: u64,
        outcomes: &[VerifyOutcome],
        seconds: f64,
    ) -> (Vec<Emission>, Vec<DraftOrder>) {
        let Some((fid, chosen)) = self.in_flight.take() else {
            return (Vec::new(), Vec::new());
        };
        if fid != id {
            self.in_flight = Some((fid, chosen));
            return (Vec::new(), Vec::new());
        }
        let step_tokens: usize = chosen.iter().map(|c| c.1 + c.2.len()).sum();
        self.cost.observe(step_tokens, seconds);
        self.step_ema = Some(match self.step_ema {
            Some(e) => 0.8 * e + 0.2 * seconds,
            None => seconds,
        });
        self.last_step_seqs = chosen.len();
        self.stats.steps += 1;
        self.stats.forward_seconds += seconds;
        self.stats.max_step_seqs = self.stats.max_step_seqs.max(chosen.len());
        self.stats.total_step_seqs += chosen.len() as u64;
        self.stats.tokens += step_tokens as u64;
        let mut emissions = Vec::new();
        for (o, (seq, fed, draft)) in outcomes.iter().zip(&chosen) {
            let Some(e) = self.seqs.get_mut(seq) else {
                continue;
            };
            e.in_step = false;
            debug_assert_eq!(o.seq, *seq);
            let accepted = o.accepted.min(draft.len());
            e.committed += fed + accepted;
            e.history.extend_from_slice(&o.tokens);
            e.drafted += draft.len() as u64;
            e.accepted += accepted as u64;
            if !draft.is_empty() {
                e.acceptance.observe(accepted, draft.len());
                e.alpha = e.acceptance.alpha();
            }
            self.stats.drafted += draft.len() as u64;
            self.stats.accepted += accepted as u64;
            self.stats.emitted += o.tokens.len() as u64;
            let mut finished = false;
            if let Some(t) = e.turn.as_mut() {
                t.remaining = t.remaining.saturating_sub(o.tokens.len());
                let stopped = t.stop.is_some_and(|s| o.tokens.contains(&s));
                if t.remaining == 0 || stopped {
                    finished = true;
                    e.turn = None;
                }
            }
            emissions.push(Emission {
                seq: *seq,
                tokens: o.tokens.clone(),
                drafted: draft.len(),
                accepted,
                finished,
                step_seconds: seconds,
            });
        }
        // Sequences of the step that returned nothing (should not happen) are freed too.
        for (seq, _, _) in &chosen {
            if let Some(e) = self.seqs.get_mut(seq) {
                e.in_step = false;
            }
        }
        // Promote pipelined drafts that guessed right; order fresh ones for the rest.
        let steps = self.stats.steps;
        let decoding = self.seqs.values().filter(|s| s.is_decoding()).count();
        let withheld = self.orders_withheld();
        let mut orders = Vec::new();
        let ids: Vec<SeqId> = chosen.iter().map(|c| c.0).collect();
        for seq in ids {
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
        (emissions, orders)
    }

    /// Orders fresh drafts for decoding sequences that have none ready and none coming (after a
    /// turn starts decoding from a prefill, or after a proposer restart).
    pub fn fresh_orders(&mut self) -> Vec<DraftOrder> {
        if self.orders_withheld() {
            return Vec::new();
        }
        let steps = self.stats.steps;
        let decoding = self.seqs.values().filter(|s| s.is_decoding()).count();
        let mut orders = Vec::new();
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for seq in ids {
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

    /// Forgets every draft made or coming: the proposer lost its state.
    pub fn proposer_restarted(&mut self) {
        self.stats.proposer_restarts += 1;
        for e in self.seqs.values_mut() {
            e.ready = None;
            e.pipe = None;
            e.pipe_reply = None;
            e.awaiting = None;
            e.in_orders = 0;
        }
    }

    /// The id of the step in flight.
    pub fn in_flight_id(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.0)
    }

    /// Sequences of the step in flight.
    pub fn in_flight_seqs(&self) -> HashSet<SeqId> {
        self.in_flight
            .as_ref()
            .map(|f| f.1.iter().map(|c| c.0).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
