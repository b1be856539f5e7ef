//! Unit tests of the scheduler's policy, driven directly on [`SchedulerState`]: no channels, no
//! actors, no clocks. Outcomes are fabricated as a greedy verifier would make them, from a toy model
//! whose next token depends only on the last one, so every emitted stream can be checked against the
//! stream the model produces alone.

use std::collections::{BTreeMap, HashSet};

use troupe_engine::accept::accept_greedy;
use troupe_engine::drafter::Draft;
use troupe_engine::{SamplingParams, SeqId, VerifyOutcome, VerifyWork};

use super::*;

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

fn turn(remaining: usize) -> Turn {
    Turn {
        remaining,
        params: SamplingParams::greedy(),
        stop: None,
    }
}

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
        draft_wait_s: Some(0.0),
    }
}

/// A prompt of `n` distinct tokens for sequence `seq`.
fn prompt(seq: SeqId, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + seq as u32 * 100 + i).collect()
}

/// What a greedy verifier returns for `w`: argmax rows from the toy model, the longest matching
/// prefix plus one token, cut after the stop token.
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
    let a = accept_greedy(&w.draft, &argmaxes).stop_at(w.stop);
    VerifyOutcome {
        seq: w.seq,
        accepted: a.accepted,
        tokens: a.tokens,
        hidden: Vec::new(),
    }
}

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

fn right_draft(st: &SchedulerState, o: &DraftOrder) -> DraftReply {
    draft_with(st, o, |_| false)
}

/// The invariants every planned step must satisfy; `st` is the state right after `plan_step`.
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

/// Drives a [`SchedulerState`] as the scheduler actor does, with the toy verifier and an optional
/// drafter that answers every order at once.
struct Sim {
    st: SchedulerState,
    /// Emitted tokens per sequence, in order.
    out: BTreeMap<SeqId, Vec<u32>>,
    /// Times each sequence's turn finished.
    finished: BTreeMap<SeqId, usize>,
    /// Seconds a step of `n` tokens takes.
    seconds: fn(usize) -> f64,
    /// Answer draft orders; `wrong(seq, order_no, i)` makes drafted token i wrong.
    drafter: Option<fn(SeqId, u64, usize) -> bool>,
    orders_seen: u64,
    /// Orders returned by the last `on_step_done`.
    last_orders: Vec<DraftOrder>,
}

impl Sim {
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

    fn with_drafter(mut self, wrong: fn(SeqId, u64, usize) -> bool) -> Self {
        self.drafter = Some(wrong);
        self
    }

    fn start(&mut self, seq: SeqId, prompt: &[u32], remaining: usize) {
        self.st.open(seq);
        self.st.submit(seq, prompt, turn(remaining)).unwrap();
        let orders = self.st.fresh_orders();
        self.answer(orders);
    }

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

    /// Plans, checks, verifies and applies one step; `None` when nothing was planned.
    fn step(&mut self) -> Option<PlannedStep> {
        let step = self.st.plan_step()?;
        check_step(&self.st, &step);
        let pipe = self.st.pipelined_orders();
        self.answer(pipe);
        let outcomes = verify(&step);
        let (emissions, orders) =
            self.st
                .on_step_done(step.id, &outcomes, (self.seconds)(step.tokens));
        self.record(&emissions);
        self.last_orders = orders.clone();
        self.answer(orders);
        let fresh = self.st.fresh_orders();
        self.answer(fresh);
        Some(step)
    }

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

fn seqs_of(step: &PlannedStep) -> Vec<SeqId> {
    step.works.iter().map(|w| w.seq).collect()
}

fn work(step: &PlannedStep, seq: SeqId) -> &VerifyWork {
    step.works
        .iter()
        .find(|w| w.seq == seq)
        .unwrap_or_else(|| panic!("sequence {seq} not in step {}", step.id))
}

// ---------------------------------------------------------------------------------------------
// (a) token budget and sequence cap
// ---------------------------------------------------------------------------------------------

#[test]
fn drafts_fill_the_token_budget_in_order_and_are_truncated_to_it() {
    let mut st = SchedulerState::new(config(10, 8, 8, 6));
    for seq in 1..=3 {
        st.open(seq);
        st.submit(seq, &[seq as u32], turn(100)).unwrap();
    }
    let orders = st.fresh_orders();
    // Each of 3 decoding sequences gets (10 - 3) / 3 = 2 drafted tokens of budget.
    assert_eq!(
        orders.iter().map(|o| o.k).collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    // A drafter that returns more than asked: the step still stops at the budget.
    let replies = orders
        .iter()
        .map(|o| reply(o, vec![7, 7, 7, 7, 7, 7]))
        .collect();
    st.on_drafts(replies);
    let step = st.plan_step().unwrap();
    check_step(&st, &step);
    assert_eq!(seqs_of(&step), vec![1, 2, 3]);
    let drafts: Vec<usize> = step.works.iter().map(|w| w.draft.len()).collect();
    assert_eq!(drafts, vec![6, 1, 0]);
    assert_eq!(step.tokens, 10);
    // Nothing else is planned while the step is in flight.
    assert!(st.busy());
    assert!(st.plan_step().is_none());
}

#[test]
fn when_every_decoder_fits_draft_budget_priority_rotates() {
    // 3 decoders, 10 tokens: 7 tokens of draft budget for three 6-token drafts. The sequence that
    // gets its whole draft changes every step.
    let mut st = SchedulerState::new(config(10, 8, 8, 6));
    for seq in 1..=3 {
        st.open(seq);
        st.submit(seq, &[seq as u32], turn(1000)).unwrap();
    }
    let mut firsts = Vec::new();
    for _ in 0..6 {
        let replies = st
            .seq_ids()
            .into_iter()
            .map(|seq| {
                let len = st.seq(seq).unwrap().history.len();
                let order = DraftOrder {
                    seq,
                    base_len: len,
                    assumed: vec![],
                    k: 6,
                    params: SamplingParams::greedy(),
                    pipelined: false,
                };
                right_draft(&st, &order)
            })
            .collect();
        st.on_drafts(replies);
        let step = st.plan_step().unwrap();
        check_step(&st, &step);
        assert_eq!(step.tokens, 10);
        let full: Vec<SeqId> = step
            .works
            .iter()
            .filter(|w| w.draft.len() == 6)
            .map(|w| w.seq)
            .collect();
        assert_eq!(full.len(), 1);
        firsts.push(full[0]);
        st.on_step_done(step.id, &verify(&step), 0.01);
    }
    assert_eq!(firsts, vec![1, 2, 3, 1, 2, 3]);
}

#[test]
fn a_step_holds_at_most_max_step_seqs_sequences() {
    let mut st = SchedulerState::new(config(1000, 3, 8, 0));
    for seq in 1..=5 {
        st.open(seq);
        st.submit(seq, &prompt(seq, 4), turn(10)).unwrap();
    }
    let step = st.plan_step().unwrap();
    check_step(&st, &step);
    assert_eq!(seqs_of(&step), vec![1, 2, 3]);
    assert_eq!(step.tokens, 12);
}

#[test]
fn budget_and_cap_hold_over_a_long_mixed_run_and_output_is_the_models() {
    let mut cfg = config(24, 5, 6, 4);
    cfg.pipelined = true;
    // Drafts wrong now and then, so acceptance is partial.
    let mut sim = Sim::new(cfg).with_drafter(|seq, n, i| (seq + n + i as u64).is_multiple_of(5));
    let lens = [1, 3, 7, 12, 20, 2, 9, 30, 5];
    let remaining = [40, 25, 17, 33, 8, 50, 21, 12, 29];
    let mut prompts = BTreeMap::new();
    for (i, (&l, &r)) in lens.iter().zip(&remaining).enumerate() {
        let seq = i as SeqId + 1;
        prompts.insert(seq, (prompt(seq, l), r));
        sim.start(seq, &prompt(seq, l), r);
    }
    let steps = sim.run(1000);
    assert_eq!(steps.iter().map(|s| s.works.len()).max(), Some(5));
    assert_eq!(steps.iter().map(|s| s.tokens).max(), Some(24));
    for (seq, (p, r)) in &prompts {
        assert_eq!(
            sim.out[seq],
            chain(*p.last().unwrap(), *r),
            "sequence {seq} emitted what the model alone emits"
        );
        assert_eq!(sim.finished[seq], 1, "sequence {seq} finished once");
    }
    let stats = &sim.st.stats;
    assert!(
        stats.accepted > 0 && stats.accepted < stats.drafted,
        "{stats:?}"
    );
    assert_eq!(stats.emitted, remaining.iter().sum::<usize>() as u64);
    assert_eq!(stats.steps, steps.len() as u64);
    assert_eq!(stats.max_step_seqs, 5);
    assert_eq!(sim.st.active(), 0);
}

// ---------------------------------------------------------------------------------------------
// (b) fairness
// ---------------------------------------------------------------------------------------------

/// Steps of `n` decoding sequences for `steps` steps; the sequences scheduled in each.
fn decode_rounds(cfg: SchedulerConfig, n: u64, steps: usize) -> Vec<Vec<SeqId>> {
    let mut sim = Sim::new(cfg);
    for seq in 1..=n {
        sim.start(seq, &[seq as u32], 10_000);
    }
    (0..steps)
        .map(|_| seqs_of(&sim.step().expect("work is left")))
        .collect()
}

fn assert_round_robin(rounds: &[Vec<SeqId>], n: u64, per_step: usize) {
    let window = (n as usize).div_ceil(per_step);
    for (i, w) in rounds.windows(window).enumerate() {
        let seen: HashSet<SeqId> = w.iter().flatten().copied().collect();
        for seq in 1..=n {
            assert!(
                seen.contains(&seq),
                "sequence {seq} not scheduled in steps {i}..{} ({:?})",
                i + window,
                w
            );
        }
    }
    // Over a whole number of rotations, every sequence gets the same share.
    let mut count = BTreeMap::new();
    for s in rounds.iter().flatten() {
        *count.entry(*s).or_insert(0usize) += 1;
    }
    let expected = rounds.len() * per_step / n as usize;
    for seq in 1..=n {
        assert_eq!(count[&seq], expected, "share of sequence {seq}");
    }
}

#[test]
fn round_robin_under_the_sequence_cap() {
    // 10 sequences, 3 per step: each is scheduled at least once every ceil(10 / 3) = 4 steps.
    let rounds = decode_rounds(config(1000, 3, 8, 0), 10, 60);
    assert_eq!(
        rounds[..4].to_vec(),
        vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10, 1, 2]]
    );
    assert_round_robin(&rounds, 10, 3);
}

#[test]
fn round_robin_under_the_token_budget() {
    // 7 sequences, 3 tokens per step and no drafts: 3 sequences per step.
    let rounds = decode_rounds(config(3, 100, 8, 0), 7, 70);
    assert!(rounds.iter().all(|r| r.len() == 3));
    assert_round_robin(&rounds, 7, 3);
}

#[test]
fn a_prompt_is_prefilled_while_decoders_fill_the_sequence_cap() {
    let mut sim = Sim::new(config(1000, 4, 8, 0));
    for seq in 1..=4 {
        sim.start(seq, &[seq as u32], 10_000);
    }
    for _ in 0..3 {
        let mut seqs = seqs_of(&sim.step().unwrap());
        seqs.sort();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }
    // A fifth session arrives with a 20-token prompt while four sessions decode.
    let p = prompt(5, 20);
    sim.start(5, &p, 3);
    let mut fed = Vec::new();
    let mut decoded = BTreeMap::new();
    for _ in 0..3 {
        let step = sim.step().unwrap();
        assert_eq!(step.works.len(), 4);
        let w = work(&step, 5);
        fed.extend_from_slice(&w.fed);
        for w in step.works.iter().filter(|w| w.seq != 5) {
            *decoded.entry(w.seq).or_insert(0) += 1;
        }
    }
    assert_eq!(fed, p, "the prompt was prefilled in three steps");
    assert_eq!(sim.out[&5], chain(*p.last().unwrap(), 1));
    // The decoders shared the three remaining seats of those steps.
    assert_eq!(decoded.values().sum::<usize>(), 9);
    assert!(decoded.len() == 4, "{decoded:?}");
}

#[test]
fn no_sequence_starves_with_prompts_arriving_all_the_time() {
    let mut sim = Sim::new(config(40, 4, 8, 0));
    for seq in 1..=6 {
        sim.start(seq, &[seq as u32], 10_000);
    }
    let mut next_seq = 100;
    let mut last_seen: BTreeMap<SeqId, usize> = BTreeMap::new();
    let mut arrived: BTreeMap<SeqId, usize> = BTreeMap::new();
    let mut worst_wait = 0;
    for i in 0..300 {
        // A new 12-token prompt every third step, each asking for 2 tokens.
        if i % 3 == 0 {
            sim.start(next_seq, &prompt(next_seq, 12), 2);
            arrived.insert(next_seq, i);
            next_seq += 1;
        }
        let step = sim.step().unwrap();
        for s in seqs_of(&step) {
            let since = last_seen.get(&s).or(arrived.get(&s)).copied().unwrap_or(0);
            worst_wait = worst_wait.max(i - since);
            last_seen.insert(s, i);
        }
    }
    for seq in 1..=6 {
        assert!(
            last_seen[&seq] >= 295,
            "decoder {seq} last ran at {}",
            last_seen[&seq]
        );
    }
    // Every arrived session finished its 2 tokens: a prompt takes 3 steps (chunks of 8 and 4, then
    // one decode step), so even the last one, arriving at step 297, is done by step 299.
    let done = sim.finished.keys().filter(|&&s| s >= 100).count();
    assert_eq!(done, 100, "prompts answered");
    // At most 8 decoders (6, plus sessions between their prompt and their last token) share the
    // 3 seats a waiting prompt leaves them: round robin serves each within ceil(8 / 3) = 3 steps.
    assert!(worst_wait <= 3, "a sequence waited {worst_wait} steps");
}

// ---------------------------------------------------------------------------------------------
// (c) chunked prefill
// ---------------------------------------------------------------------------------------------

#[test]
fn a_long_prompt_is_fed_in_chunks_while_decoders_progress() {
    let mut sim = Sim::new(config(100, 8, 8, 0));
    sim.start(1, &[5], 100);
    let p = prompt(2, 30);
    sim.start(2, &p, 5);
    let mut chunks = Vec::new();
    for i in 0..4 {
        let step = sim.step().unwrap();
        let w = work(&step, 2);
        chunks.push((w.fed.clone(), w.sample));
        // The decoder is in every one of those steps and emits one token each time.
        assert_eq!(work(&step, 1).fed.len(), 1);
        assert_eq!(sim.out[&1].len(), i + 1);
    }
    let sizes: Vec<usize> = chunks.iter().map(|c| c.0.len()).collect();
    assert_eq!(sizes, vec![8, 8, 8, 6]);
    let samples: Vec<bool> = chunks.iter().map(|c| c.1).collect();
    assert_eq!(samples, vec![false, false, false, true]);
    let fed: Vec<u32> = chunks.into_iter().flat_map(|c| c.0).collect();
    assert_eq!(fed, p);
    // Only the last chunk emitted, and the prompt's sequence then decodes.
    assert_eq!(sim.out[&2], chain(p[29], 1));
    let step = sim.step().unwrap();
    assert_eq!(work(&step, 2).fed, chain(p[29], 1));
    assert_eq!(sim.out[&1], chain(5, 5));
}

#[test]
fn prefill_keeps_a_reserved_share_of_a_full_token_budget() {
    // 20 decoders would take the whole budget of 16; a waiting prompt keeps min(8, 16 / 4) = 4.
    let mut st = SchedulerState::new(config(16, 100, 8, 0));
    for seq in 1..=20 {
        st.open(seq);
        st.submit(seq, &[seq as u32], turn(100)).unwrap();
    }
    st.open(21);
    st.submit(21, &prompt(21, 30), turn(5)).unwrap();
    let step = st.plan_step().unwrap();
    check_step(&st, &step);
    let decoders = step.works.iter().filter(|w| w.seq != 21).count();
    assert_eq!(decoders, 12);
    assert_eq!(work(&step, 21).fed.len(), 4);
    assert!(!work(&step, 21).sample);
    assert_eq!(step.tokens, 16);
}

// ---------------------------------------------------------------------------------------------
// (d) draft length
// ---------------------------------------------------------------------------------------------

/// Draft lengths ordered for `n` fresh decoding sequences.
fn fresh_ks(cfg: SchedulerConfig, n: u64, remaining: usize) -> Vec<usize> {
    let mut st = SchedulerState::new(cfg);
    for seq in 1..=n {
        st.open(seq);
        st.submit(seq, &[seq as u32], turn(remaining)).unwrap();
    }
    st.fresh_orders().iter().map(|o| o.k).collect()
}

#[test]
fn fixed_draft_len_is_capped_by_max_draft_len() {
    assert_eq!(fresh_ks(config(1000, 64, 8, 4), 1, 100), vec![4]);
    assert_eq!(fresh_ks(config(1000, 64, 8, 4), 3, 100), vec![4, 4, 4]);
    // Speculation off: no orders at all.
    assert!(fresh_ks(config(1000, 64, 8, 0), 3, 100).is_empty());
}

#[test]
fn fixed_draft_len_shrinks_with_load_then_stops() {
    // (16 - n) / n tokens of budget per decoding sequence, at most 4.
    let cfg = || config(16, 64, 8, 4);
    assert_eq!(fresh_ks(cfg(), 2, 100), vec![4; 2]);
    assert_eq!(fresh_ks(cfg(), 4, 100), vec![3; 4]);
    assert_eq!(fresh_ks(cfg(), 6, 100), vec![1; 6]);
    assert_eq!(fresh_ks(cfg(), 8, 100), vec![1; 8]);
    // The budget is full of decode tokens: no speculation.
    assert!(fresh_ks(cfg(), 9, 100).is_empty());
    assert!(fresh_ks(cfg(), 16, 100).is_empty());
}

#[test]
fn fixed_draft_len_is_capped_by_the_turns_remaining_tokens() {
    let cfg = || config(1000, 64, 8, 6);
    assert_eq!(fresh_ks(cfg(), 1, 4), vec![3]);
    assert_eq!(fresh_ks(cfg(), 1, 2), vec![1]);
    assert!(fresh_ks(cfg(), 1, 1).is_empty());
    // A ready draft longer than the turn allows is cut at plan time too.
    let mut st = SchedulerState::new(cfg());
    st.open(1);
    st.submit(1, &[9], turn(3)).unwrap();
    let o = st.fresh_orders().pop().unwrap();
    assert_eq!(o.k, 2);
    st.on_drafts(vec![reply(&o, chain(9, 6))]);
    let step = st.plan_step().unwrap();
    check_step(&st, &step);
    assert_eq!(step.works[0].draft, chain(9, 2));
    let (em, _) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(em[0].tokens, chain(9, 3));
    assert!(em[0].finished);
}

/// Drives four sequences with prompts of different lengths (so step sizes vary) and returns the
/// sim after `steps` steps.
fn adaptive_sim(seconds: fn(usize) -> f64, steps: usize) -> Sim {
    let mut cfg = config(1000, 64, 8, 4);
    cfg.adaptive = true;
    let mut sim = Sim::new(cfg).with_drafter(|_, _, _| false);
    sim.seconds = seconds;
    for (seq, len) in [(1, 1), (2, 5), (3, 11), (4, 17)] {
        sim.start(seq, &prompt(seq, len), 500);
    }
    for _ in 0..steps {
        sim.step().unwrap();
    }
    sim
}

#[test]
fn adaptive_speculation_stops_when_steps_are_compute_bound() {
    // Before the cost model has data, its prior (ratio 0.25) makes drafting pay at alpha 0.6.
    let early = adaptive_sim(|n| 1e-4 * n as f64, 0);
    assert_eq!(early.st.seq(1).unwrap().alpha, 0.6);
    assert_eq!(early.st.cost.marginal_ratio(4), 0.25);
    // Step time proportional to tokens: every drafted token costs its full share.
    let mut sim = adaptive_sim(|n| 1e-4 * n as f64, 12);
    assert!(
        sim.st.stats.drafted > 0,
        "it drafted before the model was fitted"
    );
    assert!(
        (sim.st.cost.marginal_ratio(4) - 1.0).abs() < 1e-6,
        "{}",
        sim.st.cost.marginal_ratio(4)
    );
    assert!(sim.last_orders.is_empty(), "{:?}", sim.last_orders);
    assert!(sim.st.fresh_orders().is_empty());
    let drafted = sim.st.stats.drafted;
    for _ in 0..5 {
        let step = sim.step().unwrap();
        assert!(step.works.iter().all(|w| w.draft.is_empty()));
    }
    assert_eq!(sim.st.stats.drafted, drafted);
}

#[test]
fn adaptive_speculation_continues_when_step_time_is_flat() {
    let mut sim = adaptive_sim(|_| 0.01, 12);
    assert!(sim.st.cost.marginal_ratio(4).abs() < 1e-9);
    let before = sim.st.stats.drafted;
    for _ in 0..5 {
        let step = sim.step().unwrap();
        assert_eq!(step.works.len(), 4);
        for w in &step.works {
            assert_eq!(w.draft.len(), 4, "sequence {} drafted {:?}", w.seq, w.draft);
        }
    }
    assert_eq!(sim.st.stats.drafted, before + 5 * 16);
}

// ---------------------------------------------------------------------------------------------
// (e) pipelining
// ---------------------------------------------------------------------------------------------

fn pipelined_config() -> SchedulerConfig {
    let mut cfg = config(100, 8, 8, 3);
    cfg.pipelined = true;
    cfg
}

/// One decoding sequence (prompt `[10]`) whose first block `chain(10, 3)` is in flight, with the
/// pipelined order for the next block. Returns the state, the step and that order.
fn block_in_flight() -> (SchedulerState, PlannedStep, DraftOrder) {
    let mut st = SchedulerState::new(pipelined_config());
    st.open(1);
    st.submit(1, &[10], turn(50)).unwrap();
    let fresh = st.fresh_orders();
    assert_eq!(
        fresh,
        vec![DraftOrder {
            seq: 1,
            base_len: 1,
            assumed: vec![],
            k: 3,
            params: SamplingParams::greedy(),
            pipelined: false,
        }]
    );
    let r = right_draft(&st, &fresh[0]);
    st.on_drafts(vec![r]);
    let step = st.plan_step().unwrap();
    assert_eq!(step.works[0].draft, chain(10, 3));
    let mut pipe = st.pipelined_orders();
    assert_eq!(pipe.len(), 1);
    let order = pipe.pop().unwrap();
    assert_eq!(
        order,
        DraftOrder {
            seq: 1,
            base_len: 1,
            assumed: chain(10, 3),
            k: 4,
            params: SamplingParams::greedy(),
            pipelined: true,
        }
    );
    (st, step, order)
}

#[test]
fn a_pipelined_draft_is_promoted_when_the_block_is_accepted_whole_and_the_bonus_guessed() {
    let (mut st, step, order) = block_in_flight();
    let r = right_draft(&st, &order);
    assert_eq!(r.draft.tokens, chain(10, 7)[3..].to_vec());
    st.on_drafts(vec![r]);
    let (em, orders) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(em[0].tokens, chain(10, 4));
    assert_eq!((em[0].drafted, em[0].accepted), (3, 3));
    assert!(
        orders.is_empty(),
        "no fresh order when the pipelined draft applies"
    );
    assert!(st.fresh_orders().is_empty());
    assert!(!st.awaiting_drafts());
    let step2 = st.plan_step().unwrap();
    // The verifier's bonus token is fed; the rest of the pipelined draft is the new block.
    assert_eq!(step2.works[0].fed, vec![chain(10, 4)[3]]);
    assert_eq!(step2.works[0].draft, chain(10, 7)[4..].to_vec());
}

#[test]
fn a_pipelined_draft_is_dropped_when_the_block_is_accepted_in_part() {
    let (mut st, step, order) = block_in_flight();
    let r = right_draft(&st, &order);
    st.on_drafts(vec![r]);
    // Only the first drafted token is accepted; the verifier corrects the second.
    let out = forced(&step.works[0], 1, 77);
    let (em, orders) = st.on_step_done(step.id, &[out], 0.01);
    assert_eq!(em[0].tokens, vec![chain(10, 1)[0], 77]);
    assert_eq!(st.seq(1).unwrap().history.len(), 3);
    assert_eq!(
        orders,
        vec![DraftOrder {
            seq: 1,
            base_len: 3,
            assumed: vec![],
            k: 3,
            params: SamplingParams::greedy(),
            pipelined: false,
        }]
    );
    assert!(st.awaiting_drafts());
    let step2 = st.plan_step().unwrap();
    assert_eq!(step2.works[0].fed, vec![77]);
    assert!(step2.works[0].draft.is_empty());
}

#[test]
fn a_pipelined_draft_is_dropped_when_its_first_token_is_not_the_verifiers() {
    let (mut st, step, order) = block_in_flight();
    let r = right_draft(&st, &order);
    st.on_drafts(vec![r]);
    // The whole block is accepted but the verifier's own token differs from the guess.
    let out = forced(&step.works[0], 3, 555);
    assert_ne!(555, chain(10, 4)[3]);
    let (em, orders) = st.on_step_done(step.id, &[out], 0.01);
    assert_eq!(em[0].accepted, 3);
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].base_len, orders[0].pipelined), (5, false));
    let step2 = st.plan_step().unwrap();
    assert_eq!(step2.works[0].fed, vec![555]);
    assert!(step2.works[0].draft.is_empty());
}

#[test]
fn a_pipelined_draft_arriving_after_its_step_still_applies_or_is_dropped() {
    // Arrives late and right: waited for, promoted, and no fresh order was made meanwhile.
    let (mut st, step, order) = block_in_flight();
    let (_, orders) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert!(orders.is_empty(), "waits for the pipelined draft");
    assert!(st.fresh_orders().is_empty());
    assert!(
        st.awaiting_drafts(),
        "a pipelined draft that can apply is worth waiting for"
    );
    let r = right_draft(&st, &order);
    st.on_drafts(vec![r]);
    assert!(!st.awaiting_drafts());
    let step2 = st.plan_step().unwrap();
    assert_eq!(step2.works[0].draft, chain(10, 7)[4..].to_vec());

    // After a partial acceptance the pipelined draft cannot apply: a fresh order goes out at
    // once, and the late pipelined reply is dropped.
    let (mut st, step, order) = block_in_flight();
    let (_, orders) = st.on_step_done(step.id, &[forced(&step.works[0], 2, 88)], 0.01);
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].base_len, orders[0].pipelined), (4, false));
    assert!(st.fresh_orders().is_empty(), "ordered once");
    let r = right_draft(&st, &order);
    st.on_drafts(vec![r]);
    assert!(st.awaiting_drafts(), "the fresh draft is still coming");
    let step2 = st.plan_step().unwrap();
    assert_eq!(step2.works[0].fed, vec![88]);
    assert!(step2.works[0].draft.is_empty());
}

#[test]
fn stale_and_mismatched_drafts_are_ignored() {
    let (mut st, step, order) = block_in_flight();
    // A pipelined reply for another assumed block does not match the request.
    let mut other = order.clone();
    other.assumed = vec![1, 2, 3];
    st.on_drafts(vec![reply(&other, chain(3, 4))]);
    let (_, orders) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert!(orders.is_empty(), "the real pipelined reply may still come");
    // A fresh draft made for an older history length is ignored.
    let len = st.seq(1).unwrap().history.len();
    assert_eq!(len, 5);
    let mut stale = order.clone();
    stale.pipelined = false;
    stale.assumed.clear();
    stale.base_len = 1;
    st.on_drafts(vec![reply(&stale, vec![1, 2, 3])]);
    let step2 = st.plan_step().unwrap();
    assert!(
        step2.works[0].draft.is_empty(),
        "{:?}",
        step2.works[0].draft
    );
}

#[test]
fn without_pipelining_fresh_orders_follow_each_step() {
    let mut cfg = pipelined_config();
    cfg.pipelined = false;
    let mut st = SchedulerState::new(cfg);
    st.open(1);
    st.submit(1, &[10], turn(50)).unwrap();
    let o = st.fresh_orders().pop().unwrap();
    st.on_drafts(vec![right_draft(&st, &o)]);
    let step = st.plan_step().unwrap();
    assert!(st.pipelined_orders().is_empty());
    let (_, orders) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].base_len, orders[0].k), (5, 3));
}

// ---------------------------------------------------------------------------------------------
// (f) end of a turn
// ---------------------------------------------------------------------------------------------

#[test]
fn remaining_ends_the_turn() {
    let mut st = SchedulerState::new(config(100, 8, 8, 0));
    st.open(1);
    st.submit(1, &[10], turn(2)).unwrap();
    let step = st.plan_step().unwrap();
    let (em, _) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(em[0].tokens, chain(10, 1));
    assert!(!em[0].finished);
    let step = st.plan_step().unwrap();
    let (em, _) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(em[0].tokens, chain(10, 2)[1..].to_vec());
    assert!(em[0].finished);
    assert_eq!(st.active(), 0);
    assert!(!st.has_work());
    assert!(st.plan_step().is_none());
    // The next turn continues the history: the last emitted token, then the new prompt.
    st.submit(1, &[3, 4], turn(1)).unwrap();
    let step = st.plan_step().unwrap();
    assert_eq!(step.works[0].fed, vec![chain(10, 2)[1], 3, 4]);
}

#[test]
fn a_stop_token_inside_a_draft_ends_the_turn_there() {
    let mut st = SchedulerState::new(config(100, 8, 8, 4));
    st.open(1);
    let stop = chain(10, 2)[1];
    st.submit(
        1,
        &[10],
        Turn {
            remaining: 20,
            params: SamplingParams::greedy(),
            stop: Some(stop),
        },
    )
    .unwrap();
    let o = st.fresh_orders().pop().unwrap();
    st.on_drafts(vec![right_draft(&st, &o)]);
    let step = st.plan_step().unwrap();
    assert_eq!(step.works[0].draft, chain(10, 4));
    assert_eq!(step.works[0].stop, Some(stop));
    let (em, orders) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(
        em,
        vec![Emission {
            seq: 1,
            tokens: chain(10, 2),
            drafted: 4,
            accepted: 1,
            finished: true,
            step_seconds: 0.01,
        }]
    );
    assert!(orders.is_empty());
    let e = st.seq(1).unwrap();
    assert!(e.turn.is_none());
    assert_eq!(e.history, vec![10, chain(10, 1)[0], stop]);
    assert_eq!(e.committed, 2, "the stop token is the one left to feed");
    assert!(st.plan_step().is_none());
}

#[test]
fn a_stop_token_from_the_verifier_ends_the_turn() {
    let mut st = SchedulerState::new(config(100, 8, 8, 0));
    st.open(1);
    st.submit(
        1,
        &[10],
        Turn {
            remaining: 20,
            params: SamplingParams::greedy(),
            stop: Some(chain(10, 1)[0]),
        },
    )
    .unwrap();
    let step = st.plan_step().unwrap();
    let (em, _) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(em[0].tokens, chain(10, 1));
    assert!(em[0].finished);
    assert_eq!(st.active(), 0);
}

#[test]
fn submit_is_refused_during_a_turn_and_for_an_empty_first_prompt() {
    let mut st = SchedulerState::new(config(100, 8, 8, 0));
    assert!(st.submit(1, &[1], turn(3)).is_err(), "unknown sequence");
    st.open(1);
    assert!(st.submit(1, &[], turn(3)).is_err());
    st.submit(1, &[1], turn(3)).unwrap();
    assert!(st.submit(1, &[2], turn(3)).is_err());
    assert_eq!(st.seq(1).unwrap().history, vec![1]);
}

// ---------------------------------------------------------------------------------------------
// (g) verifier restart
// ---------------------------------------------------------------------------------------------

#[test]
fn a_verifier_restart_replays_every_history_and_emits_nothing_twice() {
    let mut cfg = config(100, 8, 4, 3);
    cfg.pipelined = true;
    let mut sim = Sim::new(cfg).with_drafter(|seq, n, i| (seq + n + i as u64).is_multiple_of(4));
    let p1 = prompt(1, 10);
    let p2 = prompt(2, 3);
    let p3 = prompt(3, 9);
    sim.start(1, &p1, 30);
    sim.start(2, &p2, 30);
    for _ in 0..6 {
        sim.step().unwrap();
    }
    // A sequence with no turn is not replayed until its next turn.
    sim.st.open(4);
    sim.st.submit(4, &[7], turn(1)).unwrap();
    sim.step().unwrap();
    assert_eq!(sim.finished[&4], 1);
    sim.start(3, &p3, 30);
    // A step is in flight (with drafts, and a pipelined order) when the verifier is lost.
    let lost = sim.st.plan_step().unwrap();
    assert!(lost.works.iter().any(|w| !w.draft.is_empty()));
    let pipe = sim.st.pipelined_orders();
    sim.answer(pipe);
    let before: BTreeMap<SeqId, Vec<u32>> = [1, 2, 3]
        .iter()
        .map(|&s| (s, sim.st.seq(s).unwrap().history.clone()))
        .collect();

    sim.st.verifier_restarted();
    assert!(!sim.st.busy());
    assert_eq!(sim.st.in_flight_id(), None);
    assert_eq!(sim.st.stats.verifier_restarts, 1);
    for s in 1..=4 {
        assert_eq!(sim.st.seq(s).unwrap().committed, 0);
    }

    // Replay: each sequence with a turn is fed its whole history, in chunks of at most 4, and only
    // the last chunk samples.
    let mut fed: BTreeMap<SeqId, Vec<(usize, bool)>> = BTreeMap::new();
    let mut replayed: BTreeMap<SeqId, Vec<u32>> = BTreeMap::new();
    while fed.len() < 3 || fed.values().any(|c| !c.last().unwrap().1) {
        let step = sim.st.plan_step().unwrap();
        check_step(&sim.st, &step);
        assert!(step.works.iter().all(|w| w.seq != 4), "no turn, no replay");
        // The lost step's outcome, arriving late, is ignored.
        let (em, orders) = sim.st.on_step_done(lost.id, &verify(&lost), 0.01);
        assert!(em.is_empty() && orders.is_empty());
        assert_eq!(sim.st.in_flight_id(), Some(step.id));
        let mut replaying: BTreeMap<SeqId, bool> = BTreeMap::new();
        for w in &step.works {
            if fed.get(&w.seq).is_some_and(|c| c.last().unwrap().1) {
                continue; // replayed already, decoding again
            }
            fed.entry(w.seq).or_default().push((w.fed.len(), w.sample));
            replayed.entry(w.seq).or_default().extend_from_slice(&w.fed);
            replaying.insert(w.seq, w.sample);
        }
        let outcomes = verify(&step);
        let (em, orders) = sim.st.on_step_done(step.id, &outcomes, 0.01);
        // A replay chunk emits nothing, except the last one, which emits one new token after its
        // accepted drafts (a one-token last chunk is a decode step and may carry a draft).
        for e in em.iter().filter(|e| replaying.contains_key(&e.seq)) {
            let n = if replaying[&e.seq] { e.accepted + 1 } else { 0 };
            assert_eq!(e.tokens.len(), n, "sequence {}: {:?}", e.seq, e.tokens);
        }
        sim.record(&em);
        sim.answer(orders);
        let fresh = sim.st.fresh_orders();
        sim.answer(fresh);
    }
    assert_eq!(replayed, before);
    for (s, chunks) in &fed {
        assert!(chunks.iter().all(|c| c.0 <= 4), "{s}: {chunks:?}");
        let samples: Vec<bool> = chunks.iter().map(|c| c.1).collect();
        let mut expected = vec![false; chunks.len() - 1];
        expected.push(true);
        assert_eq!(samples, expected, "sequence {s}");
    }
    assert_eq!(fed[&1].len(), before[&1].len().div_ceil(4), "{:?}", fed[&1]);
    sim.run(500);
    for (s, p) in [(1, &p1), (2, &p2), (3, &p3)] {
        assert_eq!(sim.out[&s], chain(*p.last().unwrap(), 30), "sequence {s}");
        assert_eq!(sim.finished[&s], 1);
    }
    // The sequence without a turn replays its history with its next prompt.
    sim.st.submit(4, &[8, 9], turn(1)).unwrap();
    let step = sim.st.plan_step().unwrap();
    assert_eq!(work(&step, 4).fed, vec![7, chain(7, 1)[0], 8, 9]);
}

#[test]
fn a_replay_in_one_token_chunks_carries_no_draft_before_its_last_chunk() {
    let mut sim = Sim::new(config(100, 8, 1, 3)).with_drafter(|_, _, _| false);
    sim.start(1, &[10], 40);
    for _ in 0..2 {
        sim.step().unwrap();
    }
    let len = sim.st.seq(1).unwrap().history.len();
    assert_eq!(len, 9, "two blocks of 3 accepted, plus bonus tokens");
    // A draft for the current history is ready when the verifier is lost.
    let step = sim.st.plan_step().unwrap();
    assert_eq!(step.works[0].draft.len(), 3);
    sim.st.verifier_restarted();
    let o = sim.st.fresh_orders();
    assert!(o.is_empty(), "a replaying sequence is not decoding");
    let mut chunks = 0;
    while sim.st.seq(1).unwrap().committed < len {
        let step = sim.st.plan_step().unwrap();
        check_step(&sim.st, &step);
        assert_eq!(step.works[0].fed.len(), 1);
        chunks += 1;
        let (em, orders) = sim.st.on_step_done(step.id, &verify(&step), 0.01);
        sim.record(&em);
        sim.answer(orders);
    }
    assert_eq!(chunks, len);
    sim.run(100);
    assert_eq!(sim.out[&1], chain(10, 40));
}

#[test]
fn a_ready_draft_kept_across_a_restart_is_not_attached_to_a_replay_chunk() {
    // The drafter answered for the current history just before the verifier was lost.
    let mut st = SchedulerState::new(config(100, 8, 1, 3));
    st.open(1);
    st.submit(1, &[10, 11, 12], turn(10)).unwrap();
    let mut orders = Vec::new();
    for _ in 0..3 {
        let step = st.plan_step().unwrap();
        orders = st.on_step_done(step.id, &verify(&step), 0.01).1;
    }
    let o = orders.pop().unwrap();
    assert_eq!(o.base_len, 4);
    st.on_drafts(vec![right_draft(&st, &o)]);
    st.verifier_restarted();
    let step = st.plan_step().unwrap();
    check_step(&st, &step);
    assert_eq!(step.works[0].fed, vec![10]);
    assert!(!step.works[0].sample);
    assert!(step.works[0].draft.is_empty());
}

// ---------------------------------------------------------------------------------------------
// (h) close during a step, proposer restart
// ---------------------------------------------------------------------------------------------

#[test]
fn a_sequence_closed_during_its_step_is_ignored_when_the_step_returns() {
    let mut cfg = config(100, 8, 8, 2);
    cfg.pipelined = true;
    let mut st = SchedulerState::new(cfg);
    for seq in 1..=2 {
        st.open(seq);
        st.submit(seq, &[seq as u32 * 10], turn(10)).unwrap();
    }
    let step = st.plan_step().unwrap();
    let pipe = st.pipelined_orders();
    assert_eq!(pipe.len(), 2);
    assert!(st.close(1));
    assert!(!st.close(1));
    assert_eq!(st.seq_ids(), vec![2]);
    // A step id that is not in flight is ignored, and the step stays in flight.
    let (em, orders) = st.on_step_done(step.id + 1, &verify(&step), 0.01);
    assert!(em.is_empty() && orders.is_empty());
    assert!(st.busy());
    // Drafts for the closed sequence are ignored.
    st.on_drafts(vec![reply(&pipe[0], vec![1, 2, 3])]);
    let (em, _) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert_eq!(em.len(), 1);
    assert_eq!(em[0].seq, 2);
    assert_eq!(em[0].tokens, chain(20, 1));
    assert!(st.seq(1).is_none());
    assert!(!st.busy());
    assert_eq!(st.stats.emitted, 1);
    let step = st.plan_step().unwrap();
    assert_eq!(seqs_of(&step), vec![2]);
}

#[test]
fn a_proposer_restart_forgets_every_draft_and_orders_afresh() {
    let mut cfg = config(100, 8, 8, 3);
    cfg.pipelined = true;
    let mut st = SchedulerState::new(cfg);
    for seq in 1..=2 {
        st.open(seq);
        st.submit(seq, &[seq as u32 * 10], turn(20)).unwrap();
    }
    // Sequence 1 gets a fresh draft; both get pipelined orders that are never answered.
    let orders = st.fresh_orders();
    assert_eq!(orders.len(), 2);
    st.on_drafts(vec![right_draft(&st, &orders[0])]);
    let step = st.plan_step().unwrap();
    assert_eq!(work(&step, 1).draft.len(), 3);
    assert_eq!(st.pipelined_orders().len(), 2);
    let (_, orders) = st.on_step_done(step.id, &verify(&step), 0.01);
    assert!(orders.is_empty(), "both wait for their pipelined drafts");
    assert!(st.fresh_orders().is_empty());
    st.proposer_restarted();
    assert_eq!(st.stats.proposer_restarts, 1);
    let orders = st.fresh_orders();
    assert_eq!(orders.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(orders.iter().all(|o| !o.pipelined && o.k == 3));
    // Until they are answered, the sequences decode plainly.
    let step = st.plan_step().unwrap();
    assert!(step.works.iter().all(|w| w.draft.is_empty()));
    let (em, _) = st.on_step_done(step.id, &verify(&step), 0.01);
    let e1 = em.iter().find(|e| e.seq == 1).unwrap();
    assert_eq!(e1.tokens, vec![chain(10, 5)[4]]);
    assert_eq!((e1.drafted, e1.accepted), (0, 0));
}

/// The proposer never answers: a sequence gets at most `MAX_ORDERS_IN_FLIGHT` orders, and only after
/// `ORDER_EXPIRY_STEPS` steps are the lost ones written off and drafting tried again.
#[test]
fn unanswered_draft_orders_are_bounded_per_sequence() {
    let mut st = SchedulerState::new(SchedulerConfig {
        pipelined: true,
        ..config(64, 8, 16, 3)
    });
    st.open(1);
    st.submit(1, &prompt(1, 4), turn(200)).unwrap();
    let mut sent = Vec::new();
    for _ in 0..20 {
        let step = st.plan_step().expect("the sequence always has work");
        let mut orders = st.pipelined_orders();
        let (_, fresh) = st.on_step_done(step.id, &verify(&step), 0.01);
        orders.extend(fresh);
        orders.extend(st.fresh_orders());
        sent.push(orders.len());
    }
    let total: usize = sent.iter().sum();
    // Two orders at first, then none until the credit expires after 8 steps: 3 rounds of 2 in 20 steps.
    assert!((2..=6).contains(&total), "orders per step: {sent:?}");
    assert!(
        sent[2..8].iter().all(|&n| n == 0),
        "orders per step: {sent:?}"
    );
}

#[test]
fn the_adapted_draft_wait_stops_waiting_for_drafts_that_come_too_late() {
    let mut cfg = config(1024, 256, 128, 4);
    cfg.draft_wait_s = None;
    let mut st = SchedulerState::new(cfg);
    st.open(1);
    st.submit(1, &[10], turn(50)).unwrap();
    let step = st.plan_step().unwrap();
    st.on_step_done(step.id, &verify(&step), 0.004);
    assert!(st.awaiting_drafts());
    // At the prior acceptance of 0.6, four drafts add 1.31 tokens: worth 1.31 steps of waiting.
    let worth = 0.004 * (0.6 + 0.36 + 0.216 + 0.1296);
    assert!(
        (st.draft_wait() - worth).abs() < 1e-12,
        "{}",
        st.draft_wait()
    );
    // Drafts that come back within that are waited for.
    st.observe_draft_latency(0.008);
    assert!((st.draft_wait() - worth).abs() < 1e-12);
    // A distant proposer: its drafts come back five steps later, so a step never waits for them.
    for _ in 0..20 {
        st.observe_draft_latency(0.020);
    }
    assert_eq!(st.draft_wait(), 0.0);
    // It comes close again: waiting resumes.
    for _ in 0..20 {
        st.observe_draft_latency(0.001);
    }
    assert!((st.draft_wait() - worth).abs() < 1e-12);
    // A configured wait is kept whatever the latency.
    st.config.draft_wait_s = Some(2.5);
    st.observe_draft_latency(10.0);
    assert_eq!(st.draft_wait(), 2.5);
}

#[test]
fn drafts_that_come_too_late_are_only_ordered_now_and_then() {
    let mut cfg = config(1024, 256, 128, 4);
    cfg.draft_wait_s = None;
    let mut st = SchedulerState::new(cfg);
    st.open(1);
    st.submit(1, &[10], turn(1000)).unwrap();
    let mut orders = 0;
    let run = |st: &mut SchedulerState, steps: usize| {
        let mut n = 0;
        for _ in 0..steps {
            let step = st.plan_step().unwrap();
            let (_, o) = st.on_step_done(step.id, &verify(&step), 0.004);
            n += o.len() + st.fresh_orders().len();
            // The orders are never answered; their credit expires.
        }
        n
    };
    orders += run(&mut st, 16);
    assert!(
        orders >= 2,
        "drafts are ordered while their latency is unknown: {orders}"
    );
    // Replies now come 50 ms after the order: over ten steps too late.
    for _ in 0..20 {
        st.observe_draft_latency(0.050);
    }
    let late = run(&mut st, 32);
    assert!(
        (1..=4).contains(&late),
        "one probe every 8 steps, not {late}"
    );
}
