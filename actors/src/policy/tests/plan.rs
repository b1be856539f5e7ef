//! Planning a step: the token budget and the sequence cap, and chunked prefill.

use std::time::Duration;

use super::*;

// ---------------------------------------------------------------------------------------------
// Token budget and sequence cap
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
    let step = st.dispatch().unwrap().step;
    check_step(&st, &step);
    assert_eq!(seqs_of(&step), vec![1, 2, 3]);
    let drafts: Vec<usize> = step.works.iter().map(|w| w.draft.len()).collect();
    assert_eq!(drafts, vec![6, 1, 0]);
    assert_eq!(step.tokens, 10);
    // Nothing else is planned while the step is in flight.
    assert!(st.busy());
    assert!(st.dispatch().is_none());
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
        let step = st.dispatch().unwrap().step;
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
        st.complete(step.id, &verify(&step), Duration::from_millis(10));
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
    let step = st.dispatch().unwrap().step;
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
// Chunked prefill
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
    let step = st.dispatch().unwrap().step;
    check_step(&st, &step);
    let decoders = step.works.iter().filter(|w| w.seq != 21).count();
    assert_eq!(decoders, 12);
    assert_eq!(work(&step, 21).fed.len(), 4);
    assert!(!work(&step, 21).sample);
    assert_eq!(step.tokens, 16);
}
