//! Restarts and closes: a verifier restart replays every history, a sequence closed during its step
//! is ignored, a proposer restart forgets every draft.

use std::time::Duration;

use super::*;

// ---------------------------------------------------------------------------------------------
// Verifier restart
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
    let Dispatch { step: lost, orders } = sim.st.dispatch().unwrap();
    assert!(lost.works.iter().any(|w| !w.draft.is_empty()));
    assert!(!orders.is_empty());
    sim.answer(orders);
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
        let Dispatch { step, orders } = sim.st.dispatch().unwrap();
        check_step(&sim.st, &step);
        sim.answer(orders);
        assert!(step.works.iter().all(|w| w.seq != 4), "no turn, no replay");
        // The lost step's outcome, arriving late, is ignored.
        let Completion {
            emissions: em,
            orders,
        } = sim
            .st
            .complete(lost.id, &verify(&lost), Duration::from_millis(10));
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
        let Completion {
            emissions: em,
            orders,
        } = sim
            .st
            .complete(step.id, &outcomes, Duration::from_millis(10));
        // A replay chunk emits nothing, except the last one, which emits one new token after its
        // accepted drafts (a one-token last chunk is a decode step and may carry a draft).
        for e in em.iter().filter(|e| replaying.contains_key(&e.seq)) {
            let n = if replaying[&e.seq] { e.accepted + 1 } else { 0 };
            assert_eq!(e.tokens.len(), n, "sequence {}: {:?}", e.seq, e.tokens);
        }
        sim.record(&em);
        sim.answer(orders);
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
    let step = sim.st.dispatch().unwrap().step;
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
    let step = sim.st.dispatch().unwrap().step;
    assert_eq!(step.works[0].draft.len(), 3);
    sim.st.verifier_restarted();
    let o = sim.st.fresh_orders();
    assert!(o.is_empty(), "a replaying sequence is not decoding");
    let mut chunks = 0;
    while sim.st.seq(1).unwrap().committed < len {
        let step = sim.st.dispatch().unwrap().step;
        check_step(&sim.st, &step);
        assert_eq!(step.works[0].fed.len(), 1);
        chunks += 1;
        let Completion {
            emissions: em,
            orders,
        } = sim
            .st
            .complete(step.id, &verify(&step), Duration::from_millis(10));
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
        let step = st.dispatch().unwrap().step;
        orders = st
            .complete(step.id, &verify(&step), Duration::from_millis(10))
            .orders;
    }
    let o = orders.pop().unwrap();
    assert_eq!(o.base_len, 4);
    st.on_drafts(vec![right_draft(&st, &o)]);
    st.verifier_restarted();
    let step = st.dispatch().unwrap().step;
    check_step(&st, &step);
    assert_eq!(step.works[0].fed, vec![10]);
    assert!(!step.works[0].sample);
    assert!(step.works[0].draft.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Close during a step, proposer restart
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
    let Dispatch { step, orders: pipe } = st.dispatch().unwrap();
    assert_eq!(pipe.len(), 2);
    assert!(st.close(1));
    assert!(!st.close(1));
    assert_eq!(st.seq_ids(), vec![2]);
    // A step id that is not in flight is ignored, and the step stays in flight.
    let Completion {
        emissions: em,
        orders,
    } = st.complete(step.id + 1, &verify(&step), Duration::from_millis(10));
    assert!(em.is_empty() && orders.is_empty());
    assert!(st.busy());
    // Drafts for the closed sequence are ignored.
    st.on_drafts(vec![reply(&pipe[0], vec![1, 2, 3])]);
    let em = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .emissions;
    assert_eq!(em.len(), 1);
    assert_eq!(em[0].seq, 2);
    assert_eq!(em[0].tokens, chain(20, 1));
    assert!(st.seq(1).is_none());
    assert!(!st.busy());
    assert_eq!(st.stats.emitted, 1);
    let step = st.dispatch().unwrap().step;
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
    let Dispatch { step, orders } = st.dispatch().unwrap();
    assert_eq!(work(&step, 1).draft.len(), 3);
    assert_eq!(orders.len(), 2);
    let orders = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .orders;
    assert!(orders.is_empty(), "both wait for their pipelined drafts");
    assert!(st.fresh_orders().is_empty());
    st.proposer_restarted();
    assert_eq!(st.stats.proposer_restarts, 1);
    let orders = st.orders_after_proposer_restart();
    assert_eq!(orders.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(orders.iter().all(|o| !o.pipelined && o.k == 3));
    // Until they are answered, the sequences decode plainly.
    let step = st.dispatch().unwrap().step;
    assert!(step.works.iter().all(|w| w.draft.is_empty()));
    let em = st
        .complete(step.id, &verify(&step), Duration::from_millis(10))
        .emissions;
    let e1 = em.iter().find(|e| e.seq == 1).unwrap();
    assert_eq!(e1.tokens, vec![chain(10, 5)[4]]);
    assert_eq!((e1.drafted, e1.accepted), (0, 0));
}
