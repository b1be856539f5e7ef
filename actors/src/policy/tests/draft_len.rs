//! Draft length: fixed (capped by the maximum, the load and the turn's remaining tokens) and adaptive
//! (from the step-time model).

use std::time::Duration;

use super::*;

// ---------------------------------------------------------------------------------------------
// Draft length
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
    let step = st.dispatch().unwrap().step;
    check_step(&st, &step);
    assert_eq!(step.works[0].draft, chain(9, 2));
    let em = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .emissions;
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
