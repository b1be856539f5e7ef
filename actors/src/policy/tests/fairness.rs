//! Fairness: round robin under the sequence cap and the token budget, and prompts that arrive while
//! decoders fill the step.

use super::*;

// ---------------------------------------------------------------------------------------------
// Fairness
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

/// Asserts that every sequence ran in every window of `ceil(n / per_step)` steps, and that all got
/// the same share.
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
