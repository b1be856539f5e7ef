//! The shipped block drafter in the runtime: 16 concurrent sessions speculate with it (pipelined,
//! past their windows' capacity) and every greedy output is token-exact to the verifier decoding
//! alone; each session's reservation holds the drafter's context as well as the verifier's window.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use troupe::engine::{load_block_drafter, load_verifier, DeviceKind, ModelSource, Tokenizer};
use troupe::{GenerateParams, RuntimeBuilder, SchedulerConfig, SessionConfig, WindowSpec};

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

/// Prompts cut from the corpus the demo models learned from, at line starts.
fn corpus_prompts(n: usize) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/rust-docs.txt"),
    )
    .unwrap();
    let tok = Tokenizer::from_file(&shipped("verifier").join("tokenizer.json")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.len() > 40).collect();
    (0..n)
        .map(|i| {
            let line = lines[(i * 7919) % lines.len()];
            tok.encode(&line[..20 + i % 17]).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_sessions_drafting_with_the_block_drafter_are_lossless() {
    let (verifier, drafter) = (shipped("verifier"), shipped("block-drafter"));
    // A window the turns outgrow: the verifier's windows and the drafter's contexts both evict.
    let window = WindowSpec::new(4, 40).unwrap();
    let config = SchedulerConfig::default()
        .with_max_draft_len(4)
        .with_adaptive(false)
        .with_pipelined(true)
        // Wait for drafts however loaded the machine is, so speculation surely happens.
        .with_draft_wait(Some(Duration::from_secs(10)));
    let v = verifier.clone();
    let d = drafter.clone();
    let rt =
        RuntimeBuilder::new(move || load_verifier(&ModelSource::Dir(&v), DeviceKind::Cpu, None))
            .drafter(move || load_block_drafter(&d, DeviceKind::Cpu))
            .default_window(window)
            .scheduler(config)
            .build()
            .await
            .unwrap();
    let n = 16;
    let new_tokens = 48;
    let prompts = corpus_prompts(n);
    let mut sessions = Vec::new();
    for _ in 0..n {
        sessions.push(rt.spawn_session(SessionConfig::default()).await.unwrap());
    }
    // The reservation: the verifier's window and the drafter's context, exactly.
    let v = load_verifier(&ModelSource::Dir(&verifier), DeviceKind::Cpu, None).unwrap();
    let d = load_block_drafter(&drafter, DeviceKind::Cpu).unwrap();
    let bound = sessions[0].info().await.unwrap().kv_bytes_bound;
    assert!(d.kv_bytes(window) > 0);
    assert_eq!(bound, v.kv_bytes(window) + d.kv_bytes(window));

    let params = GenerateParams::greedy(new_tokens);
    let turns = sessions
        .iter()
        .zip(&prompts)
        .map(|(s, p)| s.generate(p.clone(), params.clone()).unwrap().collect());
    let outputs: Vec<_> = join_all(turns)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let stats = rt.stats().await.unwrap();
    for (i, ((tokens, turn), prompt)) in outputs.iter().zip(&prompts).enumerate() {
        let alone = common::run_alone(&verifier, prompt, new_tokens, window);
        assert_eq!(tokens, &alone, "session {i} differs from its run alone");
        assert_eq!(turn.tokens, new_tokens);
    }
    assert!(
        stats.drafted > 0 && stats.accepted > 0,
        "no speculation happened: {stats:?}"
    );
    // The trained drafter is right more often than not about its first draft.
    assert!(
        stats.accepted * 4 > stats.drafted,
        "the block drafter's drafts were mostly wrong: {stats:?}"
    );
    rt.shutdown().await.unwrap();
}
