//! Bounded KV windows (StreamingLLM): constant memory, in-cache positions, and rollback of rejected
//! drafts.
//!
//! With one layer, a window's logits equal a fresh full-attention run over the retained tokens (the
//! sinks plus the latest `window` tokens): layer-0 keys and values depend on their own token only. With
//! more layers they do not (a kept token's deeper keys were computed while it still saw tokens that are
//! evicted now), so multi-layer models are checked against the reference forward run with streaming
//! visibility instead, which is the exact StreamingLLM computation.

mod common;

use common::reference::Reference;
use common::*;
use troupe_engine::engine::{logits_to_host, StepItem};
use troupe_engine::{Engine, ModelConfig, SamplingParams, Verifier, WindowSpec};

const TOL: f32 = 1e-4;
const SINK: usize = 2;
const WINDOW: usize = 8;
const STREAM: usize = 40;

fn spec() -> WindowSpec {
    WindowSpec::new(SINK, WINDOW).unwrap()
}

fn one_layer() -> ModelConfig {
    ModelConfig {
        num_layers: 1,
        ..qwen3_config()
    }
}

/// The tokens a (sink, window) cache holds after seeing `prefix`.
fn retained(prefix: &[u32]) -> Vec<u32> {
    let n = prefix.len();
    let sinks = SINK.min(n);
    let start = n.saturating_sub(WINDOW).max(sinks);
    prefix[..sinks]
        .iter()
        .chain(&prefix[start..])
        .copied()
        .collect()
}

/// Last-position logits of a fresh sequence (window large enough to hold everything) fed `tokens`.
fn fresh_last_row(engine: &mut Engine<B>, seq: u64, tokens: &[u32]) -> Vec<f32> {
    engine
        .open(seq, WindowSpec::new(4, 256).unwrap(), 0)
        .unwrap();
    let row = step_rows(engine, seq, tokens, 1).pop().unwrap();
    engine.close(seq).unwrap();
    row
}

/// Feeds `stream` to a (2, 8) window in chunks of `chunk`, checking every row against a fresh run over
/// the tokens retained at that row and the window's size and fill after every step.
fn check_against_fresh(chunk: usize) {
    let ck = Checkpoint::write(&one_layer(), 31, Format::F32);
    let model = ck.load();
    let stream = random_tokens(5, STREAM, 256);
    let mut engine = Engine::new(model.clone());
    let mut fresh = Engine::new(model);
    engine.open(1, spec(), 0).unwrap();
    let bytes = engine.window(1).unwrap().bytes();
    // Keys and values × 1 layer × 2 KV heads × 16 wide × slots × 4 bytes.
    let (layers, kv_heads) = (1, 2);
    assert_eq!(
        bytes,
        (2 * layers * kv_heads * 16 * (SINK + WINDOW) * 4) as u64
    );
    let mut fresh_seq = 100;
    let mut start = 0;
    while start < STREAM {
        let end = (start + chunk).min(STREAM);
        let rows = step_all(&mut engine, 1, &stream[start..end]);
        let w = engine.window(1).unwrap();
        assert_eq!(w.bytes(), bytes, "window bytes changed");
        assert_eq!(
            w.len(),
            end.min(SINK + WINDOW),
            "window fill after {end} tokens"
        );
        assert_eq!(w.seen(), end as u64);
        for (r, row) in rows.iter().enumerate() {
            let p = start + r;
            fresh_seq += 1;
            let want = fresh_last_row(&mut fresh, fresh_seq, &retained(&stream[..=p]));
            let d = max_abs_diff(row, &want);
            assert!(
                d <= TOL,
                "chunk {chunk}: position {p} differs from the retained-token recomputation by {d}"
            );
        }
        start = end;
    }
    // The check can fail: without eviction the last logits are clearly different.
    let mut full = Engine::new(ck.load());
    let no_eviction = fresh_last_row(&mut full, 1, &stream);
    let mut again = Engine::new(ck.load());
    again.open(1, spec(), 0).unwrap();
    let last = step_all(&mut again, 1, &stream).pop().unwrap();
    assert!(
        max_abs_diff(&last, &no_eviction) > 10.0 * TOL,
        "eviction does not change the logits"
    );
}

#[test]
fn one_token_at_a_time_matches_recomputing_the_retained_tokens() {
    check_against_fresh(1);
}

#[test]
fn chunks_of_three_match_recomputing_the_retained_tokens() {
    check_against_fresh(3);
}

#[test]
fn a_prefill_longer_than_the_window_matches_recomputing_the_retained_tokens() {
    check_against_fresh(25);
}

/// Multi-layer models, fed in several chunkings and with several window shapes (no sinks, a
/// one-token window), against the reference's streaming forward.
#[test]
fn multi_layer_windows_match_the_streaming_reference() {
    for (config, seed) in [(qwen3_config(), 32), (llama_config(), 33)] {
        let ck = Checkpoint::write(&config, seed, Format::F32);
        let model = ck.load();
        let stream = random_tokens(6, STREAM, 256);
        let reference = Reference::new(&ck.weights);
        let full = reference.forward(&stream);
        for (sink, window) in [(SINK, WINDOW), (0, 8), (4, 1), (1, 3)] {
            let spec = WindowSpec::new(sink, window).unwrap();
            let cap = sink + window;
            let want = reference.forward_streaming(&stream, sink, window);
            // The check can fail: full attention differs once tokens are evicted.
            assert!(max_rows_diff(&want[cap..], &full[cap..]) > 10.0 * TOL);
            assert_rows_close("within the window", &want[..cap], &full[..cap], 1e-5);
            let chunkings: [&[usize]; 4] = [
                &[1; STREAM],
                &[3; 14],
                &[20, 1, 1, 1, 1, 16],
                &[7, 11, 5, 17],
            ];
            for sizes in chunkings {
                let mut engine = Engine::new(model.clone());
                engine.open(1, spec, 0).unwrap();
                let mut got = Vec::new();
                let mut start = 0;
                for &n in sizes {
                    let end = (start + n).min(STREAM);
                    if start == end {
                        break;
                    }
                    got.extend(step_all(&mut engine, 1, &stream[start..end]));
                    assert_eq!(engine.window(1).unwrap().len(), end.min(cap));
                    start = end;
                }
                assert_eq!(got.len(), STREAM);
                let what = format!(
                    "{:?} window ({sink}, {window}) chunks {sizes:?}",
                    config.architecture
                );
                assert_rows_close(&what, &got, &want, 1e-3);
            }
        }
    }
}

/// More keys than the initial RoPE table covers (1024 positions): one long step in a window that holds
/// everything, and the default (4, 1020) window fed in prefill chunks of 256, whose steps see up to
/// 1024 held + 256 new keys.
#[test]
fn long_contexts_grow_the_rope_table() {
    let ck = Checkpoint::write(&one_layer(), 35, Format::F32);
    let n = 1100;
    let stream = random_tokens(9, n, 256);
    let reference = Reference::new(&ck.weights);

    let mut engine = Engine::new(ck.load());
    engine
        .open(1, WindowSpec::new(4, 2000).unwrap(), 0)
        .unwrap();
    let got = step_rows(&mut engine, 1, &stream, 8);
    let want = reference.forward(&stream);
    assert_rows_close("1100 tokens in one step", &got, &want[n - 8..], 1e-3);

    let spec = WindowSpec::default();
    let want = reference.forward_streaming(&stream, spec.sink, spec.window);
    let mut engine = Engine::new(ck.load());
    engine.open(1, spec, 0).unwrap();
    for chunk in (0..n).step_by(256) {
        let end = (chunk + 256).min(n);
        let got = step_rows(&mut engine, 1, &stream[chunk..end], 4);
        assert_rows_close(
            &format!("default window, chunk at {chunk}"),
            &got,
            &want[end - 4..end],
            1e-3,
        );
    }
    assert_eq!(engine.window(1).unwrap().len(), spec.capacity());
}

/// Drafts verified in a block, accepted or not, leave exactly the committed tokens behind: a sequence
/// that verifies drafts computes the same logits as one that was only ever fed the committed tokens.
#[test]
fn rejected_drafts_leave_no_trace() {
    let ck = Checkpoint::write(&llama_config(), 34, Format::F32);
    let model = ck.load();
    let stream = random_tokens(7, STREAM, 256);
    let junk = random_tokens(8, 3 * STREAM, 256);
    let greedy = SamplingParams::greedy();
    let mut a = Engine::new(model.clone()); // verifies drafts
    let mut b = Engine::new(model); // only ever sees committed tokens
    a.open(1, spec(), 0).unwrap();
    b.open(1, spec(), 0).unwrap();
    let (mut accepted_total, mut rejected_total) = (0, 0);
    for (t, &s) in stream.iter().enumerate() {
        let drafts = junk[3 * t..3 * t + 3].to_vec();
        match t % 3 {
            0 => {
                // Through Verifier::verify; every other time the first draft is the right guess.
                let b_row = step_rows(&mut b, 1, &[s], 1).pop().unwrap();
                let mut draft = drafts;
                if t % 2 == 0 {
                    draft[0] = argmax(&b_row);
                }
                let o = a
                    .verify(&[work(1, vec![s], draft.clone(), None, true, greedy)])
                    .unwrap()
                    .pop()
                    .unwrap();
                assert_eq!(o.tokens.len(), o.accepted + 1);
                assert_eq!(
                    o.tokens[0],
                    argmax(&b_row),
                    "position {t}: first emitted token"
                );
                // Feed b the accepted drafts; each emitted token is b's argmax there.
                for (i, &d) in draft[..o.accepted].iter().enumerate() {
                    let row = step_rows(&mut b, 1, &[d], 1).pop().unwrap();
                    assert_eq!(
                        o.tokens[i + 1],
                        argmax(&row),
                        "position {t}: emitted token {}",
                        i + 1
                    );
                }
                accepted_total += o.accepted;
                rejected_total += draft.len() - o.accepted;
            }
            1 => {
                // Through Engine::step with a scratch block, then keep only the fed token.
                let out = a
                    .step(&[StepItem {
                        seq: 1,
                        tokens: [vec![s], drafts].concat(),
                        logit_rows: 4,
                    }])
                    .unwrap();
                a.resolve(1, 1).unwrap();
                let rows = logits_to_host(out.logits.unwrap()).unwrap();
                let want = step_rows(&mut b, 1, &[s], 1);
                assert_rows_close(
                    &format!("position {t}, block row 0"),
                    &rows[..1],
                    &want,
                    TOL,
                );
                rejected_total += 3;
            }
            _ => {
                let got = step_rows(&mut a, 1, &[s], 1);
                let want = step_rows(&mut b, 1, &[s], 1);
                assert_rows_close(&format!("position {t}, after drafts"), &got, &want, TOL);
            }
        }
        assert_eq!(
            a.window_fill(1),
            b.window_fill(1),
            "position {t}: window fill"
        );
        assert_eq!(a.window(1).unwrap().scratch_len(), 0);
    }
    assert!(
        accepted_total > 0 && rejected_total > 0,
        "accepted {accepted_total}, rejected {rejected_total}"
    );
    assert_eq!(a.window(1).unwrap().len(), SINK + WINDOW);
}

#[test]
fn a_forked_window_is_an_exact_copy_that_then_keeps_to_itself() {
    let ck = Checkpoint::write(&qwen3_config(), 33, Format::F32);
    let mut engine = Engine::new(ck.load());
    let stream = random_tokens(9, 30, 256);
    // The source has evicted from its window (30 tokens through 2 + 8 slots) and shares a chunk
    // of its pool with another window, which the copy must leave alone.
    engine.open(1, spec(), 0).unwrap();
    engine.open(2, spec(), 0).unwrap();
    step_all(&mut engine, 1, &stream[..26]);
    step_all(&mut engine, 2, &stream[4..20]);
    engine.fork(1, 3, 5).unwrap();
    let (w1, w3) = (engine.window(1).unwrap(), engine.window(3).unwrap());
    assert_ne!(w1.slot(), w3.slot());
    assert_eq!((w3.seen(), w3.len()), (w1.seen(), w1.len()));
    // The same next tokens give the same logits, bit for bit, in the source and the fork.
    let next = &stream[26..28];
    let from_source = step_all(&mut engine, 1, next);
    let from_fork = step_all(&mut engine, 3, next);
    assert_eq!(
        from_fork, from_source,
        "the fork's window differs from its source's"
    );
    // Each then goes its own way: the fork's new tokens do not reach the source or its neighbour.
    step_all(&mut engine, 3, &[7, 8, 9]);
    let mut alone = Engine::new(ck.load());
    alone.open(1, spec(), 0).unwrap();
    alone.open(2, spec(), 0).unwrap();
    step_all(&mut alone, 1, &stream[..26]);
    step_all(&mut alone, 1, next);
    step_all(&mut alone, 2, &stream[4..20]);
    let tail = &stream[28..30];
    assert_eq!(
        step_all(&mut engine, 1, tail),
        step_all(&mut alone, 1, tail)
    );
    assert_eq!(
        step_all(&mut engine, 2, tail),
        step_all(&mut alone, 2, tail)
    );
    // The check can fail: a fresh window fed the same next tokens gives other logits.
    engine.open(4, spec(), 0).unwrap();
    let fresh = step_all(&mut engine, 4, next);
    assert!(max_abs_diff(&fresh[1], &from_source[1]) > 10.0 * TOL);
    // A fork of an unknown sequence, or onto an open one, is refused.
    assert!(engine.fork(99, 5, 0).is_err());
    assert!(engine.fork(1, 2, 0).is_err());
}
