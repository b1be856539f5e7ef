//! Batching: sessions of different lengths in one forward compute exactly what each computes alone.

mod common;

use common::reference::Reference;
use common::*;
use troupe_engine::engine::{logits_to_host, StepItem};
use troupe_engine::{
    generate, DraftRequest, Drafter, Engine, GenerateOptions, NgramDrafter, SamplingParams,
    Verifier, WindowSpec,
};

/// Batched and single-sequence steps differ only in how the backend orders sums.
const TOL: f32 = 1e-4;

fn big_window() -> WindowSpec {
    WindowSpec::new(4, 256).unwrap()
}

#[test]
fn batched_step_logits_match_each_session_alone() {
    let ck = Checkpoint::write(&qwen3_config(), 21, Format::F32);
    let model = ck.load();
    let prompts: Vec<Vec<u32>> = [1usize, 6, 13]
        .iter()
        .enumerate()
        .map(|(i, &n)| random_tokens(100 + i as u64, n, 256))
        .collect();

    // Each session alone, in its own engine.
    let mut alone: Vec<Engine<B>> = prompts.iter().map(|_| Engine::new(model.clone())).collect();
    let alone_rows: Vec<Vec<Vec<f32>>> = alone
        .iter_mut()
        .zip(&prompts)
        .map(|(e, p)| {
            e.open(7, big_window(), 0).unwrap();
            step_all(e, 7, p)
        })
        .collect();

    // All sessions in one step.
    let mut engine = Engine::new(model.clone());
    for s in 0..prompts.len() as u64 {
        engine.open(s + 1, big_window(), 0).unwrap();
    }
    let items: Vec<StepItem> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| StepItem {
            seq: i as u64 + 1,
            tokens: p.clone(),
            logit_rows: p.len(),
        })
        .collect();
    let out = engine.step(&items).unwrap();
    assert_eq!(out.row_offsets, vec![0, 1, 7]);
    let rows = logits_to_host(out.logits.unwrap()).unwrap();
    assert_eq!(rows.len(), 20);
    for (i, p) in prompts.iter().enumerate() {
        let off = out.row_offsets[i];
        let got = &rows[off..off + p.len()];
        assert_rows_close(
            &format!("session {i} batched vs alone"),
            got,
            &alone_rows[i],
            TOL,
        );
        let want = Reference::new(&ck.weights).forward(p);
        assert_rows_close(
            &format!("session {i} batched vs reference"),
            got,
            &want,
            1e-3,
        );
        engine.resolve(i as u64 + 1, p.len()).unwrap();
    }

    // A second, ragged step: a new session joins, and sessions ask for different numbers of rows.
    let more: Vec<Vec<u32>> = [3usize, 1, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| random_tokens(200 + i as u64, n, 256))
        .collect();
    let newcomer = random_tokens(300, 5, 256);
    engine.open(4, big_window(), 0).unwrap();
    let want_rows = [1usize, 1, 0];
    let mut items: Vec<StepItem> = more
        .iter()
        .enumerate()
        .map(|(i, t)| StepItem {
            seq: i as u64 + 1,
            tokens: t.clone(),
            logit_rows: want_rows[i],
        })
        .collect();
    items.push(StepItem {
        seq: 4,
        tokens: newcomer.clone(),
        logit_rows: newcomer.len(),
    });
    let out = engine.step(&items).unwrap();
    assert_eq!(out.row_offsets, vec![0, 1, 2, 2]);
    let rows = logits_to_host(out.logits.unwrap()).unwrap();
    // One row each for the first two, none for the third, five for the newcomer.
    assert_eq!(rows.len(), [1, 1, 0, 5].iter().sum::<usize>());
    for (i, t) in more.iter().enumerate() {
        let expect = step_rows(&mut alone[i], 7, t, want_rows[i].max(1));
        if want_rows[i] > 0 {
            let off = out.row_offsets[i];
            assert_rows_close(
                &format!("session {i}, second step"),
                &rows[off..off + 1],
                &expect,
                TOL,
            );
        }
        let full: Vec<u32> = prompts[i].iter().chain(t).copied().collect();
        let reference = Reference::new(&ck.weights).forward(&full);
        assert_rows_close(
            &format!("session {i}, second step alone vs reference"),
            &expect,
            &reference[full.len() - 1..],
            1e-3,
        );
    }
    let mut fresh = Engine::new(model);
    fresh.open(1, big_window(), 0).unwrap();
    assert_rows_close(
        "newcomer",
        &rows[2..],
        &step_all(&mut fresh, 1, &newcomer),
        TOL,
    );
}

#[test]
fn batched_decoding_matches_each_session_generated_alone() {
    // Untied heads: with a tied head a random model mostly repeats its last token, which would make
    // token-exact agreement a weak check.
    let qwen3_untied = troupe_engine::ModelConfig {
        tie_word_embeddings: false,
        ..qwen3_config()
    };
    for (config, seed) in [(llama_config(), 22), (qwen3_untied, 23)] {
        batched_decoding_case(&config, seed);
    }
}

fn batched_decoding_case(config: &troupe_engine::ModelConfig, seed: u64) {
    let ck = Checkpoint::write(config, seed, Format::F32);
    let model = ck.load();
    // Different prompt lengths, a small window (eviction during decoding), staggered starts so that
    // prefills and decodes share steps, greedy and sampled sessions side by side, and some sessions
    // verifying n-gram drafts in the same batch.
    let window = WindowSpec::new(2, 16).unwrap();
    let max_new = 24;
    let greedy = SamplingParams::greedy();
    let sampled = |temperature: f32, top_p: f32| SamplingParams { temperature, top_p };
    // (prompt, draft_len, params, seed)
    let sessions: Vec<(Vec<u32>, usize, SamplingParams, u64)> = vec![
        (random_tokens(1, 3, 256), 0, greedy, 0),
        (random_tokens(2, 9, 256), 0, sampled(0.9, 1.0), 5),
        ([10u32, 20, 30, 40].repeat(4), 3, greedy, 0),
        (vec![77], 2, greedy, 0),
        ([5u32, 6, 7].repeat(4), 3, sampled(0.7, 0.9), 6),
    ];

    // Each session alone, through `generate`, with the prompt prefilled in chunks of 4.
    let alone: Vec<Vec<u32>> = sessions
        .iter()
        .map(|(p, k, params, seed)| {
            let mut e = Engine::new(model.clone());
            let mut ngram = NgramDrafter::default();
            let opts = GenerateOptions {
                max_new_tokens: max_new,
                draft_len: *k,
                params: *params,
                seed: *seed,
                window,
                prefill_chunk: 4,
                ..Default::default()
            };
            let drafter: Option<&mut dyn Drafter> = if *k > 0 { Some(&mut ngram) } else { None };
            generate(&mut e, drafter, p, &opts).unwrap().tokens
        })
        .collect();

    let mut engine = Engine::new(model);
    let mut ngram = NgramDrafter::default();
    let n = sessions.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut started = vec![false; n];
    let mut closed = vec![false; n];
    let mut widest = 0;
    let mut drafted = 0;
    for step in 0.. {
        assert!(step < 200, "batched loop does not finish");
        let mut works = Vec::new();
        for i in 0..n {
            let seq = i as u64 + 10;
            let (prompt, draft_len, params, seed) = &sessions[i];
            if !started[i] {
                if step >= i {
                    engine.open(seq, window, *seed).unwrap();
                    ngram.open(seq, window, *seed).unwrap();
                    works.push(work(seq, prompt.clone(), vec![], None, true, *params));
                    started[i] = true;
                }
                continue;
            }
            if out[i].len() >= max_new {
                if !closed[i] {
                    engine.close(seq).unwrap();
                    ngram.close(seq);
                    closed[i] = true;
                }
                continue;
            }
            let remaining = max_new - out[i].len();
            let k = (*draft_len).min(remaining - 1);
            let draft = if k > 0 {
                let req = DraftRequest {
                    seq,
                    assumed: vec![],
                    k,
                    params: *params,
                };
                ngram.draft(&[req]).unwrap().pop().unwrap().tokens
            } else {
                vec![]
            };
            drafted += draft.len();
            works.push(work(
                seq,
                vec![*out[i].last().unwrap()],
                draft,
                None,
                true,
                *params,
            ));
        }
        if works.is_empty() {
            break;
        }
        widest = widest.max(works.len());
        let outcomes = engine.verify(&works).unwrap();
        assert_eq!(outcomes.len(), works.len());
        for (w, o) in works.iter().zip(outcomes) {
            assert_eq!(w.seq, o.seq);
            let i = (o.seq - 10) as usize;
            if out[i].is_empty() {
                ngram.observe(o.seq, &sessions[i].0).unwrap();
            }
            assert_eq!(o.tokens.len(), o.accepted + 1);
            let mut emitted = o.tokens;
            emitted.truncate(max_new - out[i].len());
            ngram.observe(o.seq, &emitted).unwrap();
            out[i].extend(emitted);
        }
    }
    assert!(widest >= 3, "steps never batched several sessions");
    assert!(drafted > 0, "no drafts were verified in the batch");
    for i in 0..n {
        let distinct: std::collections::BTreeSet<u32> = alone[i].iter().copied().collect();
        assert!(
            distinct.len() > 3,
            "session {i}: degenerate continuation {:?}",
            alone[i]
        );
        assert_eq!(
            out[i], alone[i],
            "session {i}: batched tokens differ from generating alone"
        );
    }
}

/// Hidden states that a verify step reports for the committed positions are the residual stream
/// after the asked-for layers, in the asked-for order, for each session of a batch.
#[test]
fn captured_hidden_states_match_the_reference() {
    let ck = Checkpoint::write(&qwen3_config(), 24, Format::F32);
    let mut engine = Engine::new(ck.load());
    engine.set_hidden_layers(vec![1, 0]);
    let reference = Reference::new(&ck.weights);
    let p1 = random_tokens(301, 5, 256);
    let p2 = random_tokens(302, 3, 256);
    // Session 2 verifies two drafts of which the first is right and the second (almost surely) not.
    let right = argmax(reference.forward(&p2).last().unwrap());
    let wrong = (right + 1) % 256;
    engine.open(1, big_window(), 0).unwrap();
    engine.open(2, big_window(), 0).unwrap();
    let greedy = SamplingParams::greedy();
    let outcomes = engine
        .verify(&[
            greedy_work(1, p1.clone()),
            work(2, p2.clone(), vec![right, wrong], None, true, greedy),
        ])
        .unwrap();
    let mut histories = [p1, p2];
    histories[1].extend_from_slice(&[right, wrong][..outcomes[1].accepted]);
    assert!(outcomes[1].accepted >= 1);
    for step in 0..2 {
        let outcomes = if step == 0 {
            outcomes.clone()
        } else {
            let works: Vec<_> = histories
                .iter()
                .enumerate()
                .map(|(i, _)| greedy_work(i as u64 + 1, random_tokens(400 + i as u64, 1, 256)))
                .collect();
            let o = engine.verify(&works).unwrap();
            for (h, w) in histories.iter_mut().zip(&works) {
                h.extend_from_slice(&w.fed);
            }
            o
        };
        for (i, o) in outcomes.iter().enumerate() {
            let h = &histories[i];
            let (_, hidden) = reference.forward_with_hidden(h);
            assert_eq!(o.hidden.len(), 2, "one entry per captured layer");
            let committed = if step == 0 { h.len() } else { 1 };
            for (slot, layer) in [1usize, 0].into_iter().enumerate() {
                assert_eq!(
                    o.hidden[slot].len(),
                    committed,
                    "session {i}, step {step}: rows of layer {layer}"
                );
                let want = &hidden[layer][h.len() - committed..];
                assert_rows_close(
                    &format!("session {i}, step {step}, layer {layer}"),
                    &o.hidden[slot],
                    want,
                    1e-3,
                );
            }
        }
    }
}
