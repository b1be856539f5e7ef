//! Draft waits: the adapted wait, and drafts that come back too late to wait for or order.

use std::time::Duration;

use super::*;

#[test]
fn the_adapted_draft_wait_stops_waiting_for_drafts_that_come_too_late() {
    let mut cfg = config(1024, 256, 128, 4);
    cfg.draft_wait = None;
    let mut st = SchedulerState::new(cfg);
    st.open(1);
    st.submit(1, &[10], turn(50)).unwrap();
    let step = st.dispatch().unwrap().step;
    st.complete(step.id, &verify(&step), Duration::from_millis(4));
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
    st.config.draft_wait = Some(std::time::Duration::from_secs_f64(2.5));
    st.observe_draft_latency(10.0);
    assert_eq!(st.draft_wait(), 2.5);
}

#[test]
fn drafts_that_come_too_late_are_only_ordered_now_and_then() {
    let mut cfg = config(1024, 256, 128, 4);
    cfg.draft_wait = None;
    let mut st = SchedulerState::new(cfg);
    st.open(1);
    st.submit(1, &[10], turn(1000)).unwrap();
    let mut orders = 0;
    let run = |st: &mut SchedulerState, steps: usize| {
        let mut n = 0;
        for _ in 0..steps {
            let Dispatch { step, orders } = st.dispatch().unwrap();
            n += orders.len()
                + st.complete(step.id, &verify(&step), Duration::from_millis(4))
                    .orders
                    .len();
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
