//! Warm-up: it runs every step shape it promises and leaves the sequences already open as they were.

mod common;

use common::*;
use troupe_engine::{
    warm_up, Engine, SamplingParams, Verifier, WarmUp, WarmUpProgress, WindowSpec,
};

/// Decodes `steps` sampled tokens for `seq`, one verify step each.
fn decode(engine: &mut Engine<B>, seq: u64, first: u32, steps: usize) -> Vec<u32> {
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 1.0,
    };
    let mut last = first;
    (0..steps)
        .map(|_| {
            let out = engine
                .verify(&[work(seq, vec![last], vec![], None, true, params)])
                .unwrap();
            last = out[0].tokens[0];
            last
        })
        .collect()
}

#[test]
fn warm_up_runs_every_shape_and_leaves_open_sequences_alone() {
    let ck = Checkpoint::write(&qwen3_config(), 41, Format::F32);
    let window = WindowSpec::new(2, 12).unwrap();
    let prompt = random_tokens(4, 9, 256);
    // The same session twice: once with a warm-up in the middle of its decoding.
    let run = |warm: Option<&WarmUp>| {
        let mut engine = Engine::new(ck.load());
        engine.open(7, window, 99).unwrap();
        let first = engine
            .verify(&[work(
                7,
                prompt.clone(),
                vec![],
                None,
                true,
                SamplingParams::greedy(),
            )])
            .unwrap()[0]
            .tokens[0];
        let mut tokens = decode(&mut engine, 7, first, 4);
        let mut seen = Vec::new();
        if let Some(plan) = warm {
            let fill = engine.window_fill(7);
            warm_up(&mut engine, plan, &mut |p| seen.push(p)).unwrap();
            assert_eq!(
                engine.window_fill(7),
                fill,
                "the open session's window moved"
            );
            assert_eq!(
                engine.window_fill(u64::MAX),
                None,
                "a warm-up sequence stayed open"
            );
        }
        tokens.extend(decode(&mut engine, 7, *tokens.last().unwrap(), 6));
        (tokens, seen)
    };
    let plan = WarmUp::up_to(5, 3, 4);
    assert_eq!(plan.batches, vec![1, 2, 4, 5]);
    let (warmed, seen) = run(Some(&plan));
    let (cold, _) = run(None);
    assert_eq!(warmed, cold, "a warm-up changed the session's tokens");
    assert_eq!(seen.len(), plan.steps());
    assert_eq!(
        seen.last(),
        Some(&WarmUpProgress {
            done: 16,
            total: 16,
            batch: 5,
            what: "verify sampled"
        })
    );
    let batches: Vec<usize> = seen.iter().map(|p| p.batch).collect();
    assert_eq!(batches, [1, 2, 4, 5].map(|b| [b; 4]).concat());
}
