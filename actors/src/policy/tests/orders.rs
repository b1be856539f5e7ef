//! Draft orders: pipelined orders and their promotion, stale replies, fresh orders, and the credit
//! that bounds the orders unanswered per sequence.

use std::time::Duration;

use super::*;

// ---------------------------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------------------------

/// Pipelined, fixed drafts of 3.
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
    let Dispatch {
        step,
        orders: mut pipe,
    } = st.dispatch().unwrap();
    assert_eq!(step.works[0].draft, chain(10, 3));
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
    let Completion {
        emissions: em,
        orders,
    } = st.complete(step.id, &verify(&step), Duration::from_millis(10));
    assert_eq!(em[0].tokens, chain(10, 4));
    assert_eq!((em[0].drafted, em[0].accepted), (3, 3));
    assert!(
        orders.is_empty(),
        "no fresh order when the pipelined draft applies"
    );
    assert!(st.fresh_orders().is_empty());
    assert!(!st.awaiting_drafts());
    let step2 = st.dispatch().unwrap().step;
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
    let Completion {
        emissions: em,
        orders,
    } = st.complete(step.id, &[out], Duration::from_millis(10));
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
    let step2 = st.dispatch().unwrap().step;
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
    let Completion {
        emissions: em,
        orders,
    } = st.complete(step.id, &[out], Duration::from_millis(10));
    assert_eq!(em[0].accepted, 3);
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].base_len, orders[0].pipelined), (5, false));
    let step2 = st.dispatch().unwrap().step;
    assert_eq!(step2.works[0].fed, vec![555]);
    assert!(step2.works[0].draft.is_empty());
}

#[test]
fn a_pipelined_draft_arriving_after_its_step_still_applies_or_is_dropped() {
    // Arrives late and right: waited for, promoted, and no fresh order was made meanwhile.
    let (mut st, step, order) = block_in_flight();
    let orders = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .orders;
    assert!(orders.is_empty(), "waits for the pipelined draft");
    assert!(st.fresh_orders().is_empty());
    assert!(
        st.awaiting_drafts(),
        "a pipelined draft that can apply is worth waiting for"
    );
    let r = right_draft(&st, &order);
    st.on_drafts(vec![r]);
    assert!(!st.awaiting_drafts());
    let step2 = st.dispatch().unwrap().step;
    assert_eq!(step2.works[0].draft, chain(10, 7)[4..].to_vec());

    // After a partial acceptance the pipelined draft cannot apply: a fresh order goes out at
    // once, and the late pipelined reply is dropped.
    let (mut st, step, order) = block_in_flight();
    let orders = st
        .complete(
            step.id,
            &[forced(&step.works[0], 2, 88)],
            Duration::from_millis(10),
        )
        .orders;
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].base_len, orders[0].pipelined), (4, false));
    assert!(st.fresh_orders().is_empty(), "ordered once");
    let r = right_draft(&st, &order);
    st.on_drafts(vec![r]);
    assert!(st.awaiting_drafts(), "the fresh draft is still coming");
    let step2 = st.dispatch().unwrap().step;
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
    let orders = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .orders;
    assert!(orders.is_empty(), "the real pipelined reply may still come");
    // A fresh draft made for an older history length is ignored.
    let len = st.seq(1).unwrap().history.len();
    assert_eq!(len, 5);
    let mut stale = order.clone();
    stale.pipelined = false;
    stale.assumed.clear();
    stale.base_len = 1;
    st.on_drafts(vec![reply(&stale, vec![1, 2, 3])]);
    let step2 = st.dispatch().unwrap().step;
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
    let Dispatch { step, orders } = st.dispatch().unwrap();
    assert!(orders.is_empty());
    let orders = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .orders;
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].base_len, orders[0].k), (5, 3));
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
        let Dispatch { step, mut orders } = st.dispatch().expect("the sequence always has work");
        orders.extend(
            st.complete(step.id, &verify(&step), Duration::from_millis(10))
                .orders,
        );
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
