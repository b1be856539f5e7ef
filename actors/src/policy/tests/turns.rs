//! The end of a turn: its token budget, its stop tokens (one or a set, and stop tokens before any
//! content), and turns refused.

use std::time::Duration;

use super::*;

// ---------------------------------------------------------------------------------------------
// End of a turn
// ---------------------------------------------------------------------------------------------

#[test]
fn remaining_ends_the_turn() {
    let mut st = SchedulerState::new(config(100, 8, 8, 0));
    st.open(1);
    st.submit(1, &[10], turn(2)).unwrap();
    let step = st.dispatch().unwrap().step;
    let em = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .emissions;
    assert_eq!(em[0].tokens, chain(10, 1));
    assert!(!em[0].finished);
    let step = st.dispatch().unwrap().step;
    let em = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .emissions;
    assert_eq!(em[0].tokens, chain(10, 2)[1..].to_vec());
    assert!(em[0].finished);
    assert_eq!(st.active(), 0);
    assert!(!st.has_work());
    assert!(st.dispatch().is_none());
    // The next turn continues the history: the last emitted token, then the new prompt.
    st.submit(1, &[3, 4], turn(1)).unwrap();
    let step = st.dispatch().unwrap().step;
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
            stop: vec![stop],
            stop_after_content: false,
        },
    )
    .unwrap();
    let o = st.fresh_orders().pop().unwrap();
    st.on_drafts(vec![right_draft(&st, &o)]);
    let step = st.dispatch().unwrap().step;
    assert_eq!(step.works[0].draft, chain(10, 4));
    assert_eq!(step.works[0].stop, vec![stop]);
    let Completion {
        emissions: em,
        orders,
    } = st.complete(step.id, &verify(&step), Duration::from_millis(10));
    assert_eq!(
        em,
        vec![Emission {
            seq: 1,
            tokens: chain(10, 2),
            drafted: 4,
            accepted: 1,
            finished: true,
            step_time: Duration::from_millis(10),
        }]
    );
    assert!(orders.is_empty());
    let e = st.seq(1).unwrap();
    assert!(e.turn.is_none());
    assert_eq!(e.history, vec![10, chain(10, 1)[0], stop]);
    assert_eq!(e.committed, 2, "the stop token is the one left to feed");
    assert!(st.dispatch().is_none());
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
            stop: vec![chain(10, 1)[0]],
            stop_after_content: false,
        },
    )
    .unwrap();
    let step = st.dispatch().unwrap().step;
    let em = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .emissions;
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

/// A greedy turn of `remaining` tokens that `stop` ends.
fn stop_turn(remaining: usize, stop: Vec<u32>, stop_after_content: bool) -> Turn {
    Turn {
        remaining,
        params: SamplingParams::greedy(),
        stop,
        stop_after_content,
    }
}

#[test]
fn the_second_stop_token_of_a_set_ends_the_turn_inside_a_draft() {
    let c = chain(10, 8);
    assert!(!c[..7].contains(&c[7]));
    // The model never emits token 1 (its tokens are 3 and up): the set's second token ends the turn.
    let mut sim = Sim::new(config(100, 8, 8, 4)).with_drafter(|_, _, _| false);
    sim.start_turn(1, &[10], stop_turn(40, vec![1, c[7]], false));
    let steps = sim.run(20);
    assert_eq!(sim.out[&1], c);
    assert_eq!(sim.finished[&1], 1);
    // The step that ended it verified a draft that went on past the stop token, and told the
    // verifier to cut the block there.
    let last = &steps.last().unwrap().works[0];
    let at = last.draft.iter().position(|&t| t == c[7]).unwrap();
    assert!(at + 1 < last.draft.len(), "{:?}", last.draft);
    assert_eq!(last.stop, vec![1, c[7]]);
    let e = sim.st.seq(1).unwrap();
    assert!(e.turn.is_none());
    assert_eq!(e.history[1..], c[..]);
    assert_eq!(e.committed, 8, "the stop token is the one left to feed");
}

#[test]
fn after_content_a_leading_stop_token_is_emitted_and_a_later_one_ends_the_turn() {
    let c = chain(10, 6);
    // Without `stop_after_content` the first token ends the turn.
    let mut sim = Sim::new(config(100, 8, 8, 0));
    sim.start_turn(1, &[10], stop_turn(20, vec![c[0], c[2]], false));
    sim.run(20);
    assert_eq!(sim.out[&1], c[..1]);
    // With it, one token a step: the leading stop token is an ordinary one, the next one ends it.
    let mut sim = Sim::new(config(100, 8, 8, 0));
    sim.start_turn(1, &[10], stop_turn(20, vec![c[0], c[2]], true));
    assert_eq!(sim.run(20).len(), 3);
    assert_eq!(sim.out[&1], c[..3]);
    assert_eq!(sim.finished[&1], 1);
    // Content is counted per turn: the next turn may open with a stop token too.
    sim.st
        .submit(1, &[], stop_turn(20, vec![c[3], c[5]], true))
        .unwrap();
    sim.run(20);
    assert_eq!(sim.out[&1], c[..6]);
    assert_eq!(sim.finished[&1], 2);
}

#[test]
fn after_content_a_stop_token_inside_a_draft_ends_the_turn_only_after_content() {
    let c = chain(10, 4);
    let mut sim = Sim::new(config(100, 8, 8, 4)).with_drafter(|_, _, _| false);
    sim.start_turn(1, &[10], stop_turn(20, vec![c[0], c[2]], true));
    let steps = sim.run(20);
    // One step: the draft `c[..4]` opens with a stop token, which is emitted; the second one, after
    // content, ends the turn inside the draft.
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].works[0].draft, c);
    assert_eq!(steps[0].works[0].stop, vec![c[2]]);
    assert_eq!(sim.out[&1], c[..3]);
    assert_eq!(sim.finished[&1], 1);
    assert_eq!(sim.st.seq(1).unwrap().committed, 3);
}

#[test]
fn after_content_stop_tokens_alone_never_end_the_turn() {
    // 332 is the model's fixed point: a reply of nothing but stop tokens runs to its budget, its
    // drafts verified whole.
    assert_eq!(chain(332, 3), vec![332; 3]);
    let mut sim = Sim::new(config(100, 8, 8, 4)).with_drafter(|_, _, _| false);
    sim.start_turn(1, &[332], stop_turn(12, vec![332], true));
    let steps = sim.run(20);
    assert_eq!(sim.out[&1], vec![332; 12]);
    assert_eq!(sim.finished[&1], 1);
    assert!(steps.iter().all(|s| s.works[0].stop.is_empty()));
    assert!(sim.st.stats.accepted > 0);
}

#[test]
fn a_draft_whose_ending_stop_token_also_opens_it_is_cut_before_the_ending_one() {
    // The verifier cuts a block at the first occurrence of its stop token, which here is an
    // ordinary one (no content yet): the draft is cut before the one that would end the turn, and
    // the verifier's own token decides there.
    let (s, a) = (5, 6);
    let mut st = SchedulerState::new(config(100, 8, 8, 4));
    st.open(1);
    st.submit(1, &[10], stop_turn(20, vec![s], true)).unwrap();
    let o = st.fresh_orders().pop().unwrap();
    st.on_drafts(vec![reply(&o, vec![s, a, s, a])]);
    let step = st.dispatch().unwrap().step;
    check_step(&st, &step);
    assert_eq!(step.works[0].draft, vec![s, a]);
    assert_eq!(step.works[0].stop, Vec::<u32>::new());
    assert_eq!(step.tokens, 3);
}

#[test]
fn a_cancelled_turn_leaves_at_once_or_with_the_step_that_holds_it() {
    let mut st = SchedulerState::new(config(64, 8, 16, 0));
    for seq in [1, 2] {
        st.open(seq);
        st.submit(seq, &prompt(seq, 3), turn(100)).unwrap();
    }
    let step = st.dispatch().expect("work").step;
    // Sequence 1's work is in the step in flight: it ends with that step, marked finished.
    assert_eq!(st.cancel(1), Cancel::AfterStep);
    let done = st.complete(step.id, &verify(&step), Duration::from_millis(1));
    let e1 = done.emissions.iter().find(|e| e.seq == 1).unwrap();
    assert!(e1.finished, "the cancelled turn ends with its step");
    assert_eq!(e1.tokens.len(), 1, "the step's token is kept");
    assert!(st.seq(1).unwrap().turn.is_none());
    // Sequence 2, between steps, ends at once; its history (prompt and token) stays.
    assert_eq!(st.cancel(2), Cancel::Now);
    assert!(st.seq(2).unwrap().turn.is_none());
    assert_eq!(st.seq(2).unwrap().history.len(), 4);
    assert_eq!(st.active(), 0);
    assert!(!st.has_work());
    assert!(st.dispatch().is_none(), "nothing is left to step");
    // A cancellation that comes after the turn ended finds nothing to do.
    assert_eq!(st.cancel(2), Cancel::NoTurn);
    assert_eq!(st.cancel(9), Cancel::NoTurn);
    // The session continues from what it kept.
    st.submit(2, &[5], turn(2)).unwrap();
    assert_eq!(
        st.dispatch().expect("work").step.works[0].fed,
        vec![e_last(&st, 2), 5]
    );
}

/// The last token of a sequence's history before its newest prompt.
fn e_last(st: &SchedulerState, seq: SeqId) -> u32 {
    let h = &st.seq(seq).unwrap().history;
    h[h.len() - 2]
}
