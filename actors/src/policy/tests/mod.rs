//! Unit tests of the scheduler's policy, driven directly on [`SchedulerState`]: no channels, no
//! actors, no clocks. Outcomes are fabricated as a greedy verifier would make them, from a toy model
//! whose next token depends only on the last one, so every emitted stream can be checked against the
//! stream the model produces alone.
//!
//! This file holds the shared helpers and the [`Sim`] that drives the state as the scheduler actor
//! does; the tests are split by concern, one file each.

use std::collections::{BTreeMap, HashSet};

use troupe_engine::accept::accept_greedy;
use troupe_engine::drafter::Draft;
use troupe_engine::{SamplingParams, SeqId, VerifyOutcome, VerifyWork};

use std::time::Duration;

use super::*;
use crate::protocol::{DraftOrder, DraftReply, Emission, Turn};

mod draft_len;
mod fairness;
mod orders;
mod phase;
mod plan;
mod restarts;
mod turns;
mod waits;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The toy model: the greedy token after `t`.
fn next(t: u32) -> u32 {
    (t.wrapping_mul(31).wrapping_add(7)) % 997 + 3
}

/// The `n` tokens the model emits alone after `last`.
fn chain(last: u32, n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n);
    let mut t = last;
    for _ in 0..n {
        t = next(t);
        out.push(t);
    }
    out
}

/// A greedy turn of `remaining` tokens with no stop token.
fn turn(remaining: usize) -> Turn {
    Turn {
        remaining,
        params: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_after_content: false,
    }
}

/// Fixed draft lengths, no pipelining and no draft wait, with these limits.
fn config(
    max_step_tokens: usize,
    max_step_seqs: usize,
    prefill_chunk: usize,
    max_draft_len: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        max_step_tokens,
        max_step_seqs,
        prefill_chunk,
        max_draft_len,
        pipelined: false,
        adaptive: false,
        draft_wait: Some(std::time::Duration::ZERO),
        turnaround_wait: None,
    }
}

/// A prompt of `n` distinct tokens for sequence `seq`.
fn prompt(seq: SeqId, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + seq as u32 * 100 + i).collect()
}

/// What a greedy verifier returns for `w`: argmax rows from the toy model, the longest matching
/// prefix plus one token, cut after the first of the work's stop tokens.
fn verify_work(w: &VerifyWork) -> VerifyOutcome {
    if !w.sample {
        return VerifyOutcome {
            seq: w.seq,
            accepted: 0,
            tokens: Vec::new(),
            hidden: Vec::new(),
        };
    }
    let mut argmaxes = vec![next(*w.fed.last().expect("fed is never empty"))];
    argmaxes.extend(w.draft.iter().map(|&d| next(d)));
    let a = accept_greedy(&w.draft, &argmaxes).stop_at(&w.stop);
    VerifyOutcome {
        seq: w.seq,
        accepted: a.accepted,
        tokens: a.tokens,
        hidden: Vec::new(),
    }
}

/// What the greedy verifier returns for every work of `step`.
fn verify(step: &PlannedStep) -> Vec<VerifyOutcome> {
    step.works.iter().map(verify_work).collect()
}

/// A fabricated greedy outcome: the first `accepted` drafted tokens, then `bonus`.
fn forced(w: &VerifyWork, accepted: usize, bonus: u32) -> VerifyOutcome {
    let mut tokens = w.draft[..accepted].to_vec();
    tokens.push(bonus);
    VerifyOutcome {
        seq: w.seq,
        accepted,
        tokens,
        hidden: Vec::new(),
    }
}

/// The reply to `order` with `tokens` drafted.
fn reply(order: &DraftOrder, tokens: Vec<u32>) -> DraftReply {
    DraftReply {
        order: order.clone(),
        draft: Draft {
            tokens,
            probs: None,
        },
    }
}

/// A drafter that continues the toy model from the order's context, wrong wherever `wrong(i)`.
fn draft_with(st: &SchedulerState, o: &DraftOrder, wrong: impl Fn(usize) -> bool) -> DraftReply {
    let e = st.seq(o.seq).expect("ordered for an open sequence");
    let mut last = o
        .assumed
        .last()
        .copied()
        .unwrap_or(e.history[o.base_len - 1]);
    let mut tokens = Vec::with_capacity(o.k);
    for i in 0..o.k {
        last = next(last);
        if wrong(i) {
            last += 1;
        }
        tokens.push(last);
    }
    reply(o, tokens)
}

/// A drafter that continues the toy model from the order's context, right throughout.
fn right_draft(st: &SchedulerState, o: &DraftOrder) -> DraftReply {
    draft_with(st, o, |_| false)
}

/// The invariants every planned step must satisfy; `st` is the state right after `dispatch`.
fn check_step(st: &SchedulerState, step: &PlannedStep) {
    let c = &st.config;
    assert!(
        step.works.len() <= c.max_step_seqs,
        "{} sequences in a step capped at {}",
        step.works.len(),
        c.max_step_seqs
    );
    let tokens: usize = step.works.iter().map(|w| w.fed.len() + w.draft.len()).sum();
    assert_eq!(tokens, step.tokens, "the step's token count");
    assert!(
        tokens <= c.max_step_tokens,
        "{tokens} tokens in a step capped at {}",
        c.max_step_tokens
    );
    let mut seen = HashSet::new();
    for w in &step.works {
        assert!(seen.insert(w.seq), "sequence {} twice in one step", w.seq);
        assert!(!w.fed.is_empty(), "sequence {} fed nothing", w.seq);
        assert!(w.fed.len() <= c.prefill_chunk.max(1));
        let e = st.seq(w.seq).expect("scheduled sequences are open");
        assert_eq!(
            w.fed[..],
            e.history[e.committed..e.committed + w.fed.len()],
            "sequence {} is fed the next uncommitted tokens",
            w.seq
        );
        assert_eq!(
            w.sample,
            e.committed + w.fed.len() == e.history.len(),
            "sequence {} samples exactly when its chunk reaches the end of its history",
            w.seq
        );
        if !w.sample {
            assert!(
                w.draft.is_empty(),
                "sequence {}: a draft on a chunk that does not sample ({:?})",
                w.seq,
                w.draft
            );
        }
        let t = e.turn.as_ref().expect("scheduled sequences have a turn");
        assert!(
            w.draft.len() < t.remaining,
            "sequence {}: {} drafts with {} tokens left",
            w.seq,
            w.draft.len(),
            t.remaining
        );
    }
}

/// Drives a [`SchedulerState`] as the scheduler actor does, through `dispatch` and `complete`, with
/// the toy verifier and an optional drafter that answers every order at once.
struct Sim {
    /// The state driven.
    st: SchedulerState,
    /// Emitted tokens per sequence, in order.
    out: BTreeMap<SeqId, Vec<u32>>,
    /// Times each sequence's turn finished.
    finished: BTreeMap<SeqId, usize>,
    /// Seconds a step of `n` tokens takes.
    seconds: fn(usize) -> f64,
    /// Answer draft orders; `wrong(seq, order_no, i)` makes drafted token i wrong.
    drafter: Option<fn(SeqId, u64, usize) -> bool>,
    /// Draft orders answered so far (the `order_no` of the next one, less one).
    orders_seen: u64,
    /// Orders returned by the last `complete`.
    last_orders: Vec<DraftOrder>,
}

impl Sim {
    /// A sim with no sequences, no drafter, and 10 ms steps.
    fn new(config: SchedulerConfig) -> Self {
        Self {
            st: SchedulerState::new(config),
            out: BTreeMap::new(),
            finished: BTreeMap::new(),
            seconds: |_| 0.01,
            drafter: None,
            orders_seen: 0,
            last_orders: Vec::new(),
        }
    }

    /// Answers every draft order at once; `wrong(seq, order_no, i)` makes drafted token i wrong.
    fn with_drafter(mut self, wrong: fn(SeqId, u64, usize) -> bool) -> Self {
        self.drafter = Some(wrong);
        self
    }

    /// Opens `seq` and starts a greedy turn of `remaining` tokens after `prompt`.
    fn start(&mut self, seq: SeqId, prompt: &[u32], remaining: usize) {
        self.start_turn(seq, prompt, turn(remaining));
    }

    /// Opens `seq` and starts `turn` after `prompt`, and orders (and answers) a draft for it at once
    /// if it decodes from the start. The scheduler actor does not order drafts on a submit (its
    /// first orders for a turn come with the turn's first completed step); the tests here count on
    /// a draft being ready for a one-token prompt's first step.
    fn start_turn(&mut self, seq: SeqId, prompt: &[u32], turn: Turn) {
        self.st.open(seq);
        self.st.submit(seq, prompt, turn).unwrap();
        let orders = self.st.fresh_orders();
        self.answer(orders);
    }

    /// Answers `orders` with the drafter, if there is one.
    fn answer(&mut self, orders: Vec<DraftOrder>) {
        let Some(wrong) = self.drafter else { return };
        let replies = orders
            .iter()
            .map(|o| {
                self.orders_seen += 1;
                let n = self.orders_seen;
                draft_with(&self.st, o, |i| wrong(o.seq, n, i))
            })
            .collect();
        self.st.on_drafts(replies);
    }

    /// Dispatches, checks, verifies and completes one step; `None` when nothing was dispatched.
    fn step(&mut self) -> Option<PlannedStep> {
        let Dispatch { step, orders } = self.st.dispatch()?;
        check_step(&self.st, &step);
        self.answer(orders);
        let outcomes = verify(&step);
        let done = self.st.complete(
            step.id,
            &outcomes,
            Duration::from_secs_f64((self.seconds)(step.tokens)),
        );
        self.record(&done.emissions);
        self.last_orders = done.orders.clone();
        self.answer(done.orders);
        Some(step)
    }

    /// Adds `emissions` to `out` and `finished`.
    fn record(&mut self, emissions: &[Emission]) {
        for e in emissions {
            let out = self.out.entry(e.seq).or_default();
            out.extend_from_slice(&e.tokens);
            if e.finished {
                *self.finished.entry(e.seq).or_default() += 1;
            }
        }
    }

    /// Steps until nothing is left; returns the steps run.
    fn run(&mut self, limit: usize) -> Vec<PlannedStep> {
        let mut steps = Vec::new();
        while let Some(s) = self.step() {
            steps.push(s);
            assert!(steps.len() <= limit, "no progress after {limit} steps");
        }
        steps
    }
}

/// The sequences of `step`, in order.
fn seqs_of(step: &PlannedStep) -> Vec<SeqId> {
    step.works.iter().map(|w| w.seq).collect()
}

/// The work of `seq` in `step`.
fn work(step: &PlannedStep, seq: SeqId) -> &VerifyWork {
    step.works
        .iter()
        .find(|w| w.seq == seq)
        .unwrap_or_else(|| panic!("sequence {seq} not in step {}", step.id))
}
