//! Keeping sessions in phase: the turn-around and gather waits of [`Phase::hold`], on fabricated
//! clocks (the running step time is the 10 ms default: a 5 ms cap, a 0.2 ms gap).

use std::time::{Duration, Instant};

use super::*;
use crate::phase::Phase;

const GAP: Duration = Duration::from_micros(200);

/// The quiet gap of the turn-around wait under way: the gap, and the time routing the follow-ups
/// still awaited takes.
fn wait_gap(st: &SchedulerState) -> Duration {
    let gap = Duration::from_secs_f64(st.turnaround_gap());
    assert!(gap > GAP, "one awaited follow-up adds its routing time");
    gap
}

/// Sequence 1 ends its turn in the first step while sequence 2 goes on; returns the state and
/// the moment the step came back.
fn one_turn_ended(phase: &mut Phase) -> (SchedulerState, Instant) {
    let mut st = SchedulerState::new(config(64, 8, 16, 0));
    for seq in [1, 2] {
        st.open(seq);
    }
    st.submit(1, &[10], turn(1)).unwrap();
    st.submit(2, &[20], turn(50)).unwrap();
    let step = st.dispatch().expect("work").step;
    st.complete(step.id, &verify(&step), Duration::from_millis(10));
    let ended = Instant::now();
    phase.step_ended(ended);
    (st, ended)
}

#[test]
fn the_next_step_waits_for_a_session_whose_turn_just_ended_while_its_turns_keep_coming() {
    let mut phase = Phase::default();
    let (mut st, ended) = one_turn_ended(&mut phase);
    // Sequence 2 could go now; the step waits for sequence 1's next turn, a gap at most.
    let due = phase.hold(&mut st, ended).expect("waits");
    assert_eq!(due, ended + wait_gap(&st));
    // Its next turn comes: nothing more is awaited, and the step goes with both.
    let at = ended + GAP / 2;
    let since = phase.arrival(at);
    st.observe_turnaround(1, since);
    st.submit(1, &[11], turn(4)).unwrap();
    assert_eq!(phase.hold(&mut st, at), None);
    let step = st.dispatch().expect("work").step;
    assert_eq!(step.works.len(), 2, "both sessions share the step");
}

#[test]
fn a_turnaround_wait_that_caught_its_follow_ups_is_not_followed_by_a_gather() {
    let mut phase = Phase::default();
    let (mut st, ended) = one_turn_ended(&mut phase);
    assert!(phase.hold(&mut st, ended).is_some());
    // The follow-up comes within the gap, and the scheduler looks again a little later, when the
    // verifier has been idle for longer than a gap: the step goes at once, without gathering.
    let since = phase.arrival(ended + GAP / 2);
    st.observe_turnaround(1, since);
    st.submit(1, &[11], turn(4)).unwrap();
    assert_eq!(phase.hold(&mut st, ended + GAP * 3 / 2), None);
    assert_eq!(st.dispatch().expect("work").step.works.len(), 2);
}

#[test]
fn a_turnaround_wait_for_many_sessions_outlasts_a_pause_while_they_are_routed() {
    // A hundred sessions end their turns in one step while another goes on.
    let mut st = SchedulerState::new(config(1024, 128, 16, 0));
    let mut phase = Phase::default();
    for seq in 1..=101 {
        st.open(seq);
        st.submit(seq, &[seq as u32], turn(if seq == 101 { 50 } else { 1 }))
            .unwrap();
    }
    let step = st.dispatch().expect("work").step;
    st.complete(step.id, &verify(&step), Duration::from_millis(10));
    let ended = Instant::now();
    phase.step_ended(ended);
    assert!(phase.hold(&mut st, ended).is_some());
    // The first follow-up comes, then none for two gaps: the rest are still being routed back
    // (a hundred of them take longer than a gap), so the step still waits for them.
    let first = ended + GAP / 2;
    st.observe_turnaround(1, phase.arrival(first).min(1.0));
    st.submit(1, &[1], turn(4)).unwrap();
    assert!(phase.hold(&mut st, first + GAP * 2).is_some());
    // They come: the step goes at once, with all of them.
    let at = first + GAP * 3;
    for seq in 2..=100 {
        st.observe_turnaround(seq, phase.arrival(at));
        st.submit(seq, &[seq as u32], turn(4)).unwrap();
    }
    assert_eq!(phase.hold(&mut st, at), None);
    assert_eq!(st.dispatch().expect("work").step.works.len(), 101);
}

#[test]
fn a_wait_ends_after_a_quiet_gap_and_waits_stop_once_they_catch_nothing() {
    let mut phase = Phase::default();
    let (mut st, ended) = one_turn_ended(&mut phase);
    assert!(phase.hold(&mut st, ended).is_some());
    // Nothing came within the gap: the step goes without it.
    let gap = wait_gap(&st);
    assert_eq!(phase.hold(&mut st, ended + gap), None);
    assert!(!st.awaits_turnaround());
    // Session after session that never comes back: the waits are skipped from then on.
    let mut skipped = false;
    for round in 0..8u32 {
        st.submit(1, &[30 + round], turn(1)).unwrap();
        phase = Phase::default();
        let step = st.dispatch().expect("work").step;
        st.complete(step.id, &verify(&step), Duration::from_millis(10));
        let now = Instant::now();
        phase.step_ended(now);
        if phase.hold(&mut st, now).is_none() {
            skipped = true;
            break;
        }
        let gap = wait_gap(&st);
        assert_eq!(phase.hold(&mut st, now + gap), None);
    }
    assert!(
        skipped,
        "turn-around waits go on although no turn ever came back"
    );
}

#[test]
fn a_burst_at_an_idle_verifier_is_gathered_while_it_keeps_coming() {
    let mut st = SchedulerState::new(config(64, 8, 16, 0));
    let mut phase = Phase::default();
    for seq in [1, 2, 3] {
        st.open(seq);
    }
    let t0 = Instant::now();
    phase.arrival(t0);
    st.submit(1, &[10], turn(4)).unwrap();
    assert_eq!(phase.hold(&mut st, t0), Some(t0 + GAP));
    // Each turn of the burst pushes the end out by a gap, up to the cap.
    let t1 = t0 + GAP / 2;
    phase.arrival(t1);
    st.submit(2, &[20], turn(4)).unwrap();
    assert_eq!(phase.hold(&mut st, t1), Some(t1 + GAP));
    let t2 = t1 + GAP / 2;
    phase.arrival(t2);
    st.submit(3, &[30], turn(4)).unwrap();
    // Quiet for a gap: the step goes, with the whole burst.
    assert_eq!(phase.hold(&mut st, t2 + GAP), None);
    assert_eq!(st.dispatch().expect("work").step.works.len(), 3);
}

#[test]
fn a_fixed_zero_wait_never_holds_a_step() {
    let mut phase = Phase::default();
    let (mut st, ended) = one_turn_ended(&mut phase);
    st.config.turnaround_wait = Some(Duration::ZERO);
    assert_eq!(phase.hold(&mut st, ended), None);
}

#[test]
fn skipped_waits_resume_once_follow_ups_come_fast_again() {
    let mut phase = Phase::default();
    let (mut st, ended) = one_turn_ended(&mut phase);
    // Drive the hit rate down: follow-ups that never come.
    for _ in 0..8 {
        st.turnaround_over();
        st.submit(1, &[40], turn(1)).unwrap();
        let step = st.dispatch().expect("work").step;
        st.complete(step.id, &verify(&step), Duration::from_millis(10));
    }
    phase.step_ended(ended);
    assert_eq!(
        phase.hold(&mut st, ended),
        None,
        "skipped while nothing comes back"
    );
    // Follow-ups that come at once, though not waited for, bring the waits back.
    for _ in 0..8 {
        st.observe_turnaround(1, 0.0);
        st.submit(1, &[41], turn(1)).unwrap();
        let step = st.dispatch().expect("work").step;
        st.complete(step.id, &verify(&step), Duration::from_millis(10));
    }
    assert!(st.awaits_turnaround());
}
